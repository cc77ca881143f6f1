"""``rayalign bench scaling``: one preset with 1, 2, 4, ... rollout actors, and how the sampling scales.

Each size is a short sync-mode run of the preset in one Ray cluster, one after the other,
with everything but ``pools.rollout.num_actors`` unchanged (no eval grids, one checkpoint
at the end). Per size, from the run's ``metrics.jsonl`` after the warm-up epoch: samples/s,
the sampling phase's seconds per epoch, and each rollout actor's idle fraction, which says
whether adding actors added throughput or only waiting (on a machine with fewer cores than
actors, the actors share them and the idle fractions show it).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from jobs.bench import config_of, json_output, workdir_of, write_report
from jobs.bench.training import bench_config, startup_of
from orchestrator.config import replace
from orchestrator.metrics import read_metrics
from orchestrator.run import train


def scaled_config(cfg, *, actors: int, epochs: int):
    """``cfg`` in sync mode for ``epochs`` epochs with ``actors`` rollout actors."""
    return bench_config(
        replace(cfg, pools=replace(cfg.pools, rollout=replace(cfg.pools.rollout, num_actors=actors))), mode="sync", epochs=epochs
    )


def summarize_size(metrics: Sequence[dict[str, Any]], *, actors: int, warmup: int = 1) -> dict[str, Any]:
    """One size's figures from its per-epoch metrics; the first ``warmup`` epochs are not timed."""
    if len(metrics) <= warmup:
        raise ValueError(f"need more than {warmup} epochs to measure after the warm-up, got {len(metrics)}")
    timed = metrics[warmup:]
    wall = sum(m["time/epoch_s"] for m in timed)
    samples = metrics[-1]["samples"] - metrics[warmup - 1]["samples"]
    weights = [m["time/epoch_s"] for m in timed]
    return {
        "rollout_actors": actors,
        "samples_per_s": samples / wall,
        "rollout_s_per_epoch": float(np.mean([m["time/rollout_s"] for m in timed])),
        "epoch_s": float(np.mean(weights)),
        "actor_idle_frac": [float(np.average([m[f"idle/rollout/{a}_frac"] for m in timed], weights=weights)) for a in range(actors)],
        "actor_busy_s": [float(sum(m[f"busy/rollout/{a}_s"] for m in timed)) for a in range(actors)],
        "reward_mean": float(np.mean([m["reward/mean"] for m in timed])),
        **startup_of(metrics),
    }


def bench_scaling(
    cfg, *, sizes: Sequence[int], epochs: int, workdir: Path, address: str | None = None, num_cpus: int | None = None
) -> dict[str, Any]:
    """Run ``cfg`` once per rollout pool size in ``sizes``; the report :func:`format_table` prints."""
    if epochs < 2:
        raise ValueError(f"--epochs must be >= 2 (one warm-up epoch, then timed ones), got {epochs}")
    if not sizes or any(n < 1 for n in sizes):
        raise ValueError(f"--actors must list pool sizes >= 1, got {list(sizes)}")
    runs = []
    for actors in sizes:
        print(
            f"[{actors} rollout actor{'s' if actors > 1 else ''}] {epochs} epochs of {cfg.train.samples_per_epoch} samples ...", flush=True
        )
        run_dir = workdir / f"rollout-{actors}"
        train(scaled_config(cfg, actors=actors, epochs=epochs), run_dir, address=address, num_cpus=num_cpus, progress=False)
        runs.append(summarize_size(read_metrics(run_dir), actors=actors))
    base = runs[0]["samples_per_s"]
    for run in runs:
        run["speedup"] = run["samples_per_s"] / base
    return {"epochs": epochs, "samples_per_epoch": cfg.train.samples_per_epoch, "runs": runs}


def format_table(report: dict[str, Any]) -> str:
    columns = f"{'rollout actors':>14} | {'samples/s':>9} | {'speed-up':>8} | {'rollout s/epoch':>15} | {'startup s':>9}"
    lines = [f"{columns} | per-actor idle fraction"]
    for run in report["runs"]:
        idle = " ".join(f"{frac:.2f}" for frac in run["actor_idle_frac"])
        figures = f"{run['samples_per_s']:>9.2f} | {run['speedup']:>7.2f}x | {run['rollout_s_per_epoch']:>15.2f} | {run['startup_s']:>9.1f}"
        lines.append(f"{run['rollout_actors']:>14} | {figures} | {idle}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """``rayalign bench scaling``."""
    cfg = config_of(args, what="benchmark scaling")
    output = json_output(args.output)
    workdir = workdir_of(args, prefix="rayalign-scaling-")
    report = bench_scaling(cfg, sizes=args.actors, epochs=args.epochs, workdir=workdir, address=args.address, num_cpus=args.num_cpus)
    print(format_table(report))
    write_report(output, {**report, "workdir": str(workdir)})
    return 0
