"""The diffusion policy: a Stable Diffusion pipeline as a stochastic policy over denoising steps.

One code path loads a local diffusers pipeline directory of any DDIM family
(:mod:`actors.diffusion.families`: SD 1.x/2.x with epsilon or v-prediction, SDXL): the embedded
toy model or a real checkpoint. The UNet is fine-tuned with LoRA (peft) or fully; the
VAE and text encoders stay frozen, and learners and reference actors do not load them
at all (``unet_only``): they read the prompt embeddings the rollout actors recorded.

Flow-matching pipelines are :class:`actors.diffusion.flow_policy.FlowPolicy`'s (SD3) and
:class:`actors.diffusion.flux_policy.FluxPolicy`'s (FLUX.1), which have the same interface.
:func:`pretrained_policy` and :func:`load_policy` are the one place that picks the class for
a directory, so workers, ``rayalign eval`` and serving need not know which family they run.

``sample`` records every transition's latents, timestep and Gaussian log-probability;
``log_prob`` recomputes the same quantities under the current weights for given
transitions. Both share :func:`actors.diffusion.ddim.ddim_step_with_log_prob` and the same
guidance arithmetic, which is what makes the importance ratio exactly 1 at equal weights.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from peft import LoraConfig
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from actors.diffusion import ddim, families
from actors.diffusion.adapted import AdaptedPolicy, freeze_on, load_vae
from actors.diffusion.devices import load_settings
from actors.diffusion.families import PromptEmbeddings, guided
from actors.diffusion.files import FLUX, SD, SDXL, Family, check_pipeline_dir, detect_family, read_pipeline_options, vae_scale_factor
from actors.diffusion.flow_policy import FlowPolicy
from actors.diffusion.flux_policy import FluxPolicy
from actors.diffusion.lora import unet_lora_state_dict, write_lora
from actors.diffusion.trajectory import Trajectories
from actors.storage import fetch
from actors.toy.model import resolve_model_path

logger = logging.getLogger(__name__)

UNET_LORA_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
"""LoRA targets of a UNet when none are configured: its attention projections, as in DDPO."""


class DiffusionPolicy(AdaptedPolicy):
    """A text-to-image diffusion model with sampling and log-prob recomputation.

    Build with :meth:`from_pretrained`. ``unet`` is the only trained module.
    """

    def __init__(self, *, unet, scheduler, family: Family = SD, force_zeros_for_empty_prompt: bool = False, device: torch.device, **parts):
        """``parts``: the rest of :class:`AdaptedPolicy`'s fields (``image_size``: SDXL's time ids need it)."""
        self.unet = unet
        super().__init__(scheduler=scheduler, family=family, device=device, **parts)
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt
        """SDXL base: the unconditional branch of CFG sees all-zero embeddings, not the empty caption's."""
        self.alphas_cumprod = scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
        self.final_alpha_cumprod = float(scheduler.final_alpha_cumprod)
        self.prediction_type = scheduler.config.prediction_type

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
    ) -> "DiffusionPolicy":
        """Load a pipeline directory (local or a URI); attach a fresh LoRA or one from ``lora_path``.

        ``unet_path`` replaces the pipeline's UNet with a diffusers UNet folder (``config.json``
        and safetensors weights), e.g. the ``unet/`` of a fully fine-tuned run's checkpoint.

        ``unet_only`` skips the VAE and text encoders: such a policy scores and trains on
        recorded trajectories (which carry their prompt embeddings) but cannot sample.
        ``gradient_checkpointing`` recomputes UNet activations in the backward pass instead
        of storing them (less memory, about a third more compute per training pass).
        ``lora_target_modules`` None adapts :data:`UNET_LORA_TARGETS`.
        """
        path = check_pipeline_dir(fetch(path, "models"))  # a URI is downloaded once per node
        family = detect_family(path)
        if family.flow_matching:
            raise ValueError(
                f"model path {str(path)!r} holds a {family.name} pipeline, a flow-matching model: load it with FlowPolicy, "
                "or with pretrained_policy/load_policy, which pick the policy class for the directory"
            )
        torch_dtype, torch_device, common = load_settings(dtype=dtype, finetune=finetune, device=device)
        if unet_path is not None:
            unet = UNet2DConditionModel.from_pretrained(fetch(unet_path, "models", keep_parent=True), **common)
        else:
            unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **common)
        vae, text_encoders, tokenizers = None, [], []
        if not unet_only:
            vae = load_vae(path, torch_dtype=torch_dtype, common=common)
            for index, (tokenizer_dir, encoder_dir) in enumerate(family.text_encoders):
                # SDXL's second encoder also has the text projection that gives the pooled embedding.
                encoder_cls = CLIPTextModelWithProjection if family is SDXL and index == 1 else CLIPTextModel
                text_encoders.append(encoder_cls.from_pretrained(path, subfolder=encoder_dir, **common))
                tokenizers.append(CLIPTokenizer.from_pretrained(path, subfolder=tokenizer_dir))
            if family is SDXL:
                families.check_added_conditioning(unet.config, pooled_dim=text_encoders[1].config.projection_dim)
        # Whatever scheduler the checkpoint ships (SD 1.5 ships PNDM, SDXL Euler), sampling is DDIM with its noise schedule.
        scheduler = DDIMScheduler.from_pretrained(path, subfolder="scheduler")
        freeze_on(torch_device, unet, vae, *text_encoders)
        options = read_pipeline_options(path)
        policy = cls(
            unet=unet,
            vae=vae,
            text_encoders=text_encoders,
            tokenizers=tokenizers,
            scheduler=scheduler,
            device=torch_device,
            dtype=torch_dtype,
            family=family,
            image_size=unet.config.sample_size * vae_scale_factor(path),
            force_zeros_for_empty_prompt=bool(options.get("force_zeros_for_empty_prompt", False)),
        )
        policy._finish_loading(
            finetune=finetune,
            lora_path=lora_path,
            lora_rank=lora_rank,
            lora_alpha=lora_alpha,
            lora_target_modules=lora_target_modules,
            lora_dropout=lora_dropout,
            gradient_checkpointing=gradient_checkpointing,
        )
        return policy

    def add_lora(self, *, rank: int, alpha: float, target_modules: Sequence[str] | None = None, dropout: float = 0.0) -> None:
        """Attach a LoRA adapter to the UNet's ``target_modules`` (None: :data:`UNET_LORA_TARGETS`); only it is trainable."""
        if target_modules is None:
            target_modules = UNET_LORA_TARGETS
        config = LoraConfig(
            r=rank, lora_alpha=alpha, target_modules=list(target_modules), lora_dropout=dropout, init_lora_weights="gaussian"
        )
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

    # ------------------------------------------------------------------ LoRA persistence
    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """Adapter weights in diffusers' key format (what a weight sync ships)."""
        if self.lora_config is None:
            raise ValueError("this policy has no LoRA adapter (finetune: full); save the UNet instead")
        return unet_lora_state_dict(self.unet)

    def save_lora(self, directory: str | os.PathLike, state_dict: dict | None = None) -> Path:
        """Write ``adapter_config.json`` and the weights as ``StableDiffusionPipeline.load_lora_weights`` reads them
        (rank and alpha in the file's metadata, so diffusers applies the adapter at this policy's scale).

        ``state_dict`` (diffusers' key names, :meth:`lora_state_dict`'s) replaces the policy's own
        weights, e.g. a learner's gathered ones.
        """
        if self.lora_config is None:
            raise ValueError("this policy has no LoRA adapter (finetune: full); save the UNet instead")
        weights = self.lora_state_dict() if state_dict is None else state_dict
        return write_lora(directory, weights, self.lora_config, denoiser=self.family.denoiser)

    # ------------------------------------------------------------------ text and pixels
    def encode_prompts(self, prompts: Sequence[str]) -> PromptEmbeddings:
        """The UNet's conditioning for each caption: embeds (batch, tokens, dim), and for SDXL pooled (batch, dim); float32."""
        self._require_decoders("encode prompts")
        return families.encode_prompts(self.family, self.tokenizers, self.text_encoders, prompts, device=self.device)

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
        if self.family is SDXL:
            if condition.pooled is None:
                raise ValueError("an SDXL policy needs pooled prompt embeddings; these trajectories were recorded without them")
            time_ids = families.add_time_ids(height=self.image_size, width=self.image_size).to(self.device)
            added = {"text_embeds": condition.pooled.to(self.dtype), "time_ids": time_ids.expand(latents.shape[0], -1).to(self.dtype)}
        output = self.unet(
            latents.to(self.dtype), timesteps, encoder_hidden_states=condition.embeds.to(self.dtype), added_cond_kwargs=added
        )
        return output.sample.float()

    def _model_output(
        self, latents: torch.Tensor, timesteps: torch.Tensor, condition: PromptEmbeddings, negative: PromptEmbeddings, guidance_scale: float
    ) -> torch.Tensor:
        """The (guided) network output for a batch (:func:`actors.diffusion.families.guided`)."""
        return guided(self._unet, latents, timesteps, condition, negative, guidance_scale)

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
        prev_timesteps = ddim.previous_timesteps(
            timesteps, num_train_timesteps=self.scheduler.config.num_train_timesteps, num_inference_steps=num_steps
        )
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


Policy = DiffusionPolicy | FlowPolicy | FluxPolicy
"""Any policy class: they share one public interface (sampling, log-probs, replay, LoRA)."""


def pretrained_policy(path: str | os.PathLike, **kwargs) -> Policy:
    """Load a pipeline directory (local or a URI, or an embedded model's name) with the policy class its family needs.

    A FLUX.1 pipeline (flux) becomes a :class:`FluxPolicy`, an SD3 one (sd3) a :class:`FlowPolicy`,
    any other a :class:`DiffusionPolicy`; ``kwargs`` are the classes' common ``from_pretrained`` arguments.
    """
    local = check_pipeline_dir(fetch(resolve_model_path(path), "models"))  # a URI is downloaded once per node
    family = detect_family(local)
    cls = FluxPolicy if family is FLUX else FlowPolicy if family.flow_matching else DiffusionPolicy
    return cls.from_pretrained(local, **kwargs)


def load_policy(model, *, lora_path: str | os.PathLike | None = None, trainable: bool = True, unet_only: bool = False) -> Policy:
    """Build a policy from a :class:`orchestrator.config.ModelConfig` section (its class from the family of ``model.path``).

    ``trainable=False`` loads the frozen base model (the reference policy): no adapter,
    no gradients. ``unet_only`` leaves out the VAE and text encoders (learners and
    reference actors work from recorded trajectories, which carry prompt embeddings).
    ``model.lora.target_modules`` null adapts the class's default layers.
    """

    path = resolve_model_path(model.path)
    if not trainable:
        policy = pretrained_policy(path, finetune="full", dtype=model.dtype, device=model.device, unet_only=unet_only)
        policy.unet.requires_grad_(False)
        return policy
    return pretrained_policy(
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
