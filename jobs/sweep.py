"""``rayalign sweep``: a Ray Tune search over training configs, each trial a full training run.

A trial is :func:`orchestrator.run.train` in a Tune function trainable: it starts its own
learner group (Ray Train, which reserves its workers in a placement group of its own)
and its own actor pools, and reports every epoch's metrics to Tune, where ASHA may stop
it early. Tune reserves only each trial's small driver, so the number of trials running
at once is set here from what one trial's pools and learners take (see
:func:`trial_concurrency`); that keeps concurrent trials from starving each other.

Outputs in the sweep directory::

    sweep.yaml            the sweep config, as run
    trials/<trial_id>/    each trial's run directory (config.yaml, metrics.jsonl, checkpoints/)
    tune/                 Ray Tune's experiment state (what --resume reads)
    results.csv, results.parquet, best_config.yaml, best_checkpoint.txt
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray import tune
from ray.tune import ExperimentAnalysis
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from actors.storage import Location
from orchestrator import rundir
from orchestrator.cluster import connect
from orchestrator.config import (
    Config,
    SweepConfig,
    apply_overrides,
    config_to_yaml,
    load_config,
    load_preset,
    parse_yaml,
    replace,
    to_dict,
)
from orchestrator.metrics import read_metrics
from orchestrator.pools import Demand, check_fits, demands
from orchestrator.run import train
from orchestrator.rundir import INCOMPLETE_MARK, RunDir
from orchestrator.trackers import DEFAULT_TRACKERS, check_trackers

logger = logging.getLogger(__name__)

TUNE_DIR = "tune"
TRIALS_DIR = "trials"


def load_sweep(path: str | os.PathLike) -> SweepConfig:
    """The sweep file, validated; a relative ``config`` is taken relative to the file."""
    path = Path(path)
    sweep = load_config(path, cls=SweepConfig)
    if sweep.config is not None and not Path(sweep.config).expanduser().is_absolute():
        sweep = replace(sweep, config=str((path.parent / sweep.config).resolve()))
    return sweep


def base_config(sweep: SweepConfig) -> Config:
    """The training config every trial starts from (preset or file, plus ``set``)."""
    if sweep.preset is not None:
        return load_preset(sweep.preset, sweep.set)
    return load_config(sweep.config, sweep.set)


def _plain(value: Any) -> Any:
    # Tune draws numpy scalars; YAML/JSON and the config loader want Python ones.
    return value.item() if hasattr(value, "item") else value


def trial_config(base: Config, params: Mapping[str, Any]) -> Config:
    """``base`` with each swept ``dotted.key`` set to its drawn value; errors name the key."""
    return load_config(apply_overrides(to_dict(base), [f"{key}={json.dumps(_plain(value))}" for key, value in params.items()]))


def check_search_space(sweep: SweepConfig, base: Config) -> None:
    """Fail before Tune starts on a swept field that does not exist or a value it refuses."""
    for key, spec in sweep.search_space.items():
        kind, values = next(iter(spec.items()))
        for value in values:
            try:
                trial_config(base, {key: value})
            except ValueError as error:
                raise ValueError(f"search_space.{key}: {kind} value {value!r} is not a valid training config: {error}") from None


def tune_search_space(search_space: Mapping[str, Mapping[str, Sequence[Any]]]) -> dict[str, Any]:
    """The YAML search space as Tune domains."""

    makers = {
        "grid": lambda v: tune.grid_search(list(v)),
        "choice": lambda v: tune.choice(list(v)),
        "uniform": lambda v: tune.uniform(*v),
        "loguniform": lambda v: tune.loguniform(*v),
        "randint": lambda v: tune.randint(*v),
    }
    return {key: makers[kind](values) for key, spec in search_space.items() for kind, values in spec.items()}


def num_trials(sweep: SweepConfig) -> int:
    """Trials the sweep runs: the grid's points times ``num_samples``."""
    points = math.prod(len(values) for spec in sweep.search_space.values() for kind, values in spec.items() if kind == "grid")
    return points * sweep.num_samples


def trial_demands(cfg: Config, trial_cpus: float) -> list[Demand]:
    """Everything one trial holds while it runs: its driver, learners and pools."""
    return [
        Demand("trial driver", 1, trial_cpus, 0.0),
        *demands(pools=cfg.pools, learner=cfg.learner, uses_reference=cfg.reference_pool_used),
    ]


def trial_concurrency(wanted: Sequence[Demand], available: Mapping[str, float], *, limit: int) -> int:
    """How many trials fit side by side (at most ``limit``, 0 = no limit).

    Raises:
        ValueError: not even one trial fits; the message names the pool (from :func:`check_fits`).
    """
    check_fits(list(wanted), dict(available))
    cpu = sum(d.count * d.cpus for d in wanted)
    gpu = sum(d.count * d.gpus for d in wanted)
    fits = [int(float(available.get("CPU", 0)) // cpu + 1e-9) if cpu > 0 else math.inf]
    if gpu > 0:
        fits.append(int(float(available.get("GPU", 0)) // gpu + 1e-9))
    most = min(fits)
    return int(min(most, limit) if limit else (most if most != math.inf else 1))


def prepare_trial_dir(run_dir: str | os.PathLike | Location) -> bool:
    """Whether the trial resumes from a checkpoint in ``run_dir`` (a path or a URI).

    A trial interrupted before its first checkpoint leaves a run that cannot resume; it
    is moved aside (``<trial>.incomplete-N``, never deleted) and the trial starts over.
    """
    run = RunDir(run_dir)
    if run.latest_checkpoint() is not None:
        return True
    if run.root.list():
        aside = rundir.move_aside(run)
        logger.warning("trial run %s had no complete checkpoint; moved it to %s and starting the trial over", run.root, aside)
    return False


def trial_run_dirs(output_dir: str | os.PathLike | Location) -> list[Location]:
    """The trials' run directories, not the ones moved aside, sorted by trial id (Tune's trial
    ids end in their creation index, ``<experiment>_00002``, so this is the order they started)."""
    trials = Location(output_dir) / TRIALS_DIR
    return [trials / name for name in trials.list() if INCOMPLETE_MARK not in name and (trials / name).is_dir()]


def finished_trial_metrics(run_dir: str | os.PathLike | Location, *, epochs: int) -> dict[str, Any] | None:
    """The last epoch's metrics of a trial whose run already checkpointed its last epoch, else None.

    Such a trial is one the sweep stopped between its final checkpoint and its report to Tune
    (a Ctrl-C then): on ``--resume`` Tune runs it again, nothing is left to train, and Tune
    still needs the final metrics, which the run recorded.
    """
    latest = RunDir(run_dir).latest_checkpoint()
    rows = read_metrics(Location(run_dir).uri)
    if latest is None or not rows or int(latest.name.removeprefix("epoch_")) < epochs or rows[-1].get("epoch") != epochs:
        return None
    return rows[-1]


def run_trial(params: dict[str, Any], *, base: dict[str, Any], output_dir: str, loggers: Sequence[str] = DEFAULT_TRACKERS) -> None:
    """The Tune trainable: one complete training run with the trial's parameters (its own run in each tracker)."""

    trial_id = tune.get_context().get_trial_id()
    run_dir = Location(output_dir) / TRIALS_DIR / trial_id
    cfg = trial_config(load_config(base), params)
    resume = prepare_trial_dir(run_dir)
    (run_dir / "params.json").write_text(json.dumps({k: _plain(v) for k, v in params.items()}, indent=2) + "\n")

    def report(metrics: dict[str, Any]) -> None:
        tune.report({key: value for key, value in metrics.items() if isinstance(value, (int, float)) and not isinstance(value, bool)})

    finished = finished_trial_metrics(run_dir, epochs=cfg.train.epochs) if resume else None
    if finished is not None:
        report(finished)
        return
    train(cfg, run_dir.uri, resume=resume, progress=False, on_epoch=report, loggers=loggers)


@dataclasses.dataclass(frozen=True)
class TrialRow:
    """One line of the results table."""

    trial_id: str
    status: str
    params: dict[str, Any]
    epochs: int
    last: float | None
    best: float | None
    run_dir: str
    checkpoint: str
    error: str

    def as_dict(self, metric: str) -> dict[str, Any]:
        return {
            "trial_id": self.trial_id,
            "status": self.status,
            **self.params,
            "epochs": self.epochs,
            metric: self.last,
            f"{metric} (best epoch)": self.best,
            "run_dir": self.run_dir,
            "checkpoint": self.checkpoint,
            "error": self.error,
        }


def trial_row(
    run_dir: str | os.PathLike | Location, *, metric: str, mode: str, epochs: int, error: str = "", interrupted: bool = False
) -> TrialRow:
    """A trial's row from its run directory (what the run itself recorded).

    ``interrupted``: the sweep stopped while this trial was unfinished (``--resume`` continues it).
    """
    run_dir = Location(run_dir)
    params = json.loads((run_dir / "params.json").read_text()) if (run_dir / "params.json").is_file() else {}
    metrics = read_metrics(run_dir.uri)
    values = [m[metric] for m in metrics if isinstance(m.get(metric), (int, float)) and math.isfinite(m[metric])]
    done = len(metrics)
    latest = RunDir(run_dir).latest_checkpoint()
    status = "ERROR" if error else "INTERRUPTED" if interrupted else "COMPLETED" if done >= epochs else "STOPPED"
    pick = max if mode == "max" else min
    return TrialRow(
        trial_id=run_dir.name,
        status=status,
        params=params,
        epochs=done,
        last=values[-1] if values else None,
        best=pick(values) if values else None,
        run_dir=run_dir.uri,
        checkpoint=latest.location.uri if latest else "",
        error=error,
    )


def pick_best(rows: Sequence[TrialRow], *, mode: str) -> TrialRow | None:
    """The trial with the best metric at its last epoch (the first such on a tie), or None."""
    scored = [row for row in rows if row.last is not None]
    if not scored:
        return None
    sign = 1 if mode == "max" else -1
    return max(scored, key=lambda row: sign * row.last)


def write_results(rows: Sequence[TrialRow], output_dir: str | os.PathLike | Location, *, metric: str, mode: str) -> TrialRow | None:
    """results.csv, results.parquet, best_config.yaml and best_checkpoint.txt; returns the best trial."""
    output_dir = Location(output_dir)
    table = [row.as_dict(metric) for row in rows]
    columns = list(dict.fromkeys(key for line in table for key in line))
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(table)
    (output_dir / "results.csv").write_text(text.getvalue())
    parquet = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([{key: line.get(key) for key in columns} for line in table]), parquet)
    (output_dir / "results.parquet").write_bytes(parquet.getvalue())
    best = pick_best(rows, mode=mode)
    if best is not None:
        (output_dir / "best_config.yaml").write_text(RunDir(best.run_dir).config.read_text())
        (output_dir / "best_checkpoint.txt").write_text(best.checkpoint + "\n")
    return best


def format_rows(rows: Sequence[TrialRow], *, metric: str, mode: str) -> str:
    """The results as an aligned text table, best first."""
    sign = -1 if mode == "max" else 1
    ordered = sorted(rows, key=lambda r: (r.last is None, sign * (r.last or 0.0)))
    keys = list(dict.fromkeys(k for r in rows for k in r.params))
    header = ["trial", "status", *keys, "epochs", metric]
    lines = [
        [
            r.trial_id,
            r.status,
            *(f"{r.params.get(k, ''):.4g}" if isinstance(r.params.get(k), float) else str(r.params.get(k, "")) for k in keys),
            str(r.epochs),
            "n/a" if r.last is None else f"{r.last:.4f}",
        ]
        for r in ordered
    ]
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *lines)]
    return "\n".join("  ".join(str(cell).ljust(w) for cell, w in zip(line, widths)) for line in [header, *lines])


def _check_output_dir(sweep: SweepConfig, output_dir: Location, *, resume: bool) -> None:
    saved = output_dir / "sweep.yaml"
    if resume:
        if not saved.is_file() or not (output_dir / TUNE_DIR).is_dir():
            raise ValueError(f"--resume: no sweep to resume in {output_dir} (no sweep.yaml and tune/); start it without --resume")
        if load_config(parse_yaml(saved.read_text()) or {}, cls=SweepConfig) != sweep:
            raise ValueError(
                f"--resume with a sweep config that differs from the one in {saved}; resume with that file, or start a new --output-dir"
            )
        return
    if saved.exists() or (output_dir / TUNE_DIR).exists():
        raise ValueError(f"{output_dir} already holds a sweep; pass --resume to continue it, or choose a new --output-dir")


def saved_trial_states(tune_path: Location) -> dict[str, str]:
    """Each trial's status (trial id -> Tune's status) in the experiment state Tune saved.

    Read from disk, not from ``tuner.fit()``'s results: when a sweep is interrupted, Tune saves
    its state with the trials in flight unfinished (what ``--resume`` continues), then stops
    them, and the results it returns call them TERMINATED like trials that ran to the end.
    """

    analysis = ExperimentAnalysis(tune_path.path, storage_filesystem=tune_path.fs)
    return {trial.trial_id: trial.status for trial in analysis.trials}


def sweep(
    sweep_cfg: SweepConfig,
    output_dir: str | os.PathLike,
    *,
    resume: bool = False,
    address: str | None = None,
    num_cpus: int | None = None,
    loggers: Sequence[str] = DEFAULT_TRACKERS,
) -> int:
    """Run (or resume) the sweep; returns the CLI exit status (0 when every trial ran without error)."""

    output_dir = Location(output_dir)  # a local path or an object-store URI, like a run's --output-dir
    loggers = check_trackers(loggers)  # here too: a trial's error would come only once Tune has started it
    base = base_config(sweep_cfg)
    check_search_space(sweep_cfg, base)
    _check_output_dir(sweep_cfg, output_dir, resume=resume)
    (output_dir / "sweep.yaml").write_text(config_to_yaml(sweep_cfg))

    connect(address, num_cpus)
    wanted = trial_demands(base, sweep_cfg.trial_cpus)
    concurrency = trial_concurrency(wanted, ray.cluster_resources(), limit=sweep_cfg.max_concurrent_trials)
    total = num_trials(sweep_cfg)
    print(
        f"sweep: {total} trials of {base.train.epochs} epochs, {concurrency} at a time "
        f"(each: {', '.join(d.describe() for d in wanted)}); outputs in {output_dir}",
        flush=True,
    )

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=to_dict(base), output_dir=output_dir.uri, loggers=loggers),
        {"cpu": sweep_cfg.trial_cpus},
    )
    tune_path = output_dir / TUNE_DIR
    if resume:
        print(f"resuming the sweep in {tune_path}", flush=True)
        tuner = tune.Tuner.restore(
            tune_path.path, trainable=trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=tune_path.fs
        )
    else:
        scheduler = None
        if sweep_cfg.scheduler.type == "asha":
            scheduler = ASHAScheduler(
                time_attr="epoch",
                max_t=base.train.epochs,
                grace_period=min(sweep_cfg.scheduler.grace_period, base.train.epochs),
                reduction_factor=sweep_cfg.scheduler.reduction_factor,
            )
        tuner = tune.Tuner(
            trainable,
            param_space=tune_search_space(sweep_cfg.search_space),
            tune_config=tune.TuneConfig(
                metric=sweep_cfg.metric,
                mode=sweep_cfg.mode,
                num_samples=sweep_cfg.num_samples,
                scheduler=scheduler,
                # Tune ignores max_concurrent_trials when given a BasicVariantGenerator: the limit goes here.
                search_alg=BasicVariantGenerator(random_state=sweep_cfg.seed, max_concurrent=concurrency),
                trial_dirname_creator=lambda trial: trial.trial_id,
            ),
            run_config=tune.RunConfig(name=TUNE_DIR, storage_path=output_dir.path, storage_filesystem=output_dir.fs, verbose=1),
        )
    grid = tuner.fit()

    errors = {}
    for result in grid:
        if result.error is not None:
            errors[result.path.rstrip("/").rsplit("/", 1)[-1]] = str(result.error).strip().splitlines()[-1][:500]
    states = saved_trial_states(tune_path)
    unfinished = {trial_id for trial_id, status in states.items() if status not in ("TERMINATED", "ERROR")}
    rows = [
        trial_row(
            p,
            metric=sweep_cfg.metric,
            mode=sweep_cfg.mode,
            epochs=base.train.epochs,
            error=errors.get(p.name, ""),
            interrupted=p.name in unfinished,
        )
        for p in trial_run_dirs(output_dir)
    ]
    best = write_results(rows, output_dir, metric=sweep_cfg.metric, mode=sweep_cfg.mode)
    print(format_rows(rows, metric=sweep_cfg.metric, mode=sweep_cfg.mode), flush=True)
    print(f"wrote {output_dir / 'results.csv'} and {output_dir / 'results.parquet'}", flush=True)
    if best is not None:
        print(f"best trial {best.trial_id}: {sweep_cfg.metric} {best.last:.4f} with {best.params}", flush=True)
        print(f"best config: {output_dir / 'best_config.yaml'}; best checkpoint: {best.checkpoint or 'none written'}", flush=True)
    finished = len(states) - len(unfinished)
    if finished < total:
        print(f"sweep interrupted with {finished} of {total} trials finished; continue it with --resume", flush=True)
        return 130
    return 1 if errors else 0


def run(args: argparse.Namespace) -> int:
    """``rayalign sweep``."""
    return sweep(
        load_sweep(args.config),
        args.output_dir,
        resume=args.resume,
        address=args.address,
        num_cpus=args.num_cpus,
        loggers=args.loggers or DEFAULT_TRACKERS,
    )
