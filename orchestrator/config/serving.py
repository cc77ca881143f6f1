"""The image server's config (``rayalign serve``, or ``jobs.serve:app`` in a Ray Serve config)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from orchestrator.config.schema import FieldError, Section
from orchestrator.config.training import Device


class ServeLimitsConfig(Section):
    """What one image request may ask for; a request outside these limits gets HTTP 400
    naming the field, never a 500."""

    max_prompt_chars: int = Field(1000, ge=1)
    """Longest accepted prompt, in characters; >= 1. The text encoder still reads only
    its first ``tokenizer.model_max_length`` tokens, as every Stable Diffusion pipeline does."""

    max_n: int = Field(4, ge=1)
    """Most images one request may ask for (the OpenAI ``n``); >= 1. A request's images
    are generated together, in the same batch and with the same weights."""

    default_steps: int | None = None
    """DDIM steps when a request gives no ``num_inference_steps``; in [1, max_steps].
    null = the steps the served adapter was trained with (its run's ``sampling.num_steps``),
    or 20 without an adapter or training record."""

    max_steps: int = Field(50, ge=1, le=1000)
    """Most DDIM steps a request may ask for; in [1, 1000]. Latency grows linearly with steps."""

    default_guidance_scale: float | None = None
    """Classifier-free guidance weight when a request gives no ``guidance_scale``; in
    [1, max_guidance_scale]. 1 turns guidance off. null = the guidance the served adapter
    was trained with (its run's ``sampling.guidance_scale``), or 4.5 without an adapter or
    training record."""

    max_guidance_scale: float = Field(20.0, ge=1.0)
    """Largest accepted ``guidance_scale``; >= 1 (the smallest is always 1, guidance off)."""

    max_body_bytes: int = Field(65536, ge=1024)
    """Largest accepted request body in bytes; >= 1024. Larger bodies get HTTP 413."""

    @model_validator(mode="after")
    def _defaults_within_limits(self) -> "ServeLimitsConfig":
        if self.default_steps is not None and not 1 <= self.default_steps <= self.max_steps:
            raise FieldError("default_steps", f"must be >= 1 and <= {self.max_steps}, got {self.default_steps} (must not exceed max_steps)")
        if self.default_guidance_scale is not None and not 1.0 <= self.default_guidance_scale <= self.max_guidance_scale:
            raise FieldError(
                "default_guidance_scale",
                f"must be >= 1.0 and <= {self.max_guidance_scale}, got {self.default_guidance_scale} (must lie in [1, max_guidance_scale])",
            )
        return self


class ServeBatchingConfig(Section):
    """Dynamic batching of concurrent requests on each replica (Ray Serve's ``@serve.batch``)."""

    max_batch_size: int = Field(16, ge=1)
    """Most images generated in one denoising batch; >= 1. A request asking for more
    than this many images runs alone, in several batches."""

    batch_wait_timeout_s: float = Field(0.3, ge=0)
    """Longest time the first request of a batch waits for others to join it; >= 0.
    With ``pad_to_max_batch_size`` a part-full batch costs as much as a full one, so
    waiting for stragglers is cheap under load; it only adds this much latency to a lone
    request. Measured on the toy model at 16 concurrent clients (2 busy cores): 0.05 s
    left batches half full (8.0 images on average) for 5.2 images/s, 0.3 s filled them
    (16.0) for 10.7 images/s."""

    pad_to_max_batch_size: bool = True
    """Run every batch at exactly ``max_batch_size`` images, filling the rest with
    throw-away samples. CPU and GPU math libraries pick kernels by batch size, which
    changes the last bits of an image with the number of images beside it; a fixed batch
    shape makes an image's PNG bytes a function of its prompt, seed and settings only.
    false: smaller batches run at their own size (lower latency at low load, but an
    image may differ in a few pixel values by one level depending on its batch)."""


class ServeScalingConfig(Section):
    """How many replicas serve, and what each reserves. Resources are Ray logical resources."""

    num_replicas: int = Field(1, ge=1)
    """Fixed number of replicas, each holding a copy of the model; >= 1. Ignored when
    ``autoscale`` is true."""

    autoscale: bool = False
    """Let Ray Serve add and remove replicas between ``min_replicas`` and ``max_replicas``
    to keep about ``target_ongoing_requests`` requests on each."""

    min_replicas: int = Field(1, ge=0)
    """Fewest replicas when autoscaling; >= 0 (0 scales to zero when idle: the first
    request then waits for a model to load)."""

    max_replicas: int = Field(2, ge=1)
    """Most replicas when autoscaling; >= max(1, min_replicas)."""

    target_ongoing_requests: float = Field(16.0, gt=0)
    """Requests per replica the autoscaler aims for; > 0. About one full batch keeps
    batches full without queueing much."""

    max_ongoing_requests: int = Field(64, ge=1)
    """Requests one replica accepts at once (more wait in Ray Serve's queue); >= 1 and at
    least batching.max_batch_size, or batches could never fill."""

    num_cpus_per_replica: float = Field(1.0, ge=0)
    """Logical CPUs each replica reserves; >= 0. Also sets its torch threads (at least 1)."""

    num_gpus_per_replica: float = Field(0.0, ge=0)
    """GPUs each replica reserves; >= 0 (fractions pack several replicas on one GPU)."""

    @model_validator(mode="after")
    def _replica_bounds(self) -> "ServeScalingConfig":
        if self.max_replicas < self.min_replicas:
            raise FieldError(
                "max_replicas", f"must be >= {max(1, self.min_replicas)}, got {self.max_replicas} (must be >= max(1, min_replicas))"
            )
        return self


class ServeConfig(Section):
    """The image server (``rayalign serve``, or ``jobs.serve:app`` in a Ray Serve config).

    The API key is not part of it: replicas read ``RAYALIGN_API_KEY`` from their
    environment, so it never appears in a config file or in Ray Serve's status.
    """

    model: str | None = None
    """Local diffusers pipeline directory (SD 1.x/2.x, SDXL or SD3); null = the
    embedded toy model."""

    lora: str | None = None
    """LoRA to serve at start: a training run directory (its latest complete
    checkpoint), a checkpoint directory or an adapter directory; null = the base model.
    A new one is hot-swapped through the deployment's user_config ``{lora: PATH}``."""

    model_name: str | None = None
    """Id of the base model in ``/v1/models`` and requests' ``model``; null = the model
    directory's name (``toy-t2i`` for the embedded model). The adapter is
    ``<model_name>+lora``."""

    device: Device = "auto"
    """Where replicas put the model: "auto" (cuda if available, else cpu), "cpu", "cuda"
    or "cuda:N"."""

    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Dtype of the weights; float32 on CPU."""

    eta: float | None = Field(
        None, gt=0, le=1, json_schema_extra={"why": "the sampler draws per-step noise with eta > 0; 1 is the training sampler"}
    )
    """Per-step noise of the sampler (DDIM eta; for SD3 the SDE noise level); in (0, 1].
    null = the eta the served adapter was trained with (its run's ``sampling.eta``), or 1.0
    without an adapter or training record, so served images follow the distribution whose
    reward training measured. Sampling is reproducible all the same: every sample's initial
    and per-step noise is drawn from its own seed."""

    limits: ServeLimitsConfig = Field(default_factory=ServeLimitsConfig)
    """What a request may ask for."""

    batching: ServeBatchingConfig = Field(default_factory=ServeBatchingConfig)
    """Dynamic batching on each replica."""

    scaling: ServeScalingConfig = Field(default_factory=ServeScalingConfig)
    """Replicas, autoscaling bounds and per-replica resources."""

    @model_validator(mode="after")
    def _consistent(self) -> "ServeConfig":
        for name in ("model", "lora", "model_name"):
            value = getattr(self, name)
            if value is not None and (not value.strip() or value != value.strip()):
                raise FieldError(name, f"must be null or a non-empty string without surrounding spaces, got {value!r}")
        if self.scaling.max_ongoing_requests < self.batching.max_batch_size:
            raise FieldError(
                "scaling.max_ongoing_requests",
                f"must be >= batching.max_batch_size ({self.batching.max_batch_size}), got {self.scaling.max_ongoing_requests}: "
                "a replica that accepts fewer requests than a batch holds never fills a batch",
            )
        return self
