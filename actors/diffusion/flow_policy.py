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
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from transformers import AutoTokenizer, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel

from actors.diffusion import ddim, flow
from actors.diffusion.adapted import AdaptedPolicy
from actors.diffusion.devices import load_settings
from actors.diffusion.families import PromptEmbeddings
from actors.diffusion.files import SD3, Family, check_pipeline_dir, detect_family, vae_scale_factor
from actors.diffusion.lora import write_lora
from actors.diffusion.trajectory import Trajectories
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


class FlowPolicy(AdaptedPolicy):
    """A rectified-flow text-to-image model with SDE sampling and log-prob recomputation.

    Build with :meth:`from_pretrained`. ``transformer`` (also ``unet``) is the only trained module.
    """

    KEY_PREFIX = "transformer."
    FOREIGN_PREFIX = "unet."
    NETWORK = "SD3 transformer"
    FOREIGN_NETWORK = "a UNet"
    TIMESTEP_DTYPE = torch.float32  # recorded sigmas
    SAMPLES_SDE_WINDOW = True

    def __init__(
        self,
        *,
        transformer,
        vae,
        text_encoders: Sequence,
        tokenizers: Sequence,
        scheduler,
        device: torch.device,
        dtype: torch.dtype,
        family: Family = SD3,
        image_size: int | None = None,
        max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
        lora_config=None,
    ):
        if scheduler.config.get("use_dynamic_shifting", False):
            raise ValueError(
                "the scheduler uses resolution-dependent (dynamic) shifting, which FlowPolicy does not implement; "
                "it samples with SD3's static shift (scheduler_config.json: use_dynamic_shifting false, shift)"
            )
        self.transformer = transformer
        self.vae = vae
        """None on a ``unet_only`` policy (learners, reference actors)."""
        self.text_encoders = tuple(text_encoders)
        """CLIP-L, CLIP-G and T5 in SD3's order; empty on a ``unet_only`` policy."""
        self.tokenizers = tuple(tokenizers)
        self.scheduler = scheduler
        self.shift = float(scheduler.config.shift)
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        self.family = family
        self.image_size = image_size
        """Side of the square images in pixels."""
        self.max_sequence_length = max_sequence_length
        self.device = device
        self.dtype = dtype
        self.lora_config = lora_config
        self.version = 0
        """Incremented by every weight update, so trajectories can say which weights made them."""
        self._negative_embeds: PromptEmbeddings | None = None
        self._premerge_weights: dict[str, torch.Tensor] | None = None
        """While the adapter is merged (:meth:`merge_lora`): each adapted layer's own weight, on the CPU."""

    @property
    def unet(self):
        """The transformer, under the name the workers give the trained network (they also replace it, e.g. by a DeepSpeed engine)."""
        return self.transformer

    @unet.setter
    def unet(self, module) -> None:
        self.transformer = module

    @property
    def text_encoder(self):
        """The first CLIP text encoder; None on a ``unet_only`` policy."""
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
        lora_target_modules: Sequence[str] | None = None,
        lora_dropout: float = 0.0,
        dtype: str = "float32",
        device: str = "auto",
        lora_path: str | os.PathLike | None = None,
        unet_only: bool = False,
        gradient_checkpointing: bool = False,
        unet_path: str | os.PathLike | None = None,
        max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
    ) -> "FlowPolicy":
        """Load an SD3 pipeline directory (local or a URI); attach a fresh LoRA or one from ``lora_path``.

        The arguments mean what they mean for ``DiffusionPolicy.from_pretrained``: ``unet_only``
        loads the transformer alone (no VAE, no text encoders) and ``unet_path`` replaces the
        pipeline's transformer with a diffusers ``SD3Transformer2DModel`` folder (a fully
        fine-tuned run's). ``max_sequence_length`` is the number of T5 tokens per caption.
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
        if max_sequence_length < 1:
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

    def add_lora(self, *, rank: int, alpha: float, target_modules: Sequence[str] | None = None, dropout: float = 0.0) -> None:
        """Attach a LoRA adapter to the transformer's attention and feed-forward layers; only it is trainable.

        ``target_modules`` None means :data:`SD3_LORA_TARGETS` (what ``model.lora.target_modules: null`` asks for).
        """
        if target_modules is None:
            target_modules = SD3_LORA_TARGETS
        config = LoraConfig(
            r=rank, lora_alpha=alpha, target_modules=list(target_modules), lora_dropout=dropout, init_lora_weights="gaussian"
        )
        try:
            self.transformer.add_adapter(config)
        except ValueError as error:
            raise ValueError(
                f"could not attach LoRA to target modules {list(target_modules)}: {error}; "
                f"SD3's adaptable layers are e.g. {', '.join(SD3_LORA_TARGETS)}"
            ) from error
        # Half-precision master weights lose small updates; trainable weights stay fp32.
        for param in self.transformer.parameters():
            if param.requires_grad:
                param.data = param.data.float()
        self.lora_config = config

    # ------------------------------------------------------------------ LoRA persistence
    def _require_lora(self, what: str) -> None:
        if self.lora_config is None:
            raise ValueError(f"this policy has no LoRA adapter (finetune: full), so it cannot {what}; save the transformer instead")

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """Adapter weights under peft's keys relative to the transformer (``transformer_blocks.0.attn.to_q.lora_A.weight``).

        This is the layout diffusers' SD3 LoRA files use, minus their ``transformer.`` prefix;
        it is what a weight sync ships.
        """
        self._require_lora("export adapter weights")
        return get_peft_model_state_dict(self.transformer)

    def save_lora(self, directory: str | os.PathLike, state_dict: dict | None = None) -> Path:
        """Write the adapter as ``StableDiffusion3Pipeline.load_lora_weights(directory)`` reads it, plus peft's config.

        The weights file is written by diffusers' own ``save_lora_weights`` (``transformer.``
        keys, the adapter's rank and alpha in the file's metadata, so diffusers applies the
        same scale); ``adapter_config.json`` is what :meth:`load_lora` reads back. ``state_dict``
        (peft's or diffusers' key names) replaces the policy's own weights, e.g. a learner's
        gathered ones.
        """
        self._require_lora("save an adapter")
        weights = self.lora_state_dict() if state_dict is None else state_dict
        return write_lora(directory, weights, self.lora_config, denoiser=self.family.denoiser)

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

    def negative_embeds(self) -> PromptEmbeddings:
        """The unconditional branch of CFG (the empty caption), computed once: embeds (tokens, dim), pooled (dim,)."""
        if self._negative_embeds is None:
            empty = self.encode_prompts([""])
            self._negative_embeds = PromptEmbeddings(embeds=empty.embeds[0], pooled=empty.pooled[0])
        return self._negative_embeds

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Latents x_0 -> images. (batch, H, W, 3) uint8.

        SD3's VAE latents are normalised as ``(z - shift_factor) * scaling_factor``; this undoes both.
        """
        self._require_decoders("decode latents")
        shift = self.vae.config.get("shift_factor") or 0.0
        scaled = latents.to(self.device, torch.float32) / self.vae.config.scaling_factor + shift
        pixels = self.vae.decode(scaled.to(self.vae.dtype)).sample.float()
        return ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()

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

    def _guided_velocity(
        self, latents: torch.Tensor, sigmas: torch.Tensor, condition: PromptEmbeddings, negative: PromptEmbeddings, guidance_scale: float
    ) -> torch.Tensor:
        """The (guided) velocity for a batch; one call on [uncond; cond] when guiding.

        ``negative`` may hold one row (shared by the batch) or one per sample.
        """
        if guidance_scale == 1.0:
            return self._velocity(latents, sigmas, condition)
        batch = latents.shape[0]

        def rows(tensor: torch.Tensor, per_sample: torch.Tensor) -> torch.Tensor:
            return tensor.expand(batch, *tensor.shape) if tensor.ndim < per_sample.ndim else tensor

        if negative.pooled is None or condition.pooled is None:
            raise ValueError("an SD3 policy needs pooled prompt embeddings; these trajectories were recorded without them")
        both = PromptEmbeddings(
            embeds=torch.cat([rows(negative.embeds, condition.embeds), condition.embeds]),
            pooled=torch.cat([rows(negative.pooled, condition.pooled), condition.pooled]),
        )
        output = self._velocity(torch.cat([latents, latents]), torch.cat([sigmas, sigmas]), both)
        unconditional, conditional = output.chunk(2)
        return ddim.guided_output(unconditional, conditional, guidance_scale)

    @torch.no_grad()
    def sample(
        self,
        prompts: Sequence[str],
        *,
        seeds: Sequence[int],
        num_steps: int = 20,
        eta: float = 0.7,
        guidance_scale: float = 4.5,
        reduction: ddim.Reduction = "mean",
        decode: bool = True,
        sde_window: tuple[int, int] | None = None,
    ) -> tuple[Trajectories, np.ndarray | None]:
        """Sample one image per prompt with the Flow-GRPO SDE, recording its stochastic steps.

        ``eta`` is the SDE noise level ``a`` (Flow-GRPO uses 0.7). Each sample's initial latent
        and per-step noise come from its own seed, so an image depends only on (weights, prompt,
        seed, settings), never on its batch companions. Returns (trajectories, images (batch,
        H, W, 3) uint8); the trajectories' ``timesteps``/``prev_timesteps`` are sigmas.

        ``sde_window = (start, stop)`` takes the SDE step only on steps ``start <= i < stop``
        and the deterministic Euler ODE step on the others (Flow-GRPO-Fast: the early,
        high-noise steps carry most of the training signal); None = every step. Only the
        window is recorded (``Trajectories.first_step`` says where it starts), as the ODE steps
        have no log-probability. Step i's noise is the i-th draw of the sample's seed whatever
        the window, so the window covering every step samples exactly what None does.
        """
        if len(prompts) != len(seeds):
            raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds; give one seed per prompt")
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if eta <= 0:
            raise ValueError(f"eta (the SDE noise level) must be > 0 for trajectories to have log-probabilities, got {eta}")
        stochastic = flow.sde_window(num_steps, sde_window)  # (steps,) bool; raises on a bad window
        start, stop = (0, num_steps) if sde_window is None else (int(sde_window[0]), int(sde_window[1]))
        batch = len(prompts)
        channels = self.transformer.config.in_channels
        size = self.transformer.config.sample_size
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        latents = torch.stack([torch.randn(channels, size, size, generator=g) for g in generators]).to(self.device)
        sigmas = flow.flow_sigmas(num_steps, shift=self.shift, num_train_timesteps=self.num_train_timesteps)  # (steps + 1,)
        condition = self.encode_prompts(prompts)
        negative = self.negative_embeds()

        all_latents = []  # the latent before each recorded step, then the one after the last
        log_probs = []
        for i in range(num_steps):
            if i == start:
                all_latents.append(latents)
            sigma = sigmas[i].expand(batch).to(self.device)
            sigma_next = sigmas[i + 1].expand(batch).to(self.device)
            velocity = self._guided_velocity(latents, sigma, condition, negative, guidance_scale)
            if i < stop:
                # drawn on the ODE steps before the window too: step i's noise is the seed's i-th draw whatever the window
                noise = torch.stack([torch.randn(channels, size, size, generator=g) for g in generators]).to(self.device)
            if not stochastic[i]:
                latents = flow.flow_ode_step(velocity=velocity, sample=latents, sigmas=sigma, sigmas_next=sigma_next)
                continue
            step = flow.flow_sde_step_with_log_prob(
                velocity=velocity,
                sample=latents,
                sigmas=sigma,
                sigmas_next=sigma_next,
                noise_level=eta,
                noise=noise,
                reduction=reduction,
            )
            latents = step.prev_sample
            all_latents.append(latents)
            log_probs.append(step.log_prob)

        trajectories = Trajectories(
            prompts=list(prompts),
            latents=torch.stack(all_latents, dim=1).cpu().numpy(),  # (batch, window + 1, C, H, W)
            timesteps=sigmas[start:stop].numpy(),  # (window,) float32 sigmas, descending
            prev_timesteps=sigmas[start + 1 : stop + 1].numpy(),  # (window,) float32, ending at 0 if the window does
            log_probs=torch.stack(log_probs, dim=1).cpu().numpy(),  # (batch, window)
            prompt_embeds=condition.embeds.cpu().numpy(),
            negative_prompt_embeds=negative.embeds.cpu().numpy(),
            pooled_prompt_embeds=condition.pooled.cpu().numpy(),
            negative_pooled_prompt_embeds=negative.pooled.cpu().numpy(),
            seeds=np.asarray(seeds, dtype=np.int64),
            guidance_scale=float(guidance_scale),
            eta=float(eta),
            num_inference_steps=num_steps,
            policy_version=self.version,
            first_step=start,
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
        """Recompute log p_theta(x_{sigma_next} | x_sigma, c) for given transitions under the current weights.

        ``timesteps``/``prev_timesteps`` are the steps' sigmas and next sigmas, (batch,) float
        (what :meth:`sample` records). Shapes otherwise as ``DiffusionPolicy.log_prob``; the
        pooled embeddings are required. Differentiable in the trainable weights.
        """
        if self.lora_merged and torch.is_grad_enabled():
            raise RuntimeError(
                "this policy's LoRA adapter is merged into the base weights (a sampling-only state), so no "
                "gradient would reach it; call unmerge_lora() before computing log-probs to train on"
            )
        for name, value in (("timesteps", timesteps), ("prev_timesteps", prev_timesteps)):
            if not torch.is_floating_point(value):
                raise ValueError(
                    f"FlowPolicy.log_prob takes sigmas in [0, 1] as {name}, got a {value.dtype} tensor: these transitions "
                    "look like a DDIM policy's (integer timesteps); score them with DiffusionPolicy"
                )

        def on_device(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.to(self.device)

        latents = latents.to(self.device)
        sigmas = timesteps.to(self.device, torch.float32)
        condition = PromptEmbeddings(embeds=prompt_embeds.to(self.device), pooled=on_device(pooled_prompt_embeds))
        negative = PromptEmbeddings(embeds=negative_prompt_embeds.to(self.device), pooled=on_device(negative_pooled_prompt_embeds))
        velocity = self._guided_velocity(latents, sigmas, condition, negative, guidance_scale)
        return flow.flow_sde_step_with_log_prob(
            velocity=velocity,
            sample=latents,
            sigmas=sigmas,
            sigmas_next=prev_timesteps.to(self.device, torch.float32),
            noise_level=eta,
            prev_sample=next_latents.to(self.device),
            reduction=reduction,
        )


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


def load_flow_policy(model, *, lora_path: str | os.PathLike | None = None, trainable: bool = True, unet_only: bool = False) -> FlowPolicy:
    """Build a flow policy from a :class:`orchestrator.config.ModelConfig` section (``model.path`` an SD3 pipeline).

    Same meaning of the arguments as ``actors.diffusion.policy.load_policy``.
    """
    if not model.path:
        raise ValueError(
            "model.path must name an SD3 pipeline directory for a flow-matching policy (the embedded toy model is SD 1.5-format)"
        )
    if not trainable:
        policy = FlowPolicy.from_pretrained(model.path, finetune="full", dtype=model.dtype, device=model.device, unet_only=unet_only)
        policy.transformer.requires_grad_(False)
        return policy
    return FlowPolicy.from_pretrained(
        model.path,
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
