"""Reference actor: the frozen initial policy, for the KL term of DPOK."""

from __future__ import annotations

import os
import time

import numpy as np
import ray
import torch

from actors.diffusion.trajectory import Trajectories


class ReferenceWorker:
    """Computes mu_ref(x_t, t, c) for every recorded transition under the initial weights."""

    def __init__(self, model, *, num_threads: int = 1):
        torch.set_num_threads(num_threads)
        # Replay reads the recorded prompt embeddings, so only the UNet is loaded.
        from actors.diffusion.policy import load_policy  # lazy: diffusers loads in the actor, not in the driver that creates it

        self.policy = load_policy(model, trainable=False, unet_only=True)

    def reference_means(self, trajectories: Trajectories) -> tuple[np.ndarray, dict[str, float]]:
        """(batch, steps, C, H, W) float32 means of the reference policy's Gaussians, and the
        seconds it took with this process's id (called with ``num_returns=2``: learners fetch only the means)."""
        started = time.perf_counter()
        means = self.policy.replay(trajectories)[1]
        return means, {"busy_s": time.perf_counter() - started, "pid": os.getpid()}

    def identity(self) -> tuple[str, int]:
        """The Ray node this actor runs on, and its process id (a new one after a restart)."""
        return ray.get_runtime_context().get_node_id(), os.getpid()
