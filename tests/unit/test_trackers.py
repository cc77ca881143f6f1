"""Experiment trackers without Ray: choosing them, a missing package, the config as params, resuming a run.

The trackers are the real ones, offline: W&B in offline mode, MLflow's SQLite store in the run
directory, TensorBoard's event files; each is read back with the tool's own record types
(``tests/helpers/trackers.py``).
"""

import json
import math
import sys

import mlflow
import numpy as np
import pytest

from actors.diffusion.images import save_png
from jobs.cli import build_parser, main
from orchestrator.config import load_preset, to_dict
from orchestrator.metrics import REQUIRED_KEYS, MetricsWriter
from orchestrator.rundir import RunDir
from orchestrator.trackers import (
    GRID_NAME,
    TRACKERS_FILE,
    MlflowTracker,
    TensorBoardTracker,
    Trackers,
    WandbTracker,
    check_trackers,
    flatten_config,
    param_value,
    scalars,
)
from tests.helpers.trackers import (
    mlflow_history,
    mlflow_image_steps,
    offline_tracker_env,
    tensorboard_events,
    wandb_config,
    wandb_history,
    wandb_runs,
)


def test_check_trackers_keeps_order_drops_repeats_and_knows_none():
    assert check_trackers(["tensorboard"]) == ("tensorboard",)
    assert check_trackers(["mlflow", "tensorboard", "mlflow", "wandb"]) == ("mlflow", "tensorboard", "wandb")
    assert check_trackers(["none"]) == ()
    with pytest.raises(ValueError, match="--logger none means no tracker, so it cannot go with --logger wandb"):
        check_trackers(["none", "wandb"])
    with pytest.raises(ValueError, match=r"unknown --logger 'comet': choose from tensorboard, wandb, mlflow, none"):
        check_trackers(["tensorboard", "comet"])


@pytest.mark.parametrize("name, tracker", [("wandb", WandbTracker), ("mlflow", MlflowTracker)])
def test_a_missing_package_names_the_pip_command(name, tracker, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, name, None)  # what an environment without the package looks like to `import`
    with pytest.raises(ValueError, match=f"--logger {name} needs the {name} package, .*: pip install {name} "):
        check_trackers(["tensorboard", name])
    with pytest.raises(ValueError, match=f"pip install {name} "):  # the tracker itself, reached without the check
        tracker(RunDir(tmp_path / "run"), state={})


def test_train_with_a_missing_tracker_package_stops_before_writing_anything(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)
    run = tmp_path / "run"
    assert main(["train", "--preset", "toy-ddpo", "--output-dir", str(run), "--logger", "tensorboard", "--logger", "wandb"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: --logger wandb needs the wandb package") and "pip install wandb" in error
    assert len(error.splitlines()) == 1
    assert not run.exists()  # checked before the config is written or Ray is started


def test_flatten_config_gives_dotted_keys_and_mlflow_values():
    flat = flatten_config({"train": {"epochs": 2, "eval": {"every": 0}}, "pools": {"labels": {}}, "tags": ["a", "b"], "seed": None})
    assert flat == {"train.epochs": 2, "train.eval.every": 0, "pools.labels": {}, "tags": ["a", "b"], "seed": None}
    # MLflow params are strings: a string as it is, anything else as JSON (so null, not None), cut to MLflow's limit.
    assert [param_value(v, 100) for v in ("toy-train", 2, 1e-3, None, True, ["a", "b"], {})] == [
        "toy-train",
        "2",
        "0.001",
        "null",
        "true",
        '["a", "b"]',
        "{}",
    ]
    assert param_value("x" * 120, 100) == "x" * 100
    # A real config: every leaf, under the dotted name a --set override uses.
    cfg = to_dict(load_preset("toy-ddpo", ["train.epochs=7"]))
    flat = flatten_config(cfg)
    assert flat["train.epochs"] == 7 and flat["learner.learning_rate"] == cfg["learner"]["learning_rate"]
    assert flat["reward.components"] == cfg["reward"]["components"]  # a list stays one value
    assert not any(isinstance(v, dict) and v for v in flat.values())


def test_scalars_skip_the_step_flags_and_unmeasured_values():
    row = {"epoch": 3, "samples": 24, "reward/mean": 0.5, "kl/mean": float("nan"), "faults/stopped": True, "prompts/digest": "ab12"}
    assert scalars(row) == {"samples": 24.0, "reward/mean": 0.5}


def test_tensorboard_files_of_two_processes_in_the_same_second_stay_apart(monkeypatch, tmp_path):
    # tensorboardX names its file by the second and the host: a resume within that second wrote over the last file.
    monkeypatch.setattr("time.time", lambda: 1_800_000_000.5)
    run = RunDir(tmp_path / "run")
    for epoch in (1, 2):
        tracker = TensorBoardTracker(run, state={})
        tracker.log_metrics({"reward/mean": epoch / 10}, epoch)
        tracker.close()
    assert len(list((run.root.local / "tensorboard").glob("events.out.tfevents.1800000000.*"))) == 2
    scalars_read, _ = tensorboard_events(run.root.local / "tensorboard")
    assert [step for step, _ in scalars_read["reward/mean"]] == [1, 2]  # in the order written


def _row(epoch: int, attempt: int) -> dict:
    """A metrics row; ``attempt`` changes what a rerun of the epoch measures differently (its time)."""
    row = {key: float(epoch) / 10 for key in REQUIRED_KEYS}
    row.update(epoch=epoch, samples=8 * epoch, policy_version=epoch, **{"time/epoch_s": 10.0 * attempt + epoch, "kl/mean": float("nan")})
    return row


def _grid(run: RunDir, epoch: int) -> None:
    save_png(np.full((8, 16, 3), 40 * epoch, dtype=np.uint8), run.workdir / run.image_grid(epoch))


def test_a_resumed_run_continues_each_tracker_run_and_logs_every_epoch_once(monkeypatch, tmp_path):
    # Attempt 1 logs epochs 1-3 and dies; its last checkpoint is epoch 2, so the resumed run trains epoch 3
    # again (another epoch time) and then 4. MLflow joins on the resume: it is caught up from metrics.jsonl.
    offline_tracker_env(monkeypatch, tmp_path)
    run = RunDir(tmp_path / "run")
    cfg = to_dict(load_preset("toy-ddpo", ["train.epochs=3"]))
    _grid(run, 0)
    first = Trackers(["tensorboard", "wandb"], run, config=cfg)
    writer = MetricsWriter(run)
    for epoch in (1, 2, 3):
        if epoch == 2:
            _grid(run, 2)
        writer.write(_row(epoch, attempt=1))
        first.log_epoch(_row(epoch, attempt=1))
    first.close(failed=True)
    saved = json.loads((run.root / TRACKERS_FILE).read_text())
    assert saved["tensorboard"] == {"epoch": 3} and saved["wandb"]["epoch"] == 3

    cfg["train"]["epochs"] = 4  # the one field --resume may change
    # The driver opens its trackers before the controller drops metrics.jsonl's rows after the checkpoint.
    resumed = Trackers(["tensorboard", "wandb", "mlflow"], run, config=cfg, resume_epoch=2)
    writer = MetricsWriter(run, resume_epoch=2)
    for epoch in (3, 4):
        if epoch == 4:
            _grid(run, 4)
        writer.write(_row(epoch, attempt=2))
        resumed.log_epoch(_row(epoch, attempt=2))
    resumed.close()
    state = json.loads((run.root / TRACKERS_FILE).read_text())
    assert state["wandb"]["id"] == saved["wandb"]["id"]
    assert {name: entry["epoch"] for name, entry in state.items()} == {"tensorboard": 4, "wandb": 4, "mlflow": 4}

    # W&B: one run (two offline files, one per process), each epoch once; epoch 3 as first logged.
    files = wandb_runs(run.root.local / "wandb", state["wandb"]["id"])
    assert len(files) == 2
    history = wandb_history(files)
    metric_rows = [(step, values) for step, values in history if "reward/mean" in values]
    assert [step for step, _ in metric_rows] == [1, 2, 3, 4]
    assert [values["time/epoch_s"] for _, values in metric_rows] == [11.0, 12.0, 13.0, 24.0]
    assert all("kl/mean" not in values for _, values in metric_rows)  # NaN: not measured, not logged
    assert sorted(step for step, values in history if f"{GRID_NAME}/path" in values) == [0, 2, 4]
    assert wandb_config(files)["train"]["epochs"] == 4

    # MLflow: epochs 1 and 2 from metrics.jsonl on resume, 3 and 4 live, in the SQLite store in the run directory.
    client = mlflow.tracking.MlflowClient(f"sqlite:///{run.root.local / 'mlflow' / 'mlflow.db'}")
    mlflow_run = client.get_run(state["mlflow"]["run_id"])
    assert mlflow_run.info.status == "FINISHED" and mlflow_run.info.run_name == "run"
    metrics = mlflow_history(client, state["mlflow"]["run_id"])
    assert metrics["time/epoch_s"] == [(1, 11.0), (2, 12.0), (3, 23.0), (4, 24.0)]
    assert "kl/mean" not in metrics and "epoch" not in metrics
    assert mlflow_run.data.params["train.epochs"] == "4" and mlflow_run.data.params["train.prompts"] == "toy-train"
    assert mlflow_image_steps(client, state["mlflow"]["run_id"], GRID_NAME) == [0, 2, 4]

    # TensorBoard: the resumed process wrote a second event file; together, each epoch once.
    tb_scalars, tb_images = tensorboard_events(run.root.local / "tensorboard")
    assert [step for step, _ in tb_scalars["time/epoch_s"]] == [1, 2, 3, 4]
    assert [value for _, value in tb_scalars["time/epoch_s"]] == [11.0, 12.0, 13.0, 24.0]
    assert tb_images[GRID_NAME] == [0, 2, 4]
    assert math.isclose(tb_scalars["reward/mean"][3][1], 0.4, rel_tol=1e-6)  # float32 in TensorBoard


def test_a_resumed_run_with_a_changed_config_keeps_mlflow_params_immutable(monkeypatch, tmp_path):
    offline_tracker_env(monkeypatch, tmp_path)
    run = RunDir(tmp_path / "run")
    cfg = to_dict(load_preset("toy-ddpo", ["train.epochs=2"]))
    Trackers(["mlflow"], run, config=cfg).close()
    cfg["train"]["epochs"] = 5
    resumed = Trackers(["mlflow"], run, config=cfg, resume_epoch=0)
    params = resumed.trackers["mlflow"].client.get_run(resumed.trackers["mlflow"].run_id).data.params
    resumed.close()
    # MLflow refuses to change a param: the run keeps the value it started with (and says so in a warning).
    assert params["train.epochs"] == "2" and len(params) == len(flatten_config(cfg))


def test_the_logger_flag_repeats_for_train_and_sweep():
    parser = build_parser()
    train = parser.parse_args(["train", "--preset", "toy-ddpo", "--output-dir", "r", "--logger", "wandb", "--logger", "mlflow"])
    assert train.loggers == ["wandb", "mlflow"]
    assert parser.parse_args(["train", "--preset", "toy-ddpo", "--output-dir", "r"]).loggers is None  # jobs.train: tensorboard
    assert parser.parse_args(["sweep", "--config", "s.yaml", "--output-dir", "s", "--logger", "none"]).loggers == ["none"]


def test_mlflow_logs_to_the_store_and_experiment_its_variables_name(monkeypatch, tmp_path):
    offline_tracker_env(monkeypatch, tmp_path)
    store = (tmp_path / "mlruns").as_uri()  # a file store, as MLflow 2 made by default
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses its file store without it
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "toys")
    run = RunDir(tmp_path / "run")
    trackers = Trackers(["mlflow"], run, config={"train": {"epochs": 2}})
    trackers.log_epoch(_row(1, attempt=1))
    trackers.close()
    client = mlflow.tracking.MlflowClient(store)
    [logged] = client.search_runs([client.get_experiment_by_name("toys").experiment_id])
    assert logged.info.run_id == json.loads((run.root / TRACKERS_FILE).read_text())["mlflow"]["run_id"]
    assert mlflow_history(client, logged.info.run_id)["reward/mean"] == [(1, 0.1)]
    assert logged.data.params == {"train.epochs": "2"}
    assert not (run.root.local / "mlflow").exists()  # the run directory's own store is only the default


def test_a_tracker_run_that_cannot_be_continued_starts_again_from_metrics_jsonl(monkeypatch, tmp_path):
    offline_tracker_env(monkeypatch, tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'elsewhere.db'}")
    run = RunDir(tmp_path / "run")
    first, writer = Trackers(["mlflow"], run, config={"seed": 0}), MetricsWriter(run)
    for epoch in (1, 2):
        writer.write(_row(epoch, attempt=1))
        first.log_epoch(_row(epoch, attempt=1))
    first.close()
    elsewhere = json.loads((run.root / TRACKERS_FILE).read_text())["mlflow"]["run_id"]

    # Resumed with another store (the default one, in the run directory): a new MLflow run there, given all of metrics.jsonl.
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    Trackers(["mlflow"], run, config={"seed": 0}, resume_epoch=2).close()
    state = json.loads((run.root / TRACKERS_FILE).read_text())["mlflow"]
    assert state["run_id"] != elsewhere and state["tracking_uri"] is None and state["epoch"] == 2
    client = mlflow.tracking.MlflowClient(f"sqlite:///{run.root.local / 'mlflow' / 'mlflow.db'}")
    assert mlflow_history(client, state["run_id"])["time/epoch_s"] == [(1, 11.0), (2, 12.0)]

    # trackers.json naming a run its store does not hold (a store replaced by another): a new run again, not an error.
    (run.root / TRACKERS_FILE).write_text(json.dumps({"mlflow": {**state, "run_id": "f" * 32}}))
    Trackers(["mlflow"], run, config={"seed": 0}, resume_epoch=2).close()
    again = json.loads((run.root / TRACKERS_FILE).read_text())["mlflow"]
    assert again["run_id"] not in (elsewhere, state["run_id"], "f" * 32)
    assert mlflow_history(client, again["run_id"])["time/epoch_s"] == [(1, 11.0), (2, 12.0)]
