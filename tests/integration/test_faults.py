"""Pool actors killed mid-call (SIGKILL to the real process): restarted by Ray, their calls run
again with the same arguments, and the run is the one an undisturbed run gives."""

import threading
import time

import numpy as np
import pytest

from jobs.bench.faults import LEARNER, SAMPLING, actor_node, find_process, kill_process, kill_while_checkpointing, wait_for_checkpoint
from jobs.bench.s3 import BUCKET
from orchestrator.metrics import read_metrics
from orchestrator.run import train
from orchestrator.rundir import RunDir
from tests.helpers.runs import final_lora, tiny_config


def killing(title: str, times: int) -> tuple[threading.Thread, list[int]]:
    """A thread that kills ``times`` calls in a row, each in a fresh actor process; the pids it killed."""
    killed: list[int] = []

    def run():
        for _ in range(times):
            killed.append(kill_process(title, spare=set(killed)))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, killed


def slow_sampling(pipeline_dir, **overrides):
    # Sampling calls made 6x longer (the actor sleeps the rest) so that a kill lands inside one.
    return tiny_config(pipeline_dir, **{"pools.rollout.slowdown": "[6]", **overrides})


@pytest.fixture(scope="module")
def undisturbed(ray_cluster, tiny_pipeline_dir, tmp_path_factory):
    """The run every fault test here must reproduce."""
    run = tmp_path_factory.mktemp("undisturbed") / "run"
    train(slow_sampling(tiny_pipeline_dir), run, progress=False)
    return run


def assert_same_run(run, reference):
    """Every sample trained on exactly once: the same samples, rewards and prompts per epoch, and the same weights."""
    hit, calm = read_metrics(run), read_metrics(reference)
    assert [m["epoch"] for m in hit] == [m["epoch"] for m in calm]  # each epoch once
    for key in ("samples", "reward/mean", "reward/std", "prompts/digest"):
        assert [m[key] for m in hit] == [m[key] for m in calm], key
    a, b = final_lora(reference), final_lora(run)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-7, err_msg=name)


def test_killed_rollout_actors_and_a_killed_learner_leave_the_run_unchanged(undisturbed, tiny_pipeline_dir, tmp_path):
    # The rollout actor's process killed in the middle of a sampling call in epoch 1, then the
    # reward and the reference actor's, then the rollout actor's again in epoch 2, then the
    # learner: Ray restarts the actors and re-runs their calls, the driver restarts the learner
    # group from epoch 1's checkpoint, and every sample is trained on once. Two deaths of the
    # rollout actor with pools.max_restarts = 1: not in a row (it finished calls in between).
    run = tmp_path / "killed"
    killed: list[int] = []

    def kill():
        killed.append(kill_process(SAMPLING))
        killed.append(kill_process("ray::RewardWorker"))
        killed.append(kill_process("ray::ReferenceWorker"))
        deadline = time.monotonic() + 300
        while not RunDir(run).checkpoint(1).is_complete():
            assert time.monotonic() < deadline
            time.sleep(0.02)
        killed.append(kill_process(SAMPLING, spare=set(killed)))
        killed.append(kill_process(LEARNER))

    thread = threading.Thread(target=kill, daemon=True)
    thread.start()
    train(slow_sampling(tiny_pipeline_dir, **{"pools.max_restarts": 1}), run, progress=False)
    thread.join(timeout=5)
    assert len(killed) == 5, killed
    assert_same_run(run, undisturbed)
    hit = read_metrics(run)
    assert sum(m["faults/actor_restarts"] for m in hit) == 4 and sum(m["faults/retried_calls"] for m in hit) >= 1
    assert hit[1]["faults/learner_restarts"] == 1 and hit[1]["faults/recovery_s"] > 0
    assert all(m["faults/actor_restarts"] == 0 and m["faults/learner_restarts"] == 0 for m in read_metrics(undisturbed))


def test_losing_the_rollout_node_and_a_learner_killed_mid_checkpoint_leave_the_run_unchanged(
    ray_cluster, undisturbed, tiny_pipeline_dir, tmp_path
):
    # In epoch 2, the node running the rollout actor is removed (its raylet and every process on it
    # killed) in the middle of a sampling call; Ray restarts the actor on the other worker node and
    # runs the call again there. Then the learner is SIGKILLed while it writes checkpoint 2: the
    # group restarts from checkpoint 1, and the half-written checkpoint is never used. The learner
    # is kept on the head node so that losing the rollout node does not also take it (that would
    # be a different fault, and the kill below would find a process already gone).
    run = tmp_path / "run"
    injected: dict = {}

    def inject():
        try:
            wait_for_checkpoint(run, 1)
            find_process(SAMPLING)
            names = {node_id: name for name, node_id in ray_cluster.node_ids().items()}
            injected["node"] = names[actor_node("RolloutWorker")]
            ray_cluster.remove(injected["node"])
            injected["learner"] = kill_while_checkpointing(2)(run)
        except Exception as error:  # reported by the test's thread
            injected["error"] = error

    thread = threading.Thread(target=inject, daemon=True)
    thread.start()
    try:
        config = slow_sampling(
            tiny_pipeline_dir,
            **{"pools.rollout.node_labels": "{rayalign-test/node: '!head'}", "learner.resources_per_worker": "{node_head: 1}"},
        )
        train(config, run, progress=False)
        thread.join(timeout=30)
    finally:
        if "node" in injected:
            ray_cluster.add(injected["node"])  # the later tests' cluster has its 3 nodes again
    assert "error" not in injected and injected.get("learner"), injected
    assert injected["node"] in ("a", "b")
    assert_same_run(run, undisturbed)
    hit = read_metrics(run)
    assert sum(m["faults/actor_restarts"] for m in hit) >= 1 and hit[-1]["faults/learner_restarts"] >= 1
    assert [c.name for c in RunDir(run).complete_checkpoints()] == ["epoch_0001", "epoch_0002"]


def test_a_pool_actor_dying_more_times_in_a_row_than_max_restarts_stops_the_run_naming_it(ray_cluster, tiny_pipeline_dir, tmp_path):
    # Killed in a sampling call, then again in the same call run again after the restart. The
    # calls are made 30x longer (a few seconds) so that the second kill lands inside the re-run
    # call even when the machine is busy; the run stops at that kill, so this costs little.
    thread, killed = killing(SAMPLING, times=2)
    with pytest.raises(
        ValueError, match=r"rollout actor 0 died 2 times in a row without finishing a call, more than pools.max_restarts = 1"
    ):
        config = slow_sampling(tiny_pipeline_dir, **{"pools.max_restarts": 1, "pools.rollout.slowdown": "[30]"})
        train(config, tmp_path / "run", progress=False)
    thread.join(timeout=5)
    assert len(killed) == 2


def test_a_reward_failing_on_some_samples_drops_them_counts_them_and_trains_on_the_rest(ray_cluster, tiny_pipeline_dir, tmp_path):
    reward = "{components: [{name: 'tests.helpers.user_reward:nan_for_circles'}], on_invalid: drop}"
    train(tiny_config(tiny_pipeline_dir, **{"reward": reward, "pools.reference.num_actors": 0}), tmp_path / "run", progress=False)
    metrics = read_metrics(tmp_path / "run")
    dropped = [m["faults/dropped_samples"] for m in metrics]
    assert sum(dropped) > 0 and all(d < m["samples"] for d, m in zip(dropped, metrics)), dropped
    assert all(np.isfinite(m["reward/mean"]) for m in metrics)
    assert all(np.isfinite(w).all() for w in final_lora(tmp_path / "run").values())


def test_checkpoint_storage_refusing_writes_stops_the_run_and_keeps_the_previous_checkpoint(ray_cluster, s3, tiny_pipeline_dir):
    # Once checkpoint 1 is complete, the storage refuses every write under the run's checkpoints
    # (a policy change on the real S3 server: AccessDenied, as a revoked role gets).
    run = f"s3://{BUCKET}/unwritable"
    denied = threading.Event()

    def deny():
        wait_for_checkpoint(run, 1)
        s3.deny_writes("unwritable/checkpoints/")
        denied.set()

    thread = threading.Thread(target=deny, daemon=True)
    thread.start()
    try:
        with pytest.raises(
            ValueError, match=r"writing checkpoint epoch 2 to s3://.*/checkpoints failed on learner rank 0: .*Access Denied"
        ) as raised:
            train(tiny_config(tiny_pipeline_dir, **{"pools.reference.num_actors": 0}), run, progress=False)
    finally:
        thread.join(timeout=30)
        s3.allow_writes()
    assert denied.is_set()
    assert "epoch_0001 stays the latest complete checkpoint" in str(raised.value)
    assert RunDir(run).latest_checkpoint().name == "epoch_0001"  # what --resume continues from
    assert not RunDir(run).checkpoint(2).is_complete()
