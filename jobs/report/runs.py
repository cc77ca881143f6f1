"""What a report reads: each run's metrics rows, config and image grids, from a run, a sweep or several of them.

Everything is read through :class:`~orchestrator.rundir.RunDir` and
:class:`~actors.storage.Location`, so a run in object storage reads like a local one.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import re
from typing import Any, Sequence

import numpy as np
import yaml

from actors.storage import Location
from jobs.sweep import TRIALS_DIR, trial_run_dirs
from orchestrator.config import flatten_config
from orchestrator.rundir import IMAGES_DIR, RunDir

logger = logging.getLogger(__name__)

GRID_NAME = re.compile(r"^epoch_(\d+)\.png$")


@dataclasses.dataclass(frozen=True)
class Grid:
    """One image grid a run wrote: the held-out prompts' images after ``epoch``."""

    epoch: int
    location: Location


@dataclasses.dataclass
class ReportRun:
    """One run as the report sees it."""

    location: Location
    label: str
    """A short name, unique among the report's runs (the legend's and the tables' name for it)."""
    rows: list[dict[str, Any]]
    """The metrics rows, one per epoch, in epoch order."""
    config_text: str | None
    """The run's ``config.yaml`` as written (None if it has none)."""
    grids: list[Grid]

    @functools.cached_property
    def config(self) -> dict[str, Any]:
        """``config_text`` as a mapping (empty if there is none or it does not parse)."""
        try:
            loaded = yaml.safe_load(self.config_text) if self.config_text else None
        except yaml.YAMLError:
            return {}  # shown as text all the same; only the summary's fields are lost
        return loaded if isinstance(loaded, dict) else {}

    def keys(self) -> list[str]:
        """Every metric key with a number in some row, in the order first seen."""
        return list(dict.fromkeys(key for row in self.rows for key, value in row.items() if is_number(value)))

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(epochs, values) of the rows that have ``key``; NaN where a row holds null (not measured that epoch)."""
        pairs = [(row["epoch"], row[key]) for row in self.rows if key in row and (row[key] is None or is_number(row[key]))]
        epochs = np.array([e for e, _ in pairs], dtype=np.int64)
        values = np.array([math.nan if v is None else float(v) for _, v in pairs], dtype=np.float64)
        return epochs, values


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_rows(run: RunDir) -> list[dict[str, Any]]:
    """The run's metrics rows in epoch order (the last row of an epoch wins); empty before its first epoch.

    A last line without its newline is a row being written: it is left out, with a warning.
    """
    if not run.metrics.is_file():
        return []
    text = run.metrics.read_text()
    lines = text.splitlines()
    by_epoch: dict[int, dict[str, Any]] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            if number == len(lines) and not text.endswith("\n"):
                logger.warning("%s: left out line %d, which is still being written", run.metrics, number)
                continue
            raise ValueError(f"{run.metrics} line {number} is not JSON ({error}); remove or repair that line") from None
        if not isinstance(row, dict) or not is_number(row.get("epoch")):
            raise ValueError(f"{run.metrics} line {number} is not a metrics row (a JSON object with an epoch); remove that line")
        by_epoch[int(row["epoch"])] = row
    return [by_epoch[epoch] for epoch in sorted(by_epoch)]


def find_grids(run: RunDir) -> list[Grid]:
    """The run's image grids (``images/epoch_NNNN.png``), oldest first."""
    grids = []
    for name in (run.root / IMAGES_DIR).list():
        match = GRID_NAME.match(name)
        if match and run.image_grid(int(match.group(1))) == f"{IMAGES_DIR}/{name}":
            grids.append(Grid(epoch=int(match.group(1)), location=run.root / IMAGES_DIR / name))
    return sorted(grids, key=lambda grid: grid.epoch)


def is_sweep(where: Location) -> bool:
    return (where / TRIALS_DIR).is_dir()


def load_run(where: Location) -> ReportRun:
    """The run at ``where``.

    Raises:
        ValueError: ``where`` is not a run, or a run without metrics yet.
    """
    run = RunDir(where)
    if not where.exists():
        raise ValueError(f"{where} does not exist; give the --output-dir of a `rayalign train` run or a `rayalign sweep`")
    if not where.is_dir() or not (run.metrics.exists() or run.config.exists()):
        raise ValueError(
            f"{where} is not a run directory (no {run.metrics.name} or {run.config.name} in it) nor a sweep directory "
            f"(no {TRIALS_DIR}/ in it); give the --output-dir of `rayalign train` or `rayalign sweep`"
        )
    rows = read_rows(run)
    if not rows:
        raise ValueError(
            f"{where} has no metrics yet ({run.metrics.name} is missing or empty: its first epoch has not finished); "
            "make the report again once it has"
        )
    config_text = run.config.read_text() if run.config.is_file() else None
    return ReportRun(location=where, label=where.name, rows=rows, config_text=config_text, grids=find_grids(run))


def load_runs(paths: Sequence[str]) -> list[ReportRun]:
    """The runs of a report: each path a run, or a sweep (its trials that have metrics, in the order they started).

    Raises:
        ValueError: a path is not a run or a sweep, is given twice, or has no metrics yet.
    """
    runs: list[ReportRun] = []
    for path in paths:
        where = Location(path)
        if not is_sweep(where):
            runs.append(load_run(where))
            continue
        trials = []
        for trial in trial_run_dirs(where):
            try:
                trials.append(load_run(trial))
            except ValueError as error:  # a trial that has not started or reported yet: the others still make a report
                logger.warning("left out trial %s: %s", trial.name, error)
        if not trials:
            raise ValueError(
                f"{where} is a sweep whose trials have no metrics yet (in {where / TRIALS_DIR}); wait for a trial's first epoch"
            )
        runs.extend(trials)
    seen: set[Location] = set()
    for run in runs:
        if run.location in seen:
            raise ValueError(f"{run.location} is given twice; name each run once")
        seen.add(run.location)
    for run, label in zip(runs, unique_labels([run.location for run in runs])):
        run.label = label
    return runs


def unique_labels(locations: Sequence[Location]) -> list[str]:
    """The shortest path endings that tell the runs apart (``r1``, or ``a/run`` and ``b/run``)."""
    parts = [location.uri.rstrip("/").split("/") for location in locations]
    for depth in range(1, max((len(p) for p in parts), default=1) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [location.uri for location in locations]


def config_differences(runs: Sequence[ReportRun]) -> list[str]:
    """The dotted config fields whose values differ between the runs (empty for one run)."""
    if len(runs) < 2:
        return []
    flat = [flatten_config(run.config) for run in runs]
    fields = dict.fromkeys(key for config in flat for key in config)
    return [key for key in fields if len({json.dumps(config.get(key), sort_keys=True, default=str) for config in flat}) > 1]
