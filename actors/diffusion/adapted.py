"""What the two policy classes share: the LoRA adapter on the trained network, and replaying recorded steps.

:class:`~actors.diffusion.policy.DiffusionPolicy` (a UNet sampled with DDIM) and
:class:`~actors.diffusion.flow_policy.FlowPolicy` (an SD3 transformer sampled with the
flow SDE) differ in how one step is computed, not in how an adapter is attached, loaded,
merged for sampling or how a whole trajectory is re-scored. Both keep the trained network
as ``self.unet`` (the flow policy's transformer answers to that name too), so the learner,
the workers and this module need not know which it is.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Sequence

import numpy as np
import torch
from diffusers import AutoencoderKL
from diffusers.utils import convert_unet_state_dict_to_peft
from peft.tuners.lora import LoraLayer
from peft.utils import set_peft_model_state_dict

from actors.diffusion import ddim
from actors.diffusion.families import PromptEmbeddings
from actors.diffusion.files import Family
from actors.diffusion.lora import read_lora
from actors.diffusion.trajectory import Trajectories, as_tensor


def load_vae(path, *, torch_dtype: torch.dtype, common: dict, config: dict | None = None) -> AutoencoderKL:
    """The pipeline's VAE, loaded with ``common`` (:func:`actors.diffusion.devices.load_settings`). One whose
    config says ``force_upcast`` (SDXL's, SD3's) decodes in float32 when the rest is float16, where it overflows."""
    config = AutoencoderKL.load_config(path, subfolder="vae") if config is None else config
    vae_dtype = torch.float32 if torch_dtype == torch.float16 and config.get("force_upcast") else torch_dtype
    return AutoencoderKL.from_pretrained(path, subfolder="vae", **{**common, "torch_dtype": vae_dtype})


def freeze_on(device: torch.device, *modules) -> None:
    """Every module (None ones skipped) frozen, in eval mode, on ``device``: what a policy starts from."""
    for module in modules:
        if module is not None:
            module.requires_grad_(False)
            module.to(device).eval()


class AdaptedPolicy:
    """Base of the policy classes: LoRA handling and trajectory replay over ``self.unet``."""

    KEY_PREFIX = "unet."
    """The prefix diffusers' adapter files give this network's LoRA keys."""
    FOREIGN_PREFIX = "transformer."
    """A prefix that means the weights were trained on the other kind of network."""
    NETWORK = "UNet"
    """The trained network, in messages."""
    FOREIGN_NETWORK = "an SD3 transformer"
    """What weights with :attr:`FOREIGN_PREFIX` were trained on, in messages."""
    TIMESTEP_DTYPE = torch.long
    """How recorded timesteps go back into :meth:`log_prob`: DDIM timesteps (int) or flow sigmas (float)."""
    SAMPLES_SDE_WINDOW = False
    """Whether ``sample`` takes an ``sde_window`` (SDE steps in a window, ODE steps elsewhere); the flow policies do."""

    unet: torch.nn.Module

    def __init__(
        self,
        *,
        vae,
        text_encoders: Sequence,
        tokenizers: Sequence,
        scheduler,
        device: torch.device,
        dtype: torch.dtype,
        family: Family,
        image_size: int | None = None,
        lora_config=None,
    ):
        """The parts every policy has besides its trained network, which the subclass sets first."""
        self.vae = vae
        """None on a ``unet_only`` policy (learners, reference actors)."""
        self.text_encoders = tuple(text_encoders)
        """The text encoders in the pipeline's order; empty on a ``unet_only`` policy."""
        self.tokenizers = tuple(tokenizers)
        self.scheduler = scheduler
        self.family = family
        self.image_size = image_size
        """Side of the square images in pixels."""
        self.device = device
        self.dtype = dtype
        self.lora_config = lora_config
        self.version = 0
        """Incremented by every weight update, so trajectories can say which weights made them."""
        self._negative_embeds: PromptEmbeddings | None = None
        self._premerge_weights: dict[str, torch.Tensor] | None = None
        """While the adapter is merged (:meth:`merge_lora`): each adapted layer's own weight, on the CPU."""

    def _finish_loading(
        self,
        *,
        finetune: str,
        lora_path: str | os.PathLike | None,
        lora_rank: int,
        lora_alpha: float,
        lora_target_modules: Sequence[str] | None,
        lora_dropout: float,
        gradient_checkpointing: bool,
    ) -> None:
        """The last step of every ``from_pretrained``: the adapter from ``lora_path``, else a fresh one
        (``finetune: lora``) or the whole network trainable (``full``); then gradient checkpointing."""
        if lora_path is not None:
            self.load_lora(lora_path)
        elif finetune == "lora":
            self.add_lora(rank=lora_rank, alpha=lora_alpha, target_modules=lora_target_modules, dropout=lora_dropout)
        else:
            self.unet.requires_grad_(True)
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()

    @property
    def text_encoder(self):
        """The first text encoder (CLIP); None on a ``unet_only`` policy."""
        return self.text_encoders[0] if self.text_encoders else None

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.unet.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ LoRA persistence
    def load_lora_state_dict(self, state_dict: dict[str, torch.Tensor], *, adapter_name: str = "default") -> None:
        """Load adapter weights into the attached adapter (kept merged if it was merged).

        Accepts peft's or diffusers' key names, with or without this network's prefix in
        diffusers' files (``unet.``, or ``transformer.`` for SD3).
        """
        if self.lora_config is None and adapter_name == "default":
            raise ValueError("this policy has no LoRA adapter to load weights into")
        if any(key.startswith(self.FOREIGN_PREFIX) for key in state_dict):
            raise ValueError(
                f"these LoRA weights are keyed for {self.FOREIGN_NETWORK} ('{self.FOREIGN_PREFIX}' prefix), not for this "
                f"{self.NETWORK}; give an adapter trained on this model (keys '{self.KEY_PREFIX}*')"
            )
        peft_state = convert_unet_state_dict_to_peft({k.removeprefix(self.KEY_PREFIX): v for k, v in state_dict.items()})
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

    def load_lora(self, directory: str | os.PathLike) -> None:
        """Attach the adapter saved by ``save_lora`` (the network must have no adapter yet)."""
        raw, state_dict = read_lora(directory)
        if self.lora_config is not None:
            raise ValueError("this policy already has a LoRA adapter; load adapters into a freshly loaded base model")
        self.add_lora(rank=raw["r"], alpha=raw["lora_alpha"], target_modules=raw["target_modules"], dropout=raw.get("lora_dropout", 0.0))
        self.load_lora_state_dict(state_dict)

    # ------------------------------------------------------------------ merged adapter (sampling only)
    @property
    def lora_merged(self) -> bool:
        return self._premerge_weights is not None

    def _lora_layers(self) -> list[tuple[str, LoraLayer]]:
        return [(name, module) for name, module in self.unet.named_modules() if isinstance(module, LoraLayer)]

    def merge_lora(self) -> bool:
        """Fold the adapter into the layers it sits on, so sampling skips its extra matmuls.

        For actors that only sample (rollout): on the toy model this makes sampling with
        adapters on attention and feed-forward layers about 1.6x faster. Loading new adapter
        weights keeps the policy merged; :meth:`unmerge_lora` restores the original weights
        bit for bit (they are kept aside, on the CPU), so merging never accumulates drift.
        While merged, no gradient reaches the adapter, so ``log_prob`` refuses to run with
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

    # ------------------------------------------------------------------ the base model under the adapter
    @contextlib.contextmanager
    def adapter_disabled(self) -> Iterator["AdaptedPolicy"]:
        """Inside the block the policy is the base model: every LoRA layer computes its frozen layer alone.

        A reference policy without a second copy of the network (``train.reference:
        adapter_off``): the base weights under a LoRA adapter are exactly what a frozen
        reference copy holds, so switching the adapter off (peft's per-layer switch, through
        diffusers' ``disable_adapters``/``enable_adapters``) gives the reference's outputs. The
        network is also put in eval mode for the block, as a reference copy is; on exit the
        adapter is on again, trainable, and the train/eval mode is restored. Use it under
        ``torch.no_grad()``: it is a way to read the base model, not to train it.
        """
        if self.lora_config is None:
            raise ValueError(
                "this policy has no LoRA adapter to switch off (finetune: full trains the base weights themselves), so it "
                "cannot stand in for the frozen reference; use train.reference: pool, or model.finetune: lora"
            )
        if self.lora_merged:
            raise ValueError("this policy's LoRA adapter is merged into the base weights; call unmerge_lora() before switching it off")
        network = getattr(self.unet, "module", self.unet)  # a learner's network sits inside a DeepSpeed engine
        training = network.training
        network.disable_adapters()
        network.eval()
        try:
            yield self
        finally:
            network.enable_adapters()
            network.train(training)

    def _require_decoders(self, what: str) -> None:
        if self.vae is None or not self.text_encoders:
            raise ValueError(
                f"this policy was loaded with unet_only=True (no VAE or text encoders), so it cannot {what}; "
                "load it without unet_only (rollout actors do)"
            )

    # ------------------------------------------------------------------ replay
    def replay(
        self, trajectories: Trajectories, *, batch_size: int | None = None, reduction: ddim.Reduction = "mean"
    ) -> tuple[np.ndarray, np.ndarray]:
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
                        timesteps=torch.full((n,), trajectories.timesteps[j].item(), dtype=self.TIMESTEP_DTYPE),
                        prev_timesteps=torch.full((n,), trajectories.prev_timesteps[j].item(), dtype=self.TIMESTEP_DTYPE),
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

    def trajectory_log_probs(
        self, trajectories: Trajectories, *, batch_size: int | None = None, reduction: ddim.Reduction = "mean"
    ) -> np.ndarray:
        """Recompute every recorded transition's log-prob, in batches of ``batch_size`` samples. (batch, steps)."""
        return self.replay(trajectories, batch_size=batch_size, reduction=reduction)[0]
