"""The run directory: every file a training run writes, and atomic checkpoints.

This module is the one place that spells the layout; everything else asks it::

    RUN/
        config.yaml            the effective config
        metrics.jsonl          one JSON object per epoch
        tensorboard/           the same metrics as TensorBoard events (--logger tensorboard, the default)
        wandb/, mlflow/        W&B's offline files, the default MLflow store (--logger wandb, mlflow)
        trackers.json          each tracker's run ids and last epoch logged, for a resume
        images/epoch_0005.png  held-out prompts, fixed seeds
        checkpoints/
            epoch_0004/        a complete checkpoint (has COMPLETE, written last)
                COMPLETE
                state.json     counters, stat tracker (RNG streams derive from seed and epoch)
                config.yaml    the effective config
                lora/          the adapter (safetensors), loadable by `rayalign eval --lora`,
                    sampling.json  and the sampler settings it was trained with
                unet/          instead of lora/ for full fine-tuning
                deepspeed/     DeepSpeed engine + optimizer state (every rank's partition)
                replay.parquet, prefetched.parquet   the replay buffer; async mode's next epoch
            epoch_0006/        a write in progress (or one that was killed): no COMPLETE, ignored
            latest             name of the newest complete checkpoint
            best               name of the best one (train.early_stop only), never pruned

``RUN`` is a local directory or an object-store URI (``s3://bucket/runs/r1``): every file
goes through :class:`~actors.storage.Location`. Object stores cannot rename, so a checkpoint
is made complete by a marker written last: rank 0 first clears ``epoch_N/`` (the marker
first, so a re-written epoch is never complete while half new), then every learner rank
writes its own DeepSpeed partition straight into it, rank 0 the rest, and only then the
``COMPLETE`` marker and the ``latest`` pointer (each one object, written whole). A killed
write leaves a checkpoint without its marker, which readers skip. A run with
``train.early_stop`` also points ``best`` at the checkpoint it keeps (see
:mod:`orchestrator.guards`); ``--lora RUN`` and ``--model RUN`` take that one when it exists.

The files a run appends to while it runs (metrics, TensorBoard events, image grids) are
written in a local working directory (the run directory itself when it is local) and
published to the run after every epoch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

import yaml

from actors.diffusion.files import LORA_CONFIG_NAME
from actors.storage import Location, cache_root, fetch
from actors.toy.model import resolve_model_path
from orchestrator.config import Config, SamplingConfig, load_config, parse_yaml

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
TRACKERS_FILE = "trackers.json"
"""Per tracker (``--logger``), the last epoch it logged and its run's ids (:mod:`orchestrator.trackers`)."""
WANDB_DIR = "wandb"
"""W&B's own directory (``offline-run-*`` or ``run-*``), unless ``WANDB_DIR`` is set."""
MLFLOW_DIR = "mlflow"
"""The default MLflow store, when ``MLFLOW_TRACKING_URI`` is not set: ``mlflow.db`` (SQLite) and ``artifacts/``."""
IMAGES_DIR = "images"
CHECKPOINTS_DIR = "checkpoints"

COMPLETE = "COMPLETE"
LATEST = "latest"
BEST = "best"
"""Beside ``latest``: the checkpoint an early-stopping run keeps as its best."""
STATE_FILE = "state.json"
LORA_DIR = "lora"
UNET_DIR = "unet"
DEEPSPEED_DIR = "deepspeed"
REPLAY_FILE = "replay.parquet"
"""The replay buffer in a checkpoint: every buffered sample with its arrays."""
PREFETCHED_FILE = "prefetched.parquet"
"""Async mode: the next epoch's samples, drawn with the older weights before the checkpoint."""
SAMPLING_FILE = "sampling.json"
"""Beside an adapter's weights: the sampler settings it was trained with."""


class RunDir:
    """The files of the training run at ``root`` (a local directory or an object-store URI)."""

    def __init__(self, root: str | os.PathLike | Location):
        self.root = Location(root)

    def __repr__(self) -> str:
        return f"RunDir({self.root.uri!r})"

    @property
    def config(self) -> Location:
        return self.root / CONFIG_FILE

    @property
    def metrics(self) -> Location:
        return self.root / METRICS_FILE

    @property
    def checkpoints(self) -> Location:
        return self.root / CHECKPOINTS_DIR

    @property
    def workdir(self) -> Path:
        """Where this process writes the run's growing files before :meth:`publish`: the run
        directory itself when it is local, else a directory in this node's cache."""
        if self.root.local is not None:
            return self.root.local
        return cache_root() / "runs" / hashlib.sha256(self.root.uri.encode()).hexdigest()[:16]

    def read_config(self) -> Config:
        """The run's effective config (``config.yaml``)."""
        return load_config(parse_yaml(self.config.read_text()))

    def image_grid(self, epoch: int) -> str:
        """The grid of held-out images of ``epoch``, relative to the run (write it under :attr:`workdir`)."""
        return f"{IMAGES_DIR}/epoch_{epoch:04d}.png"

    def publish(self, relative: str) -> None:
        """Copy ``workdir/relative`` (a file or directory) to the run; nothing to do for a local run."""
        if self.root.local is None and (self.workdir / relative).exists():
            (self.root / relative).upload(self.workdir / relative)

    def pull(self, relative: str) -> None:
        """Copy the run's ``relative`` into :attr:`workdir` (resuming a remote run); nothing to do for a local run."""
        if self.root.local is None and (self.root / relative).exists():
            (self.root / relative).download(self.workdir / relative)

    def holds_run(self) -> bool:
        """Whether a run has written here (metrics or checkpoints)."""
        return self.metrics.exists() or self.checkpoints.exists()

    def latest_checkpoint(self) -> Checkpoint | None:
        """The newest complete checkpoint, or None. Trusts ``latest`` only if it names a complete one."""
        pointer = self.checkpoints / LATEST
        if pointer.is_file():
            candidate = Checkpoint(self.checkpoints / pointer.read_text().strip())
            if candidate.is_complete():
                return candidate
            logger.warning("%s names %s, which is not a complete checkpoint; scanning", pointer, candidate.name)
        complete = self.complete_checkpoints()
        return complete[-1] if complete else None

    def best_checkpoint(self) -> Checkpoint | None:
        """The checkpoint ``best`` names (a run with ``train.early_stop``), if it is complete; else None."""
        return _pointed(self.checkpoints / BEST)

    def chosen_checkpoint(self) -> tuple[Checkpoint | None, str]:
        """The checkpoint the run stands for (``--lora RUN``, ``--model RUN``): the best one where the run keeps
        one, else the latest; and which pointer chose it (``best`` or ``latest``)."""
        best = self.best_checkpoint()
        return (best, BEST) if best is not None else (self.latest_checkpoint(), LATEST)

    def complete_checkpoints(self) -> list[Checkpoint]:
        """Every complete checkpoint, oldest first."""
        found = [Checkpoint(self.checkpoints / name) for name in self.checkpoints.list() if name.startswith("epoch_")]
        return [checkpoint for checkpoint in found if checkpoint.is_complete()]

    def checkpoint(self, epoch: int) -> Checkpoint:
        """Where the checkpoint of ``epoch`` is (or will be) written."""
        return Checkpoint(self.checkpoints / checkpoint_name(epoch))


class Checkpoint:
    """The files of one checkpoint directory."""

    def __init__(self, where: str | os.PathLike | Location):
        self.location = Location(where)

    def __repr__(self) -> str:
        return f"Checkpoint({self.location.uri!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Checkpoint) and other.location == self.location

    @property
    def name(self) -> str:
        return self.location.name

    @property
    def state(self) -> Location:
        return self.location / STATE_FILE

    @property
    def config(self) -> Location:
        return self.location / CONFIG_FILE

    @property
    def lora(self) -> Location:
        return self.location / LORA_DIR

    @property
    def unet(self) -> Location:
        return self.location / UNET_DIR

    @property
    def deepspeed(self) -> Location:
        return self.location / DEEPSPEED_DIR

    @property
    def replay(self) -> Location:
        return self.location / REPLAY_FILE

    @property
    def prefetched(self) -> Location:
        return self.location / PREFETCHED_FILE

    def is_complete(self) -> bool:
        return (self.location / COMPLETE).is_file()

    def read_state(self) -> dict[str, Any]:
        return json.loads(self.state.read_text())

    def read_config(self) -> Config:
        """The config the checkpoint was written with."""
        return load_config(parse_yaml(self.config.read_text()))


def _pointed(pointer: Location) -> Checkpoint | None:
    """The complete checkpoint a pointer file (``checkpoints/best``, ``checkpoints/latest``) names, else None."""
    if not pointer.is_file():
        return None
    candidate = Checkpoint(Location(pointer.uri.rsplit("/", 1)[0]) / pointer.read_text().strip())
    if candidate.is_complete():
        return candidate
    logger.warning("%s names %s, which is not a complete checkpoint", pointer, candidate.name)
    return None


def _follow_pointer(path: str | os.PathLike) -> tuple[Location, str | None]:
    """``path`` as a location; ``RUN/checkpoints/best`` or ``.../latest`` become the checkpoint they name (and the choice, in words)."""
    where = Location(path)
    if where.name in (BEST, LATEST) and where.is_file():
        checkpoint = _pointed(where)
        if checkpoint is None:
            raise ValueError(f"{path} names {where.read_text().strip()!r}, which is not a complete checkpoint")
        return checkpoint.location, f"{checkpoint.location} ({where.name})"
    return where, None


def lora_choice(path: str | os.PathLike) -> tuple[Location, str]:
    """The adapter a user points at, and which it is in words (for the line eval and serve print).

    ``path`` is the adapter itself, a checkpoint (``.../epoch_0010``), a pointer to one
    (``RUN/checkpoints/best``, ``RUN/checkpoints/latest``), or a training run directory, which
    stands for its best checkpoint when it keeps one (``train.early_stop``) and else its
    latest complete one; each a local path or a URI.
    """
    where, chosen = _follow_pointer(path)
    if (where / LORA_CONFIG_NAME).is_file():
        return where, chosen or str(where)
    if (where / LORA_DIR / LORA_CONFIG_NAME).is_file():
        return where / LORA_DIR, chosen or str(where)
    run = RunDir(where)
    if run.checkpoints.is_dir():
        checkpoint, pointer = run.chosen_checkpoint()
        if checkpoint is not None and (checkpoint.lora / LORA_CONFIG_NAME).is_file():
            return checkpoint.lora, f"{checkpoint.location} (the run's {pointer} checkpoint)"
        if checkpoint is not None and checkpoint.unet.is_dir():
            raise ValueError(f"{path} fine-tuned the whole UNet, it has no LoRA adapter: give the run as --model (not --lora)")
        raise ValueError(f"{path} is a training run without a complete LoRA checkpoint yet (look in {run.checkpoints})")
    raise ValueError(f"{path} is not a LoRA adapter, checkpoint or run directory: no {LORA_CONFIG_NAME} in it or in {where / LORA_DIR}")


def locate_lora(path: str | os.PathLike) -> Location:
    """The adapter a user points at (see :func:`lora_choice`)."""
    return lora_choice(path)[0]


def resolve_lora_dir(path: str | os.PathLike) -> Path:
    """A local directory with the adapter :func:`locate_lora` finds (downloaded to this node's cache from a URI)."""
    return fetch(locate_lora(path), "adapters", keep_parent=True)


def resolve_model(path: str | os.PathLike | None, adapter_dir: str | os.PathLike | None = None) -> tuple[str | Path, Location | None]:
    """What a user may give as a model, as (the pipeline to load, a trained UNet or None).

    A pipeline directory or URI is returned as it is and an embedded model's name (``toy-sd3``)
    as its shipped directory; a fully fine-tuned run, checkpoint or pointer to one
    (``RUN/checkpoints/best``) becomes (the run's base model, the checkpoint's ``unet/``); a run
    stands for its best checkpoint where it keeps one, else its latest. None means the model
    ``adapter_dir``'s adapter was trained on (see :func:`trained_model`), else the embedded toy
    UNet model.
    """
    if path is None:
        return resolve_model_path(trained_model(adapter_dir) if adapter_dir is not None else None), None
    where, _ = _follow_pointer(path)
    checkpoint = Checkpoint(where) if (where / COMPLETE).is_file() else None
    if checkpoint is None and (where / CHECKPOINTS_DIR).is_dir():
        checkpoint, _ = RunDir(where).chosen_checkpoint()
        if checkpoint is None:
            raise ValueError(f"{path} is a training run without a complete checkpoint yet (look in {where / CHECKPOINTS_DIR})")
    if checkpoint is None:
        return resolve_model_path(path), None
    if not checkpoint.unet.is_dir():
        raise ValueError(
            f"{checkpoint.location} holds a LoRA adapter, not a fully fine-tuned UNet: give it as --lora, with --model its base model"
        )
    return resolve_model_path(checkpoint.read_config().model.path), checkpoint.unet


# --------------------------------------------------------------------------- writing checkpoints


INCOMPLETE_MARK = ".incomplete-"
"""In the name of a run moved aside because it had no complete checkpoint: ``<run>.incomplete-N``."""


def move_aside(run: RunDir) -> Location:
    """Move a run without a complete checkpoint to the first free ``<run>.incomplete-N`` beside it; returns where."""
    parent = Location(run.root.uri.rsplit("/", 1)[0])
    for n in itertools.count(1):
        aside = parent / f"{run.root.name}{INCOMPLETE_MARK}{n}"
        if not aside.exists():
            run.root.move_to(aside)
            return aside
    raise AssertionError("unreachable")


def checkpoint_name(epoch: int) -> str:
    return f"epoch_{epoch:04d}"


def begin_checkpoint(run: RunDir, epoch: int) -> Checkpoint:
    """Rank 0, before any rank writes: an empty, incomplete ``epoch_N`` (what a killed or earlier write left is removed)."""
    checkpoint = run.checkpoint(epoch)
    (checkpoint.location / COMPLETE).delete()  # first: a half-replaced epoch must never read as complete
    checkpoint.location.delete()
    return checkpoint


def commit_checkpoint(run: RunDir, checkpoint: Checkpoint, *, keep: int, best: bool = False) -> None:
    """Rank 0, after every rank wrote its part: mark it complete, point ``latest`` (and with ``best``,
    ``best``) at it, keep the newest ``keep`` and the one ``best`` names."""
    (checkpoint.location / COMPLETE).write_text(f"{checkpoint.name}\n")
    if best:
        (run.checkpoints / BEST).write_text(checkpoint.name + "\n")
    (run.checkpoints / LATEST).write_text(checkpoint.name + "\n")
    kept = run.best_checkpoint()
    for old in run.complete_checkpoints()[:-keep]:
        if old != kept:
            (old.location / COMPLETE).delete()
            old.location.delete()


# --------------------------------------------------------------------------- sampler settings of an adapter

SAMPLER_FIELDS = ("num_steps", "eta", "guidance_scale")


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
    """How images are sampled: the settings an adapter's reward was measured with.

    An adapter trained with 10 DDIM steps and no guidance scores its training reward
    only when sampled that way; ``rayalign eval`` and ``serve`` use these settings unless
    the user gives others.
    """

    num_steps: int
    eta: float
    guidance_scale: float
    sde_window: tuple[int, int] | None = None
    """Flow-matching models: the SDE only on steps ``start <= i < stop`` and the ODE step on the
    others (``sampling.sde_window``); None: the sampler's noise on every step."""

    def describe(self) -> str:
        window = "" if self.sde_window is None else f" (SDE on steps {self.sde_window[0]}-{self.sde_window[1] - 1}, ODE after)"
        return f"{self.num_steps} steps, eta {self.eta:g}{window}, guidance {self.guidance_scale:g}"


def write_sampling(adapter_dir: str | os.PathLike | Location, sampling: Any, model: str | None = None) -> None:
    """Record ``sampling``'s sampler settings (a :class:`SamplingConfig`) beside an adapter, and
    the ``model.path`` it was trained on (None: the embedded toy UNet model)."""
    settings = {name: getattr(sampling, name) for name in SAMPLER_FIELDS}
    settings["sde_window"] = None if sampling.sde_window is None else [int(i) for i in sampling.sde_window]
    settings["model"] = model
    (Location(adapter_dir) / SAMPLING_FILE).write_text(json.dumps(settings, indent=2) + "\n")


def trained_model(adapter_dir: str | os.PathLike) -> str | None:
    """The ``model.path`` the adapter in ``adapter_dir`` was trained on, as its run gave it: from
    ``sampling.json`` beside the weights, else from its checkpoint's ``config.yaml``. None for
    the embedded toy UNet model, and for an adapter with neither record."""
    adapter_dir = Path(adapter_dir)
    source = adapter_dir / SAMPLING_FILE
    try:
        if source.is_file():
            data = json.loads(source.read_text())
            if isinstance(data, Mapping) and "model" in data:
                return data["model"]
        source = adapter_dir.parent / CONFIG_FILE
        if adapter_dir.name == LORA_DIR and source.is_file():
            return ((yaml.safe_load(source.read_text()) or {}).get("model") or {}).get("path")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError, AttributeError) as error:
        raise ValueError(f"{source} is not readable ({error}); give the base model with --model") from None
    return None


def trained_sampling(adapter_dir: Path) -> tuple[SamplerSettings, Path] | None:
    """The settings the adapter in ``adapter_dir`` was trained with, and the file they came from.

    Read from ``sampling.json`` beside the weights, else (a checkpoint written before that
    file existed) from the checkpoint's ``config.yaml``; None for an adapter with neither.

    Raises:
        ValueError: the file exists but cannot be read as those settings.
    """
    adapter_dir = Path(adapter_dir)
    source = adapter_dir / SAMPLING_FILE
    if source.is_file():
        try:
            data = json.loads(source.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(
                f'{source} is not readable JSON ({error}); delete it or write {{"num_steps": ..., "eta": ..., "guidance_scale": ...}}'
            ) from None
        if isinstance(data, Mapping) and "sde_window" not in data:  # written before windows were recorded: the run's config says
            checkpoint = _checkpoint_sampling(adapter_dir)
            data = {**data, "sde_window": checkpoint[0].get("sde_window") if checkpoint else None}
    else:
        checkpoint = _checkpoint_sampling(adapter_dir)
        if checkpoint is None:
            return None
        data, source = checkpoint
        defaults = SamplingConfig()  # every field is written out, but a hand-made config may leave some to their defaults
        data = {name: data.get(name, getattr(defaults, name)) for name in (*SAMPLER_FIELDS, "sde_window")}
    return _settings_from(data, source), source


def _checkpoint_sampling(adapter_dir: Path) -> tuple[Mapping, Path] | None:
    """The ``sampling`` section of the run config saved in the checkpoint holding ``adapter_dir``, and
    that file; None when ``adapter_dir`` is not a checkpoint's adapter or the checkpoint has no config.

    Raises:
        ValueError: the config exists but cannot be read.
    """
    source = adapter_dir.parent / CONFIG_FILE
    if adapter_dir.name != LORA_DIR or not source.is_file():
        return None
    try:
        section = (yaml.safe_load(source.read_text()) or {}).get("sampling") or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError, AttributeError) as error:
        raise ValueError(f"{source} is not a readable run config ({error})") from None
    if not isinstance(section, Mapping):
        raise ValueError(f"{source} is not a readable run config (its sampling section is {section!r}, not a mapping)")
    return section, source


def _settings_from(data: Any, source: Path) -> SamplerSettings:
    if not isinstance(data, Mapping) or any(name not in data for name in SAMPLER_FIELDS):
        raise ValueError(f"{source} must hold num_steps, eta and guidance_scale, got {data!r}")
    try:
        steps, eta, guidance = (data[name] for name in SAMPLER_FIELDS)
        if isinstance(steps, bool) or int(steps) != steps:
            raise TypeError(f"num_steps {steps!r} is not an integer")
        window = data.get("sde_window")  # absent in files written before windows existed: every step SDE
        if window is not None:
            if not isinstance(window, (list, tuple)) or len(window) != 2 or any(isinstance(i, bool) or int(i) != i for i in window):
                raise TypeError(f"sde_window {window!r} is not a [start, stop] pair of step indices")
            window = (int(window[0]), int(window[1]))
            if not 0 <= window[0] < window[1] <= int(steps):
                raise ValueError(f"sde_window {list(window)} is not within the {int(steps)} steps")
        return SamplerSettings(num_steps=int(steps), eta=float(eta), guidance_scale=float(guidance), sde_window=window)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{source} holds settings that are not valid ({error})") from None
