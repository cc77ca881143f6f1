"""Reward actor: scores decoded images with the configured (combined) reward."""

from __future__ import annotations

import numpy as np

from actors.rewards import build_reward, score_batch


class RewardWorker:
    """Holds the reward functions (and any reward model) of one pool member."""

    def __init__(self, reward):
        self.reward = build_reward([(c.name, c.weight) for c in reward.components])

    def score(self, images: np.ndarray, prompts: list[str], batch_index: int) -> tuple[np.ndarray, dict[str, float]]:
        """Scores (batch,) float32 and the batch mean of every diagnostic."""
        scores, info = score_batch(self.reward, images, prompts, batch_index=batch_index)
        return scores, {key: float(np.mean(value)) for key, value in info.items()}
