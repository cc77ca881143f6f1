"""Schedules of the learner: the learning rate over a run, and denoising steps per pass."""

from __future__ import annotations

import math

from orchestrator.config import LearnerConfig


def learning_rate_at(learner: LearnerConfig, *, epoch: int, epochs: int) -> float:
    """The learning rate of 1-based ``epoch`` of a run of ``epochs`` under ``learner.lr_schedule``.

    "cosine" is half a cosine from ``learning_rate`` at the first epoch to
    ``learning_rate * lr_final_fraction`` at the last; epochs past the end stay at the floor.
    """
    if learner.lr_schedule == "constant" or epochs <= 1:
        return learner.learning_rate
    progress = min(max(epoch - 1, 0), epochs - 1) / (epochs - 1)  # 0 at the first epoch, 1 at the last
    floor = learner.lr_final_fraction
    return learner.learning_rate * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def steps_per_pass(learner: LearnerConfig, trained_steps: int) -> int:
    """Denoising steps per forward/backward pass: ``learner.timesteps_per_pass``, 0 meaning all trained steps."""
    return learner.timesteps_per_pass or trained_steps
