"""The diffusion policy: a Stable Diffusion pipeline as a stochastic policy over denoising steps.

One code path loads a local diffusers pipeline directory of any supported family
(:mod:`actors.pipelines`: SD 1.x/2.x with epsilon or v-prediction, SDXL): the embedded
toy model or a real checkpoint. The UNet is fine-tuned with LoRA (peft) or fully; the
VAE and text encoders stay frozen, and learners and reference actors do not load them
at all (``unet_only``): they read the prompt embeddings the rollout actors recorded.

``sample`` records every transition's latents, timestep and Gaussian log-probability;
``log_prob`` recomputes the same quantities under the current weights for given
transitions. Both share :func:`actors.ddim.ddim_step_with_log_prob` and the same
guidance arithmetic, which is what makes the importance ratio exactly 1 at equal weights.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from actors import ddim, pipelines
from actors.pipelines import PromptEmbeddings
from actors.trajectory import Trajectories, as_tensor

logger = logging.getLogger(__name__)

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
"""diffusers' file name, so ``StableDiffusionPipeline.load_lora_weights(dir)`` reads our adapters too."""
LORA_CONFIG_NAME = "adapter_config.json"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use device: cpu or auto")
    return torch.device(device)


def check_pipeline_dir(path: str | os.PathLike) -> Path:
    """Fail early, naming what is missing, when ``path`` is not a usable pipeline directory."""
    path = Path(path)
    if not path.is_dir():
        state = "does not exist" if not path.exists() else "is not a directory"
        raise ValueError(
            f"model path {str(path)!r} {state}: it is not a directory; set model.path (rayalign eval/serve: --model) to a local "
            "diffusers pipeline directory, e.g. one fetched on a machine with internet access by "
            "`hf download stable-diffusion-v1-5/stable-diffusion-v1-5 --local-dir DIR` (see README, Bring your own model)"
        )
    family = pipelines.detect_family(path)
    missing = [name for name in family.subfolders if not (path / name).is_dir()]
    if missing:
        raise ValueError(
            f"model path {str(path)!r} is not a complete {family.name} pipeline directory: missing {', '.join(m + '/' for m in missing)}; "
            f"expected subfolders {', '.join(family.subfolders)} (as written by {family.pipeline_classes[0]}.save_pretrained)"
        )
    for sub in ("unet", "vae", *(encoder for _, encoder in family.text_encoders)):
        weights = list((path / sub).glob("*.safetensors"))
        if not weights:
            found = ", ".join(sorted(p.name for p in (path / sub).iterdir())) or "nothing"
            raise ValueError(
                f"{path / sub} has no .safetensors weights (found: {found}); rayalign loads safetensors only. "
                f"Convert with: pipeline.save_pretrained(dir, safe_serialization=True)"
            )
    return path


def resolve_lora_dir(path: str | os.PathLike) -> Path:
    """An adapter directory from what a user may point at: the adapter itself, a checkpoint
    (``.../epoch_0010``), or a training run directory (its latest complete checkpoint)."""
    path = Path(path)
    if (path / LORA_CONFIG_NAME).is_file():
        return path
    if (path / "lora" / LORA_CONFIG_NAME).is_file():
        return path / "lora"
    if (path / "checkpoints").is_dir():
        from orchestrator.checkpoint import latest_checkpoint

        checkpoint = latest_checkpoint(path / "checkpoints")
        if checkpoint is not None and (checkpoint / "lora" / LORA_CONFIG_NAME).is_file():
            return checkpoint / "lora"
        raise ValueError(f"{path} is a training run without a complete LoRA checkpoint yet (look in {path / 'checkpoints'})")
    raise ValueError(f"{path} is not a LoRA adapter, checkpoint or run directory: no {LORA_CONFIG_NAME} found in it or in {path / 'lora'}")


def read_lora(directory: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """An adapter directory's peft config (as saved) and its weights, read and checked.

    Raises ``ValueError`` naming the directory and what is wrong with it: a missing file,
    a config that is not JSON or lacks ``r``/``lora_alpha``/``target_modules``, or weights
    that are not a readable safetensors file.
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    weights, config_file = directory / LORA_WEIGHTS_NAME, directory / LORA_CONFIG_NAME
    for required in (weights, config_file):
        if not required.is_file():
            raise ValueError(f"LoRA directory {str(directory)!r} lacks {required.name}; give a directory written by rayalign (checkpoints/.../lora)")
    try:
        raw = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{config_file} is not a readable JSON adapter config: {error}") from None
    missing = [key for key in ("r", "lora_alpha", "target_modules") if not isinstance(raw, dict) or key not in raw]
    if missing:
        raise ValueError(f"{config_file} lacks {', '.join(missing)}; it is not a peft LoRA config written by rayalign")
    try:
        state_dict = load_file(weights)
    except Exception as error:  # safetensors raises its own error type for truncated or corrupt files
        raise ValueError(f"{weights} is not a readable safetensors file ({type(error).__name__}: {error})") from None
    if not state_dict:
        raise ValueError(f"{weights} holds no tensors")
    return raw, state_dict


def unet_lora_state_dict(unet) -> dict[str, torch.Tensor]:
    """A UNet's LoRA adapter weights in diffusers' key format (what a weight sync ships)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))


def write_lora(directory: str | os.PathLike, state_dict, lora_config) -> Path:
    """Write an adapter directory: diffusers-format safetensors weights + peft's config.

    ``state_dict`` maps diffusers UNet LoRA keys (no ``unet.`` prefix) to tensors or arrays.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"unet.{k}": torch.as_tensor(v).detach().to("cpu", torch.float32).contiguous() for k, v in state_dict.items()}
    save_file(tensors, directory / LORA_WEIGHTS_NAME, metadata={"format": "pt"})
    config = lora_config.to_dict()
    if isinstance(config.get("target_modules"), (set, list)):
        config["target_modules"] = sorted(config["target_modules"])
    (directory / LORA_CONFIG_NAME).write_text(json.dumps(config, indent=2, default=str) + "\n")
    return directory


class DiffusionPolicy:
    """A text-to-image diffusion model with sampling and log-prob recomputation.

    Build with :meth:`from_pretrained`. ``unet`` is the only trained module.
    """

    def __init__(
        self,
        *,
        unet,
        vae,
        text_encoders: Sequence,
        tokenizers: Sequence,
        scheduler,
        device: torch.device,
        dtype: torch.dtype,
        family: pipelines.Family = pipelines.SD,
        image_size: int | None = None,
        force_zeros_for_empty_prompt: bool = False,
        lora_config=None,
    ):
        self.unet = unet
        self.vae = vae
        """None on a ``unet_only`` policy (learners, reference actors)."""
        self.text_encoders = tuple(text_encoders)
        """One per tokenizer; empty on a ``unet_only`` policy."""
        self.tokenizers = tuple(tokenizers)
        self.scheduler = scheduler
        self.family = family
        self.image_size = image_size
        """Side of the square images in pixels (SDXL's time ids need it)."""
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt
        """SDXL base: the unconditional branch of CFG sees all-zero embeddings, not the empty caption's."""
        self.device = device
        self.dtype = dtype
        self.lora_config = lora_config
        self.version = 0
        """Incremented by every weight update, so trajectories can say which weights made them."""
        self.alphas_cumprod = scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
        self.final_alpha_cumprod = float(scheduler.final_alpha_cumprod)
        self.prediction_type = scheduler.config.prediction_type
        self._negative_embeds: PromptEmbeddings | None = None
        self._premerge_weights: dict[str, torch.Tensor] | None = None
        """While the adapter is merged (:meth:`merge_lora`): each adapted layer's own weight, on the CPU."""

    @property
    def text_encoder(self):
        """The first (for SD the only) text encoder; None on a ``unet_only`` policy."""
        return self.text_encoders[0] if self.text_encoders else None

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        finetune: str = "lora",
        lora_rank: int = 4,
        lora_alpha: float = 4.0,
        lora_target_modules: Sequence[str] = ("to_q", "to_k", "to_v", "to_out.0"),
        lora_dropout: float = 0.0,
        dtype: str = "float32",
        device: str = "auto",
        lora_path: str | os.PathLike | None = None,
        unet_only: bool = False,
        gradient_checkpointing: bool = False,
    ) -> "DiffusionPolicy":
        """Load a local pipeline directory; attach a fresh LoRA or one from ``lora_path``.

        ``unet_only`` skips the VAE and text encoders: such a policy scores and trains on
        recorded trajectories (which carry their prompt embeddings) but cannot sample.
        ``gradient_checkpointing`` recomputes UNet activations in the backward pass instead
        of storing them (less memory, about a third more compute per training pass).
        """
        path = check_pipeline_dir(path)
        family = pipelines.detect_family(path)
        if dtype not in _DTYPES:
            raise ValueError(f"dtype {dtype!r} is not supported; choose one of {', '.join(_DTYPES)}")
        if finetune not in ("lora", "full"):
            raise ValueError(f"finetune {finetune!r} is not supported; choose 'lora' or 'full'")
        torch_dtype = _DTYPES[dtype]
        torch_device = resolve_device(device)
        if torch_dtype == torch.float16 and torch_device.type != "cuda":
            raise ValueError(
                f"dtype float16 needs a CUDA device, but the model goes to {torch_device}: CPU half-precision kernels are "
                "missing or slow. Use dtype bfloat16 (CPUs with bf16 support) or float32 on CPU"
            )
        # low_cpu_mem_usage: modules are created on the meta device and filled straight from the
        # memory-mapped safetensors, so host RAM never holds a random init next to the real weights.
        # On a GPU, device_map streams each tensor from the file (the node's shared page cache) to
        # the device: learner workers of one node do not each build a host copy of the model.
        common = {"torch_dtype": torch_dtype, "use_safetensors": True, "low_cpu_mem_usage": True}
        if torch_device.type == "cuda":
            common["device_map"] = str(torch_device)
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **common)
        vae, text_encoders, tokenizers = None, [], []
        if not unet_only:
            # A VAE marked force_upcast (SDXL's) overflows in float16: it decodes in float32.
            vae_config = AutoencoderKL.load_config(path, subfolder="vae")
            vae_dtype = torch.float32 if torch_dtype == torch.float16 and vae_config.get("force_upcast") else torch_dtype
            vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **{**common, "torch_dtype": vae_dtype})
            for index, (tokenizer_dir, encoder_dir) in enumerate(family.text_encoders):
                # SDXL's second encoder also has the text projection that gives the pooled embedding.
                encoder_cls = CLIPTextModelWithProjection if family is pipelines.SDXL and index == 1 else CLIPTextModel
                text_encoders.append(encoder_cls.from_pretrained(path, subfolder=encoder_dir, **common))
                tokenizers.append(CLIPTokenizer.from_pretrained(path, subfolder=tokenizer_dir))
            if family is pipelines.SDXL:
                pipelines.check_added_conditioning(unet.config, pooled_dim=text_encoders[1].config.projection_dim)
        # Whatever scheduler the checkpoint ships (SD 1.5 ships PNDM, SDXL Euler), sampling is DDIM with its noise schedule.
        scheduler = DDIMScheduler.from_pretrained(path, subfolder="scheduler")
        for module in (unet, vae, *text_encoders):
            if module is not None:
                module.requires_grad_(False)
                module.to(torch_device).eval()
        options = pipelines.read_pipeline_options(path)
        policy = cls(
            unet=unet,
            vae=vae,
            text_encoders=text_encoders,
            tokenizers=tokenizers,
            scheduler=scheduler,
            device=torch_device,
            dtype=torch_dtype,
            family=family,
            image_size=unet.config.sample_size * pipelines.vae_scale_factor(path),
            force_zeros_for_empty_prompt=bool(options.get("force_zeros_for_empty_prompt", False)),
        )
        if lora_path is not None:
            policy.load_lora(lora_path)
        elif finetune == "lora":
            policy.add_lora(rank=lora_rank, alpha=lora_alpha, target_modules=lora_target_modules, dropout=lora_dropout)
        else:
            unet.requires_grad_(True)
        if gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        return policy

    def add_lora(self, *, rank: int, alpha: float, target_modules: Sequence[str], dropout: float = 0.0) -> None:
        """Attach a LoRA adapter to the UNet's attention projections; only it is trainable."""
        from peft import LoraConfig

        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules), lora_dropout=dropout, init_lora_weights="gaussian")
        try:
            self.unet.add_adapter(config)
        except ValueError as error:
            raise ValueError(f"could not attach LoRA to target modules {list(target_modules)}: {error}") from error
        self._cast_trainable_to_float32()
        self.lora_config = config

    def _cast_trainable_to_float32(self) -> None:
        # Half-precision master weights lose small updates; trainable weights stay fp32.
        for param in self.unet.parameters():
            if param.requires_grad:
                param.data = param.data.float()

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.unet.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ LoRA persistence
    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """Adapter weights in diffusers' key format (what a weight sync ships)."""
        if self.lora_config is None:
            raise ValueError("this policy has no LoRA adapter (finetune: full); save the UNet instead")
        return unet_lora_state_dict(self.unet)

    def load_lora_state_dict(self, state_dict: dict[str, torch.Tensor], *, adapter_name: str = "default") -> None:
        from diffusers.utils import convert_unet_state_dict_to_peft
        from peft.utils import set_peft_model_state_dict

        if self.lora_config is None and adapter_name == "default":
            raise ValueError("this policy has no LoRA adapter to load weights into")
        peft_state = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in state_dict.items()})
        merged = self.lora_merged
        if merged:
            self.unmerge_lora()  # the old adapter leaves the base weights before the new one arrives
        try:
            result = set_peft_model_state_dict(self.unet, peft_state, adapter_name=adapter_name)
        except RuntimeError as error:  # torch's size-mismatch report
            raise ValueError(f"LoRA weights do not fit this model's adapter: {str(error).splitlines()[0]} ...") from None
        unexpected = getattr(result, "unexpected_keys", None) or []
        if unexpected:
            raise ValueError(f"LoRA weights do not match this model's adapter: unexpected keys {unexpected[:5]}")
        # A tensor the weights lack would silently keep its random initialisation.
        missing = [key for key in getattr(result, "missing_keys", None) or [] if "lora_" in key and f".{adapter_name}." in key]
        if missing:
            raise ValueError(f"LoRA weights lack {len(missing)} of this model's adapter tensors, e.g. {missing[0]}")
        if merged:
            self.merge_lora()

    # ------------------------------------------------------------------ merged adapter (sampling only)
    @property
    def lora_merged(self) -> bool:
        return self._premerge_weights is not None

    def _lora_layers(self):
        from peft.tuners.lora import LoraLayer

        return [(name, module) for name, module in self.unet.named_modules() if isinstance(module, LoraLayer)]

    def merge_lora(self) -> bool:
        """Fold the adapter into the layers it sits on, so sampling skips its extra matmuls.

        For actors that only sample (rollout): on the toy model this makes sampling with
        adapters on attention and feed-forward layers about 1.6x faster. Loading new adapter
        weights keeps the policy merged; :meth:`unmerge_lora` restores the original weights
        bit for bit (they are kept aside, on the CPU), so merging never accumulates drift.
        While merged, no gradient reaches the adapter, so :meth:`log_prob` refuses to run with
        gradients enabled. Only float32 weights are merged: in half precision a small adapter
        update is rounded away when added to the frozen weight, so a float16/bfloat16 policy
        stays unmerged. Returns whether the adapter is merged.
        """
        if self.lora_config is None:
            raise ValueError("this policy has no LoRA adapter to merge (finetune: full)")
        if self.lora_merged:
            return True
        if self.dtype != torch.float32:
            return False
        saved: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name, layer in self._lora_layers():
                saved[name] = layer.get_base_layer().weight.detach().to("cpu", copy=True)
                layer.merge()
        self._premerge_weights = saved
        return True

    def unmerge_lora(self) -> None:
        """Take a merged adapter back out of the layers (a no-op when it is not merged)."""
        if self._premerge_weights is None:
            return
        with torch.no_grad():
            for name, layer in self._lora_layers():
                layer.unmerge()
                # unmerge subtracts the update again; restoring the saved weight undoes its rounding too.
                layer.get_base_layer().weight.copy_(self._premerge_weights[name])
        self._premerge_weights = None

    def save_lora(self, directory: str | os.PathLike) -> Path:
        """Write ``adapter_config.json`` and diffusers-format safetensors weights."""
        if self.lora_config is None:
            raise ValueError("this policy has no LoRA adapter (finetune: full); save the UNet instead")
        return write_lora(directory, self.lora_state_dict(), self.lora_config)

    def load_lora(self, directory: str | os.PathLike) -> None:
        """Attach the adapter saved by :meth:`save_lora` (replacing none: the UNet must have no adapter yet)."""
        raw, state_dict = read_lora(directory)
        if self.lora_config is not None:
            raise ValueError("this policy already has a LoRA adapter; load adapters into a freshly loaded base model")
        self.add_lora(rank=raw["r"], alpha=raw["lora_alpha"], target_modules=raw["target_modules"], dropout=raw.get("lora_dropout", 0.0))
        self.load_lora_state_dict(state_dict)

    # ------------------------------------------------------------------ text and pixels
    def _require_decoders(self, what: str) -> None:
        if self.vae is None or not self.text_encoders:
            raise ValueError(
                f"this policy was loaded with unet_only=True (no VAE or text encoders), so it cannot {what}; "
                "load it without unet_only (rollout actors do)"
            )

    def encode_prompts(self, prompts: Sequence[str]) -> PromptEmbeddings:
        """The UNet's conditioning for each caption: embeds (batch, tokens, dim), and for SDXL pooled (batch, dim); float32."""
        self._require_decoders("encode prompts")
        return pipelines.encode_prompts(self.family, self.tokenizers, self.text_encoders, prompts, device=self.device)

    def negative_embeds(self) -> PromptEmbeddings:
        """The unconditional branch of CFG, computed once: embeds (tokens, dim), pooled (dim,) or None."""
        if self._negative_embeds is None:
            empty = self.encode_prompts([""])
            if self.force_zeros_for_empty_prompt:
                empty = PromptEmbeddings(embeds=torch.zeros_like(empty.embeds), pooled=torch.zeros_like(empty.pooled))
            self._negative_embeds = PromptEmbeddings(embeds=empty.embeds[0], pooled=None if empty.pooled is None else empty.pooled[0])
        return self._negative_embeds

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Latents x_0 -> images. (batch, H, W, 3) uint8."""
        self._require_decoders("decode latents")
        scaled = latents.to(self.device, self.vae.dtype) / self.vae.config.scaling_factor
        pixels = self.vae.decode(scaled).sample.float()
        return ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()

    # ------------------------------------------------------------------ the policy
    def _unet(self, latents: torch.Tensor, timesteps: torch.Tensor, condition: PromptEmbeddings) -> torch.Tensor:
        """One UNet call in the frozen weights' dtype (LoRA weights are fp32; peft casts for them); output float32."""
        added = None
        if self.family is pipelines.SDXL:
            if condition.pooled is None:
                raise ValueError("an SDXL policy needs pooled prompt embeddings; these trajectories were recorded without them")
            time_ids = pipelines.add_time_ids(height=self.image_size, width=self.image_size).to(self.device)
            added = {"text_embeds": condition.pooled.to(self.dtype), "time_ids": time_ids.expand(latents.shape[0], -1).to(self.dtype)}
        output = self.unet(latents.to(self.dtype), timesteps, encoder_hidden_states=condition.embeds.to(self.dtype), added_cond_kwargs=added)
        return output.sample.float()

    def _model_output(self, latents: torch.Tensor, timesteps: torch.Tensor, condition: PromptEmbeddings, negative: PromptEmbeddings, guidance_scale: float) -> torch.Tensor:
        """The (guided) network output for a batch; one UNet call with [uncond; cond] when guiding.

        ``negative`` may hold one row (shared by the batch) or one per sample.
        """
        if guidance_scale == 1.0:
            return self._unet(latents, timesteps, condition)
        batch = latents.shape[0]

        def rows(tensor: torch.Tensor | None, per_sample: torch.Tensor | None) -> torch.Tensor | None:
            if tensor is None or per_sample is None:
                return None
            return tensor.expand(batch, *tensor.shape) if tensor.ndim < per_sample.ndim else tensor

        both = PromptEmbeddings(
            embeds=torch.cat([rows(negative.embeds, condition.embeds), condition.embeds]),
            pooled=None if condition.pooled is None else torch.cat([rows(negative.pooled, condition.pooled), condition.pooled]),
        )
        output = self._unet(torch.cat([latents, latents]), torch.cat([timesteps, timesteps]), both)
        unconditional, conditional = output.chunk(2)
        return ddim.guided_output(unconditional, conditional, guidance_scale)

    @torch.no_grad()
    def sample(
        self,
        prompts: Sequence[str],
        *,
        seeds: Sequence[int],
        num_steps: int = 20,
        eta: float = 1.0,
        guidance_scale: float = 4.5,
        reduction: ddim.Reduction = "mean",
        decode: bool = True,
    ) -> tuple[Trajectories, np.ndarray | None]:
        """Sample one image per prompt, recording the whole trajectory.

        Each sample's initial latent and per-step noise come from its own seed, so an
        image depends only on (weights, prompt, seed, settings), never on which other
        prompts share its batch. Returns (trajectories, images (batch, H, W, 3) uint8).
        """
        if len(prompts) != len(seeds):
            raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds; give one seed per prompt")
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if eta <= 0:
            raise ValueError(f"eta must be > 0 for trajectories to have log-probabilities, got {eta}")
        batch = len(prompts)
        channels = self.unet.config.in_channels
        size = self.unet.config.sample_size
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        latents = torch.stack([torch.randn(channels, size, size, generator=g) for g in generators]).to(self.device)
        timestep_list = ddim.inference_timesteps(self.scheduler, num_steps)
        timesteps = torch.tensor(timestep_list, dtype=torch.long)
        prev_timesteps = ddim.previous_timesteps(timesteps, num_train_timesteps=self.scheduler.config.num_train_timesteps, num_inference_steps=num_steps)
        condition = self.encode_prompts(prompts)
        negative = self.negative_embeds()

        all_latents = [latents]
        log_probs = []
        for t, t_prev in zip(timesteps.tolist(), prev_timesteps.tolist()):
            t_batch = torch.full((batch,), t, dtype=torch.long, device=self.device)
            output = self._model_output(latents, t_batch, condition, negative, guidance_scale)
            noise = torch.stack([torch.randn(channels, size, size, generator=g) for g in generators]).to(self.device)
            step = ddim.ddim_step_with_log_prob(
                model_output=output,
                sample=latents,
                timesteps=t_batch,
                prev_timesteps=torch.full((batch,), t_prev, dtype=torch.long, device=self.device),
                alphas_cumprod=self.alphas_cumprod,
                final_alpha_cumprod=self.final_alpha_cumprod,
                eta=eta,
                prediction_type=self.prediction_type,
                noise=noise,
                reduction=reduction,
            )
            latents = step.prev_sample
            all_latents.append(latents)
            log_probs.append(step.log_prob)

        trajectories = Trajectories(
            prompts=list(prompts),
            latents=torch.stack(all_latents, dim=1).cpu().numpy(),  # (batch, steps + 1, C, H, W)
            timesteps=timesteps.numpy(),
            prev_timesteps=prev_timesteps.numpy(),
            log_probs=torch.stack(log_probs, dim=1).cpu().numpy(),  # (batch, steps)
            prompt_embeds=condition.embeds.cpu().numpy(),
            negative_prompt_embeds=negative.embeds.cpu().numpy(),
            pooled_prompt_embeds=None if condition.pooled is None else condition.pooled.cpu().numpy(),
            negative_pooled_prompt_embeds=None if negative.pooled is None else negative.pooled.cpu().numpy(),
            seeds=np.asarray(seeds, dtype=np.int64),
            guidance_scale=float(guidance_scale),
            eta=float(eta),
            num_inference_steps=num_steps,
            policy_version=self.version,
        )
        images = self.decode(latents) if decode else None
        return trajectories, images

    def log_prob(
        self,
        *,
        latents: torch.Tensor,
        next_latents: torch.Tensor,
        timesteps: torch.Tensor,
        prev_timesteps: torch.Tensor,
        prompt_embeds: torch.Tensor,
        negative_prompt_embeds: torch.Tensor,
        guidance_scale: float,
        eta: float,
        reduction: ddim.Reduction = "mean",
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
    ) -> ddim.StepOutput:
        """Recompute log p_theta(x_{t_prev} | x_t, c) for given transitions under the current weights.

        Shapes: latents/next_latents (batch, C, H, W); timesteps/prev_timesteps (batch,);
        prompt_embeds (batch, tokens, dim); negative_prompt_embeds (tokens, dim) or per
        sample; SDXL also pooled_prompt_embeds (batch, dim) and negative_pooled_prompt_embeds
        (dim,). Differentiable in the trainable weights.
        """
        if self.lora_merged and torch.is_grad_enabled():
            raise RuntimeError(
                "this policy's LoRA adapter is merged into the base weights (a sampling-only state), so no "
                "gradient would reach it; call unmerge_lora() before computing log-probs to train on"
            )
        latents = latents.to(self.device)
        timesteps = timesteps.to(self.device)

        def on_device(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.to(self.device)

        condition = PromptEmbeddings(embeds=prompt_embeds.to(self.device), pooled=on_device(pooled_prompt_embeds))
        negative = PromptEmbeddings(embeds=negative_prompt_embeds.to(self.device), pooled=on_device(negative_pooled_prompt_embeds))
        output = self._model_output(latents, timesteps, condition, negative, guidance_scale)
        return ddim.ddim_step_with_log_prob(
            model_output=output,
            sample=latents,
            timesteps=timesteps,
            prev_timesteps=prev_timesteps.to(self.device),
            alphas_cumprod=self.alphas_cumprod,
            final_alpha_cumprod=self.final_alpha_cumprod,
            eta=eta,
            prediction_type=self.prediction_type,
            prev_sample=next_latents.to(self.device),
            reduction=reduction,
        )

    def replay(self, trajectories: Trajectories, *, batch_size: int | None = None, reduction: ddim.Reduction = "mean") -> tuple[np.ndarray, np.ndarray]:
        """Re-score every recorded transition under the current weights, ``batch_size`` samples at a time.

        Returns log-probs (batch, steps) and the Gaussians' means (batch, steps, C, H, W).
        """
        batch_size = batch_size or trajectories.batch_size
        batch, steps = trajectories.batch_size, trajectories.num_steps
        log_probs = np.zeros((batch, steps), dtype=np.float32)
        means = np.zeros((batch, steps, *trajectories.latents.shape[2:]), dtype=np.float32)
        negative = as_tensor(trajectories.negative_prompt_embeds)
        negative_pooled = trajectories.tensor("negative_pooled_prompt_embeds")
        with torch.no_grad():
            for start in range(0, batch, batch_size):
                rows = slice(start, start + batch_size)
                latents = as_tensor(trajectories.latents[rows])
                embeds = as_tensor(trajectories.prompt_embeds[rows])
                pooled = trajectories.tensor("pooled_prompt_embeds", rows)
                n = latents.shape[0]
                for j in range(steps):
                    out = self.log_prob(
                        latents=latents[:, j],
                        next_latents=latents[:, j + 1],
                        timesteps=torch.full((n,), int(trajectories.timesteps[j]), dtype=torch.long),
                        prev_timesteps=torch.full((n,), int(trajectories.prev_timesteps[j]), dtype=torch.long),
                        prompt_embeds=embeds,
                        negative_prompt_embeds=negative,
                        pooled_prompt_embeds=pooled,
                        negative_pooled_prompt_embeds=negative_pooled,
                        guidance_scale=trajectories.guidance_scale,
                        eta=trajectories.eta,
                        reduction=reduction,
                    )
                    log_probs[rows, j] = out.log_prob.cpu().numpy()
                    means[rows, j] = out.mean.cpu().numpy()
        return log_probs, means

    def trajectory_log_probs(self, trajectories: Trajectories, *, batch_size: int | None = None, reduction: ddim.Reduction = "mean") -> np.ndarray:
        """Recompute every recorded transition's log-prob, in batches of ``batch_size`` samples. (batch, steps)."""
        return self.replay(trajectories, batch_size=batch_size, reduction=reduction)[0]

def load_policy(model, *, lora_path: str | os.PathLike | None = None, trainable: bool = True, unet_only: bool = False) -> DiffusionPolicy:
    """Build a policy from a :class:`orchestrator.config.ModelConfig` section.

    ``trainable=False`` loads the frozen base model (the reference policy): no adapter,
    no gradients. ``unet_only`` leaves out the VAE and text encoders (learners and
    reference actors work from recorded trajectories, which carry prompt embeddings).
    """
    from actors.toy_model import embedded_model_path

    path = model.path or embedded_model_path()
    if not trainable:
        policy = DiffusionPolicy.from_pretrained(path, finetune="full", dtype=model.dtype, device=model.device, unet_only=unet_only)
        policy.unet.requires_grad_(False)
        return policy
    return DiffusionPolicy.from_pretrained(
        path,
        finetune=model.finetune,
        lora_rank=model.lora.rank,
        lora_alpha=model.lora.alpha,
        lora_target_modules=model.lora.target_modules,
        lora_dropout=model.lora.dropout,
        dtype=model.dtype,
        device=model.device,
        lora_path=lora_path,
        unet_only=unet_only,
        gradient_checkpointing=model.gradient_checkpointing,
    )
