"""``rayalign bench --preset NAME``: the same training run in sync and in async mode, compared.

Both runs use one Ray cluster, one after the other, with the preset's pools as they are
(the shipped ``toy-bench`` preset gives every pool its own logical CPU and one torch
thread, as pools own separate GPUs on a cluster). Evaluation grids are off and a single
checkpoint is written at the end, so the epochs measure the loop itself. What is
reported, per mode, comes from the runs' ``metrics.jsonl``:

- samples/s over the epochs after the warm-up epoch, and their ratio ``async_over_sync``;
- per-pool busy seconds and idle fraction (busy / (wall x actors));
- ``overhead_frac`` = 1 - critical-path compute / wall time: what the loop spends on
  anything but the compute the sync loop must wait for (sampling, the last batch's
  reward and reference, learning, loading weights);
- weight-sync latency and bytes, object-store peak and end-of-epoch bytes, the
  controller's ObjectRefs and resident memory per epoch;
- reward per sample seen, and whether async is worse than sync beyond the epoch-to-epoch
  noise of both runs.
"""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from jobs.bench import config_of, json_output, workdir_of, write_report
from orchestrator.config import replace
from orchestrator.metrics import read_metrics
from orchestrator.run import train

logger = logging.getLogger(__name__)

POOLS = ("rollout", "reward", "reference", "learner")
MODES = ("sync", "async")


def bench_config(cfg, *, mode: str, epochs: int):
    """``cfg`` as the bench runs it: ``mode``, ``epochs``, no eval grids, one final checkpoint."""
    train = replace(cfg.train, mode=mode, epochs=epochs, eval_every=0, checkpoint_every=epochs)
    return replace(cfg, train=train)


def startup_of(metrics: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Seconds from ``train()`` being called to the first epoch starting, and its phases (first epoch's metrics)."""
    first = metrics[0]
    phases = {k.removeprefix("time/startup/").removesuffix("_s"): v for k, v in first.items() if k.startswith("time/startup/")}
    return {"startup_s": first.get("time/startup_s"), "startup_phases_s": phases}


def summarize_run(metrics: Sequence[dict[str, Any]], *, warmup: int = 1) -> dict[str, Any]:
    """One mode's figures from its per-epoch metrics; the first ``warmup`` epochs are not timed."""
    if len(metrics) <= warmup:
        raise ValueError(f"need more than {warmup} epochs to measure after the warm-up, got {len(metrics)}")
    timed = metrics[warmup:]
    wall = sum(m["time/epoch_s"] for m in timed)
    samples = metrics[-1]["samples"] - metrics[warmup - 1]["samples"] if warmup else metrics[-1]["samples"]
    pools = [pool for pool in POOLS if f"busy/{pool}_s" in timed[0]]
    busy = {pool: sum(m[f"busy/{pool}_s"] for m in timed) for pool in pools}
    # Weighted by epoch time, the per-epoch idle fractions (which know the pool sizes) add up
    # to the run's: 1 - busy / (wall x actors).
    idle = {pool: float(np.average([m[f"idle/{pool}_frac"] for m in timed], weights=[m["time/epoch_s"] for m in timed])) for pool in pools}
    critical = sum(m["time/critical_path_s"] for m in timed)
    rss = [m["memory/controller_rss_bytes"] for m in metrics]
    store_end = [m["memory/object_store_bytes"] for m in metrics]
    refs = [m["memory/controller_refs"] for m in metrics]
    baseline = store_end[0]
    early_peak = max(m["memory/object_store_peak_bytes"] for m in metrics[: warmup + 1])
    return {
        "epochs": len(metrics),
        "timed_epochs": len(timed),
        **startup_of(metrics),
        "samples": int(samples),
        "wall_s": wall,
        "samples_per_s": samples / wall,
        "busy_s": busy,
        "idle_frac": idle,
        "critical_path_s": critical,
        "overhead_frac": 1.0 - critical / wall,
        "sync_s_mean": float(np.mean([m["time/sync_s"] for m in timed])),
        "sync_load_s_mean": float(np.mean([m["sync/load_s"] for m in timed])),
        "sync_bytes": int(metrics[-1]["sync/bytes"]),
        "object_store_peak_bytes": int(max(m["memory/object_store_peak_bytes"] for m in metrics)),
        "object_store_end_bytes": [int(b) for b in store_end],
        "object_store_baseline_bytes": int(baseline),
        # In async mode an epoch's end reading may include the next epoch's in-flight outputs;
        # a leak shows as readings that climb past the early peak, or a final one (nothing in
        # flight) above the first epoch's.
        "object_store_back_to_baseline": store_end[-1] <= baseline and max(store_end) <= early_peak,
        "object_store_epochs_above_baseline": sum(b > baseline for b in store_end),
        "controller_refs": [int(r) for r in refs],
        "controller_rss_bytes": [int(r) for r in rss],
        "controller_rss_growth_frac": (rss[-1] - rss[warmup]) / rss[warmup],
        "reward_mean": [m["reward/mean"] for m in metrics],
        "samples_seen": [m["samples"] for m in metrics],
        "staleness_mean": float(np.mean([m["replay/staleness_mean"] for m in timed])),
        "is_ess_frac_mean": float(np.mean([m["is/ess_frac"] for m in timed])),
    }


def compare_rewards(sync: Sequence[float], asynchronous: Sequence[float]) -> dict[str, Any]:
    """Is async's reward per sample seen worse than sync's beyond noise?

    Both runs see the same prompts per epoch, so epoch i of each has seen the same number
    of samples. Over the second half of the epochs (after the early climb) the gap of the
    mean rewards is compared with its standard error, from each run's epoch-to-epoch
    spread: async is "not worse" unless it trails by more than two standard errors.
    """
    if len(sync) != len(asynchronous) or len(sync) < 4:
        raise ValueError(f"need two reward curves of the same length >= 4, got {len(sync)} and {len(asynchronous)}")
    half = len(sync) // 2
    a, b = np.asarray(sync[half:], dtype=np.float64), np.asarray(asynchronous[half:], dtype=np.float64)
    se = math.sqrt(a.var(ddof=1) / a.size + b.var(ddof=1) / b.size)
    gap = float(b.mean() - a.mean())
    return {
        "epochs_compared": f"{half + 1}..{len(sync)}",
        "sync_mean": float(a.mean()),
        "async_mean": float(b.mean()),
        "async_minus_sync": gap,
        "standard_error": se,
        "async_not_worse": gap >= -2 * se,
    }


def bench_training(cfg, *, epochs: int, workdir: Path, address: str | None = None, num_cpus: int | None = None) -> dict[str, Any]:
    """Run ``cfg`` for ``epochs`` in sync and then async mode; the report :func:`format_report` prints."""
    if epochs < 4:
        raise ValueError(f"--epochs must be >= 4 (one warm-up epoch, and two halves to compare rewards), got {epochs}")
    runs = {}
    for mode in MODES:
        print(f"[{mode}] {epochs} epochs of {cfg.train.samples_per_epoch} samples ...", flush=True)
        output = train(
            bench_config(cfg, mode=mode, epochs=epochs), Path(workdir) / mode, address=address, num_cpus=num_cpus, progress=False
        )
        runs[mode] = summarize_run(read_metrics(output))
    return {
        "epochs": epochs,
        "samples_per_epoch": cfg.train.samples_per_epoch,
        "runs": runs,
        "async_over_sync": runs["async"]["samples_per_s"] / runs["sync"]["samples_per_s"],
        "overhead_frac": runs["sync"]["overhead_frac"],
        "reward": compare_rewards(runs["sync"]["reward_mean"], runs["async"]["reward_mean"]),
    }


def format_report(report: dict[str, Any]) -> str:
    """The bench's table, one column per mode."""
    runs = report["runs"]
    mib = 1024 * 1024
    rows = [
        ("samples/s", lambda r: f"{r['samples_per_s']:.3f}"),
        ("wall s (timed epochs)", lambda r: f"{r['wall_s']:.1f}"),
        ("startup s (to epoch 1)", lambda r: f"{r['startup_s']:.1f}"),
    ]
    for pool in POOLS:
        if all(pool in r["busy_s"] for r in runs.values()):
            rows.append((f"{pool} busy s / idle", lambda r, p=pool: f"{r['busy_s'][p]:.1f} / {r['idle_frac'][p]:.0%}"))
    rows += [
        # Defined for the sync loop: in async mode the critical-path parts overlap, so it goes negative.
        ("overhead_frac", lambda r: f"{r['overhead_frac']:.3f}" if r is runs["sync"] else "(sync only)"),
        ("weight sync s (put / load)", lambda r: f"{r['sync_s_mean']:.3f} / {r['sync_load_s_mean']:.3f}"),
        ("weight sync bytes", lambda r: f"{r['sync_bytes']}"),
        ("object store peak MiB", lambda r: f"{r['object_store_peak_bytes'] / mib:.2f}"),
        ("object store back to baseline", lambda r: "yes" if r["object_store_back_to_baseline"] else "NO"),
        ("controller refs (first/last)", lambda r: f"{r['controller_refs'][0]} / {r['controller_refs'][-1]}"),
        ("controller RSS growth", lambda r: f"{r['controller_rss_growth_frac']:+.1%}"),
        ("staleness mean", lambda r: f"{r['staleness_mean']:.2f}"),
        ("reward, last epoch", lambda r: f"{r['reward_mean'][-1]:.4f}"),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"{'':<{width}}  {'sync':>16}  {'async':>16}"]
    lines += [f"{name:<{width}}  {fmt(runs['sync']):>16}  {fmt(runs['async']):>16}" for name, fmt in rows]
    reward = report["reward"]
    lines.append(f"async_over_sync: {report['async_over_sync']:.2f}x samples/s; overhead_frac (sync): {report['overhead_frac']:.3f}")
    lines.append(
        f"reward over epochs {reward['epochs_compared']}: sync {reward['sync_mean']:.4f}, async {reward['async_mean']:.4f} "
        f"(async - sync {reward['async_minus_sync']:+.4f}, standard error {reward['standard_error']:.4f}): "
        + ("async not worse beyond noise" if reward["async_not_worse"] else "ASYNC WORSE beyond noise")
    )
    lines.append("startup phases (sync run), s: " + ", ".join(f"{k} {v:.1f}" for k, v in runs["sync"]["startup_phases_s"].items()))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """``rayalign bench``: one preset in sync and then async mode."""
    cfg = config_of(args, what="benchmark training, or use `rayalign bench serve ...`")
    output = json_output(args.output)
    workdir = workdir_of(args, prefix="rayalign-bench-")
    report = bench_training(cfg, epochs=args.epochs, workdir=workdir, address=args.address, num_cpus=args.num_cpus)
    report["workdir"] = str(workdir)
    print(format_report(report))
    write_report(output, report)
    print(f"runs written to {workdir}")
    return 0
