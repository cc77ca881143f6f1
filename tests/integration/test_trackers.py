"""A real 2-epoch run logged to every tracker at once: W&B offline, MLflow's local store and TensorBoard hold
what ``metrics.jsonl`` holds, the config, and the held-out grids."""

import json

import mlflow
import pytest

from orchestrator.config import to_dict
from orchestrator.metrics import read_metrics
from orchestrator.run import train
from orchestrator.trackers import GRID_NAME, TRACKERS_FILE, flatten_config
from tests.helpers.runs import tiny_config
from tests.helpers.trackers import (
    mlflow_history,
    mlflow_image_steps,
    offline_tracker_env,
    tensorboard_events,
    wandb_config,
    wandb_history,
    wandb_runs,
)


def test_every_tracker_holds_the_runs_metrics_config_and_grids(ray_cluster, tiny_pipeline_dir, tmp_path, monkeypatch):
    offline_tracker_env(monkeypatch, tmp_path)
    cfg = tiny_config(tiny_pipeline_dir, **{"train.eval_every": 2, "train.eval_prompts": "toy-heldout"})
    run = tmp_path / "run"
    train(cfg, run, progress=False, loggers=("tensorboard", "wandb", "mlflow"))

    # What each tracker must hold: every number of each metrics.jsonl row (null: not measured), the epoch as the step.
    rows = read_metrics(run)
    assert [row["epoch"] for row in rows] == [1, 2]
    expected = {
        row["epoch"]: {k: v for k, v in row.items() if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        for row in rows
    }
    assert len(expected[1]) > 40 and {"reward/mean", "time/epoch_s", "samples"} <= expected[1].keys()
    assert "eval/reward_mean" in expected[2]  # an eval epoch: its grid is images/epoch_0002.png (and epoch 0's)
    state = json.loads((run / TRACKERS_FILE).read_text())
    assert {name: entry["epoch"] for name, entry in state.items()} == {"tensorboard": 2, "wandb": 2, "mlflow": 2}

    # W&B, offline: the run's .wandb file read with W&B's own protobuf records.
    files = wandb_runs(run / "wandb", state["wandb"]["id"])
    assert len(files) == 1
    history = wandb_history(files)
    logged = {step: values for step, values in history if "reward/mean" in values}
    assert sorted(logged) == [1, 2] and len(logged) == sum("reward/mean" in values for _, values in history)
    for epoch, values in expected.items():
        assert {k for k in logged[epoch] if not k.startswith(GRID_NAME)} == values.keys()  # the grid shares its epoch's row
        assert {k: logged[epoch][k] for k in values} == pytest.approx(values)
    grids = {step: values[f"{GRID_NAME}/path"] for step, values in history if f"{GRID_NAME}/path" in values}
    assert sorted(grids) == [0, 2] and all((files[0].parent / "files" / path).is_file() for path in grids.values())
    assert wandb_config(files) == json.loads(json.dumps(to_dict(cfg)))

    # MLflow: the default store, SQLite in the run directory, read through MLflow's client.
    client = mlflow.tracking.MlflowClient(f"sqlite:///{run / 'mlflow' / 'mlflow.db'}")
    mlflow_run = client.get_run(state["mlflow"]["run_id"])
    assert mlflow_run.info.status == "FINISHED" and mlflow_run.data.tags["rayalign.run"] == str(run)
    metrics = mlflow_history(client, mlflow_run.info.run_id)
    assert metrics.keys() == expected[1].keys() | expected[2].keys()
    for key, points in metrics.items():
        assert points == [(epoch, pytest.approx(values[key])) for epoch, values in expected.items() if key in values], key
    params = mlflow_run.data.params
    assert params.keys() == flatten_config(to_dict(cfg)).keys()
    assert params["train.epochs"] == "2" and params["model.path"] == str(tiny_pipeline_dir)
    assert json.loads(params["reward.components"]) == to_dict(cfg)["reward"]["components"]
    assert mlflow_image_steps(client, mlflow_run.info.run_id, GRID_NAME) == [0, 2]

    # TensorBoard, written by the driver now: the same names, float32 values.
    scalars, images = tensorboard_events(run / "tensorboard")
    assert scalars.keys() == expected[1].keys() | expected[2].keys()
    for key, points in scalars.items():
        assert points == [(epoch, pytest.approx(values[key], rel=1e-6)) for epoch, values in expected.items() if key in values], key
    assert images == {GRID_NAME: [0, 2]}
