"""Reward actor: scores decoded images with the configured (combined) reward, and eval images with the gold reward."""

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
    """Holds the reward functions (and any reward model) of one pool member, and those of the gold reward."""

    def __init__(self, reward, *, gold=None, num_threads: int = 1):
        """``reward`` and ``gold`` are ``RewardConfig`` sections: the training reward and ``train.gold_reward`` (or None)."""
        # A reward model on CPU would otherwise take every core of the node.
        torch.set_num_threads(num_threads)
        # Each reward with its own reward.on_invalid.
        self.reward = (build_reward_from_config(reward), reward.on_invalid)
        self.gold = (build_reward_from_config(gold), gold.on_invalid) if gold is not None else None
        # Load reward models while the pool starts: a bad weights file fails here, before
        # the first rollout, and the first batch is not slowed by loading.
        for combined, _ in filter(None, (self.reward, self.gold)):
            combined.load()

    def score(
        self, images: np.ndarray, prompts: list[str], batch_index: int, *, gold: bool = False
    ) -> tuple[np.ndarray, dict[str, float], dict[str, float]]:
        """Scores (batch,) float32, the batch mean of every diagnostic, and the seconds it took with this process's id.

        ``gold``: score with the gold reward (``train.gold_reward``), an eval measurement that is never trained on.
        """
        if gold and self.gold is None:
            raise ValueError("this reward actor has no gold reward: train.gold_reward is not set")
        reward, on_invalid = self.gold if gold else self.reward
        started = time.perf_counter()
        try:
            scores, info = score_batch(reward, images, prompts, batch_index=batch_index)
        except Exception as error:
            if on_invalid != "drop":
                raise
            # reward.on_invalid: drop. Score the images one by one so only those the reward fails on are dropped.
            scores, info = self._score_each(reward, images, prompts, batch_index, error)
        return (
            scores,
            {key: float(np.mean(value)) for key, value in info.items()},
            {"busy_s": time.perf_counter() - started, "pid": os.getpid()},
        )

    def _score_each(self, reward, images: np.ndarray, prompts: list[str], batch_index: int, error: Exception) -> tuple[np.ndarray, dict]:
        """Scores image by image, NaN for each one the reward fails on (the controller drops those samples)."""
        scores = np.full(len(images), np.nan, dtype=np.float32)
        for i in range(len(images)):
            try:
                scores[i] = score_batch(reward, images[i : i + 1], prompts[i : i + 1], batch_index=batch_index)[0][0]
            except Exception as each:  # noqa: PERF203 (one image at a time is the point)
                logger.warning("dropping sample %d of batch %d (reward.on_invalid: drop): %s", i, batch_index, str(each).splitlines()[0])
        if np.isnan(scores).all():
            logger.warning("dropping all %d samples of batch %d (reward.on_invalid: drop): %s", len(images), batch_index, error)
        return scores, {}

    def identity(self) -> tuple[str, int]:
        """The Ray node this actor runs on, and its process id (a new one after a restart)."""
        return ray.get_runtime_context().get_node_id(), os.getpid()
