"""Async pipelining with replay on a real local Ray cluster: lag, IS correction, memory, exact resume."""

import threading

import numpy as np

from jobs.bench.faults import SAMPLING, kill_process, kill_while_checkpointing, wait_for_checkpoint
from orchestrator.metrics import read_metrics
from orchestrator.replay import read_replay
from orchestrator.run import train
from orchestrator.rundir import RunDir
from tests.helpers.runs import final_lora, tiny_config

REPLAY_KEYS = (
    "replay/size",
    "replay/staleness_mean",
    "replay/staleness_max",
    "is/ratio_mean",
    "is/ratio_max",
    "is/truncated_frac",
    "is/ess_frac",
    "idle/rollout_frac",
    "idle/reward_frac",
    "idle/reference_frac",
    "idle/learner_frac",
)


def async_config(pipeline_dir, **overrides):
    return tiny_config(pipeline_dir, **{"train.mode": "async", "replay.is_truncation": 2.0, **overrides})


def test_async_trains_one_version_behind_with_importance_weights_and_no_leaks(ray_cluster, tiny_pipeline_dir, tmp_path):
    run = tmp_path / "async"
    train(async_config(tiny_pipeline_dir, **{"train.epochs": 5, "train.checkpoint_every": 5}), run, progress=False)
    metrics = read_metrics(run)
    assert [m["epoch"] for m in metrics] == [1, 2, 3, 4, 5]
    for m in metrics:
        assert set(REPLAY_KEYS) <= set(m)
        assert m["samples"] == 8 * m["epoch"] and m["policy_version"] == m["epoch"]
        assert 0 <= m["idle/rollout_frac"] <= 1 and 0 <= m["idle/learner_frac"] <= 1
    # Epoch 1 samples with version 0 and trains version 0: on-policy. Every later epoch was
    # sampled while the previous update ran, one version behind the learner.
    assert [m["behaviour_version"] for m in metrics] == [0, 0, 1, 2, 3]
    assert metrics[0]["replay/staleness_max"] == 0 and metrics[0]["is/ratio_mean"] == 1.0
    for m in metrics[1:]:
        assert m["replay/staleness_mean"] == 1 and m["replay/staleness_max"] == 1
        # The learner moved since the behaviour policy: ratios differ from 1, weights are <= C.
        assert m["is/ratio_max"] != 1.0 and 0 < m["is/ess_frac"] <= 1
        # The PPO ratio is taken against the learner's own weights at the update's start.
        assert m["policy/onpolicy_gap"] < 1e-4
    assert all(m["replay/size"] == 0 for m in metrics)  # max_reuse 1: every sample trained once, then dropped
    # No leaked refs: the controller holds the same number of ObjectRefs at the end of every
    # epoch once the pipeline is full, and the store never grows past its early level.
    refs = [m["memory/controller_refs"] for m in metrics]
    assert refs[1:-1] == [refs[1]] * (len(refs) - 2), refs
    assert refs[-1] <= refs[1]  # nothing launched after the last epoch
    # At an epoch's end the next epoch is in flight, so a reading may catch some of its
    # outputs, and Ray frees released objects asynchronously: readings step up and down by an
    # object or two (seen: 63.7, 101.7, 63.7, 101.7, 44.7 kB in one run, 63.8, 101.7, 82.8,
    # 82.8, 82.8 in another). The refs above are the exact leak check; for the bytes, a leak
    # (say the weights of every version) would grow from reading to reading, so the last may
    # not exceed the early ones and none may double the first.
    store = [m["memory/object_store_bytes"] for m in metrics]
    assert store[-1] <= max(store[1:3]) and max(store) < 2 * store[0], store
    rss = [m["memory/controller_rss_bytes"] for m in metrics]
    assert rss[-1] <= 1.05 * rss[1], rss  # after the warm-up epoch the controller's memory stays flat


def test_async_run_with_killed_actors_and_learner_restores_buffer_versions_and_counters_exactly(ray_cluster, tiny_pipeline_dir, tmp_path):
    # Updates of 16 = the fresh 8 + 8 replayed; samples live two updates, so the buffer is
    # never empty at a checkpoint and replayed samples are two versions old. Sampling calls are
    # slowed (the actor sleeps) so that a kill lands inside one.
    cfg = async_config(
        tiny_pipeline_dir,
        **{
            "train.epochs": 3,
            "train.keep_checkpoints": 3,
            "replay.samples_per_update": 16,
            "replay.max_reuse": 2,
            "replay.max_staleness": 2,
            "pools.rollout.slowdown": "[4]",
        },
    )
    full = tmp_path / "full"
    train(cfg, full, progress=False)
    # The same run with the rollout actor SIGKILLed in a sampling call once checkpoint 1 is
    # complete (epoch 3's samples are then in flight, sampled ahead with version 1), and the
    # learner SIGKILLed while it writes checkpoint 3: the group restarts from checkpoint 2, with
    # the replay buffer and the prefetched epoch as they were saved there.
    killed = tmp_path / "killed"
    injected: dict = {}

    def inject():
        try:
            wait_for_checkpoint(killed, 1)
            injected["rollout"] = kill_process(SAMPLING)
            injected["learner"] = kill_while_checkpointing(3)(killed)
        except Exception as error:  # reported by the test's thread
            injected["error"] = error

    thread = threading.Thread(target=inject, daemon=True)
    thread.start()
    train(cfg, killed, progress=False)
    thread.join(timeout=30)
    assert "error" not in injected and injected.get("learner"), injected
    saved = RunDir(killed).checkpoint(2)
    entries, _ = read_replay(saved.replay)
    prefetched, _ = read_replay(saved.prefetched)
    assert [(e.epoch, e.uses) for e in entries] == [(2, 1)] * 8  # epoch 1's samples left after their 2nd use
    assert {(e.epoch, e.version) for e in prefetched} == {(3, 1)}  # sampled ahead, with version 1, before the kill
    a, b = read_metrics(full), read_metrics(killed)
    assert [m["epoch"] for m in b] == [1, 2, 3]
    for key in (
        "samples",
        "policy_version",
        "behaviour_version",
        "prompts/digest",
        "replay/size",
        "replay/staleness_mean",
        "replay/staleness_max",
    ):
        assert [m[key] for m in a] == [m[key] for m in b], key
    for key in ("reward/mean", "is/ratio_mean", "is/ess_frac", "policy/approx_kl"):
        np.testing.assert_allclose([m[key] for m in a], [m[key] for m in b], rtol=1e-4, err_msg=key)
    assert a[-1]["replay/staleness_max"] == 2 and a[-1]["is/ratio_mean"] != 1.0
    wa, wb = final_lora(full), final_lora(killed)
    for name in wa:
        np.testing.assert_allclose(wa[name], wb[name], rtol=1e-4, atol=1e-6, err_msg=name)
    ea, _ = read_replay(RunDir(full).latest_checkpoint().replay)
    eb, _ = read_replay(RunDir(killed).latest_checkpoint().replay)
    assert ea == eb and len(ea) == 8
