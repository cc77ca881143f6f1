"""``rayalign sweep`` as a user runs it: 2 trials x 2 epochs of the toy preset, interrupted twice and resumed."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

from jobs.sweep import trial_run_dirs
from orchestrator.config import load_config
from orchestrator.metrics import read_metrics
from orchestrator.rundir import RunDir

REPO = Path(__file__).resolve().parents[2]

SWEEP = """\
preset: toy-ddpo
set: [train.epochs=2, train.samples_per_epoch=8, sampling.num_steps=4, sampling.batch_size=8, learner.num_workers=1,
      learner.micro_batch_size=4, learner.gradient_accumulation_steps=1, train.stat_min_count=2, train.eval_every=0,
      train.checkpoint_every=1, pools.reference.num_actors=0, pools.rollout.num_cpus=1]
search_space:
  learner.learning_rate: {grid: [1.0e-3, 3.0e-2]}
  train.clip_range: {choice: [1.0e-4, 1.0e-2]}
scheduler: {type: asha, grace_period: 1, reduction_factor: 2}
# One at a time: on 2 cores, trials side by side only compete for them.
max_concurrent_trials: 1
"""


class Sweep:
    """``rayalign sweep`` in its own process group (so Ctrl-C reaches all of it), output to a file
    (a pipe nobody reads while it runs would fill up and block it)."""

    def __init__(self, sweep_file, out, log, *extra):
        # On a busy 2-core machine Ray's agents can take longer to start than the raylet waits by default.
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", RAY_agent_register_timeout_ms="180000")
        env.pop("RAY_ADDRESS", None)
        self.log = log
        with open(log, "w") as handle:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "jobs.cli",
                    "sweep",
                    "--config",
                    str(sweep_file),
                    "--output-dir",
                    str(out),
                    "--num-cpus",
                    "8",
                    *extra,
                ],
                stdout=handle,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env=env,
                start_new_session=True,
            )

    def wait(self, timeout):
        try:
            self.process.wait(timeout=timeout)
        finally:
            if self.process.poll() is None:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return self.process.returncode, self.log.read_text()


def checkpointed_trials(out):
    return [p for p in trial_run_dirs(out) if RunDir(p).latest_checkpoint()]


# Wall-clock and memory measurements: the only fields a redone epoch may change.
MEASURED = ("time/", "busy/", "idle/", "throughput/", "memory/")


def without_measurements(metrics):
    return [{k: v for k, v in m.items() if not k.startswith(MEASURED)} for m in metrics]


def test_sweep_interrupted_resumes_and_picks_the_best_trial(tmp_path):
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(SWEEP)
    out = tmp_path / "sweep"

    # Interrupt (Ctrl-C) once the first trial has a checkpoint.
    first = Sweep(sweep_file, out, tmp_path / "first.log")
    deadline = time.monotonic() + 600
    while not checkpointed_trials(out):
        if first.process.poll() is not None or time.monotonic() > deadline:
            returncode, log = first.wait(timeout=0)
            raise AssertionError(f"no trial wrote a checkpoint (exit status {returncode}):\n{log[-5000:]}")
        time.sleep(0.5)
    os.killpg(first.process.pid, signal.SIGINT)
    returncode, log = first.wait(timeout=180)
    checkpointed = checkpointed_trials(out)
    interrupted = {p.name: read_metrics(p) for p in checkpointed}
    kept = {p.name: RunDir(p).latest_checkpoint().read_state()["epoch"] for p in checkpointed}
    assert returncode == 130, log[-5000:]
    assert "continue it with --resume" in log

    # Resume, and interrupt again while the last trial starts: Tune then stops the one trial in
    # flight as it stops a finished one, and the sweep must still say interrupted, not done.
    second = Sweep(sweep_file, out, tmp_path / "second.log", "--resume")
    deadline = time.monotonic() + 600
    while len(started := trial_run_dirs(out)) < 2 or not (started[-1] / "params.json").exists():
        if second.process.poll() is not None or time.monotonic() > deadline:
            returncode, log = second.wait(timeout=0)
            raise AssertionError(f"the last trial did not start (exit status {returncode}):\n{log[-5000:]}")
        time.sleep(0.1)
    last_started = started[-1].name
    os.killpg(second.process.pid, signal.SIGINT)
    returncode, log = second.wait(timeout=180)
    assert returncode == 130, log[-5000:]
    with open(out / "results.csv") as handle:
        statuses = {row["trial_id"]: row["status"] for row in csv.DictReader(handle)}
    assert statuses[last_started] == "INTERRUPTED", statuses
    assert all(status in ("COMPLETED", "STOPPED") for trial_id, status in statuses.items() if trial_id != last_started), statuses
    assert any(line.startswith(last_started) and "INTERRUPTED" in line for line in log.splitlines()), log[-3000:]

    returncode, log = Sweep(sweep_file, out, tmp_path / "resumed.log", "--resume").wait(timeout=900)
    assert returncode == 0, log[-5000:]

    runs = {p.name: p for p in trial_run_dirs(out)}
    assert len(runs) == 2
    last = {}
    for trial_id, run in runs.items():
        metrics = read_metrics(run)
        epochs = [m["epoch"] for m in metrics]
        assert epochs in ([1], [1, 2]), (trial_id, epochs)  # 1: stopped by ASHA; never an epoch twice
        last[trial_id] = metrics[-1]["reward/mean"]
        if trial_id in interrupted:
            # Resumed from its checkpoint: the epochs up to it are kept as they were; an epoch
            # recorded after it (the interrupt came before its checkpoint was complete) is redone
            # exactly, so only its timings may differ.
            n, before = kept[trial_id], interrupted[trial_id]
            assert metrics[:n] == before[:n]
            assert without_measurements(metrics[n : len(before)]) == without_measurements(before[n:])
    assert any(len(read_metrics(run)) == 2 for run in runs.values())

    with open(out / "results.csv") as handle:
        table = {row["trial_id"]: row for row in csv.DictReader(handle)}
    assert set(table) == set(runs)
    for trial_id, row in table.items():
        assert float(row["reward/mean"]) == last[trial_id]
        assert float(row["learner.learning_rate"]) == json.loads((runs[trial_id] / "params.json").read_text())["learner.learning_rate"]
    assert sorted(float(row["learner.learning_rate"]) for row in table.values()) == [1e-3, 3e-2]
    assert {r["trial_id"] for r in pq.read_table(out / "results.parquet").to_pylist()} == set(runs)

    # The best trial is the one with the highest reward/mean reported at its last epoch.
    best_id = next(line.split()[2].rstrip(":") for line in log.splitlines() if line.startswith("best trial "))
    assert last[best_id] == max(last.values())
    assert load_config(out / "best_config.yaml") == RunDir(runs[best_id]).read_config()
    best_checkpoint = Path((out / "best_checkpoint.txt").read_text().strip())
    assert str(best_checkpoint) == RunDir(runs[best_id]).latest_checkpoint().location.uri
