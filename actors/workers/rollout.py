"""Rollout actor: a policy copy that samples trajectories and takes weight updates."""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import ray
import torch

from actors.diffusion.trajectory import Trajectories, as_tensor

logger = logging.getLogger(__name__)


class RolloutWorker:
    """Samples with the latest weights it was sent; one Ray actor per pool member.

    ``sample`` is called with ``num_returns=3`` so the trajectories (for learners and the
    reference pool) and the decoded images (for reward actors only) are separate objects;
    the third is a small dict of timings (busy seconds, for the pool's idle fraction) and the
    actor's process id (a new one after a restart).
    """

    def __init__(self, model, sampling, *, num_threads: int = 1, slowdown: float = 1.0):
        torch.set_num_threads(num_threads)
        self.sampling = sampling
        self.slowdown = slowdown  # pools.rollout.slowdown: stand in for a slower GPU in benchmarks and tests
        from actors.diffusion.policy import load_policy  # lazy: diffusers loads in the actor, not in the driver that creates it

        self.policy = load_policy(model)
        if sampling.sde_window is not None and not self.policy.SAMPLES_SDE_WINDOW:
            raise ValueError(
                f"sampling.sde_window is set, but model.path holds a {self.policy.family.name} model, whose sampler "
                f"({type(self.policy).__name__}) records every step; the window is for flow-matching models (sd3, flux): set "
                "sampling.sde_window: null"
            )
        # only the flow policies take the argument; without it every step is sampled and recorded, as before windows existed
        self._window = {} if sampling.sde_window is None else {"sde_window": tuple(sampling.sde_window)}
        if self.policy.lora_config is not None and sampling.merge_lora:
            self.policy.merge_lora()  # stays merged across weight loads; a no-op for half precision

    def sample(
        self, prompts: list[str], seeds: list[int], version: int | None = None, weights: dict[str, np.ndarray] | None = None
    ) -> tuple[Trajectories, np.ndarray, dict[str, float]]:
        """Sample with policy ``version``: its ``weights`` are loaded first unless already held.

        Naming the version in every call (rather than a separate weight update) makes each
        batch's policy independent of how calls interleave in the async pipeline.
        """
        started = time.perf_counter()
        load_s = 0.0
        if version is not None and version != self.policy.version:
            if weights is None:
                raise ValueError(
                    f"sample() was asked for policy version {version} but this actor holds {self.policy.version} and got no weights"
                )
            load_s = self.set_weights(weights, version)
        trajectories, images = self.policy.sample(
            prompts,
            seeds=seeds,
            num_steps=self.sampling.num_steps,
            eta=self.sampling.eta,
            guidance_scale=self.sampling.guidance_scale,
            reduction=self.sampling.log_prob_reduction,
            **self._window,
        )
        if self.slowdown > 1:
            time.sleep((self.slowdown - 1) * (time.perf_counter() - started))
        return trajectories, images, {"busy_s": time.perf_counter() - started, "load_s": load_s, "pid": os.getpid()}

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

    def identity(self) -> tuple[str, int]:
        """The Ray node this actor runs on, and its process id (a new one after a restart)."""
        return ray.get_runtime_context().get_node_id(), os.getpid()
