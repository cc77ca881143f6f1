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

import csv
import dataclasses
import itertools
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

from orchestrator import checkpoint as ckpt
from orchestrator.config import Config, SweepConfig, apply_overrides, dump_yaml, load_config, load_preset, to_dict
from orchestrator.metrics import read_metrics
from orchestrator.pools import Demand, check_fits, demands

logger = logging.getLogger(__name__)

TUNE_DIR = "tune"
TRIALS_DIR = "trials"
INCOMPLETE_MARK = ".incomplete-"
"""In the name of a trial run moved aside because it had no checkpoint: ``<trial>.incomplete-N``."""


def load_sweep(path: str | os.PathLike) -> SweepConfig:
    """The sweep file, validated; a relative ``config`` is taken relative to the file."""
    path = Path(path)
    sweep = load_config(path, cls=SweepConfig)
    if sweep.config is not None and not Path(sweep.config).expanduser().is_absolute():
        sweep = dataclasses.replace(sweep, config=str((path.parent / sweep.config).resolve()))
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
    from ray import tune

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
    return [Demand("trial driver", 1, trial_cpus, 0.0), *demands(pools=cfg.pools, learner=cfg.learner, uses_reference=cfg.pools.reference.num_actors > 0)]


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


def prepare_trial_dir(run_dir: Path) -> bool:
    """Whether the trial resumes from a checkpoint in ``run_dir``.

    A trial interrupted before its first checkpoint leaves a run that cannot resume; it
    is moved aside (``<trial>.incomplete-N``, never deleted) and the trial starts over.
    """
    if ckpt.latest_checkpoint(run_dir / "checkpoints") is not None:
        return True
    if run_dir.exists() and any(run_dir.iterdir()):
        for n in itertools.count(1):
            aside = run_dir.with_name(f"{run_dir.name}{INCOMPLETE_MARK}{n}")
            if not aside.exists():
                run_dir.rename(aside)
                logger.warning("trial run %s had no complete checkpoint; moved it to %s and starting the trial over", run_dir, aside)
                break
    return False


def trial_run_dirs(output_dir: Path) -> list[Path]:
    """The trials' run directories, not the ones moved aside, sorted by trial id (Tune's trial
    ids end in their creation index, ``<experiment>_00002``, so this is the order they started)."""
    trials = Path(output_dir) / TRIALS_DIR
    return sorted(p for p in trials.iterdir() if p.is_dir() and INCOMPLETE_MARK not in p.name) if trials.is_dir() else []


def run_trial(params: dict[str, Any], *, base: dict[str, Any], output_dir: str) -> None:
    """The Tune trainable: one complete training run with the trial's parameters."""
    from ray import tune

    from orchestrator.run import train

    trial_id = tune.get_context().get_trial_id()
    run_dir = Path(output_dir) / TRIALS_DIR / trial_id
    cfg = trial_config(load_config(base), params)
    resume = prepare_trial_dir(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "params.json").write_text(json.dumps({k: _plain(v) for k, v in params.items()}, indent=2) + "\n")

    def report(metrics: dict[str, Any]) -> None:
        tune.report({key: value for key, value in metrics.items() if isinstance(value, (int, float)) and not isinstance(value, bool)})

    train(cfg, run_dir, resume=resume, progress=False, on_epoch=report)


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


def trial_row(run_dir: Path, *, metric: str, mode: str, epochs: int, error: str = "", interrupted: bool = False) -> TrialRow:
    """A trial's row from its run directory (what the run itself recorded).

    ``interrupted``: the sweep stopped while this trial was unfinished (``--resume`` continues it).
    """
    params = json.loads((run_dir / "params.json").read_text()) if (run_dir / "params.json").is_file() else {}
    metrics = read_metrics(run_dir)
    values = [m[metric] for m in metrics if isinstance(m.get(metric), (int, float)) and math.isfinite(m[metric])]
    done = len(metrics)
    latest = ckpt.latest_checkpoint(run_dir / "checkpoints")
    status = "ERROR" if error else "INTERRUPTED" if interrupted else "COMPLETED" if done >= epochs else "STOPPED"
    pick = max if mode == "max" else min
    return TrialRow(
        trial_id=run_dir.name,
        status=status,
        params=params,
        epochs=done,
        last=values[-1] if values else None,
        best=pick(values) if values else None,
        run_dir=str(run_dir),
        checkpoint=str(latest) if latest else "",
        error=error,
    )


def pick_best(rows: Sequence[TrialRow], *, mode: str) -> TrialRow | None:
    """The trial with the best metric at its last epoch (the first such on a tie), or None."""
    scored = [row for row in rows if row.last is not None]
    if not scored:
        return None
    sign = 1 if mode == "max" else -1
    return max(scored, key=lambda row: sign * row.last)


def write_results(rows: Sequence[TrialRow], output_dir: Path, *, metric: str, mode: str) -> TrialRow | None:
    """results.csv, results.parquet, best_config.yaml and best_checkpoint.txt; returns the best trial."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = [row.as_dict(metric) for row in rows]
    columns = list(dict.fromkeys(key for line in table for key in line))
    with open(output_dir / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(table)
    pq.write_table(pa.Table.from_pylist([{key: line.get(key) for key in columns} for line in table]), output_dir / "results.parquet")
    best = pick_best(rows, mode=mode)
    if best is not None:
        shutil.copyfile(Path(best.run_dir) / "config.yaml", output_dir / "best_config.yaml")
        (output_dir / "best_checkpoint.txt").write_text(best.checkpoint + "\n")
    return best


def format_rows(rows: Sequence[TrialRow], *, metric: str, mode: str) -> str:
    """The results as an aligned text table, best first."""
    sign = -1 if mode == "max" else 1
    ordered = sorted(rows, key=lambda r: (r.last is None, sign * (r.last or 0.0)))
    keys = list(dict.fromkeys(k for r in rows for k in r.params))
    header = ["trial", "status", *keys, "epochs", metric]
    lines = [[r.trial_id, r.status, *(f"{r.params.get(k, ''):.4g}" if isinstance(r.params.get(k), float) else str(r.params.get(k, "")) for k in keys),
              str(r.epochs), "n/a" if r.last is None else f"{r.last:.4f}"] for r in ordered]
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *lines)]
    return "\n".join("  ".join(str(cell).ljust(w) for cell, w in zip(line, widths)) for line in [header, *lines])


def _check_output_dir(sweep: SweepConfig, output_dir: Path, *, resume: bool) -> None:
    saved = output_dir / "sweep.yaml"
    if resume:
        if not saved.is_file() or not (output_dir / TUNE_DIR).is_dir():
            raise ValueError(f"--resume: no sweep to resume in {output_dir} (no sweep.yaml and tune/); start it without --resume")
        if load_config(saved, cls=SweepConfig) != sweep:
            raise ValueError(f"--resume with a sweep config that differs from the one in {saved}; resume with that file, or start a new --output-dir")
        return
    if saved.exists() or (output_dir / TUNE_DIR).exists():
        raise ValueError(f"{output_dir} already holds a sweep; pass --resume to continue it, or choose a new --output-dir")


def saved_trial_states(tune_path: Path) -> dict[str, str]:
    """Each trial's status (trial id -> Tune's status) in the experiment state Tune saved.

    Read from disk, not from ``tuner.fit()``'s results: when a sweep is interrupted, Tune saves
    its state with the trials in flight unfinished (what ``--resume`` continues), then stops
    them, and the results it returns call them TERMINATED like trials that ran to the end.
    """
    from ray.tune import ExperimentAnalysis

    return {trial.trial_id: trial.status for trial in ExperimentAnalysis(str(tune_path)).trials}


def sweep(sweep_cfg: SweepConfig, output_dir: str | os.PathLike, *, resume: bool = False, address: str | None = None, num_cpus: int | None = None) -> int:
    """Run (or resume) the sweep; returns the CLI exit status (0 when every trial ran without error)."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from orchestrator.run import connect

    output_dir = Path(output_dir).resolve()
    base = base_config(sweep_cfg)
    check_search_space(sweep_cfg, base)
    _check_output_dir(sweep_cfg, output_dir, resume=resume)
    output_dir.mkdir(parents=True, exist_ok=True)
    dump_yaml(sweep_cfg, output_dir / "sweep.yaml")

    connect(address, num_cpus)
    wanted = trial_demands(base, sweep_cfg.trial_cpus)
    concurrency = trial_concurrency(wanted, ray.cluster_resources(), limit=sweep_cfg.max_concurrent_trials)
    total = num_trials(sweep_cfg)
    print(f"sweep: {total} trials of {base.train.epochs} epochs, {concurrency} at a time "
          f"(each: {', '.join(d.describe() for d in wanted)}); outputs in {output_dir}", flush=True)

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=to_dict(base), output_dir=str(output_dir)),
        {"cpu": sweep_cfg.trial_cpus},
    )
    tune_path = output_dir / TUNE_DIR
    if resume:
        print(f"resuming the sweep in {tune_path}", flush=True)
        tuner = tune.Tuner.restore(str(tune_path), trainable=trainable, resume_unfinished=True, resume_errored=True)
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
            run_config=tune.RunConfig(name=TUNE_DIR, storage_path=str(output_dir), verbose=1),
        )
    grid = tuner.fit()

    errors = {}
    for result in grid:
        if result.error is not None:
            errors[Path(result.path).name] = str(result.error).strip().splitlines()[-1][:500]
    states = saved_trial_states(tune_path)
    unfinished = {trial_id for trial_id, status in states.items() if status not in ("TERMINATED", "ERROR")}
    rows = [trial_row(p, metric=sweep_cfg.metric, mode=sweep_cfg.mode, epochs=base.train.epochs, error=errors.get(p.name, ""),
                      interrupted=p.name in unfinished) for p in trial_run_dirs(output_dir)]
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
