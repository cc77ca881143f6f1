"""Image grids and PNG files for evaluation and training snapshots."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

MIN_TILE = 128
"""Small images are enlarged (nearest neighbour) to at least this many pixels a side."""


def make_grid(images: np.ndarray, *, columns: int, padding: int = 2, background: int = 255) -> np.ndarray:
    """Tile ``(n, H, W, 3)`` uint8 images row by row into one ``(rows*H', columns*W', 3)`` image."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected images of shape (n, H, W, 3), got {images.shape}")
    if columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    n, height, width, _ = images.shape
    scale = max(1, MIN_TILE // max(height, width))
    if scale > 1:
        images = images.repeat(scale, axis=1).repeat(scale, axis=2)
        height, width = height * scale, width * scale
    rows = -(-n // columns)
    grid = np.full((rows * (height + padding) + padding, columns * (width + padding) + padding, 3), background, dtype=np.uint8)
    for index, image in enumerate(images):
        r, c = divmod(index, columns)
        top, left = padding + r * (height + padding), padding + c * (width + padding)
        grid[top : top + height, left : left + width] = image
    return grid


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of a (H, W, 3) uint8 image: lossless, and equal pixels give equal bytes (no timestamps or text chunks)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def save_png(image: np.ndarray, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_png(image))
    return path
