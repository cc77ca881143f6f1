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
import os
from typing import Sequence

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from transformers import AutoTokenizer, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel

from actors.diffusion import flow
from actors.diffusion.devices import load_settings
from actors.diffusion.families import PromptEmbeddings, guided
from actors.diffusion.files import SD3, Family, check_pipeline_dir, detect_family, vae_scale_factor
from actors.diffusion.flow_matching import FlowMatchingPolicy
from actors.storage import fetch

logger = logging.getLogger(__name__)

SD3_LORA_TARGETS: tuple[str, ...] = (
    # joint attention: image-stream projections, text-stream projections ("add_"), both outputs
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
    # feed-forward of the image stream and of the text stream
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
)
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

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        finetune: str = "lora",
        lora_rank: int = 4,
        lora_alpha: float = 4.0,
        lora_target_modules: Sequence[str] | None = None,
        lora_dropout: float = 0.0,
        dtype: str = "float32",
        device: str = "auto",
        lora_path: str | os.PathLike | None = None,
        unet_only: bool = False,
        gradient_checkpointing: bool = False,
        unet_path: str | os.PathLike | None = None,
        max_sequence_length: int | None = None,
    ) -> "FlowPolicy":
        """Load an SD3 pipeline directory (local or a URI); attach a fresh LoRA or one from ``lora_path``.

        The arguments mean what they mean for ``DiffusionPolicy.from_pretrained``: ``unet_only``
        loads the transformer alone (no VAE, no text encoders) and ``unet_path`` replaces the
        pipeline's transformer with a diffusers ``SD3Transformer2DModel`` folder (a fully
        fine-tuned run's). ``max_sequence_length`` is the number of T5 tokens per caption; None
        means the pipeline's default, 256, or the T5 tokenizer's ``model_max_length`` where that
        is shorter (the embedded toy flow model's: 16).
        ``lora_target_modules`` None adapts :data:`SD3_LORA_TARGETS`.
        """
        path = check_pipeline_dir(fetch(path, "models"))  # a URI is downloaded once per node
        family = detect_family(path)
        if family is not SD3:
            runs_it = "FluxPolicy" if family.flow_matching else "DiffusionPolicy (a DDIM model)"
            raise ValueError(
                f"model path {str(path)!r} holds a {family.name} pipeline: load it with {runs_it}, or with "
                "pretrained_policy/load_policy, which pick the class; FlowPolicy runs sd3 (StableDiffusion3Pipeline)"
            )
        torch_dtype, torch_device, common = load_settings(dtype=dtype, finetune=finetune, device=device)
        if max_sequence_length is not None and max_sequence_length < 1:
            raise ValueError(f"max_sequence_length must be >= 1 T5 token, got {max_sequence_length} (SD3's pipeline uses 256)")
        if unet_path is not None:
            transformer = SD3Transformer2DModel.from_pretrained(fetch(unet_path, "models", keep_parent=True), **common)
        else:
            transformer = SD3Transformer2DModel.from_pretrained(path, subfolder=family.denoiser, **common)
        vae, text_encoders, tokenizers = None, [], []
        if not unet_only:
            vae_config = AutoencoderKL.load_config(path, subfolder="vae")
            vae_dtype = torch.float32 if torch_dtype == torch.float16 and vae_config.get("force_upcast") else torch_dtype
            vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **{**common, "torch_dtype": vae_dtype})
            (clip_l_tok, clip_l), (clip_g_tok, clip_g), (t5_tok, t5) = family.text_encoders
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
            check_conditioning(transformer.config, text_encoders)
        if max_sequence_length is None:
            t5_length = tokenizers[2].model_max_length if tokenizers else DEFAULT_MAX_SEQUENCE_LENGTH
            max_sequence_length = min(DEFAULT_MAX_SEQUENCE_LENGTH, t5_length)
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler")
        for module in (transformer, vae, *text_encoders):
            if module is not None:
                module.requires_grad_(False)
                module.to(torch_device).eval()
        policy = cls(
            transformer=transformer,
            vae=vae,
            text_encoders=text_encoders,
            tokenizers=tokenizers,
            scheduler=scheduler,
            device=torch_device,
            dtype=torch_dtype,
            family=family,
            image_size=transformer.config.sample_size * vae_scale_factor(path),
            max_sequence_length=max_sequence_length,
        )
        if lora_path is not None:
            policy.load_lora(lora_path)
        elif finetune == "lora":
            policy.add_lora(rank=lora_rank, alpha=lora_alpha, target_modules=lora_target_modules, dropout=lora_dropout)
        else:
            transformer.requires_grad_(True)
        if gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        return policy

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
