"""Atomic checkpoints: a killed write never replaces a good checkpoint.

Layout under ``<output>/checkpoints/``::

    epoch_0004/            complete checkpoint (has COMPLETE)
        COMPLETE
        state.json         counters, stat tracker (RNG streams derive from seed and epoch)
        config.yaml        the effective config
        lora/              adapter (safetensors) loadable by `rayalign eval --lora`
        deepspeed/         DeepSpeed engine + optimizer state (every rank's partition)
    .tmp-epoch_0006/       a write in progress (or one that was killed): ignored
    latest                 name of the newest complete checkpoint

A checkpoint is written into ``.tmp-epoch_N``, marked COMPLETE, fsynced, then renamed
to ``epoch_N`` (rename is atomic on POSIX filesystems); only then is ``latest``
replaced, itself by write-to-temp + ``os.replace``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
LATEST = "latest"


def checkpoint_name(epoch: int) -> str:
    return f"epoch_{epoch:04d}"


def staging_dir(root: Path, epoch: int) -> Path:
    """Where the checkpoint of ``epoch`` is written before it is committed (same on every rank)."""
    return Path(root) / f".tmp-{checkpoint_name(epoch)}"


def prepare_staging(root: Path, epoch: int) -> Path:
    """Empty staging directory for ``epoch`` (removing what a killed write left there)."""
    path = staging_dir(root, epoch)
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def _fsync_tree(path: Path) -> None:
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
    for directory in [path, *sorted(p for p in path.rglob("*") if p.is_dir())]:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_json_atomic(path: Path, data: Any) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as handle:
        json.dump(data, handle, indent=2)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def commit(root: Path, epoch: int, *, keep: int) -> Path:
    """Mark the staged checkpoint complete, move it into place, point ``latest`` at it, prune."""
    root = Path(root)
    staged = staging_dir(root, epoch)
    (staged / COMPLETE).write_text(f"{epoch}\n")
    _fsync_tree(staged)
    final = root / checkpoint_name(epoch)
    if final.exists():
        # Re-running an epoch after a resume: the new one replaces it, never half-way.
        trash = root / f".old-{checkpoint_name(epoch)}"
        shutil.rmtree(trash, ignore_errors=True)
        os.rename(final, trash)
        os.rename(staged, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(staged, final)
    tmp = root / f".{LATEST}.tmp"
    tmp.write_text(final.name + "\n")
    os.replace(tmp, root / LATEST)
    _prune(root, keep)
    return final


def _complete_checkpoints(root: Path) -> list[Path]:
    found = [p for p in Path(root).glob("epoch_*") if p.is_dir() and (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: p.name)


def _prune(root: Path, keep: int) -> None:
    for old in _complete_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint, or None. Trusts ``latest`` only if it points at a complete one."""
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / COMPLETE).is_file():
            return candidate
        logger.warning("%s points at %s, which is not a complete checkpoint; scanning", pointer, candidate.name)
    complete = _complete_checkpoints(root)
    return complete[-1] if complete else None


def read_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((Path(checkpoint) / "state.json").read_text())
