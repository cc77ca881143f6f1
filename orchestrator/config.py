"""The config tree: typed, frozen dataclasses loaded from YAML and validated at load.

A run is described by one :class:`Config`. Each component receives its own section
(``cfg.sampling``, ``cfg.model``, ...), never the root. Typical use::

    cfg = load_config("run.yaml", overrides=["sampling.num_steps=10", "model.lora.rank=8"])

Validation happens in two places, and every error is a ``ValueError`` that names the
field by its full dotted path, the bad value and what is allowed:

- :func:`from_dict` checks keys and types (unknown keys get a "did you mean" hint);
- each section's ``__post_init__`` checks ranges with the ``_check_*`` helpers, and
  :func:`from_dict` adds the dotted path to those messages.

Adding a section (``train``, ``pools``, ...) is: write a frozen dataclass with a
docstring under every field and range checks in ``__post_init__``, then add one field
to :class:`Config`. Field types :func:`from_dict` understands: ``int``, ``float`` (an
int is accepted), ``bool``, ``str``, ``X | None`` (and other unions), ``Literal[...]``,
``tuple[T, ...]`` / ``tuple[A, B]``, nested dataclasses, ``dict[K, V]`` /
``Mapping[K, V]`` and ``Any``.

A section may accept a YAML shorthand by defining a classmethod ``coerce(value)`` that
returns the canonical plain data (see :meth:`RewardConfig.coerce`); :func:`from_dict`
calls it before anything else and still validates what it returns.

YAML is read with PyYAML's safe loader plus one fix: ``1e-4`` is a float (plain PyYAML
follows YAML 1.1 and reads it as the string ``"1e-4"``).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import math
import numbers
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

__all__ = [
    "Config",
    "LearnerConfig",
    "LoRAConfig",
    "ModelConfig",
    "PoolConfig",
    "PoolsConfig",
    "ReplayConfig",
    "RewardComponent",
    "RewardConfig",
    "SamplingConfig",
    "ServeBatchingConfig",
    "ServeConfig",
    "ServeLimitsConfig",
    "ServeScalingConfig",
    "SweepConfig",
    "SweepSchedulerConfig",
    "TrainConfig",
    "apply_overrides",
    "config_to_yaml",
    "dump_yaml",
    "from_dict",
    "load_config",
    "to_dict",
]

T = TypeVar("T")


# --------------------------------------------------------------------------- range checks


class _FieldError(ValueError):
    """A range error raised in ``__post_init__``; :func:`from_dict` prefixes the dotted path."""

    def __init__(self, field_name: str, detail: str) -> None:
        super().__init__(f"{field_name} {detail}")
        self.field_name = field_name
        self.detail = detail


def _bounds_text(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high}")
    return " and ".join(parts)


def _check_range(
    obj: Any,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    why: str = "",
) -> None:
    """Raise if ``obj.name`` is outside the interval; non-finite floats are always out."""
    value = getattr(obj, name)
    finite = not isinstance(value, float) or math.isfinite(value)
    # Finiteness first: NaN fails every comparison silently and inf passes one-sided bounds.
    inside = finite
    if low is not None:
        inside = inside and (value > low if low_open else value >= low)
    if high is not None:
        inside = inside and (value < high if high_open else value <= high)
    if not inside:
        bounds = _bounds_text(low, high, low_open, high_open)
        if not finite:
            bounds = f"finite and {bounds}" if bounds else "finite"
        suffix = f" ({why})" if why else ""
        raise _FieldError(name, f"must be {bounds}, got {value!r}{suffix}")


def _check_positive(obj: Any, name: str, *, why: str = "") -> None:
    """Raise unless ``obj.name > 0`` (and finite)."""
    _check_range(obj, name, low=0, low_open=True, why=why)


def _check_finite(obj: Any, name: str) -> None:
    """Raise unless ``obj.name`` is a finite number."""
    _check_range(obj, name)


def _check_non_empty(obj: Any, name: str, *, why: str = "") -> None:
    """Raise if ``obj.name`` is an empty string or collection."""
    value = getattr(obj, name)
    if len(value) == 0:
        suffix = f" ({why})" if why else ""
        raise _FieldError(name, f"must not be empty, got {value!r}{suffix}")


def _check_identifier_like(obj: Any, name: str) -> None:
    """Raise if the string ``obj.name`` is empty or has leading/trailing whitespace."""
    value = getattr(obj, name)
    if not value or value != value.strip():
        raise _FieldError(name, f"must be a non-empty string without surrounding spaces, got {value!r}")


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class LoRAConfig:
    """Low-rank adapters on the UNet (used when ``model.finetune == "lora"``)."""

    rank: int = 4
    """Rank r of each adapter (the inner dimension of B @ A); >= 1. Higher = more capacity."""

    alpha: float = 4.0
    """LoRA scaling numerator: the update is scaled by alpha / rank; > 0."""

    target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    """Names (suffixes, as peft matches them) of the UNet linear layers that get adapters;
    non-empty. The default covers the attention projections, as in DDPO."""

    dropout: float = 0.0
    """Dropout probability on the adapter input during training; in [0, 1)."""

    def __post_init__(self) -> None:
        _check_range(self, "rank", low=1)
        _check_positive(self, "alpha")
        _check_non_empty(self, "target_modules", why="list at least one UNet module name, e.g. [to_q, to_v]")
        for module in self.target_modules:
            if not module.strip():
                raise _FieldError("target_modules", f"must not contain empty names, got {self.target_modules!r}")
        _check_range(self, "dropout", low=0, high=1, high_open=True)


_DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


@dataclass(frozen=True)
class ModelConfig:
    """Which diffusion model to align, and which of its weights are trained."""

    path: str | None = None
    """Local diffusers pipeline directory: Stable Diffusion 1.x/2.x (unet/, vae/,
    text_encoder/, tokenizer/, scheduler/; epsilon or v-prediction) or SDXL base (also
    text_encoder_2/, tokenizer_2/). null = the embedded toy model. Nothing is downloaded:
    a hub id is not accepted at run time. A missing directory fails before any actor
    starts, naming the path."""

    finetune: Literal["lora", "full"] = "lora"
    """"lora": train only LoRA adapters on the UNet (see ``lora``); "full": train every
    UNet weight. The VAE and text encoder are always frozen."""

    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """Adapter settings; ignored when ``finetune`` is "full"."""

    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Dtype of the frozen weights and of the UNet's forward passes; one of float32,
    float16, bfloat16. Trainable weights (LoRA, or the whole UNet with finetune: full),
    optimizer state and all log-prob maths stay float32 whatever this is. float16 needs a
    CUDA device (an error on CPU); on CPU use float32, or bfloat16 where the CPU has it."""

    gradient_checkpointing: bool = False
    """Recompute the UNet's activations in the backward pass instead of keeping them:
    much less learner memory for about a third more learner compute. Needed for SDXL and
    for SD 1.5 micro-batches above ~8 on 24 GB GPUs (see docs/gpu-memory.md)."""

    device: str = "auto"
    """Where actors put the model: "auto" (cuda if available, else cpu), "cpu", "cuda"
    or "cuda:N" (GPU index N as seen by the actor)."""

    def __post_init__(self) -> None:
        if self.path is not None and not self.path.strip():
            raise _FieldError("path", f"must be a directory path or null (for the toy model), got {self.path!r}")
        if not _DEVICE_PATTERN.fullmatch(self.device):
            raise _FieldError(
                "device", f"must be one of 'auto', 'cpu', 'cuda', 'cuda:N' (N a GPU index), got {self.device!r}"
            )


@dataclass(frozen=True)
class SamplingConfig:
    """How rollouts are sampled: the DDIM sampler whose per-step log-probs the RL losses use."""

    num_steps: int = 20
    """Number of DDIM denoising steps per image, i.e. the length T of each trajectory;
    in [1, 1000]."""

    eta: float = 1.0
    """DDIM stochasticity: 0 = deterministic DDIM, 1 = DDPM-like noise. Must be in (0, 1]:
    at 0 the step has no noise, so log p(x_{t-1} | x_t) does not exist; above 1 the DDIM
    variance exceeds what the step can hold. DDPO uses 1.0."""

    guidance_scale: float = 4.5
    """Classifier-free guidance weight w in eps_uncond + w * (eps_cond - eps_uncond);
    1.0 turns guidance off (one UNet call per step instead of two); >= 1.0."""

    batch_size: int = 16
    """Images generated per sampling call on one rollout actor; >= 1."""

    log_prob_reduction: Literal["mean", "sum"] = "mean"
    """How the per-element Gaussian log-density of x_{t-1} is reduced over latent
    dimensions. "mean": averaged (the DDPO convention, so its clip ranges and KL
    coefficients transfer unchanged); "sum": the exact log-density."""

    merge_lora: bool = True
    """Rollout actors fold the LoRA adapter into the layers it sits on (again after every
    weight sync), so sampling skips the adapter's extra matmuls: about 1.6x faster
    sampling on the toy model with adapters on its attention and feed-forward layers.
    Recorded log-probs equal the unmerged model's to float32 rounding. Only float32
    models merge; with ``model.dtype`` float16/bfloat16 the adapter stays separate, since
    adding a small update to a half-precision weight would round it away."""

    def __post_init__(self) -> None:
        _check_range(self, "num_steps", low=1, high=1000)
        _check_range(
            self,
            "eta",
            low=0,
            high=1,
            low_open=True,
            why="per-step log-probs need eta > 0, since DDIM at eta = 0 is deterministic; "
            "eta > 1 would make the DDIM variance invalid; DDPO uses eta = 1.0",
        )
        _check_range(self, "guidance_scale", low=1.0, why="1.0 turns classifier-free guidance off")
        _check_range(self, "batch_size", low=1)


@dataclass(frozen=True)
class RewardComponent:
    """One reward function and its weight in the weighted sum."""

    name: str
    """A reward registered in the reward registry (e.g. "toy_fidelity",
    "jpeg_compressibility") or a user function as "package.module:function"."""

    weight: float = 1.0
    """Multiplier of this reward in the total; any finite number (negative = penalty)."""

    options: dict[str, Any] = field(default_factory=dict)
    """Settings of a reward that takes options (model rewards such as "aesthetic" or
    "imagereward", and "http"), e.g. ``{weights: /models/imagereward, device: cuda,
    batch_size: 16}``; empty for plain reward functions. Checked against the reward's own
    option dataclass (actors/reward_models.py, actors/reward_http.py) before any actor
    starts: an unknown option or a bad value is an error naming it."""

    @classmethod
    def coerce(cls, value: Any) -> Any:
        """Accept a bare name as shorthand for ``{name: <name>}`` (weight 1.0)."""
        if isinstance(value, str):
            return {"name": value}
        return value

    def __post_init__(self) -> None:
        _check_identifier_like(self, "name")
        _check_finite(self, "weight")
        if not isinstance(self.options, Mapping):
            raise _FieldError("options", f"must be a mapping of option name to value, got {self.options!r}")


@dataclass(frozen=True)
class RewardConfig:
    """The reward: a weighted sum of registered reward functions.

    Besides the canonical ``{components: [{name: ..., weight: ...}, ...]}``, YAML may use:

    - ``reward: toy_fidelity``  (one reward, weight 1.0);
    - ``reward: {toy_fidelity: 1.0, jpeg_compressibility: 0.1}``  (name -> weight);
    - ``reward: [toy_fidelity, {name: jpeg_compressibility, weight: 0.1}]``.

    A reward with options needs the canonical or list form, e.g. ``reward: [{name:
    aesthetic, options: {weights: /models/aesthetic-head}}]``. Names and options are
    checked against the reward registry before any actor starts (``rayalign train``'s
    pre-flight), not here.
    """

    components: tuple[RewardComponent, ...] = (RewardComponent("toy_fidelity"),)
    """The rewards to combine, each a name and a weight; non-empty, names unique."""

    @classmethod
    def coerce(cls, value: Any) -> Any:
        """Normalise the YAML shorthands above to ``{"components": [...]}``.

        A mapping that is empty or has a ``components`` key is taken as canonical, so a
        reward cannot be called "components".
        """
        if isinstance(value, str):
            return {"components": [{"name": value}]}
        if isinstance(value, (list, tuple)):
            return {"components": list(value)}
        if isinstance(value, Mapping) and value and "components" not in value:
            components = []
            for name, weight in value.items():
                if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
                    raise ValueError(
                        f"weight of reward {name!r} must be a number, got {weight!r}; write "
                        "`reward: {name: weight, ...}` or `reward: {components: [{name: ..., weight: ...}]}`"
                    )
                components.append({"name": name, "weight": weight})
            return {"components": components}
        return value

    def __post_init__(self) -> None:
        _check_non_empty(self, "components", why="name at least one reward, e.g. `reward: toy_fidelity`")
        names = [component.name for component in self.components]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise _FieldError(
                "components", f"must name each reward once, got {duplicates} more than once (merge their weights)"
            )


@dataclass(frozen=True)
class PoolConfig:
    """Size and per-actor resources of one actor pool. Resources are Ray *logical*
    resources: fractions let several pools share a small machine."""

    num_actors: int = 1
    """Number of actors in the pool; >= 1 (the reference pool may be 0 when the algorithm
    has no KL term; with >= 1 the KL to the reference is logged as a diagnostic)."""

    num_cpus: float = 0.5
    """Logical CPUs reserved per actor; >= 0 (fractions allowed)."""

    num_gpus: float = 0.0
    """GPUs reserved per actor; >= 0 (fractions allowed, e.g. 0.5 to pack two actors on a GPU)."""

    def __post_init__(self) -> None:
        _check_range(self, "num_actors", low=0, why="0 is allowed only for the reference pool")
        _check_range(self, "num_cpus", low=0)
        _check_range(self, "num_gpus", low=0)


def _pool(num_cpus: float) -> Any:
    return field(default_factory=lambda: PoolConfig(num_cpus=num_cpus))


@dataclass(frozen=True)
class PoolsConfig:
    """The actor pools around the learners."""

    rollout: PoolConfig = _pool(1.0)
    """Policy copies that sample trajectories (receive new weights after every update)."""

    reward: PoolConfig = _pool(0.5)
    """Reward actors that score decoded images."""

    reference: PoolConfig = _pool(0.5)
    """Frozen copies of the initial policy that compute reference means for the KL term
    (only used by algorithms with a KL term, e.g. dpok)."""


@dataclass(frozen=True)
class LearnerConfig:
    """The learner group: Ray Train workers running DeepSpeed."""

    num_workers: int = 1
    """Ray Train workers (data-parallel ranks); >= 1."""

    num_cpus_per_worker: float = 1.0
    """Logical CPUs per worker; >= 0."""

    num_gpus_per_worker: float = 0.0
    """GPUs per worker; 0 trains on CPU (gloo), >= 1 on GPU (nccl)."""

    zero_stage: int = 2
    """DeepSpeed ZeRO stage: 0 (plain data parallel), 1 (optimizer state sharded),
    2 (+ gradients), 3 (+ parameters)."""

    micro_batch_size: int = 4
    """Trajectories per forward/backward pass on one worker; >= 1."""

    gradient_accumulation_steps: int = 1
    """Micro-batches per worker whose gradients add up to one optimizer step (before the
    accumulation over each trajectory's passes, see ``timesteps_per_pass``, on top); >= 1."""

    timesteps_per_pass: int = 1
    """Denoising steps of each trajectory stacked into one forward/backward pass; >= 1,
    or 0 for all of its trained steps in one pass (whatever their number).
    1 keeps activation memory at one UNet pass of ``micro_batch_size`` rows (what large
    models need); N runs ``micro_batch_size * N`` transitions per pass and cuts the number
    of passes N-fold, which pays on small models and CPUs where per-pass overhead
    dominates. The optimizer step is the same either way. Must divide the trained steps
    per trajectory, round(sampling.num_steps * train.timestep_fraction)."""

    learning_rate: float = 3e-4
    """AdamW learning rate (DDPO uses 3e-4 for LoRA); > 0. The peak rate when
    ``lr_schedule`` is not "constant"."""

    lr_schedule: Literal["constant", "cosine"] = "constant"
    """How the learning rate moves over the run: "constant", or "cosine" (half a cosine
    from ``learning_rate`` at the first epoch down to ``learning_rate * lr_final_fraction``
    at the last of ``train.epochs``). Set per epoch from the epoch number, so a resumed run
    uses the rate an uninterrupted one would."""

    lr_final_fraction: float = 0.1
    """With ``lr_schedule: cosine``, the last epoch's rate as a fraction of
    ``learning_rate``; in [0, 1]."""

    weight_decay: float = 1e-4
    """AdamW weight decay; >= 0."""

    adam_beta1: float = 0.9
    """AdamW beta1; in [0, 1)."""

    adam_beta2: float = 0.999
    """AdamW beta2; in [0, 1)."""

    adam_epsilon: float = 1e-8
    """AdamW epsilon; > 0."""

    max_grad_norm: float = 1.0
    """Gradient clipping by global norm; > 0."""

    def __post_init__(self) -> None:
        _check_range(self, "num_workers", low=1)
        _check_range(self, "num_cpus_per_worker", low=0)
        _check_range(self, "num_gpus_per_worker", low=0)
        _check_range(self, "zero_stage", low=0, high=3)
        _check_range(self, "micro_batch_size", low=1)
        _check_range(self, "gradient_accumulation_steps", low=1)
        _check_range(self, "timesteps_per_pass", low=0)
        _check_positive(self, "learning_rate")
        _check_range(self, "lr_final_fraction", low=0, high=1)
        _check_range(self, "weight_decay", low=0)
        _check_range(self, "adam_beta1", low=0, high=1, high_open=True)
        _check_range(self, "adam_beta2", low=0, high=1, high_open=True)
        _check_positive(self, "adam_epsilon")
        _check_positive(self, "max_grad_norm")


@dataclass(frozen=True)
class TrainConfig:
    """The RL loop: what is sampled each epoch and how it is learned from."""

    algorithm: Literal["ddpo_sf", "ddpo_is", "dpok"] = "ddpo_is"
    """Policy-gradient estimator: "ddpo_sf" (REINFORCE), "ddpo_is" (PPO-clipped
    importance ratio), "dpok" (ddpo_is plus beta * per-step KL to the frozen reference)."""

    mode: Literal["sync", "async"] = "sync"
    """"sync": sample epoch k with the weights of version k-1, then learn (exactly
    on-policy). "async": the rollouts of epoch k+1 run with the weights of version k-1
    while the learners train on epoch k, so every pool stays busy; the learner corrects
    the one-version lag with truncated importance weights (see the ``replay`` section)."""

    epochs: int = 10
    """Sample -> score -> learn -> sync rounds; >= 1."""

    prompts: str = "toy-train"
    """Training prompts: a built-in set (toy-train, toy-heldout, toy-all) or a text file
    with one prompt per line."""

    samples_per_epoch: int = 32
    """Trajectories sampled per epoch across the rollout pool; must be divisible by
    learner.num_workers * learner.micro_batch_size."""

    samples_per_prompt: int = 1
    """Images sampled per chosen prompt each epoch (a "group", as in GRPO / Flow-GRPO);
    must divide samples_per_epoch. With groups, advantages can be normalised within each
    prompt's group from the very first epoch."""

    inner_epochs: int = 1
    """Passes over each epoch's samples (more than 1 reuses samples off-policy, corrected
    by the importance ratio); >= 1."""

    timestep_fraction: float = 1.0
    """Fraction of each trajectory's denoising steps trained on (DDPO); in (0, 1]."""

    timestep_selection: Literal["random", "earliest"] = "random"
    """Which steps ``timestep_fraction`` picks: "random" (a fresh random subset per
    trajectory, DDPO) or "earliest" (the first, highest-noise steps, where layout,
    shape and colour are decided; the later steps' log-prob gradients scale with 1/σ_t
    and, when they decide little, mostly add noise)."""

    clip_range: float = 1e-4
    """PPO clip range of the importance ratio (ddpo_is, dpok); DDPO uses 1e-4; > 0."""

    beta: float = 0.01
    """Weight of the per-step KL to the reference policy (dpok); >= 0."""

    advantage: Literal["per_prompt", "group", "batch"] = "per_prompt"
    """Reward normalisation: "per_prompt" (running statistics per prompt across epochs,
    DDPO), "group" (within each prompt's group of samples_per_prompt images this epoch,
    GRPO-style) or "batch" (whole-epoch statistics)."""

    stat_buffer_size: int = 32
    """Rewards remembered per prompt for per-prompt normalisation; >= 1."""

    stat_min_count: int = 16
    """Below this many rewards for a prompt, batch statistics are used instead; >= 1."""

    adv_clip_max: float = 5.0
    """Advantages are clipped to [-adv_clip_max, adv_clip_max]; > 0."""

    checkpoint_every: int = 1
    """Write a checkpoint every this many epochs (and after the last); >= 1."""

    keep_checkpoints: int = 2
    """Most recent checkpoints kept on disk; >= 1."""

    eval_every: int = 5
    """Save an image grid of the held-out prompts every this many epochs; 0 = never."""

    eval_prompts: str = "toy-heldout"
    """Prompts for the image grid (a built-in set or a file)."""

    def __post_init__(self) -> None:
        _check_range(self, "epochs", low=1)
        _check_range(self, "samples_per_epoch", low=1)
        _check_range(self, "inner_epochs", low=1)
        _check_range(self, "samples_per_prompt", low=1)
        if self.samples_per_epoch % self.samples_per_prompt:
            raise _FieldError("samples_per_prompt", f"must divide samples_per_epoch ({self.samples_per_epoch}), got {self.samples_per_prompt}")
        if self.advantage == "group" and self.samples_per_prompt < 2:
            raise _FieldError("advantage", "'group' needs samples_per_prompt >= 2 (a group of one has no spread)")
        _check_range(self, "timestep_fraction", low=0, high=1, low_open=True)
        _check_positive(self, "clip_range")
        _check_range(self, "beta", low=0)
        _check_range(self, "stat_buffer_size", low=1)
        _check_range(self, "stat_min_count", low=1)
        if self.stat_min_count > self.stat_buffer_size:
            raise _FieldError(
                "stat_min_count",
                f"must be <= stat_buffer_size ({self.stat_buffer_size}), got {self.stat_min_count}: "
                "a prompt's buffer never holds more than stat_buffer_size rewards",
            )
        _check_positive(self, "adv_clip_max")
        _check_range(self, "checkpoint_every", low=1)
        _check_range(self, "keep_checkpoints", low=1)
        _check_range(self, "eval_every", low=0)
        _check_non_empty(self, "prompts")


@dataclass(frozen=True)
class ReplayConfig:
    """The replay buffer between the reward pool and the learners, and the async pipeline.

    Every epoch's fresh samples enter the buffer; each update trains on
    ``train.samples_per_epoch`` of them, newest first. The defaults (reuse once, one
    version of lag) make sync mode train on exactly the fresh batch, as plain DDPO."""

    capacity: int = 1024
    """Most trajectories held; beyond it the oldest are evicted; >= train.samples_per_epoch."""

    max_staleness: int = 1
    """Oldest policy version a trained sample may come from, counted in versions behind the
    learner's; async mode needs >= 1 (its samples are one version behind)."""

    max_reuse: int = 1
    """Times one trajectory may be trained on before it leaves the buffer; >= 1."""

    is_truncation: float = 1.0
    """C in the importance weight min(p_old / p_behaviour, C) of a stale transition
    (IMPALA's rho-bar; 1 never up-weights a sample); > 0."""

    samples_per_update: int = 0
    """Trajectories each update trains on, newest first: 0 means train.samples_per_epoch
    (the fresh batch only); more reuses buffered samples of older versions (up to
    max_reuse times each) with importance weights. Same divisibility rules as
    train.samples_per_epoch."""

    max_in_flight: int = 8
    """Rollout requests (sampling batches) submitted and not yet finished, at most; bounds
    what the pipeline holds in the object store; >= 1."""

    def __post_init__(self) -> None:
        _check_range(self, "capacity", low=1)
        _check_range(self, "max_staleness", low=0)
        _check_range(self, "max_reuse", low=1)
        _check_positive(self, "is_truncation")
        _check_range(self, "max_in_flight", low=1)
        _check_range(self, "samples_per_update", low=0)


@dataclass(frozen=True)
class Config:
    """Everything one run needs. Components get their own section, never this root."""

    seed: int = 0
    """Base random seed (>= 0); every actor derives its own seed from it."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The diffusion model and which of its weights are trained."""

    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """The DDIM sampler used for rollouts."""

    reward: RewardConfig = field(default_factory=RewardConfig)
    """The reward functions and their weights."""

    train: TrainConfig = field(default_factory=TrainConfig)
    """The RL loop: algorithm, epochs, batch sizes, advantage estimation, checkpoints."""

    pools: PoolsConfig = field(default_factory=PoolsConfig)
    """Rollout, reward and reference actor pools."""

    learner: LearnerConfig = field(default_factory=LearnerConfig)
    """The DeepSpeed learner group in Ray Train."""

    replay: ReplayConfig = field(default_factory=ReplayConfig)
    """Replay buffer (staleness, reuse, importance-weight truncation) and async pipeline depth."""

    def __post_init__(self) -> None:
        _check_range(self, "seed", low=0)
        per_update = self.samples_per_update
        if per_update < self.train.samples_per_epoch:
            raise _FieldError("replay.samples_per_update", f"must be 0 or >= train.samples_per_epoch ({self.train.samples_per_epoch}), got {per_update}")
        if self.replay.capacity < per_update:
            raise _FieldError(
                "replay.capacity",
                f"must be >= the samples of one update ({per_update}, replay.samples_per_update or train.samples_per_epoch), got {self.replay.capacity}",
            )
        if self.train.mode == "async" and self.replay.max_staleness < 1:
            raise _FieldError(
                "replay.max_staleness",
                "must be >= 1 when train.mode is async: its samples come from the previous policy version, got 0",
            )
        for name in ("rollout", "reward"):
            if getattr(self.pools, name).num_actors < 1:
                raise _FieldError(f"pools.{name}.num_actors", "must be >= 1: training cannot run without this pool")
        if self.train.algorithm == "dpok" and self.pools.reference.num_actors < 1:
            raise _FieldError("pools.reference.num_actors", "must be >= 1 for algorithm dpok, whose KL term needs the reference policy")
        # Cross-section rules that no single section can check on its own.
        shard = self.learner.num_workers * self.learner.micro_batch_size
        if self.replay.samples_per_update % shard:
            raise _FieldError(
                "replay.samples_per_update",
                f"must be divisible by learner.num_workers * learner.micro_batch_size = {shard}, got {self.replay.samples_per_update}",
            )
        if self.replay.samples_per_update and (self.replay.samples_per_update // shard) % self.learner.gradient_accumulation_steps:
            raise _FieldError(
                "learner.gradient_accumulation_steps",
                f"must divide the {self.replay.samples_per_update // shard} micro-batches each worker gets per update "
                f"(replay.samples_per_update / (num_workers * micro_batch_size)), got {self.learner.gradient_accumulation_steps}",
            )
        if self.train.samples_per_epoch % shard:
            raise _FieldError(
                "train.samples_per_epoch",
                f"must be divisible by learner.num_workers * learner.micro_batch_size = "
                f"{self.learner.num_workers} * {self.learner.micro_batch_size} = {shard}, got "
                f"{self.train.samples_per_epoch}; e.g. use {max(shard, self.train.samples_per_epoch // shard * shard)}",
            )
        micro_batches = self.train.samples_per_epoch // shard
        if micro_batches % self.learner.gradient_accumulation_steps:
            raise _FieldError(
                "learner.gradient_accumulation_steps",
                f"must divide the {micro_batches} micro-batches each worker gets per epoch "
                f"(train.samples_per_epoch / (num_workers * micro_batch_size)), got "
                f"{self.learner.gradient_accumulation_steps}",
            )
        trained = trained_timesteps(self.sampling.num_steps, self.train.timestep_fraction)
        if self.learner.timesteps_per_pass and trained % self.learner.timesteps_per_pass:
            raise _FieldError(
                "learner.timesteps_per_pass",
                f"must divide the {trained} denoising steps trained per trajectory "
                f"(round(sampling.num_steps * train.timestep_fraction) = round({self.sampling.num_steps} * "
                f"{self.train.timestep_fraction})), got {self.learner.timesteps_per_pass}",
            )


    @property
    def samples_per_update(self) -> int:
        """Trajectories per update once the buffer is full: replay.samples_per_update, or the epoch's."""
        return self.replay.samples_per_update or self.train.samples_per_epoch


def learning_rate_at(learner: "LearnerConfig", *, epoch: int, epochs: int) -> float:
    """The learning rate of 1-based ``epoch`` of a run of ``epochs`` under ``learner.lr_schedule``."""
    if learner.lr_schedule == "constant" or epochs <= 1:
        return learner.learning_rate
    progress = min(max(epoch - 1, 0), epochs - 1) / (epochs - 1)  # 0 at the first epoch, 1 at the last
    floor = learner.lr_final_fraction
    return learner.learning_rate * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def steps_per_pass(learner: "LearnerConfig", train_timesteps: int) -> int:
    """Denoising steps per forward/backward pass: ``learner.timesteps_per_pass``, 0 meaning all trained steps."""
    return learner.timesteps_per_pass or train_timesteps


def trained_timesteps(num_steps: int, timestep_fraction: float) -> int:
    """Denoising steps trained per trajectory (DDPO's timestep_fraction), at least one."""
    return max(1, int(round(num_steps * timestep_fraction)))


# --------------------------------------------------------------------------- serving


@dataclass(frozen=True)
class ServeLimitsConfig:
    """What one image request may ask for; a request outside these limits gets HTTP 400
    naming the field, never a 500."""

    max_prompt_chars: int = 1000
    """Longest accepted prompt, in characters; >= 1. The text encoder still reads only
    its first ``tokenizer.model_max_length`` tokens, as every Stable Diffusion pipeline does."""

    max_n: int = 4
    """Most images one request may ask for (the OpenAI ``n``); >= 1. A request's images
    are generated together, in the same batch and with the same weights."""

    default_steps: int = 20
    """DDIM steps when a request gives no ``num_inference_steps``; in [1, max_steps]."""

    max_steps: int = 50
    """Most DDIM steps a request may ask for; in [1, 1000]. Latency grows linearly with steps."""

    default_guidance_scale: float = 4.5
    """Classifier-free guidance weight when a request gives no ``guidance_scale``; in
    [1, max_guidance_scale]. 1 turns guidance off."""

    max_guidance_scale: float = 20.0
    """Largest accepted ``guidance_scale``; >= 1 (the smallest is always 1, guidance off)."""

    max_body_bytes: int = 65536
    """Largest accepted request body in bytes; >= 1024. Larger bodies get HTTP 413."""

    def __post_init__(self) -> None:
        _check_range(self, "max_prompt_chars", low=1)
        _check_range(self, "max_n", low=1)
        _check_range(self, "max_steps", low=1, high=1000)
        _check_range(self, "default_steps", low=1, high=self.max_steps, why="must not exceed max_steps")
        _check_range(self, "max_guidance_scale", low=1.0)
        _check_range(self, "default_guidance_scale", low=1.0, high=self.max_guidance_scale, why="must lie in [1, max_guidance_scale]")
        _check_range(self, "max_body_bytes", low=1024)


@dataclass(frozen=True)
class ServeBatchingConfig:
    """Dynamic batching of concurrent requests on each replica (Ray Serve's ``@serve.batch``)."""

    max_batch_size: int = 16
    """Most images generated in one denoising batch; >= 1. A request asking for more
    than this many images runs alone, in several batches."""

    batch_wait_timeout_s: float = 0.3
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

    def __post_init__(self) -> None:
        _check_range(self, "max_batch_size", low=1)
        _check_range(self, "batch_wait_timeout_s", low=0)


@dataclass(frozen=True)
class ServeScalingConfig:
    """How many replicas serve, and what each reserves. Resources are Ray logical resources."""

    num_replicas: int = 1
    """Fixed number of replicas, each holding a copy of the model; >= 1. Ignored when
    ``autoscale`` is true."""

    autoscale: bool = False
    """Let Ray Serve add and remove replicas between ``min_replicas`` and ``max_replicas``
    to keep about ``target_ongoing_requests`` requests on each."""

    min_replicas: int = 1
    """Fewest replicas when autoscaling; >= 0 (0 scales to zero when idle: the first
    request then waits for a model to load)."""

    max_replicas: int = 2
    """Most replicas when autoscaling; >= max(1, min_replicas)."""

    target_ongoing_requests: float = 16.0
    """Requests per replica the autoscaler aims for; > 0. About one full batch keeps
    batches full without queueing much."""

    max_ongoing_requests: int = 64
    """Requests one replica accepts at once (more wait in Ray Serve's queue); >= 1 and at
    least batching.max_batch_size, or batches could never fill."""

    num_cpus_per_replica: float = 1.0
    """Logical CPUs each replica reserves; >= 0. Also sets its torch threads (at least 1)."""

    num_gpus_per_replica: float = 0.0
    """GPUs each replica reserves; >= 0 (fractions pack several replicas on one GPU)."""

    def __post_init__(self) -> None:
        _check_range(self, "num_replicas", low=1)
        _check_range(self, "min_replicas", low=0)
        _check_range(self, "max_replicas", low=max(1, self.min_replicas), why="must be >= max(1, min_replicas)")
        _check_positive(self, "target_ongoing_requests")
        _check_range(self, "max_ongoing_requests", low=1)
        _check_range(self, "num_cpus_per_replica", low=0)
        _check_range(self, "num_gpus_per_replica", low=0)


@dataclass(frozen=True)
class ServeConfig:
    """The image server (``rayalign serve``, or ``jobs.serve:app`` in a Ray Serve config).

    The API key is not part of it: replicas read ``RAYALIGN_API_KEY`` from their
    environment, so it never appears in a config file or in Ray Serve's status.
    """

    model: str | None = None
    """Local diffusers pipeline directory (SD 1.x/2.x or SDXL); null = the
    embedded toy model."""

    lora: str | None = None
    """LoRA to serve at start: a training run directory (its latest complete
    checkpoint), a checkpoint directory or an adapter directory; null = the base model.
    A new one is hot-swapped through the deployment's user_config ``{lora: PATH}``."""

    model_name: str | None = None
    """Id of the base model in ``/v1/models`` and requests' ``model``; null = the model
    directory's name (``toy-t2i`` for the embedded model). The adapter is
    ``<model_name>+lora``."""

    device: str = "auto"
    """Where replicas put the model: "auto" (cuda if available, else cpu), "cpu", "cuda"
    or "cuda:N"."""

    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Dtype of the weights; float32 on CPU."""

    eta: float = 1.0
    """DDIM eta of the sampler; in (0, 1]. The default 1 is the sampler the policy was
    trained and evaluated with, so served images follow the distribution whose reward
    training measured. It is reproducible all the same: every sample's initial and
    per-step noise is drawn from its own seed."""

    limits: ServeLimitsConfig = field(default_factory=ServeLimitsConfig)
    """What a request may ask for."""

    batching: ServeBatchingConfig = field(default_factory=ServeBatchingConfig)
    """Dynamic batching on each replica."""

    scaling: ServeScalingConfig = field(default_factory=ServeScalingConfig)
    """Replicas, autoscaling bounds and per-replica resources."""

    def __post_init__(self) -> None:
        for name in ("model", "lora", "model_name"):
            value = getattr(self, name)
            if value is not None and (not value.strip() or value != value.strip()):
                raise _FieldError(name, f"must be null or a non-empty string without surrounding spaces, got {value!r}")
        if not _DEVICE_PATTERN.fullmatch(self.device):
            raise _FieldError("device", f"must be one of 'auto', 'cpu', 'cuda', 'cuda:N' (N a GPU index), got {self.device!r}")
        _check_range(self, "eta", low=0, high=1, low_open=True, why="the sampler draws per-step noise with eta > 0; 1 is the training sampler")
        if self.scaling.max_ongoing_requests < self.batching.max_batch_size:
            raise _FieldError(
                "scaling.max_ongoing_requests",
                f"must be >= batching.max_batch_size ({self.batching.max_batch_size}), got {self.scaling.max_ongoing_requests}: "
                "a replica that accepts fewer requests than a batch holds never fills a batch",
            )


# --------------------------------------------------------------------------- sweeps

SEARCH_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
"""How a swept field is drawn: ``grid`` (every value, crossed with the other grids),
``choice`` (one value at random), ``uniform`` / ``loguniform`` ([low, high]) and
``randint`` ([low, high), integers)."""

# Resources decide how many trials run at once, so they must be the same for every trial.
_UNSWEEPABLE_PREFIXES = ("pools.", "learner.num_workers", "learner.num_cpus_per_worker", "learner.num_gpus_per_worker")


@dataclass(frozen=True)
class SweepSchedulerConfig:
    """The trial scheduler: which trials Ray Tune stops early."""

    type: Literal["asha", "none"] = "asha"
    """"asha" (asynchronous successive halving on the sweep's metric, by epoch) or
    "none" (every trial runs all its epochs)."""

    grace_period: int = 1
    """Epochs every trial runs before ASHA may stop it; >= 1."""

    reduction_factor: float = 2.0
    """ASHA keeps the best 1/reduction_factor of the trials at each rung; > 1."""

    def __post_init__(self) -> None:
        _check_range(self, "grace_period", low=1)
        _check_range(self, "reduction_factor", low=1, low_open=True)


@dataclass(frozen=True)
class SweepConfig:
    """A hyperparameter sweep (``rayalign sweep``): a base training config and a search
    space of its fields; every trial is a complete training run."""

    preset: str | None = None
    """Base training config: a shipped preset (toy-ddpo, toy-dpok, ...). Give this or
    ``config``."""

    config: str | None = None
    """Base training config: a YAML file (relative to the sweep file). Give this or
    ``preset``."""

    set: tuple[str, ...] = ()
    """``dotted.key=value`` overrides of the base config for every trial, e.g.
    ``train.epochs=2``."""

    search_space: dict[str, Any] = field(default_factory=dict)
    """Swept fields by dotted name, each ``{KIND: VALUES}`` with KIND one of grid,
    choice (a list of values), uniform, loguniform, randint ([low, high]); e.g.
    ``learner.learning_rate: {loguniform: [1.0e-4, 1.0e-2]}``. Pool and learner
    resources cannot be swept (they decide how many trials fit at once)."""

    num_samples: int = 1
    """Trials drawn per grid point (the grid's points are crossed with this); >= 1."""

    metric: str = "reward/mean"
    """Metric of metrics.jsonl that ranks trials and drives the scheduler."""

    mode: Literal["max", "min"] = "max"
    """Whether a higher or a lower ``metric`` is better."""

    scheduler: SweepSchedulerConfig = field(default_factory=SweepSchedulerConfig)
    """Early stopping of poor trials."""

    max_concurrent_trials: int = 0
    """Trials running at once; 0 = as many as the cluster's resources fit (each trial
    needs its learners, pools and a small driver)."""

    trial_cpus: float = 0.1
    """Logical CPUs reserved for each trial's driver (it only coordinates); > 0."""

    seed: int = 0
    """Seed of the random draws of the search space; >= 0."""

    def __post_init__(self) -> None:
        if (self.preset is None) == (self.config is None):
            raise _FieldError("preset", f"give exactly one of preset or config, got preset={self.preset!r}, config={self.config!r}")
        _check_non_empty(self, "search_space", why="name at least one field to sweep, e.g. learner.learning_rate: {grid: [1.0e-4, 3.0e-4]}")
        for key, spec in self.search_space.items():
            _check_search_spec(key, spec)
        _check_range(self, "num_samples", low=1)
        _check_identifier_like(self, "metric")
        _check_range(self, "max_concurrent_trials", low=0)
        _check_positive(self, "trial_cpus")
        _check_range(self, "seed", low=0)


def _check_search_spec(key: str, spec: Any) -> None:
    where = f"search_space.{key}"
    if key.startswith(_UNSWEEPABLE_PREFIXES):
        raise _FieldError(where, "cannot be swept: pool and learner resources decide how many trials fit at once; set them in the base config")
    if not isinstance(spec, Mapping) or len(spec) != 1 or next(iter(spec)) not in SEARCH_KINDS:
        raise _FieldError(where, f"must be a mapping with one key, one of {', '.join(SEARCH_KINDS)}, e.g. {{grid: [1.0e-4, 3.0e-4]}}; got {spec!r}")
    kind, values = next(iter(spec.items()))
    if not isinstance(values, (list, tuple)) or not values:
        raise _FieldError(where, f"{kind} needs a non-empty list, got {values!r}")
    if kind in ("uniform", "loguniform", "randint"):
        numbers_ok = len(values) == 2 and all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in values)
        if not numbers_ok or not values[0] < values[1]:
            raise _FieldError(where, f"{kind} needs [low, high] with low < high, got {list(values)!r}")
        if kind == "loguniform" and values[0] <= 0:
            raise _FieldError(where, f"loguniform needs low > 0, got {list(values)!r}")
        if kind == "randint" and not all(isinstance(v, int) for v in values):
            raise _FieldError(where, f"randint needs integer bounds, got {list(values)!r}")


# --------------------------------------------------------------------------- YAML

# YAML 1.1 (PyYAML) only reads floats with a dot and a signed exponent ("1.0e-4"); this
# adds "1e-4", "1e4", "1.5E3" so learning rates and the like read as numbers.
_EXPONENT_FLOAT = re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")


class _YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading ``1e-4`` as a float."""


class _YamlDumper(yaml.SafeDumper):
    """PyYAML's safe dumper; quotes strings such as ``"1e-4"`` that the loader would read as floats."""


for _resolver in (_YamlLoader, _YamlDumper):
    _resolver.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789"))


def _parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - _YamlLoader is a SafeLoader


# --------------------------------------------------------------------------- from_dict


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


def _at(path: str, message: str) -> str:
    return f"{path}: {message}" if path else message


def _show(value: Any) -> str:
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{text} ({type(value).__name__})"


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _type_name(tp: Any) -> str:
    if tp is Any:
        return "any value"
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return f"a mapping of {tp.__name__} fields"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if _is_union(tp):
        return " or ".join(_type_name(arg) for arg in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(choice) for choice in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_type_name(args[0])}"
        return f"a list of {len(args)} items ({', '.join(_type_name(arg) for arg in args)})"
    if origin in (dict, Mapping) or tp in (dict, Mapping):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _is_scalar(tp: Any) -> bool:
    return tp in (bool, int, float, str) or typing.get_origin(tp) is Literal


def _type_error(path: str, tp: Any, value: Any) -> ValueError:
    return ValueError(_at(path, f"expected {_type_name(tp)}, got {_show(value)}"))


@functools.lru_cache(maxsize=None)
def _field_types(cls: type) -> dict[str, Any]:
    # get_type_hints, not field.type: with `from __future__ import annotations` the latter are strings.
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _convert(tp: Any, value: Any, path: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it in the field's form."""
    if tp is Any:
        return copy.deepcopy(value)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path=path)
    origin, args = typing.get_origin(tp), typing.get_args(tp)

    if _is_union(tp):
        if value is None and type(None) in args:
            return None
        options = [arg for arg in args if arg is not type(None)]
        if len(options) == 1 and not _is_scalar(options[0]):
            # A structured type or None (e.g. an optional section): let its deeper errors through.
            if value is None:
                raise _type_error(path, tp, value)
            return _convert(options[0], value, path)
        for option in options:
            try:
                return _convert(option, value, path)
            except ValueError:
                continue
        raise _type_error(path, tp, value)

    if origin is Literal:
        if any(type(value) is type(choice) and value == choice for choice in args):
            return value
        hint = ""
        if isinstance(value, str):
            close = difflib.get_close_matches(value, [c for c in args if isinstance(c, str)], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(_at(path, f"expected {_type_name(tp)}, got {_show(value)}{hint}"))

    if origin is tuple:
        # A string is a sequence too; taking it as a list of characters would be a silent bug.
        if not isinstance(value, (list, tuple)):
            raise _type_error(path, tp, value)
        if len(args) == 2 and args[1] is Ellipsis:
            item_types = [args[0]] * len(value)
        elif len(args) == len(value):
            item_types = list(args)
        else:
            raise _type_error(path, tp, value)
        items = enumerate(zip(item_types, value))
        return tuple(_convert(item_tp, item, f"{path}[{i}]") for i, (item_tp, item) in items)

    if origin in (dict, Mapping) or tp in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise _type_error(path, tp, value)
        key_tp, value_tp = args if args else (Any, Any)
        return {_convert(key_tp, k, path): _convert(value_tp, v, _join(path, k)) for k, v in value.items()}

    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _type_error(path, tp, value)
    if tp is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
        raise _type_error(path, tp, value)
    if tp is float:
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return float(value)
        raise _type_error(path, tp, value)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _type_error(path, tp, value)

    raise TypeError(f"{path}: config field type {tp!r} is not supported by from_dict; see the module docstring")


def _unknown_keys_error(unknown: list[Any], valid: list[str], path: str) -> ValueError:
    described = []
    for key in unknown:
        close = difflib.get_close_matches(str(key), valid, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        described.append(f"{_join(path, key)!r}{hint}")
    where = f"under {path!r}" if path else "at the top level"
    noun = "key" if len(unknown) == 1 else "keys"
    return ValueError(f"unknown config {noun} {', '.join(described)}; valid keys {where}: {', '.join(valid)}")


def from_dict(cls: type[T], data: Any, *, path: str = "") -> T:
    """Build the frozen dataclass ``cls`` (and its nested sections) from plain data.

    ``data`` is a mapping of field names to YAML-like values (or anything ``cls.coerce``
    accepts). Missing fields take their defaults. ``path`` is the dotted location of
    ``data`` in the config tree, used in error messages.

    Raises:
        ValueError: unknown or missing keys, wrong types, or values out of range; the
            message names the full dotted path, the value and what is allowed.
    """
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"from_dict needs a dataclass type, got {cls!r}")
    coerce = getattr(cls, "coerce", None)
    if coerce is not None:
        try:
            data = coerce(data)
        except ValueError as error:
            raise ValueError(_at(path, str(error))) from None
    if not isinstance(data, Mapping):
        raise _type_error(path, cls, data)

    types_by_name = _field_types(cls)
    valid = list(types_by_name)
    unknown = [key for key in data if key not in types_by_name]
    if unknown:
        raise _unknown_keys_error(unknown, valid, path)
    required = [
        f.name
        for f in dataclasses.fields(cls)
        if f.init and f.name not in data
        and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if required:
        names = ", ".join(repr(name) for name in required)
        raise ValueError(_at(path, f"missing required field {names} for {cls.__name__}"))

    kwargs = {name: _convert(types_by_name[name], value, _join(path, name)) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except _FieldError as error:
        raise ValueError(f"{_join(path, error.field_name)} {error.detail}") from None
    except ValueError as error:
        if not path:
            raise
        raise ValueError(_at(path, str(error))) from None


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_to_plain(item) for item in value]
    if isinstance(value, Mapping):
        return {key: _to_plain(item) for key, item in value.items()}
    return value


def to_dict(obj: Any) -> dict[str, Any]:
    """The inverse of :func:`from_dict`: plain dicts, lists (for tuples) and scalars.

    ``from_dict(type(x), to_dict(x)) == x`` holds for every config; tuples nested inside
    ``dict[str, Any]`` fields come back as lists.
    """
    if not (dataclasses.is_dataclass(obj) and not isinstance(obj, type)):
        raise TypeError(f"to_dict needs a dataclass instance, got {obj!r}")
    return _to_plain(obj)


# --------------------------------------------------------------------------- overrides and files


def _copy_tree(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {key: _copy_tree(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_copy_tree(item) for item in value]
    return value


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``"dotted.key=value"`` override set.

    The value is parsed as YAML, so ``3``, ``0.1``, ``1e-4``, ``true``, ``null`` and
    ``[a, b]`` have their YAML types. Missing intermediate mappings are created; unknown
    keys are reported later by :func:`from_dict`. ``data`` is not modified.
    """
    if isinstance(overrides, str):
        raise TypeError(f"overrides must be a sequence of 'key=value' strings, got the string {overrides!r}")
    result = _copy_tree(data)
    for override in overrides:
        key, sep, raw = override.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(
                f"config override {override!r} must look like 'dotted.key=value', e.g. 'sampling.num_steps=10'"
            )
        keys = key.split(".")
        if any(not part for part in keys):
            raise ValueError(f"config override {override!r} has an empty key segment in {key!r}")
        try:
            value = _parse_yaml(raw)
        except yaml.YAMLError as error:
            raise ValueError(f"cannot parse the value of config override {override!r} as YAML: {error}") from None

        node = result
        for depth, part in enumerate(keys[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                where = ".".join(keys[: depth + 1])
                raise ValueError(
                    f"cannot apply config override {override!r}: {where!r} is {_show(child)}, not a mapping; "
                    f"override {where!r} as a whole instead"
                )
            node = child
        node[keys[-1]] = value
    return result


def _read_yaml_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"config file {str(path)!r} does not exist") from None
    except OSError as error:
        raise ValueError(f"cannot read config file {str(path)!r}: {error}") from None
    try:
        data = _parse_yaml(text)
    except yaml.YAMLError as error:
        raise ValueError(f"config file {str(path)!r} is not valid YAML: {error}") from None
    if data is None:  # an empty file: all defaults
        return {}
    if not isinstance(data, dict):
        raise ValueError(
            f"config file {str(path)!r} must contain a mapping of sections (seed:, model:, ...), "
            f"got {type(data).__name__}"
        )
    return data


def load_config(
    source: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    overrides: Sequence[str] = (),
    cls: type[T] = Config,  # type: ignore[assignment]
) -> T:
    """Load and validate a config from a YAML file path or a mapping, then apply overrides.

    ``source=None`` means all defaults; anything not given takes its default.

    Raises:
        ValueError: the file is missing, unreadable, not YAML or not a mapping (the
            message names the file), or an override or value is invalid.
    """
    if source is None:
        data: dict[str, Any] = {}
    elif isinstance(source, Mapping):
        data = _copy_tree(source)
    elif isinstance(source, (str, os.PathLike)):
        data = _read_yaml_file(Path(source).expanduser())
    else:
        raise TypeError(f"config source must be a path, a mapping or None, got {_show(source)}")
    return from_dict(cls, apply_overrides(data, overrides))


def config_to_yaml(cfg: Any) -> str:
    """The config as YAML text that :func:`load_config` reads back to an equal config."""
    return yaml.dump(to_dict(cfg), Dumper=_YamlDumper, sort_keys=False, default_flow_style=False, allow_unicode=True)


def dump_yaml(cfg: Any, path: str | os.PathLike[str]) -> None:
    """Write :func:`config_to_yaml` of ``cfg`` to ``path``, creating parent directories."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config_to_yaml(cfg), encoding="utf-8")


# --------------------------------------------------------------------------- presets


def preset_names() -> list[str]:
    """Names of the configs shipped in ``orchestrator/presets``."""
    from importlib import resources

    return sorted(p.name[: -len(".yaml")] for p in resources.files("orchestrator").joinpath("presets").iterdir() if p.name.endswith(".yaml"))


def load_preset(name: str, overrides: Sequence[str] = ()) -> "Config":
    """A shipped preset by name, with ``key=value`` overrides applied."""
    from importlib import resources

    names = preset_names()
    if name not in names:
        raise ValueError(f"unknown preset {name!r}; available presets: {', '.join(names)}")
    text = resources.files("orchestrator").joinpath("presets", f"{name}.yaml").read_text()
    return load_config(_parse_yaml(text) or {}, overrides)
