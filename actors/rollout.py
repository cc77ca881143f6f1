"""Rollout actor: a policy copy that samples trajectories and takes weight updates."""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from actors.policy import load_policy
from actors.trajectory import Trajectories, as_tensor

logger = logging.getLogger(__name__)


class RolloutWorker:
    """Samples with the latest weights it was sent; one Ray actor per pool member.

    ``sample`` is called with ``num_returns=3`` so the trajectories (for learners and the
    reference pool) and the decoded images (for reward actors only) are separate objects;
    the third is a small dict of timings (busy seconds, for the pool's idle fraction).
    """

    def __init__(self, model, sampling, *, num_threads: int = 1):
        torch.set_num_threads(num_threads)
        self.sampling = sampling
        self.policy = load_policy(model)
        if self.policy.lora_config is not None and sampling.merge_lora:
            self.policy.merge_lora()  # stays merged across weight loads; a no-op for half precision

    def sample(self, prompts: list[str], seeds: list[int], version: int | None = None, weights: dict[str, np.ndarray] | None = None) -> tuple[Trajectories, np.ndarray, dict[str, float]]:
        """Sample with policy ``version``: its ``weights`` are loaded first unless already held.

        Naming the version in every call (rather than a separate weight update) makes each
        batch's policy independent of how calls interleave in the async pipeline.
        """
        started = time.perf_counter()
        load_s = 0.0
        if version is not None and version != self.policy.version:
            if weights is None:
                raise ValueError(f"sample() was asked for policy version {version} but this actor holds {self.policy.version} and got no weights")
            load_s = self.set_weights(weights, version)
        trajectories, images = self.policy.sample(
            prompts,
            seeds=seeds,
            num_steps=self.sampling.num_steps,
            eta=self.sampling.eta,
            guidance_scale=self.sampling.guidance_scale,
            reduction=self.sampling.log_prob_reduction,
        )
        return trajectories, images, {"busy_s": time.perf_counter() - started, "load_s": load_s}

    def set_weights(self, weights: dict[str, np.ndarray], version: int) -> float:
        """Load trainable weights (LoRA adapters, or the full UNet) of policy ``version``; returns the seconds it took."""
        started = time.perf_counter()
        state = {name: as_tensor(array) for name, array in weights.items()}
        if self.policy.lora_config is not None:
            self.policy.load_lora_state_dict(state)
        else:
            missing, unexpected = self.policy.unet.load_state_dict(state, strict=False)
            if unexpected:
                raise ValueError(f"weights do not match the UNet: unexpected keys {unexpected[:5]}")
        self.policy.version = version
        return time.perf_counter() - started

    def version(self) -> int:
        return self.policy.version
