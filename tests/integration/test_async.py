"""Async pipelining with replay on a real local Ray cluster: lag, IS correction, memory, exact resume."""

import numpy as np

from orchestrator import checkpoint as ckpt
from orchestrator.metrics import read_metrics
from orchestrator.replay import read_replay
from orchestrator.run import train
from tests.integration.test_train import final_lora, tiny_config

REPLAY_KEYS = ("replay/size", "replay/staleness_mean", "replay/staleness_max", "is/ratio_mean", "is/ratio_max",
               "is/truncated_frac", "is/ess_frac", "idle/rollout_frac", "idle/reward_frac", "idle/reference_frac", "idle/learner_frac")


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
    store = [m["memory/object_store_bytes"] for m in metrics]
    assert max(store[2:]) <= max(store[:2]), store


def test_async_resume_after_a_kill_restores_buffer_versions_and_counters_exactly(ray_cluster, tiny_pipeline_dir, tmp_path):
    # max_reuse 2 / max_staleness 2 keep samples in the buffer across checkpoints.
    common = {"replay.max_reuse": 2, "replay.max_staleness": 2}
    full, split = tmp_path / "full", tmp_path / "split"
    train(async_config(tiny_pipeline_dir, **common, **{"train.epochs": 4}), full, progress=False)
    train(async_config(tiny_pipeline_dir, **common, **{"train.epochs": 2}), split, progress=False)
    # The run was stopped after epoch 2's checkpoint; pretend it was killed while writing epoch 3's.
    (split / "checkpoints" / ".tmp-epoch_0003").mkdir()
    saved = ckpt.latest_checkpoint(split / "checkpoints")
    entries, _ = read_replay(saved / "replay.parquet")
    prefetched, _ = read_replay(saved / "prefetched.parquet")
    assert len(entries) == 8 and {e.uses for e in entries} == {1}  # epoch 2's samples, once used
    assert {e.epoch for e in prefetched} == {3} and {e.version for e in prefetched} == {1}  # sampled ahead with version 1
    train(async_config(tiny_pipeline_dir, **common, **{"train.epochs": 4}), split, resume=True, progress=False)
    a, b = read_metrics(full), read_metrics(split)
    assert [m["epoch"] for m in b] == [1, 2, 3, 4]
    for key in ("samples", "policy_version", "behaviour_version", "prompts/digest", "replay/size", "replay/staleness_mean", "replay/staleness_max"):
        assert [m[key] for m in a] == [m[key] for m in b], key
    for key in ("reward/mean", "is/ratio_mean", "is/ess_frac"):
        np.testing.assert_allclose([m[key] for m in a], [m[key] for m in b], rtol=1e-4, err_msg=key)
    assert max(m["replay/size"] for m in a) > 0 and max(m["replay/staleness_max"] for m in a) == 2
    wa, wb = final_lora(full), final_lora(split)
    for name in wa:
        np.testing.assert_allclose(wa[name], wb[name], rtol=1e-4, atol=1e-6, err_msg=name)
    ea, _ = read_replay(ckpt.latest_checkpoint(full / "checkpoints") / "replay.parquet")
    eb, _ = read_replay(ckpt.latest_checkpoint(split / "checkpoints") / "replay.parquet")
    assert ea == eb
