"""Advantage estimators: rewards of a batch of images -> one advantage per image.

Pure numpy; the learner broadcasts each image's advantage to all denoising transitions of
its trajectory. Three ways to centre and scale rewards:

- :class:`PerPromptStatTracker` -- DDPO's per-prompt normalisation with a rolling buffer
  of past rewards for each prompt (Black et al. 2023, sec. 5), so an easy prompt's high
  reward is not mistaken for a good sample;
- :func:`batch_normalize` -- one mean and std for the whole batch;
- :func:`group_normalize` -- GRPO-style, within each group of samples sharing a prompt.

All use the population std (ddof=0, as DDPO's ``np.std``) plus ``EPS`` in the denominator,
so a batch or buffer whose rewards are all equal gives advantages ~0 instead of 0/0.
Statistics are computed in float64 and the advantages returned as float32, the dtype the
losses work in.
"""

from __future__ import annotations

import collections
import math
from typing import Any, Hashable, NamedTuple, Sequence

import numpy as np

EPS = 1e-6
"""Added to every std before dividing: keeps zero-spread rewards finite (DDPO uses 1e-6)."""


def _check_rewards(rewards: Any) -> np.ndarray:
    """``rewards`` as a float64 ``(batch,)`` array; ``ValueError`` unless finite, 1-D and non-empty."""
    array = np.asarray(rewards, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"rewards must be 1-D, one reward per image; got shape {array.shape}")
    if array.size == 0:
        raise ValueError("rewards is empty; pass at least one reward")
    bad = np.flatnonzero(~np.isfinite(array))
    if bad.size:
        raise ValueError(f"rewards must be finite; got {array[bad[0]]} at index {bad[0]} ({bad.size} non-finite in all)")
    return array


def _check_labels(labels: Any, rewards: np.ndarray, what: str) -> list:
    if isinstance(labels, (str, bytes)):
        raise ValueError(f"{what} must be a sequence with one entry per reward, got a single {type(labels).__name__}")
    labels = list(labels)
    if len(labels) != len(rewards):
        raise ValueError(f"len({what}) = {len(labels)} but len(rewards) = {len(rewards)}; they must match, one per image")
    return labels


def batch_normalize(rewards: np.ndarray) -> np.ndarray:
    """(r - mean) / (std + EPS) over the whole batch. (batch,) float32"""
    rewards = _check_rewards(rewards)
    return ((rewards - rewards.mean()) / (rewards.std() + EPS)).astype(np.float32)


class GroupNormalized(NamedTuple):
    advantages: np.ndarray
    """(r - group mean) / (group std + EPS); 0 in zero-spread groups. (batch,) float32"""
    zero_spread_groups: int
    """How many groups had all rewards equal, so carry no learning signal."""


def group_normalize(rewards: np.ndarray, group_ids: Sequence[Hashable]) -> GroupNormalized:
    """Normalise each reward within its group (the samples sharing a prompt, as in GRPO).

    A group whose rewards are all equal (including a group of one) has no preferred
    sample; its advantages are exactly 0 rather than rounding noise divided by EPS.
    """
    rewards = _check_rewards(rewards)
    group_ids = _check_labels(group_ids, rewards, "group_ids")
    advantages = np.zeros_like(rewards)
    zero_spread = 0
    for indices in _indices_by_label(group_ids).values():
        group = rewards[indices]
        # max == min rather than std == 0: the mean of equal floats can round, leaving a ~1e-17 std
        if group.max() == group.min():
            zero_spread += 1
            continue
        advantages[indices] = (group - group.mean()) / (group.std() + EPS)
    return GroupNormalized(advantages=advantages.astype(np.float32), zero_spread_groups=zero_spread)


def clip_advantages(advantages: np.ndarray, max_abs: float) -> np.ndarray:
    """Advantages clipped to [-max_abs, max_abs] (DDPO's ``adv_clip_max``), dtype kept."""
    if not (isinstance(max_abs, (int, float)) and math.isfinite(max_abs) and max_abs > 0):
        raise ValueError(f"max_abs must be a finite number > 0, got {max_abs!r}")
    advantages = np.asarray(advantages)
    return np.clip(advantages, -max_abs, max_abs)


def _indices_by_label(labels: Sequence[Hashable]) -> dict[Hashable, np.ndarray]:
    """Positions of each distinct label, in order of first appearance."""
    positions: dict[Hashable, list[int]] = {}
    for i, label in enumerate(labels):
        positions.setdefault(label, []).append(i)
    return {label: np.asarray(idx) for label, idx in positions.items()}


class PerPromptStatTracker:
    """DDPO's per-prompt reward normalisation with a rolling buffer per prompt.

    For each prompt the last ``buffer_size`` rewards seen (across batches and epochs) are
    kept. :meth:`update` first appends the batch's rewards to their prompts' buffers, then
    normalises each reward by its prompt's buffer mean and std once that buffer holds at
    least ``min_count`` rewards; until then by the whole batch's mean and std.
    """

    def __init__(self, buffer_size: int = 32, min_count: int = 16) -> None:
        if not (isinstance(buffer_size, int) and buffer_size >= 1):
            raise ValueError(f"buffer_size must be an int >= 1, got {buffer_size!r}")
        if not (isinstance(min_count, int) and min_count >= 1):
            raise ValueError(f"min_count must be an int >= 1, got {min_count!r}")
        if min_count > buffer_size:
            raise ValueError(
                f"min_count ({min_count}) > buffer_size ({buffer_size}) means per-prompt statistics are never used; "
                f"lower min_count or raise buffer_size"
            )
        self.buffer_size = buffer_size
        self.min_count = min_count
        self._buffers: dict[str, collections.deque[float]] = {}

    def update(self, prompts: Sequence[str], rewards: np.ndarray) -> np.ndarray:
        """Record ``rewards`` and return their advantages. (batch,) float32"""
        rewards = _check_rewards(rewards)
        prompts = _check_labels(prompts, rewards, "prompts")
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise ValueError(f"prompts must be strings; prompts[{i}] is a {type(prompt).__name__}: {prompt!r}")
        batch_mean, batch_std = rewards.mean(), rewards.std()
        advantages = np.empty_like(rewards)
        for prompt, indices in _indices_by_label(prompts).items():
            buffer = self._buffers.setdefault(prompt, collections.deque(maxlen=self.buffer_size))
            buffer.extend(float(r) for r in rewards[indices])
            if len(buffer) >= self.min_count:
                history = np.fromiter(buffer, dtype=np.float64, count=len(buffer))
                mean, std = history.mean(), history.std()
            else:
                mean, std = batch_mean, batch_std
            advantages[indices] = (rewards[indices] - mean) / (std + EPS)
        return advantages.astype(np.float32)

    def stats(self) -> dict[str, float]:
        """How much history is tracked, for logging."""
        lengths = [len(buffer) for buffer in self._buffers.values()]
        return {
            "advantages/tracked_prompts": float(len(lengths)),
            "advantages/mean_buffer_length": float(np.mean(lengths)) if lengths else 0.0,
        }

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state: settings and every prompt's buffer, oldest reward first."""
        return {
            "buffer_size": self.buffer_size,
            "min_count": self.min_count,
            "buffers": {prompt: list(buffer) for prompt, buffer in self._buffers.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the buffers saved by :meth:`state_dict` (settings must match this tracker's)."""
        missing = {"buffer_size", "min_count", "buffers"} - set(state)
        if missing:
            raise ValueError(f"tracker state is missing {sorted(missing)}; pass a dict from PerPromptStatTracker.state_dict()")
        for key in ("buffer_size", "min_count"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"tracker state was saved with {key}={state[key]} but this tracker has {key}={getattr(self, key)}; "
                    f"construct it with {key}={state[key]} to resume"
                )
        buffers = {}
        for prompt, values in state["buffers"].items():
            values = [float(v) for v in values]
            if len(values) > self.buffer_size:
                raise ValueError(f"tracker state for prompt {prompt!r} holds {len(values)} rewards > buffer_size {self.buffer_size}")
            buffers[prompt] = collections.deque(values, maxlen=self.buffer_size)
        self._buffers = buffers
