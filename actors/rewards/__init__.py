"""Rewards: a registry of named, batched scoring functions and the rewards that register in it.

Importing the package registers every shipped reward: the model-free ones
(:mod:`actors.rewards.builtin`) and the remote judge (:mod:`actors.rewards.http`) at once,
the learned reward models (:mod:`actors.rewards.models`, which imports torch and
transformers) by name, imported the first time one of them is used.
"""

from actors.rewards import builtin, http  # noqa: F401  (imported for registration)
from actors.rewards.registry import register_lazily

register_lazily("actors.rewards.models", "aesthetic", "clip_score", "pickscore", "hpsv2", "imagereward")
