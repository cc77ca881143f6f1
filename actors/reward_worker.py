"""Reward actor: scores decoded images with the configured (combined) reward."""

from __future__ import annotations

import time

import numpy as np

from actors.rewards import build_reward_from_config, score_batch


class RewardWorker:
    """Holds the reward functions (and any reward model) of one pool member."""

    def __init__(self, reward, *, num_threads: int = 1):
        import torch

        # A reward model on CPU would otherwise take every core of the node.
        torch.set_num_threads(num_threads)
        self.reward = build_reward_from_config(reward)
        # Load reward models while the pool starts: a bad weights file fails here, before
        # the first rollout, and the first batch is not slowed by loading.
        self.reward.load()

    def score(self, images: np.ndarray, prompts: list[str], batch_index: int) -> tuple[np.ndarray, dict[str, float], float]:
        """Scores (batch,) float32, the batch mean of every diagnostic, and the seconds it took."""
        started = time.perf_counter()
        scores, info = score_batch(self.reward, images, prompts, batch_index=batch_index)
        return scores, {key: float(np.mean(value)) for key, value in info.items()}, time.perf_counter() - started
