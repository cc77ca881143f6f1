"""The rewards that need no model: JPEG compressibility (DDPO's task) and the toy world's verifier."""

from __future__ import annotations

import io
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from actors.rewards.registry import Info, register_reward
from actors.toy import world as toy_world

JPEG_QUALITY = 95
"""JPEG quality used by the compressibility rewards (DDPO, Black et al. 2023, uses 95)."""


def jpeg_kilobytes(image: np.ndarray, quality: int = JPEG_QUALITY) -> float:
    """Size of one ``(H, W, 3)`` uint8 image encoded as JPEG by PIL, in kilobytes (bytes / 1000)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.tell() / 1000


def _jpeg_sizes(images: np.ndarray) -> np.ndarray:
    return np.array([jpeg_kilobytes(image) for image in images], dtype=np.float32)  # (batch,)


@register_reward("jpeg_incompressibility")
def jpeg_incompressibility(images: np.ndarray, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, Info]:
    """JPEG size in kB: rewards detail and texture (DDPO's "incompressibility")."""
    sizes = _jpeg_sizes(images)
    return sizes, {"jpeg_kb": sizes}


@register_reward("jpeg_compressibility")
def jpeg_compressibility(images: np.ndarray, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, Info]:
    """Minus the JPEG size in kB: rewards flat, simple images (DDPO's "compressibility")."""
    sizes = _jpeg_sizes(images)
    return -sizes, {"jpeg_kb": sizes}


def _parse_toy_prompt(reward_name: str, prompt: str) -> toy_world.ToyPrompt:
    try:
        return toy_world.parse_prompt(prompt)
    except ValueError as err:
        raise ValueError(f"reward {reward_name!r} scores only toy-world captions: {err}") from err


@register_reward("toy_fidelity")
def toy_fidelity(images: np.ndarray, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, Info]:
    """Fraction of the caption's colour, shape and position that the image shows, in [0, 1].

    Same value as :func:`toy_world.fidelity`, but detects each image once and also reports
    per-attribute accuracy over the batch (``color_acc``, ``shape_acc``, ``position_acc``).
    """
    targets = [_parse_toy_prompt("toy_fidelity", prompt) for prompt in prompts]
    found = [toy_world.detect(image) for image in images]
    hits = np.array(
        [[d.color == t.color, d.shape == t.shape, d.position == t.position] for d, t in zip(found, targets, strict=True)],
        dtype=np.float64,
    ).reshape(len(targets), 3)  # (batch, attribute)
    # Divide in float64 before the cast so 2 of 3 hits is exactly float32(2 / 3).
    scores = (hits.sum(axis=1) / 3.0).astype(np.float32)
    accuracy = hits.mean(axis=0) if len(targets) else np.zeros(3)
    info: Info = {"color_acc": float(accuracy[0]), "shape_acc": float(accuracy[1]), "position_acc": float(accuracy[2])}
    return scores, info
