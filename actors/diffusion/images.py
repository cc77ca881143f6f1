"""Image grids and PNG files for evaluation and training snapshots."""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

MIN_TILE = 128
"""Small images are enlarged (nearest neighbour) to at least this many pixels a side."""

LABELS_KEY = "rayalign-grid"
"""The PNG text chunk of a labelled grid: its captions and scores as JSON (see :func:`read_grid_labels`)."""

TEXT_COLOR = (40, 40, 40)


def _enlarge(images: np.ndarray) -> np.ndarray:
    """``(n, H, W, 3)`` uint8 images, enlarged by a whole factor to at least :data:`MIN_TILE` a side."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected images of shape (n, H, W, 3), got {images.shape}")
    scale = max(1, MIN_TILE // max(images.shape[1], images.shape[2]))
    return images.repeat(scale, axis=1).repeat(scale, axis=2) if scale > 1 else images


def make_grid(images: np.ndarray, *, columns: int, padding: int = 2, background: int = 255) -> np.ndarray:
    """Tile ``(n, H, W, 3)`` uint8 images row by row into one ``(rows*H', columns*W', 3)`` image."""
    images = _enlarge(images)
    if columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    n, height, width, _ = images.shape
    rows = -(-n // columns)
    grid = np.full((rows * (height + padding) + padding, columns * (width + padding) + padding, 3), background, dtype=np.uint8)
    for index, image in enumerate(images):
        r, c = divmod(index, columns)
        top, left = padding + r * (height + padding), padding + c * (width + padding)
        grid[top : top + height, left : left + width] = image
    return grid


def make_labelled_grid(
    images: np.ndarray, *, captions: Sequence[str], scores: Sequence[float], columns: int, padding: int = 2, background: int = 255
) -> np.ndarray:
    """:func:`make_grid` with words: each row's caption in a strip at its left, each image's score under it.

    Row ``r`` holds images ``r * columns`` to ``(r + 1) * columns - 1`` and is captioned
    ``captions[r]`` (so ``columns`` images per prompt give one prompt per row); ``scores`` has
    one value per image, NaN for an image without one (printed "n/a"). The text is drawn in
    PIL's default font, sized to the tiles; a caption too long for its strip is cut with "...".
    """
    images = _enlarge(images)
    if columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    n, height, width, _ = images.shape
    rows = -(-n // columns)
    if len(captions) != rows:
        raise ValueError(f"{n} images in rows of {columns} make {rows} rows, but got {len(captions)} captions (one per row)")
    if len(scores) != n:
        raise ValueError(f"got {len(scores)} scores for {n} images (one per image)")
    font = ImageFont.load_default(size=max(12, height // 10))  # no font file to find: the one Pillow embeds
    line = font.getbbox("Ag")[3] + 3  # pixels from one line of text to the next
    caption_width = width * 3 // 2
    row_height = height + line + 2  # the tile, then its score
    grid = Image.new(
        "RGB",
        (padding + caption_width + columns * (width + padding) + padding, padding + rows * (row_height + padding)),
        (background,) * 3,
    )
    draw = ImageDraw.Draw(grid)
    margin = max(2, width // 32)
    for r, caption in enumerate(captions):
        top = padding + r * (row_height + padding)
        lines = wrap_text(str(caption), font, caption_width - 2 * margin, max_lines=max(1, row_height // line))
        for k, text in enumerate(lines):
            draw.text((padding + margin, top + margin + k * line), text, font=font, fill=TEXT_COLOR)
    for index, (image, score) in enumerate(zip(images, scores)):
        r, c = divmod(index, columns)
        top, left = padding + r * (row_height + padding), padding + caption_width + c * (width + padding)
        grid.paste(Image.fromarray(image), (left, top))
        text = "n/a" if not math.isfinite(score) else f"{score:.3f}"
        draw.text((left + (width - font.getlength(text)) / 2, top + height + 1), text, font=font, fill=TEXT_COLOR)
    return np.asarray(grid)


def wrap_text(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: float, *, max_lines: int) -> list[str]:
    """``text`` broken at spaces into lines at most ``width`` pixels long in ``font``, at most ``max_lines`` of them
    (the last one cut with "..." if the text goes on; a word longer than a line is cut too)."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    cut = len(lines) > max_lines
    lines = lines[:max_lines]
    for k, current in enumerate(lines):
        if font.getlength(current) > width or (cut and k == len(lines) - 1):
            while current and font.getlength(current + "...") > width:
                current = current[:-1]
            lines[k] = current.rstrip() + "..."
    return lines


def grid_labels(captions: Sequence[str], scores: Sequence[float]) -> dict[str, str]:
    """The PNG text of a labelled grid (give it to :func:`save_png`): what it shows, readable without OCR."""
    values = [float(s) if math.isfinite(s) else None for s in scores]
    return {LABELS_KEY: json.dumps({"captions": list(map(str, captions)), "scores": values})}


def read_grid_labels(png: bytes) -> tuple[list[str], list[float]] | None:
    """The captions and scores :func:`grid_labels` stored in a PNG, or None for a grid without them."""
    raw = Image.open(io.BytesIO(png)).text.get(LABELS_KEY)  # type: ignore[attr-defined]
    if raw is None:
        return None
    labels = json.loads(raw)
    return list(labels["captions"]), [math.nan if s is None else float(s) for s in labels["scores"]]


def encode_png(image: np.ndarray, *, text: dict[str, str] | None = None) -> bytes:
    """PNG bytes of a (H, W, 3) uint8 image: lossless, and equal pixels (and ``text``) give equal bytes (no timestamps).

    ``text`` becomes PNG text chunks (keyword: value), e.g. a labelled grid's :func:`grid_labels`.
    """
    info = None
    if text:
        info = PngInfo()
        for key, value in text.items():
            info.add_itxt(key, value)  # international text: UTF-8, so any prompt fits
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def save_png(image: np.ndarray, path: str | os.PathLike, *, text: dict[str, str] | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_png(image, text=text))
    return path
