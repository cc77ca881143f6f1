"""Per-epoch metrics: ``metrics.jsonl`` (one JSON object per epoch), the summary line, memory readings."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import psutil
import ray
from ray._private.internal_api import get_memory_info_reply, get_state_from_address

from orchestrator.rundir import METRICS_FILE, RunDir

REQUIRED_KEYS = (
    "epoch",
    "policy_version",
    "samples",
    "reward/mean",
    "reward/std",
    "kl/mean",
    "policy/clipfrac",
    "policy/approx_kl",
    "time/rollout_s",
    "time/reward_s",
    "time/reference_s",
    "time/learn_s",
    "time/sync_s",
    "time/epoch_s",
    "throughput/samples_per_s",
)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; null means "not measured this epoch"
    return value


class MetricsWriter:
    """Appends epoch metrics in the run's working directory and publishes them to the run after every
    epoch; on resume drops lines from epochs after the checkpoint. ``metrics.jsonl`` is the run's record:
    the experiment trackers (TensorBoard, W&B, MLflow: :mod:`orchestrator.trackers`) log it from the driver."""

    def __init__(self, run: RunDir, *, resume_epoch: int | None = None):
        self.run = run
        self.path = run.workdir / METRICS_FILE
        if resume_epoch is not None:
            run.pull(METRICS_FILE)
        if resume_epoch is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if line.strip() and json.loads(line)["epoch"] <= resume_epoch]
            self.path.write_text("".join(f"{line}\n" for line in kept))
        elif self.path.exists():
            self.path.unlink()
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, metrics: dict[str, Any]) -> None:
        missing = [key for key in REQUIRED_KEYS if key not in metrics]
        if missing:
            raise ValueError(f"epoch metrics lack {missing}")
        with open(self.path, "a") as handle:
            handle.write(json.dumps({k: _jsonable(v) for k, v in metrics.items()}) + "\n")
        self.run.publish(METRICS_FILE)

    def close(self) -> None:
        """Nothing to release: every row is written and published as it comes (kept for the controller's shutdown)."""


def memory_stats() -> dict[str, float]:
    """This process's resident memory, the ObjectRefs it holds, and the object store's bytes in use.

    Called by the controller at the end of each epoch: a leaked ref shows as refs and
    store bytes that keep growing from epoch to epoch.
    """
    worker = ray._private.worker.global_worker
    return {
        "memory/controller_rss_bytes": float(psutil.Process().memory_info().rss),
        "memory/controller_refs": float(len(worker.core_worker.get_all_reference_counts())),
        "memory/object_store_bytes": float(object_store_bytes()),
    }


def object_store_bytes() -> int:
    """Bytes in use in the cluster's object store (shared memory, all nodes)."""
    # Ray has no public call for the store's usage; `ray memory --stats-only` reads this reply.
    reply = get_memory_info_reply(get_state_from_address(ray.get_runtime_context().gcs_address))
    return int(reply.store_stats.object_store_bytes_used)


def read_metrics(output_dir: str | Path) -> list[dict[str, Any]]:
    """The metrics rows of the run in ``output_dir``, a path or a URI (empty before its first epoch)."""
    path = RunDir(output_dir).metrics
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _measured(value: Any) -> bool:
    """A figure the epoch measured: not absent (None) and not NaN."""
    return isinstance(value, float) and math.isfinite(value)


def summary_line(m: dict[str, Any], total_epochs: int) -> str:
    """The one line printed per epoch; an evaluated epoch also shows its eval reward (and gold reward)."""
    kl_text = f"{m['kl/mean']:.2e}" if _measured(m.get("kl/mean")) else "n/a"
    evaluated = ""
    if m.get("eval/reward_mean") is not None:
        evaluated = f" | eval {m['eval/reward_mean']:.4f}"
        if _measured(m.get("gold/mean")):
            evaluated += f", gold {m['gold/mean']:.4f}"
    return (
        f"epoch {m['epoch']:>3}/{total_epochs} | reward {m['reward/mean']:.4f} ± {m['reward/std']:.4f} | kl {kl_text} | "
        f"clipfrac {m['policy/clipfrac']:.3f}{evaluated} | {m['time/epoch_s']:.1f}s (rollout {m['time/rollout_s']:.1f}, "
        f"reward {m['time/reward_s']:.1f}, ref {m['time/reference_s']:.1f}, learn {m['time/learn_s']:.1f}, "
        f"sync {m['time/sync_s']:.2f}) | {m['throughput/samples_per_s']:.2f} samples/s"
    )
