"""Rollout actor: a policy copy that samples trajectories and takes weight updates."""

from __future__ import annotations

import logging

import numpy as np
import torch

from actors.policy import load_policy
from actors.trajectory import Trajectories, as_tensor

logger = logging.getLogger(__name__)


class RolloutWorker:
    """Samples with the latest weights it was sent; one Ray actor per pool member.

    ``sample`` is called with ``num_returns=2`` so the trajectories (for learners and the
    reference pool) and the decoded images (for reward actors only) are separate objects.
    """

    def __init__(self, model, sampling, *, num_threads: int = 1):
        torch.set_num_threads(num_threads)
        self.sampling = sampling
        self.policy = load_policy(model)

    def sample(self, prompts: list[str], seeds: list[int]) -> tuple[Trajectories, np.ndarray]:
        return self.policy.sample(
            prompts,
            seeds=seeds,
            num_steps=self.sampling.num_steps,
            eta=self.sampling.eta,
            guidance_scale=self.sampling.guidance_scale,
            reduction=self.sampling.log_prob_reduction,
        )

    def set_weights(self, weights: dict[str, np.ndarray], version: int) -> int:
        """Load trainable weights (LoRA adapters, or the full UNet) of policy ``version``."""
        state = {name: as_tensor(array) for name, array in weights.items()}
        if self.policy.lora_config is not None:
            self.policy.load_lora_state_dict(state)
        else:
            missing, unexpected = self.policy.unet.load_state_dict(state, strict=False)
            if unexpected:
                raise ValueError(f"weights do not match the UNet: unexpected keys {unexpected[:5]}")
        self.policy.version = version
        return version

    def version(self) -> int:
        return self.policy.version
