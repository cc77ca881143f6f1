"""Published test vectors for real reward checkpoints; they run only where the weights are.

The weights cannot be downloaded in CI, so each test is skipped unless its environment
variables point at local files (see docs/models-and-rewards.md, "Reward models"):

- ``RAYALIGN_IMAGEREWARD_WEIGHTS``: the directory written by ``rayalign convert-reward
  imagereward`` from the published ImageReward.pt; ``RAYALIGN_IMAGEREWARD_EXAMPLES``: the
  ImageReward repository's ``assets/images`` directory (1.webp ... 4.webp).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from actors.rewards.registry import resolve_reward, score_batch

IMAGEREWARD_PROMPT = "a painting of an ocean with clouds and birds, day time, low depth field effect"
IMAGEREWARD_PUBLISHED = [0.5811622738838196, 0.2745276093482971, -1.4131819009780884, -2.029569625854492]
"""The scores the ImageReward README prints for its example images 1.webp ... 4.webp."""


def _env_path(name: str) -> Path:
    value = os.environ.get(name)
    if not value:
        pytest.skip(f"set {name} to run this test on the real checkpoint")
    return Path(value)


def test_imagereward_matches_the_published_example_scores():
    weights = _env_path("RAYALIGN_IMAGEREWARD_WEIGHTS")
    examples = _env_path("RAYALIGN_IMAGEREWARD_EXAMPLES")
    reward = resolve_reward("imagereward", {"weights": str(weights)})
    scores = []
    for index in range(1, 5):  # one at a time: the example images need not share a size
        image = np.asarray(Image.open(examples / f"{index}.webp").convert("RGB"))[None]
        scores.append(float(score_batch(reward, image, [IMAGEREWARD_PROMPT])[0][0]))
    # The README says the numbers "may be slightly different depending on the compute device".
    np.testing.assert_allclose(scores, IMAGEREWARD_PUBLISHED, atol=0.05)
    assert scores == sorted(scores, reverse=True)
