"""Sweep config, search space, trial placement and the results table, without Ray."""

import csv
import io
import json

import pyarrow.parquet as pq
import pytest

from jobs.sweep import (
    base_config,
    check_search_space,
    finished_trial_metrics,
    load_sweep,
    num_trials,
    pick_best,
    prepare_trial_dir,
    trial_concurrency,
    trial_config,
    trial_demands,
    trial_row,
    trial_run_dirs,
    write_results,
)
from orchestrator import rundir
from orchestrator.config import SweepConfig, config_to_yaml, dump_yaml, load_config, load_preset, parse_yaml
from orchestrator.rundir import RunDir


def sweep_of(**fields):
    return load_config(
        {"preset": "toy-ddpo", "search_space": {"learner.learning_rate": {"grid": [1.0e-4, 1.0e-3]}}, **fields}, cls=SweepConfig
    )


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"config": "x.yaml"}, "give exactly one of preset or config"),
        ({"search_space": {}}, "search_space must not be empty"),
        ({"search_space": {"train.beta": [0.0, 0.1]}}, "search_space.train.beta must be a mapping with one key, one of grid, choice"),
        ({"search_space": {"train.beta": {"normal": [0, 1]}}}, "one of grid, choice, uniform, loguniform, randint"),
        ({"search_space": {"train.beta": {"uniform": [0.1, 0.0]}}}, "uniform needs \\[low, high\\] with low < high"),
        ({"search_space": {"learner.learning_rate": {"loguniform": [0.0, 1.0e-3]}}}, "loguniform needs low > 0"),
        ({"search_space": {"train.epochs": {"randint": [1.5, 4]}}}, "randint needs integer bounds"),
        ({"search_space": {"train.beta": {"grid": []}}}, "grid needs a non-empty list"),
        ({"search_space": {"pools.rollout.num_cpus": {"grid": [1, 2]}}}, "cannot be swept: pool and learner resources"),
        ({"scheduler": {"type": "hyperband"}}, "scheduler.type: expected one of 'asha', 'none'"),
        ({"scheduler": {"reduction_factor": 1}}, "scheduler.reduction_factor must be > 1"),
        ({"num_samples": 0}, "num_samples must be >= 1"),
    ],
)
def test_sweep_config_errors_name_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        sweep_of(**fields)


def test_swept_fields_must_exist_and_take_the_values(tmp_path):
    base = load_preset("toy-ddpo")
    check_search_space(sweep_of(search_space={"train.clip_range": {"choice": [1.0e-4, 1.0e-2]}}), base)
    with pytest.raises(
        ValueError, match=r"search_space.train.clip_rnage: .*unknown config key 'train.clip_rnage' \(did you mean 'clip_range'\?\)"
    ):
        check_search_space(sweep_of(search_space={"train.clip_rnage": {"grid": [0.1]}}), base)
    with pytest.raises(
        ValueError, match="search_space.train.timestep_fraction: uniform value 1.5 .*timestep_fraction must be > 0 and <= 1"
    ):
        check_search_space(sweep_of(search_space={"train.timestep_fraction": {"uniform": [0.5, 1.5]}}), base)


def test_trial_config_sets_the_drawn_values():
    import numpy as np

    cfg = trial_config(
        load_preset("toy-dpok"), {"learner.learning_rate": np.float64(1e-3), "train.beta": 0.1, "train.inner_epochs": np.int64(2)}
    )
    assert cfg.learner.learning_rate == 1e-3 and cfg.train.beta == 0.1 and cfg.train.inner_epochs == 2
    assert cfg.train.algorithm == "dpok"  # the rest is the base


def test_sweep_file_with_a_relative_config_and_overrides(tmp_path):
    dump_yaml(load_preset("toy-ddpo"), tmp_path / "configs" / "base.yaml")
    (tmp_path / "sweep.yaml").write_text(
        "config: configs/base.yaml\nset: [train.epochs=3]\nnum_samples: 2\n"
        "search_space:\n  train.beta: {grid: [0.0, 0.01, 0.1]}\n  learner.learning_rate: {loguniform: [1.0e-4, 1.0e-2]}\n"
    )
    sweep = load_sweep(tmp_path / "sweep.yaml")
    assert base_config(sweep).train.epochs == 3
    assert num_trials(sweep) == 3 * 2  # grid points x num_samples


def test_trial_concurrency_counts_every_pool_and_the_driver():
    cfg = load_preset("toy-ddpo")  # learners 2 x 1 CPU, rollout 2, reward 0.5, reference 0.5 = 5 CPU
    wanted = trial_demands(cfg, 0.5)
    assert trial_concurrency(wanted, {"CPU": 16}, limit=0) == 2  # 16 // 5.5
    assert trial_concurrency(wanted, {"CPU": 16}, limit=1) == 1
    assert trial_concurrency(wanted, {"CPU": 5.5}, limit=0) == 1
    gpu = load_preset("toy-ddpo", ["learner.num_gpus_per_worker=1"])
    assert trial_concurrency(trial_demands(gpu, 0.1), {"CPU": 64, "GPU": 5}, limit=0) == 2  # 2 GPUs a trial
    with pytest.raises(ValueError, match="pool 'rollout' does not fit"):
        trial_concurrency(wanted, {"CPU": 3}, limit=0)


def write_run(run_dir, rewards, *, params, checkpoint_epoch=None):
    (run_dir / "params.json").write_text(json.dumps(params))
    (run_dir / "config.yaml").write_text(config_to_yaml(load_preset("toy-ddpo")))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"epoch": i + 1, "reward/mean": r}) + "\n" for i, r in enumerate(rewards)))
    if checkpoint_epoch is not None:
        run = RunDir(run_dir)
        rundir.commit_checkpoint(run, rundir.begin_checkpoint(run, checkpoint_epoch), keep=2)


def test_results_table_and_best_trial(root):
    trials = root / "trials"
    write_run(trials / "t0", [0.5, 0.6], params={"learner.learning_rate": 1e-4}, checkpoint_epoch=2)
    write_run(trials / "t1", [0.5, 0.7], params={"learner.learning_rate": 1e-3}, checkpoint_epoch=2)
    write_run(trials / "t2", [0.8], params={"learner.learning_rate": 1e-2}, checkpoint_epoch=1)  # stopped early by ASHA
    assert [run.name for run in trial_run_dirs(root)] == ["t0", "t1", "t2"]
    rows = [trial_row(trials / name, metric="reward/mean", mode="max", epochs=2) for name in ("t0", "t1", "t2")]
    assert [r.status for r in rows] == ["COMPLETED", "COMPLETED", "STOPPED"]
    # Unfinished in Tune's saved state: interrupted, even with every epoch's metrics written
    # (the sweep stopped before the last checkpoint was taken).
    assert trial_row(trials / "t0", metric="reward/mean", mode="max", epochs=2, interrupted=True).status == "INTERRUPTED"
    assert trial_row(trials / "t2", metric="reward/mean", mode="max", epochs=2, interrupted=True, error="boom").status == "ERROR"
    assert rows[1].checkpoint == (trials / "t1" / "checkpoints" / "epoch_0002").uri
    best = write_results(rows, root, metric="reward/mean", mode="max")
    assert best.trial_id == "t2"  # the best metric at a trial's last epoch
    assert pick_best(rows, mode="min").trial_id == "t0"
    table = list(csv.DictReader(io.StringIO((root / "results.csv").read_text())))
    assert [row["trial_id"] for row in table] == ["t0", "t1", "t2"]
    assert [float(row["reward/mean"]) for row in table] == [0.6, 0.7, 0.8]
    assert float(table[1]["learner.learning_rate"]) == 1e-3
    parquet = pq.read_table(io.BytesIO((root / "results.parquet").read_bytes())).to_pylist()
    assert [row["reward/mean"] for row in parquet] == [0.6, 0.7, 0.8] and parquet[0]["epochs"] == 2
    assert load_config(parse_yaml((root / "best_config.yaml").read_text())) == load_preset("toy-ddpo")
    assert (root / "best_checkpoint.txt").read_text().strip() == rows[2].checkpoint


def test_interrupted_trial_without_checkpoint_is_moved_aside_not_deleted(root):
    run = root / "trials" / "t0"
    assert prepare_trial_dir(run) is False  # nothing there yet
    write_run(run, [0.5], params={})
    assert prepare_trial_dir(run) is False
    assert not run.exists() and (root / "trials" / "t0.incomplete-1" / "metrics.jsonl").is_file()
    assert trial_run_dirs(root) == []
    write_run(run, [0.5, 0.6], params={}, checkpoint_epoch=2)
    assert prepare_trial_dir(run) is True and (run / "metrics.jsonl").is_file()


def test_a_trial_stopped_after_its_last_checkpoint_reports_its_recorded_metrics_on_resume(root):
    # Ctrl-C after the last checkpoint but before Tune took the report: --resume runs the trial
    # again, and it must hand Tune the final metrics instead of finishing with none.
    run = root / "trials" / "t0"
    write_run(run, [0.5, 0.6], params={}, checkpoint_epoch=2)
    assert finished_trial_metrics(run, epochs=2) == {"epoch": 2, "reward/mean": 0.6}
    assert finished_trial_metrics(run, epochs=3) is None  # more to train
    stopped = root / "trials" / "t1"
    write_run(stopped, [0.5, 0.6], params={}, checkpoint_epoch=1)
    assert finished_trial_metrics(stopped, epochs=2) is None  # the last epoch's checkpoint was not complete
