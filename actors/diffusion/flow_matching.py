"""What the flow-matching policies share: SDE sampling, log-prob recomputation, LoRA on the transformer.

:class:`~actors.diffusion.flow_policy.FlowPolicy` (SD3 / 3.5) and
:class:`~actors.diffusion.flux_policy.FluxPolicy` (FLUX.1) sample the same way: from a
seeded Gaussian latent, each step asks the transformer for the velocity ``v = noise - x0``
and takes :func:`actors.diffusion.flow.flow_sde_step_with_log_prob` (Flow-GRPO's SDE step,
Liu et al. 2025, arXiv 2505.05470), or the deterministic Euler ODE step outside an SDE
window. They differ in what a subclass provides:

- :meth:`FlowMatchingPolicy.sigmas`: the sigma schedule (SD3's static shift, FLUX's
  resolution-dependent one);
- :meth:`FlowMatchingPolicy.step_velocity`: the conditioning and the transformer call
  (classifier-free guidance for SD3, distilled guidance and packed latents for FLUX);
- :attr:`FlowMatchingPolicy.latent_shape` and ``encode_prompts``;
- what :meth:`FlowMatchingPolicy.from_pretrained` loads: the transformer class, the text
  encoders (:meth:`FlowMatchingPolicy._load_text_encoders`), the checks of their
  widths against the transformer's, and the T5 lengths.

:class:`~actors.diffusion.trajectory.Trajectories` records sigmas, not integer timesteps:
``timesteps[i]`` is the sigma a step starts from and ``prev_timesteps[i]`` the one it
reaches (0 after the last step), both float32 in [0, 1].
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from actors.diffusion import ddim, flow
from actors.diffusion.adapted import AdaptedPolicy, freeze_on, load_vae
from actors.diffusion.devices import load_settings
from actors.diffusion.families import PromptEmbeddings
from actors.diffusion.files import FLUX, SD3, Family, check_pipeline_dir, detect_family
from actors.diffusion.lora import write_lora
from actors.diffusion.trajectory import Trajectories
from actors.storage import fetch

MMDIT_LORA_TARGETS: tuple[str, ...] = (
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
"""Every linear layer of an MMDiT block's attention and feed-forward parts, as diffusers names
them in SD3's blocks and in FLUX's double-stream blocks."""


class FlowMatchingPolicy(AdaptedPolicy):
    """Base of the rectified-flow policies; ``transformer`` (also ``unet``) is the only trained module."""

    KEY_PREFIX = "transformer."
    FOREIGN_PREFIX = "unet."
    FOREIGN_NETWORK = "a UNet"
    TIMESTEP_DTYPE = torch.float32  # recorded sigmas
    SAMPLES_SDE_WINDOW = True
    LORA_TARGETS: tuple[str, ...] = ()
    """The layers ``model.lora.target_modules: null`` adapts."""
    LORA_EXCLUDED: str | None = None
    """A module path (a full match) never adapted, though a target name reaches it."""
    MODEL_NAME = "flow"
    """The model family in messages ("SD3", "FLUX")."""
    FAMILY: Family
    """The pipeline directories this class loads."""
    TRANSFORMER_CLASS: type
    """The diffusers transformer class of :attr:`FAMILY`."""
    DEFAULT_MAX_SEQUENCE_LENGTH: int
    """T5 tokens per caption when none is given: the diffusers pipeline's default."""
    MAX_SEQUENCE_LENGTH: int | None = None
    """The most T5 tokens the model was trained with, where the model defines one."""

    def __init__(self, *, transformer, max_sequence_length: int, **parts):
        """``parts``: :class:`AdaptedPolicy`'s fields."""
        self.transformer = transformer
        super().__init__(**parts)
        self.max_sequence_length = max_sequence_length
        """T5 tokens per caption."""

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
        **options,
    ):
        """Load a pipeline directory of :attr:`FAMILY` (local or a URI); attach a fresh LoRA or one from ``lora_path``.

        The arguments mean what they mean for ``DiffusionPolicy.from_pretrained``: ``unet_only``
        loads the transformer alone (no VAE, no text encoders: a learner's or reference actor's
        copy, which reads the conditioning from recorded trajectories) and ``unet_path``
        replaces the pipeline's transformer with a diffusers transformer folder (a fully
        fine-tuned run's). ``max_sequence_length`` is the number of T5 tokens per caption; None
        means the pipeline's default (:attr:`DEFAULT_MAX_SEQUENCE_LENGTH`), or the T5 tokenizer's
        ``model_max_length`` where that is shorter (the embedded toy flow model's: 16).
        ``lora_target_modules`` None adapts :attr:`LORA_TARGETS`. ``options`` are the family's own
        (:meth:`_size_arguments`).
        """
        path = check_pipeline_dir(fetch(path, "models"))  # a URI is downloaded once per node
        family = detect_family(path)
        if family is not cls.FAMILY:
            runs_it = {SD3: "FlowPolicy", FLUX: "FluxPolicy"}.get(family, "DiffusionPolicy (a DDIM model)")
            raise ValueError(
                f"model path {str(path)!r} holds a {family.name} pipeline: load it with {runs_it}, or with "
                f"pretrained_policy/load_policy, which pick the class; {cls.__name__} runs {cls.FAMILY.name} "
                f"({cls.FAMILY.pipeline_classes[0]})"
            )
        torch_dtype, torch_device, common = load_settings(dtype=dtype, finetune=finetune, device=device)
        cls._check_sequence_length(max_sequence_length)
        vae_config = AutoencoderKL.load_config(path, subfolder="vae")  # a learner reads it without loading the VAE
        if unet_path is not None:
            transformer = cls.TRANSFORMER_CLASS.from_pretrained(fetch(unet_path, "models", keep_parent=True), **common)
        else:
            transformer = cls.TRANSFORMER_CLASS.from_pretrained(path, subfolder=family.denoiser, **common)
        cls._check_latents(transformer.config, vae_config)
        vae, text_encoders, tokenizers = None, [], []
        if not unet_only:
            vae = load_vae(path, torch_dtype=torch_dtype, common=common, config=vae_config)
            text_encoders, tokenizers = cls._load_text_encoders(path, common)
            cls._check_conditioning(transformer.config, text_encoders)
        if max_sequence_length is None:
            t5_length = tokenizers[-1].model_max_length if tokenizers else cls.DEFAULT_MAX_SEQUENCE_LENGTH  # T5 comes last
            max_sequence_length = min(cls.DEFAULT_MAX_SEQUENCE_LENGTH, t5_length)
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler")
        freeze_on(torch_device, transformer, vae, *text_encoders)
        policy = cls(
            transformer=transformer,
            vae=vae,
            text_encoders=text_encoders,
            tokenizers=tokenizers,
            scheduler=scheduler,
            device=torch_device,
            dtype=torch_dtype,
            family=family,
            max_sequence_length=max_sequence_length,
            **cls._size_arguments(path, transformer.config, vae_config, **options),
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

    @classmethod
    def _check_sequence_length(cls, max_sequence_length: int | None) -> None:
        if max_sequence_length is None:
            return
        pipeline = cls.FAMILY.pipeline_classes[0]
        if cls.MAX_SEQUENCE_LENGTH is None and max_sequence_length < 1:
            raise ValueError(
                f"max_sequence_length must be >= 1 T5 token, got {max_sequence_length} ({pipeline} uses {cls.DEFAULT_MAX_SEQUENCE_LENGTH})"
            )
        if cls.MAX_SEQUENCE_LENGTH is not None and not 1 <= max_sequence_length <= cls.MAX_SEQUENCE_LENGTH:
            raise ValueError(
                f"max_sequence_length must be between 1 and {cls.MAX_SEQUENCE_LENGTH} T5 tokens ({cls.MODEL_NAME}'s training "
                f"length), got {max_sequence_length}; {pipeline} uses {cls.DEFAULT_MAX_SEQUENCE_LENGTH}"
            )

    @classmethod
    def _load_text_encoders(cls, path, common: dict) -> tuple[list, list]:
        """The family's text encoders and their tokenizers, in the pipeline's order (T5 last)."""
        raise NotImplementedError

    @staticmethod
    def _check_conditioning(transformer_config, text_encoders: Sequence) -> None:
        """Fail at load when the text encoders' widths are not the ones the transformer takes."""
        raise NotImplementedError

    @staticmethod
    def _check_latents(transformer_config, vae_config: dict) -> None:
        """Fail at load when the transformer does not read the VAE's latents (nothing to check by default)."""

    @classmethod
    def _size_arguments(cls, path, transformer_config, vae_config: dict, **options) -> dict:
        """The image-size arguments of the constructor, from the loaded configs and the family's ``options``."""
        raise NotImplementedError

    @property
    def unet(self):
        """The transformer, under the name the workers give the trained network (they also replace it, e.g. by a DeepSpeed engine)."""
        return self.transformer

    @unet.setter
    def unet(self, module) -> None:
        self.transformer = module

    # ------------------------------------------------------------------ what a family provides
    latent_shape: tuple[int, int, int]
    """(C, H, W) of one image's latents, as the trajectories record them; set by the subclass from
    the transformer's config while it is a diffusers model (a learner later wraps it in DeepSpeed's
    engine, whose ``config`` is DeepSpeed's)."""

    def sigmas(self, num_steps: int) -> torch.Tensor:
        """``num_steps + 1`` descending float32 sigmas from 1 to a final 0."""
        raise NotImplementedError

    def encode_prompts(self, prompts: Sequence[str]) -> PromptEmbeddings:
        raise NotImplementedError

    def step_velocity(
        self, latents: torch.Tensor, sigmas: torch.Tensor, condition: PromptEmbeddings, negative: PromptEmbeddings, guidance_scale: float
    ) -> torch.Tensor:
        """The velocity the sampler steps with for (batch, C, H, W) latents at (batch,) sigmas, float32."""
        raise NotImplementedError

    # ------------------------------------------------------------------ LoRA
    def add_lora(self, *, rank: int, alpha: float, target_modules: Sequence[str] | None = None, dropout: float = 0.0) -> None:
        """Attach a LoRA adapter to the transformer's attention and feed-forward layers; only it is trainable.

        ``target_modules`` None means :attr:`LORA_TARGETS` (what ``model.lora.target_modules: null``
        asks for); :attr:`LORA_EXCLUDED` layers are never adapted.
        """
        if target_modules is None:
            target_modules = self.LORA_TARGETS
        # only where a target would reach the excluded layer: peft warns about an exclusion that excludes nothing
        excluded = {"exclude_modules": self.LORA_EXCLUDED} if self.LORA_EXCLUDED in target_modules else {}
        config = LoraConfig(
            r=rank, lora_alpha=alpha, target_modules=list(target_modules), lora_dropout=dropout, init_lora_weights="gaussian", **excluded
        )
        try:
            self.transformer.add_adapter(config)
        except ValueError as error:
            raise ValueError(
                f"could not attach LoRA to target modules {list(target_modules)}: {error}; "
                f"{self.MODEL_NAME}'s adaptable layers are e.g. {', '.join(self.LORA_TARGETS)}"
            ) from error
        # Half-precision master weights lose small updates; trainable weights stay fp32.
        for param in self.transformer.parameters():
            if param.requires_grad:
                param.data = param.data.float()
        self.lora_config = config

    def _require_lora(self, what: str) -> None:
        if self.lora_config is None:
            raise ValueError(f"this policy has no LoRA adapter (finetune: full), so it cannot {what}; save the transformer instead")

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """Adapter weights under peft's keys relative to the transformer (``transformer_blocks.0.attn.to_q.lora_A.weight``).

        This is the layout diffusers' SD3 and FLUX LoRA files use, minus their ``transformer.``
        prefix; it is what a weight sync ships.
        """
        self._require_lora("export adapter weights")
        return get_peft_model_state_dict(self.transformer)

    def save_lora(self, directory: str | os.PathLike, state_dict: dict | None = None) -> Path:
        """Write the adapter as the diffusers pipeline's ``load_lora_weights(directory)`` reads it, plus peft's config.

        The weights file is written by diffusers' own saver (``transformer.`` keys, the
        adapter's rank and alpha in the file's metadata, so diffusers applies the same scale);
        ``adapter_config.json`` is what :meth:`load_lora` reads back. ``state_dict`` (peft's or
        diffusers' key names) replaces the policy's own weights, e.g. a learner's gathered ones.
        """
        self._require_lora("save an adapter")
        weights = self.lora_state_dict() if state_dict is None else state_dict
        return write_lora(directory, weights, self.lora_config, denoiser=self.family.denoiser)

    # ------------------------------------------------------------------ pixels
    def negative_embeds(self) -> PromptEmbeddings:
        """The empty caption's conditioning, computed once: embeds (tokens, dim), pooled (dim,)."""
        if self._negative_embeds is None:
            empty = self.encode_prompts([""])
            self._negative_embeds = PromptEmbeddings(embeds=empty.embeds[0], pooled=empty.pooled[0])
        return self._negative_embeds

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Latents x_0 (batch, C, H, W) -> images (batch, H, W, 3) uint8.

        SD3's and FLUX's VAE latents are normalised as ``(z - shift_factor) * scaling_factor``; this undoes both.
        """
        self._require_decoders("decode latents")
        shift = self.vae.config.get("shift_factor") or 0.0
        scaled = latents.to(self.device, torch.float32) / self.vae.config.scaling_factor + shift
        pixels = self.vae.decode(scaled.to(self.vae.dtype)).sample.float()
        return ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()

    # ------------------------------------------------------------------ the policy
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
        self._check_guidance(guidance_scale)
        stochastic = flow.sde_window(num_steps, sde_window)  # (steps,) bool; raises on a bad window
        start, stop = (0, num_steps) if sde_window is None else (int(sde_window[0]), int(sde_window[1]))
        batch = len(prompts)
        shape = self.latent_shape
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        latents = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(self.device)
        sigmas = self.sigmas(num_steps)  # (steps + 1,)
        condition = self.encode_prompts(prompts)
        negative = self.negative_embeds()

        all_latents = []  # the latent before each recorded step, then the one after the last
        log_probs = []
        for i in range(num_steps):
            if i == start:
                all_latents.append(latents)
            sigma = sigmas[i].expand(batch).to(self.device)
            sigma_next = sigmas[i + 1].expand(batch).to(self.device)
            velocity = self.step_velocity(latents, sigma, condition, negative, guidance_scale)
            if i < stop:
                # drawn on the ODE steps before the window too: step i's noise is the seed's i-th draw whatever the window
                noise = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(self.device)
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

    def _check_guidance(self, guidance_scale: float) -> None:
        """Raise on a guidance scale the family cannot sample with (nothing by default)."""

    def log_prob(
        self,
        *,
        latents: torch.Tensor,
        next_latents: torch.Tensor,
        timesteps: torch.Tensor,
        prev_timesteps: torch.Tensor,
        prompt_embeds: torch.Tensor,
        negative_prompt_embeds: torch.Tensor | None,
        guidance_scale: float,
        eta: float,
        reduction: ddim.Reduction = "mean",
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
    ) -> ddim.StepOutput:
        """Recompute log p_theta(x_{sigma_next} | x_sigma, c) for given transitions under the current weights.

        ``latents``/``next_latents`` are (batch, C, H, W) as :meth:`sample` records them,
        ``timesteps``/``prev_timesteps`` the steps' sigmas and next sigmas, (batch,) float.
        Shapes otherwise as ``DiffusionPolicy.log_prob``; the pooled embeddings are required.
        Differentiable in the trainable weights.
        """
        name = type(self).__name__
        if self.lora_merged and torch.is_grad_enabled():
            raise RuntimeError(
                "this policy's LoRA adapter is merged into the base weights (a sampling-only state), so no "
                "gradient would reach it; call unmerge_lora() before computing log-probs to train on"
            )
        for field, value in (("timesteps", timesteps), ("prev_timesteps", prev_timesteps)):
            if not torch.is_floating_point(value):
                raise ValueError(
                    f"{name}.log_prob takes sigmas in [0, 1] as {field}, got a {value.dtype} tensor: these transitions "
                    "look like a DDIM policy's (integer timesteps); score them with DiffusionPolicy"
                )
        if latents.ndim != 4:
            raise ValueError(
                f"{name}.log_prob takes unpacked latents (batch, C, H, W), as sample() records them, got shape {tuple(latents.shape)}"
            )

        def on_device(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.to(self.device)

        latents = latents.to(self.device)
        sigmas = timesteps.to(self.device, torch.float32)
        condition = PromptEmbeddings(embeds=prompt_embeds.to(self.device), pooled=on_device(pooled_prompt_embeds))
        negative = PromptEmbeddings(embeds=on_device(negative_prompt_embeds), pooled=on_device(negative_pooled_prompt_embeds))
        velocity = self.step_velocity(latents, sigmas, condition, negative, guidance_scale)
        return flow.flow_sde_step_with_log_prob(
            velocity=velocity,
            sample=latents,
            sigmas=sigmas,
            sigmas_next=prev_timesteps.to(self.device, torch.float32),
            noise_level=eta,
            prev_sample=next_latents.to(self.device),
            reduction=reduction,
        )
