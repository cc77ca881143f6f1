"""The toy world: one coloured shape on a plain background, with a caption grammar.

Every image is a pure function of ``(prompt, seed)``, so datasets, tests and the
``toy_fidelity`` verifier agree exactly on what a prompt means.

Caption grammar::

    caption  := article " " color " " shape " " position
    article  := "a" | "an"            (English: "an" before a vowel sound, e.g. "an orange")
    color    := red | green | blue | yellow | purple | orange
    shape    := circle | square | triangle
    position := "on the left" | "on the right" | "at the top" | "at the bottom" | "in the center"

The 6 x 3 x 5 = 90 attribute combinations are split once and for all into 72 training
prompts and 18 held-out prompts (see :func:`is_held_out`). Every colour x shape pair
appears in training at four of its five positions; the fifth is held out, so held-out
prompts test composition of attributes that were each seen in training.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Sequence

import numpy as np

IMAGE_SIZE = 32
"""Side of every toy image in pixels."""

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 180),
    "orange": (250, 130, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
POSITIONS: tuple[str, ...] = ("on the left", "on the right", "at the top", "at the bottom", "in the center")

BACKGROUND: tuple[int, int, int] = (224, 224, 224)
"""Light grey: far (> 90 in RGB distance) from every shape colour."""

# Shape centre for each position, in pixels (x, y) of a 32 x 32 image.
POSITION_ANCHORS: dict[str, tuple[float, float]] = {
    "on the left": (9.0, 16.0),
    "on the right": (23.0, 16.0),
    "at the top": (16.0, 9.0),
    "at the bottom": (16.0, 23.0),
    "in the center": (16.0, 16.0),
}

RADIUS_RANGE = (6.0, 7.5)
"""Half the side of the shape's bounding box, drawn uniformly per image."""
JITTER = 1.0
"""Maximum offset of the shape centre from its anchor, in pixels, per axis."""

_CAPTION_RE = re.compile(r"^(?P<article>a|an) (?P<color>[a-z]+) (?P<shape>[a-z]+) (?P<position>(?:on the|at the|in the) [a-z]+)$")


@dataclasses.dataclass(frozen=True)
class ToyPrompt:
    """The three attributes a toy caption names."""

    color: str
    shape: str
    position: str

    @property
    def caption(self) -> str:
        article = "an" if self.color[0] in "aeiou" else "a"
        return f"{article} {self.color} {self.shape} {self.position}"


def parse_prompt(prompt: str) -> ToyPrompt:
    """Parse a caption of the toy grammar; raise ``ValueError`` naming the problem otherwise."""
    text = " ".join(prompt.strip().lower().split())
    match = _CAPTION_RE.match(text)
    if match is None:
        raise ValueError(
            f"{prompt!r} is not a toy-world caption; expected 'a|an <color> <shape> <position>', e.g. 'a red circle on the left'"
        )
    color, shape, position = match["color"], match["shape"], match["position"]
    for value, allowed, what in ((color, COLORS, "color"), (shape, SHAPES, "shape"), (position, POSITIONS, "position")):
        if value not in allowed:
            raise ValueError(f"{prompt!r}: unknown {what} {value!r}; allowed: {', '.join(allowed)}")
    parsed = ToyPrompt(color, shape, position)
    if match["article"] != parsed.caption.split(" ", 1)[0]:
        raise ValueError(f"{prompt!r}: wrong article, write {parsed.caption!r}")
    return parsed


def all_prompts() -> list[ToyPrompt]:
    """All 90 attribute combinations in a fixed order (colour, then shape, then position)."""
    return [ToyPrompt(c, s, p) for c in COLORS for s in SHAPES for p in POSITIONS]


def is_held_out(prompt: ToyPrompt) -> bool:
    """The fixed held-out rule: (colour index + 2 * shape index + position index) divisible by 5.

    For each colour x shape pair exactly one position satisfies it, so 18 of the 90
    combinations are held out and each pair keeps four training positions.
    """
    c = list(COLORS).index(prompt.color)
    s = SHAPES.index(prompt.shape)
    p = POSITIONS.index(prompt.position)
    return (c + 2 * s + p) % 5 == 0


def train_prompts() -> list[str]:
    """The 72 captions RL training and pretraining may use."""
    return [p.caption for p in all_prompts() if not is_held_out(p)]


def held_out_prompts() -> list[str]:
    """The 18 captions never used for training; for evaluation only."""
    return [p.caption for p in all_prompts() if is_held_out(p)]


def shape_mask(shape: str, cx: float, cy: float, radius: float, size: int = IMAGE_SIZE, supersample: int = 4) -> np.ndarray:
    """Coverage in [0, 1] of each pixel by an ideal shape, by supersampling.

    ``radius`` is half the side of the shape's bounding box; the triangle points up.
    Returns ``(size, size)`` float32.
    """
    n = size * supersample
    coords = (np.arange(n, dtype=np.float32) + 0.5) / supersample
    x, y = np.meshgrid(coords, coords)
    dx, dy = x - cx, y - cy
    if shape == "circle":
        inside = dx * dx + dy * dy <= radius * radius
    elif shape == "square":
        inside = (np.abs(dx) <= radius) & (np.abs(dy) <= radius)
    elif shape == "triangle":
        # Apex at (cx, cy - r), base from (cx - r, cy + r) to (cx + r, cy + r).
        depth = (dy + radius) / (2 * radius)  # 0 at apex, 1 at base
        inside = (depth >= 0) & (depth <= 1) & (np.abs(dx) <= depth * radius)
    else:
        raise ValueError(f"unknown shape {shape!r}; allowed: {', '.join(SHAPES)}")
    return inside.reshape(size, supersample, size, supersample).mean(axis=(1, 3)).astype(np.float32)


def render(prompt: str | ToyPrompt, seed: int) -> np.ndarray:
    """Render the ground-truth image of a caption: ``(32, 32, 3)`` uint8, deterministic in ``seed``."""
    toy = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    rng = np.random.default_rng(seed)
    radius = rng.uniform(*RADIUS_RANGE)
    ax, ay = POSITION_ANCHORS[toy.position]
    cx, cy = ax + rng.uniform(-JITTER, JITTER), ay + rng.uniform(-JITTER, JITTER)
    coverage = shape_mask(toy.shape, cx, cy, radius)[..., None]
    background = np.array(BACKGROUND, dtype=np.float32)
    color = np.array(COLORS[toy.color], dtype=np.float32)
    image = background * (1 - coverage) + color * coverage
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def render_batch(prompts: Sequence[str], seeds: Iterable[int]) -> np.ndarray:
    """Render many captions: ``(batch, 32, 32, 3)`` uint8."""
    return np.stack([render(p, s) for p, s in zip(prompts, seeds, strict=True)])


# --------------------------------------------------------------------------------------
# Verifier: read the attributes back off an image (no learned weights).
# --------------------------------------------------------------------------------------

FOREGROUND_DISTANCE = 60.0
"""A pixel whose RGB distance from the background exceeds this is foreground."""
MIN_SHAPE_PIXELS = 12
"""Fewer connected foreground pixels than this means "no shape drawn"."""
MAX_COLOR_DISTANCE = 110.0
"""A mean colour farther than this from every palette colour matches no colour."""
MIN_SHAPE_IOU = 0.5
"""The best ideal-shape template must overlap the drawn shape at least this much."""


@dataclasses.dataclass(frozen=True)
class Detection:
    """Attributes found in one image; ``None`` where none could be read."""

    color: str | None
    shape: str | None
    position: str | None


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask (speckles are not the shape)."""
    h, w = mask.shape
    labels = np.zeros((h, w), dtype=np.int32)
    best_label, best_size, current = 0, 0, 0
    for start_y, start_x in zip(*np.nonzero(mask)):
        if labels[start_y, start_x]:
            continue
        current += 1
        labels[start_y, start_x] = current
        stack, size = [(start_y, start_x)], 0
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = current
                    stack.append((ny, nx))
        if size > best_size:
            best_label, best_size = current, size
    return labels == best_label if best_size else np.zeros_like(mask)


def detect(image: np.ndarray) -> Detection:
    """Read colour, shape and position of the main shape in a ``(H, W, 3)`` uint8 image.

    Colour: mean of the shape's pixels, nearest palette colour (within a bound).
    Position: bounding-box centre, nearest position anchor (anchors scale with image size).
    Shape: intersection-over-union against an ideal circle, square and upward triangle
    fitted to the shape's bounding box; the best match wins (if it overlaps enough).
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {image.shape}")
    pixels = image.astype(np.float32)
    distance = np.linalg.norm(pixels - np.array(BACKGROUND, dtype=np.float32), axis=-1)
    mask = _largest_component(distance > FOREGROUND_DISTANCE)
    if mask.sum() < MIN_SHAPE_PIXELS * (image.shape[0] / IMAGE_SIZE) ** 2:
        return Detection(None, None, None)

    mean_color = pixels[mask].mean(axis=0)
    color_distances = {name: float(np.linalg.norm(mean_color - np.array(rgb))) for name, rgb in COLORS.items()}
    color = min(color_distances, key=color_distances.get)
    if color_distances[color] > MAX_COLOR_DISTANCE:
        color = None

    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    # The bounding-box centre, not the centroid: a triangle's centroid sits low.
    scale = image.shape[1] / IMAGE_SIZE
    cx, cy = (x0 + x1) / 2 / scale, (y0 + y1) / 2 / scale
    position = min(POSITION_ANCHORS, key=lambda p: (POSITION_ANCHORS[p][0] - cx) ** 2 + (POSITION_ANCHORS[p][1] - cy) ** 2)

    box = mask[y0:y1, x0:x1]
    # Templates are drawn in a square canvas and stretched to the box, so elongated
    # blobs are compared with stretched ideals rather than rejected outright.
    ious = {}
    for shape in SHAPES:
        template = _box_template(shape, y1 - y0, x1 - x0)
        ious[shape] = float((template & box).sum() / max((template | box).sum(), 1))
    shape = max(ious, key=ious.get)
    if ious[shape] < MIN_SHAPE_IOU:
        shape = None
    return Detection(color, shape, position)


def _box_template(shape: str, height: int, width: int) -> np.ndarray:
    """An ideal shape filling a ``height x width`` box, as a boolean mask."""
    ys = (np.arange(height, dtype=np.float32) + 0.5) / height * 2 - 1  # -1 .. 1
    xs = (np.arange(width, dtype=np.float32) + 0.5) / width * 2 - 1
    x, y = np.meshgrid(xs, ys)
    if shape == "circle":
        return x * x + y * y <= 1.0
    if shape == "square":
        return np.ones((height, width), dtype=bool)
    depth = (y + 1) / 2  # 0 at the apex row, 1 at the base
    return np.abs(x) <= depth


def fidelity(image: np.ndarray, prompt: str | ToyPrompt) -> float:
    """Fraction of the caption's three attributes (colour, shape, position) the image shows."""
    toy = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    found = detect(image)
    hits = (found.color == toy.color) + (found.shape == toy.shape) + (found.position == toy.position)
    return hits / 3.0
