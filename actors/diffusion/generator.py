"""Image generation for serving: batches of requests, a fixed batch shape, hot-swapped LoRA.

The Ray Serve deployment (:mod:`jobs.serve.app`) is a thin wrapper around
:class:`ImageGenerator`; everything here runs without Ray.

Three guarantees, each tested:

- **An image is a function of (weights, prompt, seed, settings).** Each sample's noise
  comes from its own seed (see :meth:`actors.diffusion.policy.DiffusionPolicy.sample`), and with
  ``pad_batches`` every denoising call has the same batch size, so the numerical kernels,
  which math libraries choose by batch size, are the same whoever shares the batch.
- **A request's images come from one set of weights.** A job is never split across an
  adapter swap: :meth:`ImageGenerator.generate` and :meth:`ImageGenerator.load_adapter`
  take the same lock.
- **A failed swap changes nothing.** The new adapter is read and checked first, then
  attached under a new name next to the old one, and the old one is removed only once
  the new one has loaded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import threading
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np
from peft import LoraConfig

from actors.diffusion.files import LORA_WEIGHTS_NAME
from actors.diffusion.lora import read_lora
from actors.diffusion.policy import Policy, pretrained_policy

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ImageJob:
    """One request: ``len(seeds)`` images of one prompt with one group of settings."""

    prompt: str
    seeds: tuple[int, ...]
    num_steps: int
    guidance_scale: float
    eta: float
    """Per-step noise: DDIM eta for SD/SDXL (1 is DDPO's sampler), the SDE noise level ``a`` for SD3 (Flow-GRPO uses 0.7)."""
    use_adapter: bool = True
    """False: the base model, even while an adapter is loaded."""
    sde_window: tuple[int, int] | None = None
    """Flow-matching models: the SDE on steps ``start <= i < stop`` only, the ODE step on the others
    (what a run with ``sampling.sde_window`` trained with); None: the SDE on every step."""


@dataclasses.dataclass(frozen=True)
class GeneratedImages:
    images: np.ndarray
    """(len(job.seeds), H, W, 3) uint8."""
    adapter_version: str | None
    """Version of the adapter that made them; None for the base model."""


@dataclasses.dataclass(frozen=True)
class AdapterInfo:
    """The adapter being served."""

    path: str
    """The adapter directory it was read from."""
    version: str
    """``<checkpoint or directory name>@<first 12 hex digits of the weights' sha256>``:
    changes whenever the weights do."""
    rank: int
    loaded_at: float
    """Unix time of the swap."""


def adapter_version(directory: str | os.PathLike) -> str:
    """Version string of an adapter directory (see :attr:`AdapterInfo.version`)."""
    directory = Path(directory)
    digest = hashlib.sha256((directory / LORA_WEIGHTS_NAME).read_bytes()).hexdigest()[:12]
    # Training writes adapters to <run>/checkpoints/epoch_N/lora: the epoch is the useful name.
    name = directory.parent.name if directory.name == "lora" else directory.name
    return f"{name}@{digest}"


class ImageGenerator:
    """A frozen policy (a DDIM model's or SD3's) that turns batches of :class:`ImageJob` into images."""

    def __init__(self, policy: Policy, *, batch_size: int, pad_batches: bool):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.policy = policy
        self.batch_size = batch_size
        self.pad_batches = pad_batches
        self._lock = threading.Lock()
        self._adapter: AdapterInfo | None = None
        self._adapter_name: str | None = None
        self._swaps = 0
        self.stats = {"batches": 0, "images": 0, "padding": 0, "largest_batch": 0}
        """Counters since start: denoising batches run, images returned, throw-away padding
        samples, and the most real images one batch held."""

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        device: str = "auto",
        dtype: str = "float32",
        batch_size: int = 16,
        pad_batches: bool = True,
        unet_path: str | os.PathLike | None = None,
    ) -> "ImageGenerator":
        policy = pretrained_policy(path, finetune="full", dtype=dtype, device=device, unet_path=unet_path)
        policy.unet.requires_grad_(False)
        return cls(policy, batch_size=batch_size, pad_batches=pad_batches)

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of the images the model makes (square: the policy's side in pixels)."""
        return self.policy.image_size, self.policy.image_size

    @property
    def adapter(self) -> AdapterInfo | None:
        return self._adapter

    # ------------------------------------------------------------------ generation
    def generate(self, jobs: Sequence[ImageJob]) -> list[GeneratedImages]:
        """Images for every job, in order. Jobs with equal settings share denoising batches."""
        height, width = self.image_size
        images = [np.zeros((len(job.seeds), height, width, 3), dtype=np.uint8) for job in jobs]
        groups: dict[tuple[int, float, float, tuple[int, int] | None, bool], list[tuple[int, int]]] = defaultdict(list)
        for j, job in enumerate(jobs):
            for i in range(len(job.seeds)):
                groups[(job.num_steps, job.guidance_scale, job.eta, job.sde_window, job.use_adapter)].append((j, i))
        with self._lock:
            version = self._adapter.version if self._adapter else None
            for (num_steps, guidance_scale, eta, window, use_adapter), samples in groups.items():
                adapter_off = self._adapter is not None and not use_adapter
                if adapter_off:
                    self.policy.unet.disable_adapters()
                try:
                    for start in range(0, len(samples), self.batch_size):
                        chunk = samples[start : start + self.batch_size]
                        batch = self._sample(
                            [jobs[j].prompt for j, _ in chunk], [jobs[j].seeds[i] for j, i in chunk], num_steps, guidance_scale, eta, window
                        )
                        for (j, i), image in zip(chunk, batch):
                            images[j][i] = image
                finally:
                    if adapter_off:
                        self.policy.unet.enable_adapters()
            return [GeneratedImages(images=im, adapter_version=version if job.use_adapter else None) for job, im in zip(jobs, images)]

    def _sample(
        self, prompts: list[str], seeds: list[int], num_steps: int, guidance_scale: float, eta: float, window: tuple[int, int] | None
    ) -> np.ndarray:
        real = len(prompts)
        if self.pad_batches and real < self.batch_size:
            # Throw-away copies of the last sample: same shape every call, discarded below.
            prompts = prompts + [prompts[-1]] * (self.batch_size - real)
            seeds = seeds + [seeds[-1]] * (self.batch_size - real)
        extra = {} if window is None else {"sde_window": window}
        _, images = self.policy.sample(prompts, seeds=seeds, num_steps=num_steps, eta=eta, guidance_scale=guidance_scale, **extra)
        self.stats["batches"] += 1
        self.stats["images"] += real
        self.stats["padding"] += len(prompts) - real
        self.stats["largest_batch"] = max(self.stats["largest_batch"], real)
        return images[:real]

    # ------------------------------------------------------------------ adapters
    def load_adapter(self, directory: str | os.PathLike) -> AdapterInfo:
        """Serve the LoRA adapter in ``directory`` from the next batch on.

        Raises ``ValueError`` naming the problem when the adapter is missing, unreadable
        or does not fit the model; the adapter served before (or the base model) stays.
        """

        directory = Path(directory)
        raw, state_dict = read_lora(directory)
        version = adapter_version(directory)
        config = LoraConfig(
            r=raw["r"],
            lora_alpha=raw["lora_alpha"],
            target_modules=raw["target_modules"],
            exclude_modules=raw.get("exclude_modules"),  # FLUX: its final proj_out, whose name a target shares
            lora_dropout=0.0,
        )
        name = f"serve_{self._swaps + 1}"
        unet = self.policy.unet
        with self._lock:
            old_name = self._adapter_name
            try:
                with warnings.catch_warnings():
                    # peft warns about several adapters in one model: two exist only during the swap.
                    warnings.filterwarnings("ignore", message=".*multiple adapters.*")
                    unet.add_adapter(config, adapter_name=name)
                self.policy.load_lora_state_dict(state_dict, adapter_name=name)
            except Exception as error:
                self._drop_adapter(name, restore=old_name)
                if isinstance(error, ValueError):
                    raise ValueError(f"LoRA {directory}: {error}") from None
                raise ValueError(f"LoRA {directory} does not fit this model ({type(error).__name__}: {error})") from None
            unet.set_adapter(name)
            if old_name is not None:
                unet.delete_adapters(old_name)
            self._swaps += 1
            self._adapter_name = name
            self._adapter = AdapterInfo(path=str(directory), version=version, rank=int(raw["r"]), loaded_at=time.time())
        logger.info("serving LoRA %s (version %s)", directory, version)
        return self._adapter

    def unload_adapter(self) -> None:
        """Serve the base model from the next batch on."""
        with self._lock:
            if self._adapter_name is not None:
                self.policy.unet.delete_adapters(self._adapter_name)
            self._adapter_name = None
            self._adapter = None

    def _drop_adapter(self, name: str, *, restore: str | None) -> None:
        unet = self.policy.unet
        with warnings.catch_warnings():
            # peft warns that the active adapter was deleted; the old one is re-activated right below.
            warnings.filterwarnings("ignore", message=".*was active which is now deleted.*")
            if name in getattr(unet, "peft_config", {}):
                unet.delete_adapters(name)
        if restore is not None:
            unet.set_adapter(restore)
