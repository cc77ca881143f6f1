"""Prompt lists: built-in toy sets by name, or a text file with one prompt per line."""

from __future__ import annotations

import logging
from pathlib import Path

from actors.toy import world as toy_world

logger = logging.getLogger(__name__)

ANIMALS = (
    "cat",
    "dog",
    "horse",
    "monkey",
    "rabbit",
    "zebra",
    "spider",
    "bird",
    "sheep",
    "deer",
    "cow",
    "goat",
    "lion",
    "tiger",
    "bear",
    "raccoon",
    "fox",
    "wolf",
    "lizard",
    "beetle",
    "ant",
    "butterfly",
    "fish",
    "shark",
    "whale",
    "dolphin",
    "squirrel",
    "mouse",
    "rat",
    "snake",
    "turtle",
    "frog",
    "chicken",
    "duck",
    "goose",
    "bee",
    "pig",
    "turkey",
    "fly",
    "llama",
    "camel",
    "bat",
    "gorilla",
    "hedgehog",
    "kangaroo",
)
"""The 45 common animal names DDPO trains its aesthetic and compressibility runs on (Black et al. 2023, sec. 6)."""

BUILTIN_PROMPT_SETS = {
    "animals": lambda: list(ANIMALS),
    "toy-train": toy_world.train_prompts,
    "toy-heldout": toy_world.held_out_prompts,
    "toy-all": lambda: [p.caption for p in toy_world.all_prompts()],
}
"""Prompt lists that ``--prompts`` accepts by name instead of a file."""


def read_prompts(source: str) -> list[str]:
    """Prompts from a file (one per line; blank lines and ``#`` comments skipped) or a built-in set name."""
    if source in BUILTIN_PROMPT_SETS:
        return BUILTIN_PROMPT_SETS[source]()
    path = Path(source)
    if not path.is_file():
        raise ValueError(
            f"prompt file {source!r} does not exist; give a text file with one prompt per line, or one of: {', '.join(BUILTIN_PROMPT_SETS)}"
        )
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise ValueError(f"prompt file {source!r} has no prompts (one per line; '#' starts a comment)")
    unique = list(dict.fromkeys(prompts))
    if len(unique) < len(prompts):
        logger.warning("prompt file %s lists %d prompts more than once; each is evaluated once", source, len(prompts) - len(unique))
    return unique
