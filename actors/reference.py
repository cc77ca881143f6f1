"""Reference actor: the frozen initial policy, for the KL term of DPOK."""

from __future__ import annotations

import time

import numpy as np
import torch

from actors.policy import load_policy
from actors.trajectory import Trajectories


class ReferenceWorker:
    """Computes mu_ref(x_t, t, c) for every recorded transition under the initial weights."""

    def __init__(self, model, *, num_threads: int = 1):
        torch.set_num_threads(num_threads)
        # Replay reads the recorded prompt embeddings, so only the UNet is loaded.
        self.policy = load_policy(model, trainable=False, unet_only=True)

    def reference_means(self, trajectories: Trajectories) -> tuple[np.ndarray, float]:
        """(batch, steps, C, H, W) float32 means of the reference policy's Gaussians, and the
        seconds it took (called with ``num_returns=2``: learners fetch only the means)."""
        started = time.perf_counter()
        means = self.policy.replay(trajectories)[1]
        return means, time.perf_counter() - started
