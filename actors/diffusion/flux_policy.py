"""The FLUX.1 policy: a FLUX.1-dev or -schnell pipeline as a stochastic policy over Flow-GRPO SDE steps.

It has :class:`actors.diffusion.flow_policy.FlowPolicy`'s public interface (loading, LoRA,
``sample``, ``log_prob``, ``replay``), so rollout, reference and learner workers can hold it
too. What differs from SD3:

- the denoiser is a ``FluxTransformer2DModel``: double-stream (MMDiT) blocks followed by
  single-stream blocks, with rotary positions instead of a learned position table. It reads
  the 16-channel latents as a sequence of 2 x 2 patches (64 features a token) and gets each
  token's (row, column) alongside; it predicts the velocity ``v = noise - x0`` in the same
  packed form. The policy packs latents right before the call and unpacks the velocity right
  after, so :class:`actors.diffusion.trajectory.Trajectories` records them unpacked,
  ``(batch, steps + 1, C, H, W)`` like every other policy's.
- the sigma schedule is the FLUX pipeline's: ``linspace(1, 1 / n, n)`` shifted by the
  scheduler's static ``shift`` or, when its config says ``use_dynamic_shifting`` (FLUX.1-dev),
  by a shift ``mu`` that grows linearly with the number of image tokens (:func:`flux_sigmas`:
  the resolution-dependent shifting of Esser et al. 2024, with FLUX's own formula). The
  transformer takes the sigma itself as its timestep (it scales by 1000 inside).
- there is no classifier-free guidance. FLUX.1-dev is guidance-distilled: the guidance scale
  is an input of the transformer (``guidance``), one call per step whatever its value;
  FLUX.1-schnell has no guidance input and ignores the scale. The empty caption's
  embeddings are still recorded (``negative_prompt_embeds``), so the trajectories have the
  fields the workers pass around, but nothing reads them.
- the conditioning (:meth:`FluxPolicy.encode_prompts`) is the T5 encoder's tokens, which the
  transformer attends to, and the CLIP encoder's pooled output, which joins its time embedding.

Each step is :func:`actors.diffusion.flow.flow_sde_step_with_log_prob` with ``eta`` as
Flow-GRPO's noise level ``a`` (Liu et al. 2025, arXiv 2505.05470).
"""

from __future__ import annotations

import logging
import math
from typing import Sequence

import numpy as np
import torch
from diffusers import FluxTransformer2DModel
from transformers import AutoTokenizer, CLIPTextModel, CLIPTokenizer, T5EncoderModel

from actors.diffusion.families import PromptEmbeddings
from actors.diffusion.files import FLUX, Family, vae_scale_factor
from actors.diffusion.flow_matching import MMDIT_LORA_TARGETS, FlowMatchingPolicy

logger = logging.getLogger(__name__)

FLUX_LORA_TARGETS: tuple[str, ...] = MMDIT_LORA_TARGETS + (
    # single-stream blocks: q/k/v are the names above; the MLP's input and the joint attention + MLP output
    "proj_mlp",
    "proj_out",
)
"""LoRA targets for ``FluxTransformer2DModel``: every linear layer of both block types' attention and
feed-forward parts (the double-stream blocks are MMDiT blocks). Short names match by suffix."""

NEVER_ADAPTED = "proj_out"
"""A regular expression (full match on the module's path) for layers no LoRA is put on: the transformer's
final output projection, which shares its name with the single-stream blocks' ``proj_out``."""

DEFAULT_MAX_SEQUENCE_LENGTH = 512
"""T5 tokens per caption, ``FluxPipeline``'s default (FLUX.1-schnell's model card uses 256)."""
MAX_SEQUENCE_LENGTH = 512
"""The longest caption ``FluxPipeline`` accepts, in T5 tokens: the length FLUX.1 was trained with."""
DEFAULT_GUIDANCE_SCALE = 3.5
"""FLUX.1-dev's distilled guidance in ``FluxPipeline``; a model without guidance embeddings ignores it."""

_UNSUPPORTED_SCHEDULER_OPTIONS = ("shift_terminal", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas")


# ---------------------------------------------------------------------- pure functions


def check_scheduler_config(config) -> None:
    """Refuse scheduler settings :func:`flux_sigmas` does not reproduce (FLUX.1's own configs use none of them)."""
    used = [name for name in _UNSUPPORTED_SCHEDULER_OPTIONS if config.get(name)]
    if used:
        raise ValueError(
            f"the scheduler config sets {', '.join(used)}, which FluxPolicy's sigma schedule does not implement; it supports "
            "FLUX.1's FlowMatchEulerDiscreteScheduler configs (a static shift, or use_dynamic_shifting with base/max shift): "
            "unset them in scheduler/scheduler_config.json"
        )
    if config.get("use_dynamic_shifting", False) and config.get("time_shift_type", "exponential") not in ("exponential", "linear"):
        raise ValueError(f"unknown scheduler time_shift_type {config.get('time_shift_type')!r}; expected 'exponential' or 'linear'")


def dynamic_shift(image_seq_len: int, *, base_seq_len: int, max_seq_len: int, base_shift: float, max_shift: float) -> float:
    """FLUX's resolution-dependent shift mu: ``base_shift`` at ``base_seq_len`` image tokens, ``max_shift`` at
    ``max_seq_len``, on the straight line through both (so extrapolated outside them)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + slope * (image_seq_len - base_seq_len)


def flux_sigmas(num_steps: int, *, image_seq_len: int, scheduler_config) -> torch.Tensor:
    """The descending sigmas ``FluxPipeline`` samples with, for images of ``image_seq_len`` packed tokens.

    Returns ``num_steps + 1`` float32 values from 1 down to a final 0; step ``i`` goes from
    ``sigmas[i]`` to ``sigmas[i + 1]``. The pipeline hands the scheduler the unshifted
    ``s = linspace(1, 1 / num_steps, num_steps)``, which shifts them (``scheduler_config``, a dict
    or diffusers config):

    - ``use_dynamic_shifting`` (FLUX.1-dev): with ``mu`` from :func:`dynamic_shift`,
      ``e^mu / (e^mu + 1 / s - 1)`` (``time_shift_type`` "exponential", the default) or
      ``mu / (mu + 1 / s - 1)`` ("linear");
    - otherwise the static ``shift * s / (1 + (shift - 1) * s)`` (FLUX.1-schnell: shift 1, none).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if image_seq_len < 1:
        raise ValueError(f"image_seq_len must be >= 1 packed image token, got {image_seq_len}")
    check_scheduler_config(scheduler_config)
    s = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64)
    if scheduler_config.get("use_dynamic_shifting", False):
        mu = dynamic_shift(
            image_seq_len,
            base_seq_len=scheduler_config.get("base_image_seq_len", 256),
            max_seq_len=scheduler_config.get("max_image_seq_len", 4096),
            base_shift=scheduler_config.get("base_shift", 0.5),
            max_shift=scheduler_config.get("max_shift", 1.15),
        )
        scale = math.exp(mu) if scheduler_config.get("time_shift_type", "exponential") == "exponential" else mu
        sigmas = scale / (scale + (1 / s - 1))
    else:
        shift = float(scheduler_config.get("shift", 1.0))
        sigmas = shift * s / (1 + (shift - 1) * s)
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float()


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(batch, C, H, W) latents -> (batch, H/2 * W/2, C * 4) tokens, one per 2 x 2 patch, rows first.

    A token's features are its channels, each followed by its patch's four pixels (top-left,
    top-right, bottom-left, bottom-right): the order FLUX's transformer was trained on.
    """
    if latents.ndim != 4:
        raise ValueError(f"latents to pack must be (batch, C, H, W), got shape {tuple(latents.shape)}")
    batch, channels, height, width = latents.shape
    if height % 2 or width % 2:
        raise ValueError(f"FLUX packs latents into 2 x 2 patches, so their height and width must be even, got {height} x {width}")
    patches = latents.reshape(batch, channels, height // 2, 2, width // 2, 2)
    # (batch, patch row, patch column, channel, pixel row, pixel column)
    return patches.permute(0, 2, 4, 1, 3, 5).reshape(batch, (height // 2) * (width // 2), channels * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of :func:`pack_latents`: (batch, H/2 * W/2, C * 4) -> (batch, C, H, W)."""
    if tokens.ndim != 3:
        raise ValueError(f"packed latents must be (batch, tokens, features), got shape {tuple(tokens.shape)}")
    batch, count, features = tokens.shape
    if height % 2 or width % 2 or count != (height // 2) * (width // 2) or features % 4:
        raise ValueError(
            f"{count} tokens of {features} features are not the 2 x 2 patches of {height} x {width} latents "
            f"(expected {(height // 2) * (width // 2)} tokens of 4 * channels features)"
        )
    patches = tokens.reshape(batch, height // 2, width // 2, features // 4, 2, 2)
    return patches.permute(0, 3, 1, 4, 2, 5).reshape(batch, features // 4, height, width)


def image_positions(rows: int, columns: int) -> torch.Tensor:
    """Each packed token's position ids for FLUX's rotary embedding: (0, row, column), rows first. (rows * columns, 3)."""
    grid = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(columns), indexing="ij"), dim=-1).reshape(-1, 2)
    return torch.cat([torch.zeros(rows * columns, 1, dtype=grid.dtype), grid], dim=1)


# ---------------------------------------------------------------------- the policy


class FluxPolicy(FlowMatchingPolicy):
    """A FLUX.1 text-to-image model with SDE sampling and log-prob recomputation.

    Build with :meth:`from_pretrained`. ``transformer`` (also ``unet``) is the only trained module.
    """

    NETWORK = "FLUX transformer"
    LORA_TARGETS = FLUX_LORA_TARGETS
    LORA_EXCLUDED = NEVER_ADAPTED
    MODEL_NAME = "FLUX"
    FAMILY = FLUX
    TRANSFORMER_CLASS = FluxTransformer2DModel
    DEFAULT_MAX_SEQUENCE_LENGTH = DEFAULT_MAX_SEQUENCE_LENGTH
    MAX_SEQUENCE_LENGTH = MAX_SEQUENCE_LENGTH

    def __init__(
        self,
        *,
        scheduler,
        image_size: int,
        vae_scale_factor: int,
        family: Family = FLUX,
        max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
        **parts,
    ):
        """``parts``: the transformer and :class:`AdaptedPolicy`'s fields; the text encoders are CLIP-L and T5."""
        check_scheduler_config(scheduler.config)
        if image_size % (2 * vae_scale_factor):
            raise ValueError(
                f"image_size {image_size} must be a multiple of {2 * vae_scale_factor}: the VAE shrinks images "
                f"{vae_scale_factor}x and FLUX packs the latents into 2 x 2 patches"
            )
        super().__init__(scheduler=scheduler, image_size=image_size, family=family, max_sequence_length=max_sequence_length, **parts)
        self.vae_scale_factor = vae_scale_factor
        side = image_size // vae_scale_factor
        self.latent_shape = (self.transformer.config.in_channels // 4, side, side)  # unpacked
        self.guidance_embeds = bool(self.transformer.config.guidance_embeds)
        """FLUX.1-dev's distilled guidance is a transformer input; schnell has none."""

    def sigmas(self, num_steps: int) -> torch.Tensor:
        """FLUX's schedule for this image size (:func:`flux_sigmas`)."""
        _, height, width = self.latent_shape
        return flux_sigmas(num_steps, image_seq_len=(height // 2) * (width // 2), scheduler_config=self.scheduler.config)

    # ------------------------------------------------------------------ loading (FlowMatchingPolicy.from_pretrained)
    @classmethod
    def _load_text_encoders(cls, path, common: dict) -> tuple[list, list]:
        """CLIP-L (its pooled output, no projection), then T5."""
        (clip_tok, clip), (t5_tok, t5) = FLUX.text_encoders
        text_encoders = [
            CLIPTextModel.from_pretrained(path, subfolder=clip, **common),
            T5EncoderModel.from_pretrained(path, subfolder=t5, **common),
        ]
        # AutoTokenizer: T5's tokenizer class differs between transformers versions (slow/fast, sentencepiece or not)
        tokenizers = [CLIPTokenizer.from_pretrained(path, subfolder=clip_tok), AutoTokenizer.from_pretrained(path, subfolder=t5_tok)]
        return text_encoders, tokenizers

    @staticmethod
    def _check_conditioning(transformer_config, text_encoders: Sequence) -> None:
        check_conditioning(transformer_config, text_encoders)

    @staticmethod
    def _check_latents(transformer_config, vae_config: dict) -> None:
        check_latent_channels(transformer_config, vae_config)

    @classmethod
    def _size_arguments(cls, path, transformer_config, vae_config: dict, image_size: int | None = None) -> dict:
        """``image_size`` (pixels, square; ``from_pretrained(image_size=...)``) defaults to the VAE's
        ``sample_size``: 1024 for FLUX.1. FLUX's transformer has no fixed latent size."""
        return {
            "image_size": image_size if image_size is not None else int(vae_config["sample_size"]),
            "vae_scale_factor": vae_scale_factor(path),
        }

    # ------------------------------------------------------------------ text and pixels
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> PromptEmbeddings:
        """FLUX's conditioning: embeds (batch, t5_tokens, t5_dim), the T5 encoder's last hidden states;
        pooled (batch, clip_dim), the CLIP encoder's pooled output (no projection). Float32."""
        self._require_decoders("encode prompts")
        prompts = list(prompts)
        (clip_tokenizer, t5_tokenizer), (clip, t5) = self.tokenizers, self.text_encoders
        ids = clip_tokenizer(
            prompts, padding="max_length", max_length=clip_tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        pooled = clip(ids.to(self.device), output_hidden_states=False).pooler_output.float()
        ids = t5_tokenizer(
            prompts, padding="max_length", max_length=self.max_sequence_length, truncation=True, return_tensors="pt"
        ).input_ids
        tokens = t5(ids.to(self.device), output_hidden_states=False)[0].float()
        return PromptEmbeddings(embeds=tokens, pooled=pooled)

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Latents x_0 -> images (batch, H, W, 3) uint8; ``latents`` unpacked (batch, C, H, W), as the
        trajectories hold them, or packed (batch, tokens, C * 4) for this policy's image size."""
        if latents.ndim == 3:
            _, side, _ = self.latent_shape
            latents = unpack_latents(latents, side, side)
        return super().decode(latents)

    # ------------------------------------------------------------------ the policy
    def _velocity(self, latents: torch.Tensor, sigmas: torch.Tensor, condition: PromptEmbeddings, guidance_scale: float) -> torch.Tensor:
        """One transformer call on unpacked (batch, C, H, W) latents; the velocity, unpacked, in float32.

        The frozen weights' dtype goes in, as in ``FluxPipeline`` (which also casts the position
        ids to it); the timestep is the sigma itself, the guidance the scale itself: the
        transformer multiplies both by 1000.
        """
        if condition.pooled is None:
            raise ValueError("a FLUX policy needs pooled prompt embeddings; these trajectories were recorded without them")
        batch, _, height, width = latents.shape
        text_positions = torch.zeros(condition.embeds.shape[1], 3)
        guidance = None
        if self.guidance_embeds:
            guidance = torch.full((batch,), float(guidance_scale), device=self.device, dtype=torch.float32)
        output = self.transformer(
            hidden_states=pack_latents(latents.to(self.device)).to(self.dtype),
            timestep=sigmas.to(self.device, torch.float32),
            guidance=guidance,
            pooled_projections=condition.pooled.to(self.device, self.dtype),
            encoder_hidden_states=condition.embeds.to(self.device, self.dtype),
            txt_ids=text_positions.to(self.device, self.dtype),
            img_ids=image_positions(height // 2, width // 2).to(self.device, self.dtype),
            return_dict=False,
        )[0]
        return unpack_latents(output.float(), height, width)

    def step_velocity(
        self, latents: torch.Tensor, sigmas: torch.Tensor, condition: PromptEmbeddings, negative: PromptEmbeddings, guidance_scale: float
    ) -> torch.Tensor:
        """One transformer call whatever the guidance: FLUX has no classifier-free guidance, so
        ``negative`` (the empty caption, recorded only because the workers pass it around) is unused."""
        return self._velocity(latents, sigmas, condition, guidance_scale)

    def _check_guidance(self, guidance_scale: float) -> None:
        if not math.isfinite(guidance_scale):
            raise ValueError(f"guidance_scale must be a finite number (FLUX.1-dev uses 3.5), got {guidance_scale}")

    def sample(self, prompts: Sequence[str], *, num_steps: int = 28, guidance_scale: float = DEFAULT_GUIDANCE_SCALE, **kwargs):
        """:meth:`FlowMatchingPolicy.sample` with FLUX's defaults (28 steps, distilled guidance 3.5).

        ``guidance_scale`` is FLUX.1-dev's distilled guidance, ignored by a model without
        guidance embeddings; the initial latent is the one ``FluxPipeline`` draws from
        ``torch.Generator().manual_seed(seed)``. The trajectories hold unpacked latents.
        """
        return super().sample(prompts, num_steps=num_steps, guidance_scale=guidance_scale, **kwargs)


def check_latent_channels(transformer_config, vae_config: dict) -> None:
    """Fail at load when the transformer does not read 2 x 2 patches of the VAE's latents (e.g. FLUX.1 Fill's
    image-conditioned transformer, whose input also carries a masked image)."""
    expected = 4 * vae_config["latent_channels"]
    if transformer_config.in_channels != expected:
        raise ValueError(
            f"the FLUX transformer reads {transformer_config.in_channels} features a token, but 2 x 2 patches of the VAE's "
            f"{vae_config['latent_channels']}-channel latents have {expected}: this is not a FLUX.1 text-to-image transformer "
            "(FLUX.1 Fill, Canny and Depth are image-conditioned); give a FLUX.1-dev or -schnell pipeline"
        )


def check_conditioning(transformer_config, text_encoders: Sequence) -> None:
    """Fail at load, not at the first transformer call, when the FLUX transformer and its text encoders disagree."""
    clip, t5 = text_encoders
    token_width, pooled_width = transformer_config.joint_attention_dim, transformer_config.pooled_projection_dim
    problems = []
    if t5.config.d_model != token_width:
        problems.append(f"text_encoder_2 gives {t5.config.d_model}-wide tokens but the transformer expects {token_width}")
    if clip.config.hidden_size != pooled_width:
        problems.append(f"text_encoder gives {clip.config.hidden_size} pooled features but the transformer expects {pooled_width}")
    if problems:
        raise ValueError(f"the FLUX pipeline's parts come from different models: {'; '.join(problems)}")
