"""Experiment trackers: every epoch's metrics row, the config and the image grids in TensorBoard, W&B or MLflow.

``metrics.jsonl`` is the run's record (the controller writes it, :mod:`orchestrator.metrics`);
a tracker is a view of it in a tool people already use, chosen by name (``rayalign train
--logger NAME``): :class:`TensorBoardTracker` (the default), :class:`WandbTracker`,
:class:`MlflowTracker`. Each does one job with four calls: ``log_config``, ``log_metrics``,
``log_image``, ``close``. Metric names are ``metrics.jsonl``'s keys (``reward/mean``,
``kl/mean``, ...), the step is the epoch.

Trackers log from the driver (:func:`orchestrator.run.train`), which gets each epoch's row as
it is announced: the tracker's package, its credentials and its variables (``WANDB_*``,
``MLFLOW_*``) are needed where ``rayalign train`` runs, and nowhere else. A held-out grid
reaches the trackers as a file: when epoch N's row arrives, the grids the run wrote for the
epochs since the last row (``images/epoch_NNNN.png``, epoch 0's included) are logged first.

Each tracker logs each epoch once. ``trackers.json`` in the run directory keeps, per tracker,
the last epoch it logged and the ids that let a resumed run continue the same W&B or MLflow
run; epochs a resumed run trains again are not logged again, and epochs a tracker missed
(added on ``--resume``, or a driver that died between a row and its tracker) are filled in
from ``metrics.jsonl``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

import numpy as np
import yaml
from PIL import Image

from orchestrator.config import flatten_config
from orchestrator.metrics import read_metrics
from orchestrator.rundir import MLFLOW_DIR, TENSORBOARD_DIR, TRACKERS_FILE, WANDB_DIR, RunDir

logger = logging.getLogger(__name__)

GRID_NAME = "eval/grid"
"""The held-out image grid's name in every tracker."""

DEFAULT_TRACKERS = ("tensorboard",)
NONE = "none"
PACKAGES = {"tensorboard": "tensorboardX", "wandb": "wandb", "mlflow": "mlflow"}
"""Each tracker's Python package (what ``pip install`` takes)."""


def missing_package(name: str) -> ValueError:
    package = PACKAGES[name]
    extra = "" if name == "tensorboard" else " (or pip install 'rayalign[trackers]' for W&B and MLflow both)"
    return ValueError(f"--logger {name} needs the {package} package, which is not installed here: pip install {package}{extra}")


def check_trackers(names: Sequence[str]) -> tuple[str, ...]:
    """The trackers to use, in order, each once: ``--logger`` values checked, and their packages installed.

    ``none`` alone means no tracker (``metrics.jsonl`` only). Cheap (no import): the driver
    calls it before anything starts, the trackers' imports come when they open.
    """
    chosen = tuple(dict.fromkeys(names))
    unknown = [name for name in chosen if name not in PACKAGES and name != NONE]
    if unknown:
        raise ValueError(f"unknown --logger {unknown[0]!r}: choose from {', '.join([*PACKAGES, NONE])} (repeat --logger for several)")
    if NONE in chosen:
        if len(chosen) > 1:
            raise ValueError(f"--logger none means no tracker, so it cannot go with --logger {[n for n in chosen if n != NONE][0]}")
        return ()
    for name in chosen:
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise missing_package(name)
    return chosen


def scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """What a tracker logs of a metrics row: every finite number but the epoch (the step); a value
    that was not measured (NaN, written as null in ``metrics.jsonl``) is left out, not logged as 0."""
    return {
        key: float(value)
        for key, value in metrics.items()
        if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    }


class Tracker(Protocol):
    """One experiment tracker. A new one is a class with these members, one row in :data:`TRACKERS` and its
    package in :data:`PACKAGES`; its constructor takes the run directory and the ``state`` it kept last time."""

    name: str
    """The ``--logger`` value."""
    state: dict[str, Any]
    """What ``trackers.json`` keeps for it (its run's id), to continue the run on ``--resume``."""
    resumed: bool
    """Whether it continues the run of an earlier process (else it logs every epoch again)."""

    def log_config(self, config: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...

    def log_image(self, name: str, image: str | os.PathLike | np.ndarray, step: int) -> None: ...

    def close(self, *, failed: bool = False) -> None: ...


def _rgb(image: str | os.PathLike | np.ndarray) -> np.ndarray:
    """An image file (PNG) or array as an (H, W, 3) uint8 array."""
    if isinstance(image, np.ndarray):
        return image
    with Image.open(image) as opened:
        return np.asarray(opened.convert("RGB"))


class TensorBoardTracker:
    """TensorBoard event files in ``RUN/tensorboard/`` (tensorboardX): scalars, grids as images, the config as text."""

    name = "tensorboard"

    def __init__(self, run: RunDir, *, state: Mapping[str, Any]):
        try:
            from tensorboardX import SummaryWriter  # lazy: loaded for the trackers chosen only
        except ImportError as error:
            raise missing_package(self.name) from error
        self.run = run
        self.state: dict[str, Any] = {}
        self.resumed = True  # a resumed run writes a new event file beside the old ones; TensorBoard reads them as one run
        # tensorboardX names a file by the second and the host: a resume within the same second would write over
        # the last file. The nanoseconds after them keep every file apart, in the order written (as TensorBoard reads).
        self.writer = SummaryWriter(str(run.workdir / TENSORBOARD_DIR), filename_suffix=f".{time.time_ns()}")

    def log_config(self, config: Mapping[str, Any]) -> None:
        text = yaml.safe_dump(dict(config), sort_keys=False)
        self.writer.add_text("config", "".join(f"    {line}\n" for line in text.splitlines()), 0)  # indented: markdown code

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()
        self.run.publish(TENSORBOARD_DIR)

    def log_image(self, name: str, image: str | os.PathLike | np.ndarray, step: int) -> None:
        self.writer.add_image(name, _rgb(image), step, dataformats="HWC")

    def close(self, *, failed: bool = False) -> None:
        self.writer.close()
        self.run.publish(TENSORBOARD_DIR)


class WandbTracker:
    """A W&B run: the metrics as its history, the grids as ``wandb.Image``, the nested config as its config.

    W&B's own variables apply (``WANDB_MODE=offline``, ``WANDB_PROJECT``, ``WANDB_ENTITY``,
    ``WANDB_DIR``, ``WANDB_API_KEY``, ...); without ``WANDB_PROJECT`` the project is ``rayalign``,
    without ``WANDB_DIR`` W&B's files go in ``RUN/wandb/``. A resumed run continues the W&B run
    whose id ``trackers.json`` keeps (``resume="allow"``).
    """

    name = "wandb"

    def __init__(self, run: RunDir, *, state: Mapping[str, Any]):
        try:
            import wandb  # lazy: an optional package, for --logger wandb only
        except ImportError as error:
            raise missing_package(self.name) from error
        self.run = run
        self._wandb = wandb
        self._in_run = not os.environ.get("WANDB_DIR")
        directory = Path(os.environ.get("WANDB_DIR") or run.workdir)
        directory.mkdir(parents=True, exist_ok=True)
        self.wandb_run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or "rayalign",
            name=os.environ.get("WANDB_NAME") or run.root.name,
            notes=f"rayalign run {run.root.uri}",
            id=state.get("id"),  # None: WANDB_RUN_ID, else a new id
            resume="allow",
            dir=str(directory),
            reinit="create_new",  # a W&B run the caller already has stays theirs
        )
        self.state = {"id": self.wandb_run.id}
        self.resumed = self.wandb_run.id == state.get("id")

    def log_config(self, config: Mapping[str, Any]) -> None:
        self.wandb_run.config.update(dict(config), allow_val_change=True)  # a resumed run may change train.epochs

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self.wandb_run.log(dict(metrics), step=step)

    def log_image(self, name: str, image: str | os.PathLike | np.ndarray, step: int) -> None:
        self.wandb_run.log({name: self._wandb.Image(image if isinstance(image, np.ndarray) else str(image))}, step=step)

    def close(self, *, failed: bool = False) -> None:
        self.wandb_run.finish(exit_code=1 if failed else 0)
        if self._in_run:
            self.run.publish(WANDB_DIR)


class MlflowTracker:
    """An MLflow run: the metrics with the epoch as step, the flattened config as params, the grids by ``log_image``.

    The store is ``MLFLOW_TRACKING_URI`` (a server, ``sqlite:///...``, ``databricks``); without
    it, a SQLite store in ``RUN/mlflow/`` (MLflow 3 refuses a plain file store unless
    ``MLFLOW_ALLOW_FILE_STORE=true``). The experiment is ``MLFLOW_EXPERIMENT_NAME``, else
    ``rayalign``. A resumed run continues the MLflow run whose id ``trackers.json`` keeps, in
    the same store.
    """

    name = "mlflow"

    def __init__(self, run: RunDir, *, state: Mapping[str, Any]):
        try:
            import mlflow  # lazy: an optional package, for --logger mlflow only
        except ImportError as error:
            raise missing_package(self.name) from error
        self.run = run
        self.tracking_uri = os.environ.get("MLFLOW_TRACKING_URI")  # None: the store in the run directory
        if self.tracking_uri is None:
            store = run.workdir / MLFLOW_DIR
            if state.get("run_id"):
                run.pull(f"{MLFLOW_DIR}/mlflow.db")
            store.mkdir(parents=True, exist_ok=True)
            self.store_uri = f"sqlite:///{store / 'mlflow.db'}"
        else:
            self.store_uri = self.tracking_uri
        self.client = mlflow.tracking.MlflowClient(self.store_uri)
        run_id = state.get("run_id") if state.get("tracking_uri") == self.tracking_uri else None
        if run_id is not None and not self._has_run(run_id):
            logger.warning("MLflow run %s is not in %s any more; logging to a new run", run_id, self.store_uri)
            run_id = None
        self.resumed = run_id is not None
        if run_id is not None:
            self.client.update_run(run_id, status="RUNNING")
        else:
            run_id = self.client.create_run(
                self._experiment_id(), run_name=os.environ.get("MLFLOW_RUN_NAME") or run.root.name, tags={"rayalign.run": run.root.uri}
            ).info.run_id
        self.run_id = run_id
        self.state = {"run_id": run_id, "tracking_uri": self.tracking_uri}

    def _has_run(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException  # lazy: as in __init__

        try:
            self.client.get_run(run_id)
        except MlflowException:
            return False
        return True

    def _experiment_id(self) -> str:
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "rayalign"
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        location = None if self.tracking_uri else (self.run.workdir / MLFLOW_DIR / "artifacts").as_uri()
        try:
            return self.client.create_experiment(name, artifact_location=location)
        except Exception:  # created meanwhile by another run (a sweep's trials sharing a server)
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def log_config(self, config: Mapping[str, Any]) -> None:
        from mlflow.entities import Param  # lazy: as in __init__
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH  # lazy: as in __init__

        params = {key: param_value(value, MAX_PARAM_VAL_LENGTH, key=key) for key, value in flatten_config(config).items()}
        logged = self.client.get_run(self.run_id).data.params
        changed = sorted(key for key in params.keys() & logged.keys() if params[key] != logged[key])
        if changed:
            # MLflow params cannot change; on --resume only train.epochs may, and the run keeps its first value.
            logger.warning("MLflow run %s keeps its first values of %s (params cannot change)", self.run_id, changed)
        new = [Param(key, value) for key, value in params.items() if key not in logged]
        for start in range(0, len(new), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, params=new[start : start + MAX_PARAMS_TAGS_PER_BATCH])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric  # lazy: as in __init__
        from mlflow.utils.validation import MAX_METRICS_PER_BATCH  # lazy: as in __init__

        now = int(time.time() * 1000)
        rows = [Metric(key, value, now, step) for key, value in metrics.items()]
        for start in range(0, len(rows), MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=rows[start : start + MAX_METRICS_PER_BATCH])

    def log_image(self, name: str, image: str | os.PathLike | np.ndarray, step: int) -> None:
        self.client.log_image(self.run_id, _rgb(image), key=name, step=step)

    def close(self, *, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")
        if self.tracking_uri is None:
            self.run.publish(MLFLOW_DIR)
            print(f"mlflow: run {self.run_id}; view it with: mlflow ui --backend-store-uri {self.store_uri}", flush=True)


def param_value(value: Any, limit: int, *, key: str = "") -> str:
    """A config value as an MLflow param: strings as they are, anything else as JSON, cut to MLflow's ``limit``."""
    text = value if isinstance(value, str) else json.dumps(value)
    if len(text) > limit:
        logger.warning("config %s is %d characters long; MLflow keeps the first %d", key, len(text), limit)
        text = text[:limit]
    return text


TRACKERS: dict[str, type[Tracker]] = {tracker.name: tracker for tracker in (TensorBoardTracker, WandbTracker, MlflowTracker)}


class Trackers:
    """The chosen trackers of one training run, fed each epoch's metrics row by the driver.

    ``resume_epoch`` is the checkpoint's epoch when the run resumes: the trackers then continue
    their runs (``trackers.json``) and catch up on the rows of ``metrics.jsonl`` up to that epoch
    that they have not logged.
    """

    def __init__(self, names: Sequence[str], run: RunDir, *, config: Mapping[str, Any], resume_epoch: int | None = None):
        self.run = run
        self.saved: dict[str, dict[str, Any]] = {}
        if resume_epoch is not None and (run.root / TRACKERS_FILE).is_file():
            self.saved = json.loads((run.root / TRACKERS_FILE).read_text())
        self.trackers: dict[str, Tracker] = {}
        self.logged: dict[str, int] = {}
        self._grids: dict[int, Path | None] = {}
        try:
            for name in check_trackers(names):
                state = self.saved.get(name, {})
                tracker = self.trackers[name] = TRACKERS[name](run, state=state)
                tracker.log_config(config)
                # A tracker run that could not be continued (a new MLflow store, say) starts from epoch 0 again.
                self.logged[name] = int(state.get("epoch", 0)) if tracker.resumed else 0
        except BaseException:
            self.close(failed=True)
            raise
        if self.trackers:
            self._save()
        if resume_epoch is not None and self.trackers:
            for row in read_metrics(run.root.uri):
                if row["epoch"] <= resume_epoch:
                    self.log_epoch(row)

    def log_epoch(self, metrics: Mapping[str, Any]) -> None:
        """Log one epoch's row (and the grids written since the last row) to each tracker that has not logged it."""
        epoch = int(metrics["epoch"])
        values = scalars(metrics)
        for name, tracker in list(self.trackers.items()):
            last = self.logged[name]
            if epoch <= last:
                continue  # logged before a resume or a learner restart: each tracker logs an epoch once
            try:
                for grid_epoch in range(0 if last == 0 else last + 1, epoch + 1):  # epoch 0: the base model's grid
                    grid = self._grid(grid_epoch)
                    if grid is not None:
                        tracker.log_image(GRID_NAME, grid, grid_epoch)
                tracker.log_metrics(values, epoch)
            except Exception:
                # The run goes on: metrics.jsonl still records every epoch, and a --resume catches the tracker up.
                logger.exception("tracker %s failed at epoch %d and logs nothing more in this process", name, epoch)
                self._close(name, failed=True)
                continue
            self.logged[name] = epoch
        if self.trackers:
            self._save()

    def _grid(self, epoch: int) -> Path | None:
        """The local file of ``epoch``'s held-out grid, or None when the run wrote none."""
        if epoch not in self._grids:
            relative = self.run.image_grid(epoch)
            local = self.run.workdir / relative
            if self.run.root.local is None and (self.run.root / relative).is_file():
                (self.run.root / relative).download(local)
            self._grids[epoch] = local if local.is_file() else None
        return self._grids[epoch]

    def _save(self) -> None:
        state = {**self.saved, **{name: {**tracker.state, "epoch": self.logged[name]} for name, tracker in self.trackers.items()}}
        (self.run.root / TRACKERS_FILE).write_text(json.dumps(state, indent=2) + "\n")
        self.saved = state

    def _close(self, name: str, *, failed: bool) -> None:
        tracker = self.trackers.pop(name)
        try:
            tracker.close(failed=failed)
        except Exception:
            logger.exception("tracker %s failed to close", name)

    def close(self, *, failed: bool = False) -> None:
        for name in list(self.trackers):
            self._close(name, failed=failed)
