"""A reward defined outside ``actors/``, for the ``"package.module:function"`` form of ``resolve_reward``."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np


def mean_brightness(images: np.ndarray, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, dict]:
    """Mean pixel value in [0, 1]; info counts the prompts so a test can see they arrived."""
    scores = images.astype(np.float32).mean(axis=(1, 2, 3)) / 255.0  # (batch,)
    return scores.astype(np.float32), {"num_prompts": float(len(prompts))}


def nan_for_first_image(images: np.ndarray, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, dict]:
    """A broken reward: NaN for the first image, for errors raised inside a CombinedReward."""
    scores = np.zeros(len(images), dtype=np.float32)
    scores[0] = np.nan
    return scores, {}


def nan_for_circles(images: np.ndarray, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, dict]:
    """A reward that breaks on some prompts: NaN for every image of a circle, brightness otherwise."""
    scores, info = mean_brightness(images, prompts, metadata)
    scores[["circle" in prompt for prompt in prompts]] = np.nan
    return scores, info


NOT_A_FUNCTION = 42
"""A module attribute that exists but cannot be called, for the error test."""
