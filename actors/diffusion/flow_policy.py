"""The flow-matching policy: a Stable Diffusion 3 / 3.5 pipeline as a stochastic policy over Flow-GRPO SDE steps.

It has :class:`actors.diffusion.policy.DiffusionPolicy`'s public interface (loading, LoRA,
``sample``, ``log_prob``, ``replay``), so rollout, reference and learner workers can hold
either; only the denoiser and the step differ:

- the denoiser is an ``SD3Transformer2DModel`` (MMDiT) that predicts the velocity
  ``v = noise - x0``; it is also reachable as ``unet``, the name the workers use;
- each step is :func:`actors.diffusion.flow.flow_sde_step_with_log_prob` on the sigma
  schedule of the checkpoint's ``FlowMatchEulerDiscreteScheduler`` (its static ``shift``),
  with ``eta`` as Flow-GRPO's SDE noise level ``a`` (Liu et al. 2025, arXiv 2505.05470), or,
  outside an SDE window (``sampling.sde_window``), the deterministic Euler ODE step, which is
  not recorded;
- :class:`actors.diffusion.trajectory.Trajectories` records the sigmas, not integer
  timesteps: ``timesteps[i]`` is the sigma a step starts from and ``prev_timesteps[i]`` the
  one it reaches (0 after the last step), both float32 in [0, 1]. The transformer itself is
  called with ``sigma * num_train_timesteps``, as diffusers' pipeline does.

SD3's conditioning (Esser et al. 2024, sec. 5.2.1 "Improved Text Encoders") is built by
:meth:`FlowPolicy.encode_prompts`: both CLIP encoders' penultimate hidden states side by side,
zero-padded to the T5 width and followed, along the sequence, by the T5 encoder's tokens; the
pooled vector is the two CLIP projections side by side. Learners and reference actors load
the transformer only (``unet_only``) and read these from the recorded trajectories.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch
import torch.nn.functional as F
from diffusers import SD3Transformer2DModel
from transformers import AutoTokenizer, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel

from actors.diffusion import flow
from actors.diffusion.families import PromptEmbeddings, guided
from actors.diffusion.files import SD3, Family, vae_scale_factor
from actors.diffusion.flow_matching import MMDIT_LORA_TARGETS, FlowMatchingPolicy

logger = logging.getLogger(__name__)

SD3_LORA_TARGETS: tuple[str, ...] = MMDIT_LORA_TARGETS
"""LoRA targets for ``SD3Transformer2DModel``: every linear layer of the MMDiT blocks' attention and
feed-forward parts. Short names match by suffix, so SD 3.5's second attention (``attn2``) is adapted too."""

DEFAULT_MAX_SEQUENCE_LENGTH = 256
"""T5 tokens per caption, ``StableDiffusion3Pipeline``'s default; the CLIP tokens come on top."""


class FlowPolicy(FlowMatchingPolicy):
    """A Stable Diffusion 3 / 3.5 model with SDE sampling and log-prob recomputation.

    Build with :meth:`from_pretrained`. ``transformer`` (also ``unet``) is the only trained module.
    """

    NETWORK = "SD3 transformer"
    LORA_TARGETS = SD3_LORA_TARGETS
    MODEL_NAME = "SD3"
    FAMILY = SD3
    TRANSFORMER_CLASS = SD3Transformer2DModel
    DEFAULT_MAX_SEQUENCE_LENGTH = DEFAULT_MAX_SEQUENCE_LENGTH

    def __init__(self, *, scheduler, family: Family = SD3, max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH, **parts):
        """``parts``: the transformer and :class:`AdaptedPolicy`'s fields; the text encoders are CLIP-L, CLIP-G and T5."""
        if scheduler.config.get("use_dynamic_shifting", False):
            raise ValueError(
                "the scheduler uses resolution-dependent (dynamic) shifting, which FlowPolicy does not implement; "
                "it samples with SD3's static shift (scheduler_config.json: use_dynamic_shifting false, shift)"
            )
        super().__init__(scheduler=scheduler, family=family, max_sequence_length=max_sequence_length, **parts)
        config = self.transformer.config
        self.latent_shape = (config.in_channels, config.sample_size, config.sample_size)
        self.shift = float(scheduler.config.shift)
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)

    def sigmas(self, num_steps: int) -> torch.Tensor:
        """SD3's schedule: the scheduler's static ``shift`` (:func:`actors.diffusion.flow.flow_sigmas`)."""
        return flow.flow_sigmas(num_steps, shift=self.shift, num_train_timesteps=self.num_train_timesteps)

    # ------------------------------------------------------------------ loading (FlowMatchingPolicy.from_pretrained)
    @classmethod
    def _load_text_encoders(cls, path, common: dict) -> tuple[list, list]:
        """CLIP-L and CLIP-G, both with their text projections (the pooled vector), then T5."""
        (clip_l_tok, clip_l), (clip_g_tok, clip_g), (t5_tok, t5) = SD3.text_encoders
        text_encoders = [
            CLIPTextModelWithProjection.from_pretrained(path, subfolder=clip_l, **common),
            CLIPTextModelWithProjection.from_pretrained(path, subfolder=clip_g, **common),
            T5EncoderModel.from_pretrained(path, subfolder=t5, **common),
        ]
        # AutoTokenizer: T5's tokenizer class differs between transformers versions (slow/fast, sentencepiece or not)
        tokenizers = [
            CLIPTokenizer.from_pretrained(path, subfolder=clip_l_tok),
            CLIPTokenizer.from_pretrained(path, subfolder=clip_g_tok),
            AutoTokenizer.from_pretrained(path, subfolder=t5_tok),
        ]
        return text_encoders, tokenizers

    @staticmethod
    def _check_conditioning(transformer_config, text_encoders: Sequence) -> None:
        check_conditioning(transformer_config, text_encoders)

    @classmethod
    def _size_arguments(cls, path, transformer_config, vae_config: dict) -> dict:
        """SD3 samples at the size it was trained for: the transformer's latent side times the VAE's factor."""
        return {"image_size": transformer_config.sample_size * vae_scale_factor(path)}

    # ------------------------------------------------------------------ text and pixels
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> PromptEmbeddings:
        """SD3's conditioning: embeds (batch, clip_tokens + t5_tokens, t5_dim), pooled (batch, clip_l_proj + clip_g_proj); float32."""
        self._require_decoders("encode prompts")
        prompts = list(prompts)
        clip_tokenizers, t5_tokenizer = self.tokenizers[:2], self.tokenizers[2]
        clip_encoders, t5_encoder = self.text_encoders[:2], self.text_encoders[2]
        # Both CLIP encoders see the first tokenizer's length: their features are joined token by token.
        clip_length = clip_tokenizers[0].model_max_length
        features, pooled = [], []
        for tokenizer, encoder in zip(clip_tokenizers, clip_encoders):
            ids = tokenizer(prompts, padding="max_length", max_length=clip_length, truncation=True, return_tensors="pt").input_ids
            output = encoder(ids.to(self.device), output_hidden_states=True)
            features.append(output.hidden_states[-2].float())  # penultimate layer, as for SDXL
            pooled.append(output.text_embeds.float())
        ids = t5_tokenizer(
            prompts,
            padding="max_length",
            max_length=self.max_sequence_length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        ).input_ids
        t5_tokens = t5_encoder(ids.to(self.device))[0].float()
        clip_tokens = torch.cat(features, dim=-1)
        clip_tokens = F.pad(clip_tokens, (0, t5_tokens.shape[-1] - clip_tokens.shape[-1]))
        return PromptEmbeddings(embeds=torch.cat([clip_tokens, t5_tokens], dim=1), pooled=torch.cat(pooled, dim=-1))

    # ------------------------------------------------------------------ the policy
    def _velocity(self, latents: torch.Tensor, sigmas: torch.Tensor, condition: PromptEmbeddings) -> torch.Tensor:
        """One transformer call in the frozen weights' dtype; the velocity in float32."""
        if condition.pooled is None:
            raise ValueError("an SD3 policy needs pooled prompt embeddings; these trajectories were recorded without them")
        # float32 timesteps whatever the weights' dtype, as diffusers' pipeline passes them
        timesteps = sigmas.to(self.device, torch.float32) * self.num_train_timesteps
        output = self.transformer(
            hidden_states=latents.to(self.dtype),
            timestep=timesteps,
            encoder_hidden_states=condition.embeds.to(self.dtype),
            pooled_projections=condition.pooled.to(self.dtype),
            return_dict=False,
        )[0]
        return output.float()

    def step_velocity(
        self, latents: torch.Tensor, sigmas: torch.Tensor, condition: PromptEmbeddings, negative: PromptEmbeddings, guidance_scale: float
    ) -> torch.Tensor:
        """The (guided) velocity for a batch (:func:`actors.diffusion.families.guided`)."""
        if guidance_scale != 1.0 and (negative.pooled is None or condition.pooled is None):
            raise ValueError("an SD3 policy needs pooled prompt embeddings; these trajectories were recorded without them")
        return guided(self._velocity, latents, sigmas, condition, negative, guidance_scale)


def check_conditioning(transformer_config, text_encoders: Sequence) -> None:
    """Fail at load, not at the first transformer call, when the SD3 transformer and its text encoders disagree."""
    clip_l, clip_g, t5 = text_encoders
    problems = []
    t5_width = t5.config.d_model
    if t5_width != transformer_config.joint_attention_dim:
        problems.append(f"text_encoder_3 gives {t5_width}-wide tokens but the transformer expects {transformer_config.joint_attention_dim}")
    clip_width = clip_l.config.hidden_size + clip_g.config.hidden_size
    if clip_width > t5_width:
        problems.append(
            f"the two CLIP encoders' joint features ({clip_width}) are wider than T5's ({t5_width}), so they cannot be padded to it"
        )
    pooled = clip_l.config.projection_dim + clip_g.config.projection_dim
    if pooled != transformer_config.pooled_projection_dim:
        problems.append(
            f"the CLIP projections give {pooled} pooled features but the transformer expects {transformer_config.pooled_projection_dim}"
        )
    if problems:
        raise ValueError(f"the SD3 pipeline's parts come from different models: {'; '.join(problems)}")
