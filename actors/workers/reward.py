"""Reward actor: scores decoded images with the configured (combined) reward."""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import ray
import torch

from actors.rewards.registry import build_reward_from_config, score_batch

logger = logging.getLogger(__name__)


class RewardWorker:
    """Holds the reward functions (and any reward model) of one pool member."""

    def __init__(self, reward, *, num_threads: int = 1):
        self.on_invalid = reward.on_invalid

        # A reward model on CPU would otherwise take every core of the node.
        torch.set_num_threads(num_threads)
        self.reward = build_reward_from_config(reward)
        # Load reward models while the pool starts: a bad weights file fails here, before
        # the first rollout, and the first batch is not slowed by loading.
        self.reward.load()

    def score(self, images: np.ndarray, prompts: list[str], batch_index: int) -> tuple[np.ndarray, dict[str, float], dict[str, float]]:
        """Scores (batch,) float32, the batch mean of every diagnostic, and the seconds it took with this process's id."""
        started = time.perf_counter()
        try:
            scores, info = score_batch(self.reward, images, prompts, batch_index=batch_index)
        except Exception as error:
            if self.on_invalid != "drop":
                raise
            # reward.on_invalid: drop. Score the images one by one so only those the reward fails on are dropped.
            scores, info = self._score_each(images, prompts, batch_index, error)
        return (
            scores,
            {key: float(np.mean(value)) for key, value in info.items()},
            {"busy_s": time.perf_counter() - started, "pid": os.getpid()},
        )

    def _score_each(self, images: np.ndarray, prompts: list[str], batch_index: int, error: Exception) -> tuple[np.ndarray, dict]:
        """Scores image by image, NaN for each one the reward fails on (the controller drops those samples)."""
        scores = np.full(len(images), np.nan, dtype=np.float32)
        for i in range(len(images)):
            try:
                scores[i] = score_batch(self.reward, images[i : i + 1], prompts[i : i + 1], batch_index=batch_index)[0][0]
            except Exception as each:  # noqa: PERF203 (one image at a time is the point)
                logger.warning("dropping sample %d of batch %d (reward.on_invalid: drop): %s", i, batch_index, str(each).splitlines()[0])
        if np.isnan(scores).all():
            logger.warning("dropping all %d samples of batch %d (reward.on_invalid: drop): %s", len(images), batch_index, error)
        return scores, {}

    def identity(self) -> tuple[str, int]:
        """The Ray node this actor runs on, and its process id (a new one after a restart)."""
        return ray.get_runtime_context().get_node_id(), os.getpid()
