"""Runs across the 3-node test cluster: pools of many actors on different nodes, learners on
different nodes, output and resume through object storage (a real S3 server on loopback), a
model path that exists on one node only, and least-loaded dispatch around a slow actor."""

import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file

from jobs.bench.s3 import BUCKET
from orchestrator.config import load_preset
from orchestrator.metrics import read_metrics
from orchestrator.run import train
from orchestrator.rundir import RunDir
from tests.helpers.runs import assert_same_training, tiny_config


def toy(epochs: int, *overrides: str):
    """The toy-ddpo preset, shrunk to seconds per epoch: 16 samples (4 prompts x 4), every pool of 2 actors, 2 learners."""
    return load_preset(
        "toy-ddpo",
        [
            f"train.epochs={epochs}",
            "train.samples_per_epoch=16",
            "train.checkpoint_every=1",
            "train.eval_every=0",
            "sampling.batch_size=4",
            "learner.micro_batch_size=4",
            "learner.lr_schedule=constant",  # a cosine depends on train.epochs, which a resume here changes
            "pools.rollout={num_actors: 2, num_cpus: 0.5}",
            "pools.reward={num_actors: 2, num_cpus: 0.25}",
            "pools.reference={num_actors: 2, num_cpus: 0.25}",
            *overrides,
        ],
    )


SPREAD = [
    "pools.rollout.placement=spread",
    "pools.reward.placement=spread",
    "pools.reference.placement=spread",
    "learner.placement=strict_spread",
]
ON_HEAD = [
    "pools.rollout.resources={node_head: 1}",
    "pools.reward.resources={node_head: 1}",
    "pools.reference.resources={node_head: 1}",
    "learner.resources_per_worker={node_head: 1}",
]


def lora_of(run) -> dict[str, np.ndarray]:
    latest = RunDir(run).latest_checkpoint()
    with latest.lora.as_local_dir() as local:
        return load_file(str(local / "pytorch_lora_weights.safetensors"))


def test_a_run_over_three_nodes_into_object_storage_resumes_from_it_and_equals_one_node(ray_cluster, s3, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a URI mistaken for a path would show up here as a directory named "s3:"
    uri = f"s3://{BUCKET}/runs/multinode"
    train(toy(2, *SPREAD), uri, progress=False)
    first = read_metrics(uri)
    assert [m["epoch"] for m in first] == [1, 2]
    # Every pool's 2 actors and the 2 learners ran on different nodes.
    assert {key: first[0][f"nodes/{key}"] for key in ("rollout", "reward", "reference", "learner")} == dict.fromkeys(
        ("rollout", "reward", "reference", "learner"), 2.0
    )
    # Each learner rank wrote its own DeepSpeed partition straight into the bucket; the marker came last.
    keys = s3.keys("runs/multinode/checkpoints/epoch_0002/")
    assert any("zero_pp_rank_0_" in k for k in keys) and any("zero_pp_rank_1_" in k for k in keys)
    assert "runs/multinode/checkpoints/epoch_0002/COMPLETE" in keys and "runs/multinode/checkpoints/latest" in s3.keys(
        "runs/multinode/checkpoints/l"
    )
    train(toy(3, *SPREAD), uri, resume=True, progress=False)  # every rank reads the checkpoint from the bucket
    assert not list(tmp_path.iterdir())  # nothing written to the local directory

    local = tmp_path.parent / "one-node"
    train(toy(3, *ON_HEAD), local, progress=False)
    a, b = read_metrics(uri), read_metrics(local)
    assert [m["epoch"] for m in a] == [1, 2, 3] and b[0]["nodes/rollout"] == b[0]["nodes/learner"] == 1.0
    assert_same_training(a, b, lora_of(uri), lora_of(local))


def test_a_model_path_missing_on_a_node_is_an_error_naming_that_node(ray_cluster, tiny_pipeline_dir, tmp_path):
    # A relative path resolves in each node's working directory: the model is on node a only.
    shutil.copytree(tiny_pipeline_dir, ray_cluster.workdirs["a"] / "models" / "tiny")
    cfg = toy(
        1,
        "model.path=models/tiny",
        "model.lora.target_modules=[to_q, to_v]",
        "pools.rollout={num_actors: 1, num_cpus: 0.5, resources: {node_b: 1}}",
        "pools.reference.num_actors=0",
        "learner.resources_per_worker={node_a: 1}",
    )
    with pytest.raises(ValueError) as caught:
        # The driver does not look for a cluster's path on its own disk: each node that loads the model checks it.
        train(cfg, tmp_path / "run", address=ray_cluster.cluster.address, progress=False)
    node_b = ray_cluster.node_ids()["b"][:12]
    assert "models/tiny' does not exist" in str(caught.value) and f"node {node_b}" in str(caught.value)


def test_a_bucket_that_does_not_exist_fails_before_anything_starts(ray_cluster, s3):
    with pytest.raises(ValueError, match="bucket 'no-such-bucket-rayalign' does not exist"):
        train(toy(1), "s3://no-such-bucket-rayalign/run", progress=False)


def test_least_loaded_dispatch_gives_a_slow_actor_fewer_chunks_and_round_robin_equal_ones(ray_cluster, tiny_pipeline_dir, tmp_path):
    # The mechanism, not wall-clock ratios (those vary with the machine's load; `rayalign bench
    # scaling` and docs/cluster.md measure the time): each of 16 chunks an epoch waits for a
    # rollout actor with no unfinished call, so an actor 3x slower than the other three runs
    # about a tenth of them instead of a quarter.
    def calls(name: str, **overrides) -> list[list[float]]:
        cfg = tiny_config(
            tiny_pipeline_dir,
            **{
                "train.epochs": 2,
                "train.samples_per_epoch": 64,
                "train.timestep_fraction": 0.5,
                "sampling.batch_size": 4,
                "learner.micro_batch_size": 8,
                "learner.gradient_accumulation_steps": 1,
                "pools.rollout": "{num_actors: 4, num_cpus: 0.5, slowdown: [3]}",
                "pools.reference.num_actors": 0,
                **overrides,
            },
        )
        train(cfg, tmp_path / name, progress=False)
        return [[m[f"calls/rollout/{a}"] for a in range(4)] for m in read_metrics(tmp_path / name)]

    for per_actor in calls("round-robin", **{"pools.rollout.dispatch": "round_robin"}):
        assert per_actor == [4, 4, 4, 4], per_actor  # equal shares: the epoch waits for the slow actor's 4
    for slow, *fast in calls("least-loaded"):
        # Fewer than its round-robin share (expected about 2 of 16; the fast actors share the
        # rest, unevenly when the machine is busy, so they are not compared with each other).
        assert slow + sum(fast) == 16 and slow < 4, (slow, fast)


def test_a_sweep_writes_its_trials_and_results_to_object_storage_and_resumes_from_it(ray_cluster, s3, tmp_path, monkeypatch):
    import csv
    import io

    from actors.storage import Location
    from jobs.sweep import sweep, trial_run_dirs
    from orchestrator.config import SweepConfig, load_config

    monkeypatch.chdir(tmp_path)
    uri = f"s3://{BUCKET}/sweeps/lr"
    sweep_cfg = load_config(
        {
            "preset": "toy-ddpo",
            "set": [
                "train.epochs=1",
                "train.samples_per_epoch=8",
                "sampling.batch_size=8",
                "learner.num_workers=1",
                "learner.micro_batch_size=4",
                "train.eval_every=0",
                "pools.reference.num_actors=0",
                "pools.rollout.num_cpus=1",
            ],
            "search_space": {"learner.learning_rate": {"grid": [1.0e-3, 1.0e-2]}},
            "max_concurrent_trials": 1,
        },
        cls=SweepConfig,
    )
    assert sweep(sweep_cfg, uri) == 0
    runs = trial_run_dirs(uri)
    assert len(runs) == 2 and all(RunDir(run).latest_checkpoint() is not None for run in runs)
    table = list(csv.DictReader(io.StringIO(Location(f"{uri}/results.csv").read_text())))
    assert sorted(float(row["learner.learning_rate"]) for row in table) == [1e-3, 1e-2]
    assert all(row["checkpoint"].startswith(f"{uri}/trials/") for row in table)
    assert s3.keys("sweeps/lr/tune/") and Location(f"{uri}/best_config.yaml").is_file()
    assert not (tmp_path / "s3:").exists()
    # Resuming a finished sweep restores Tune's state from the bucket and reruns nothing.
    before = [read_metrics(run.uri) for run in runs]
    assert sweep(sweep_cfg, uri, resume=True) == 0
    assert [read_metrics(run.uri) for run in trial_run_dirs(uri)] == before
