"""An epoch's bookkeeping without Ray: advantages by estimator, the sampling phase's busy time, shards, the metrics row."""

import numpy as np
import pytest

from actors.rl.advantages import PerPromptStatTracker
from orchestrator.config import TrainConfig
from orchestrator.epoch import (
    EpochBatch,
    compute_advantages,
    epoch_metrics,
    sampling_busy,
    shard_descriptor,
    shard_rows,
)
from orchestrator.metrics import REQUIRED_KEYS, summary_line


def train(**fields) -> TrainConfig:
    return TrainConfig(samples_per_epoch=4, **fields)


def test_group_advantages_normalise_within_each_prompts_samples():
    # Two groups of two: rewards (1, 3) -> mean 2, std 1 -> (-1, +1); (5, 5) has no spread -> 0, 0.
    rewards = np.array([1.0, 3.0, 5.0, 5.0])
    advantages, info = compute_advantages(
        rewards, ["a", "a", "b", "b"], train(samples_per_prompt=2, advantage="group"), PerPromptStatTracker()
    )
    np.testing.assert_allclose(advantages, [-1.0, 1.0, 0.0, 0.0], atol=1e-5)
    assert advantages.dtype == np.float32
    assert info == {"advantages/zero_spread_groups": 1.0, "advantages/zero_spread_frac": 0.5}


def test_batch_advantages_use_the_whole_epoch_and_are_clipped():
    # (0, 0, 0, 10): mean 2.5, population std sqrt(75 / 4); the zeros -> -1/sqrt(3), the 10 -> sqrt(3), clipped to 1.5.
    advantages, info = compute_advantages(
        np.array([0.0, 0.0, 0.0, 10.0]), ["a", "b", "c", "d"], train(advantage="batch", adv_clip_max=1.5), PerPromptStatTracker()
    )
    np.testing.assert_allclose(advantages, [-1 / np.sqrt(3)] * 3 + [1.5], atol=1e-5)
    assert info == {}


def test_per_prompt_advantages_remember_earlier_epochs():
    tracker = PerPromptStatTracker(buffer_size=8, min_count=2)
    cfg = train(stat_buffer_size=8, stat_min_count=2)
    # First epoch: fewer than min_count rewards per prompt, so batch statistics (mean 0.5, std 0.5).
    first, _ = compute_advantages(np.array([0.0, 1.0, 0.0, 1.0]), ["a", "a", "b", "b"], cfg, tracker)
    np.testing.assert_allclose(first, [-1.0, 1.0, -1.0, 1.0], atol=1e-5)
    # Second epoch: "a" now has 4 rewards (0, 1, 1, 1): mean 0.75, std ~0.433; its new 1s sit above the mean.
    second, _ = compute_advantages(np.array([1.0, 1.0, 0.0, 0.0]), ["a", "a", "b", "b"], cfg, tracker)
    np.testing.assert_allclose(second[:2], [0.25 / np.sqrt(0.1875)] * 2, rtol=1e-4)
    assert second[2] < 0 and second[3] < 0


def test_group_sampling_repeats_each_prompt_with_its_own_seeds():
    from orchestrator.epoch import epoch_prompts

    prompts, seeds = epoch_prompts([f"p{i}" for i in range(10)], seed=1, epoch=2, count=8, per_prompt=4)
    assert prompts[:4] == [prompts[0]] * 4 and prompts[4:] == [prompts[4]] * 4 and prompts[0] != prompts[4]
    assert len(set(seeds)) == 8


def test_dropped_samples_get_no_advantage_and_do_not_count_for_the_others():
    # Group (1, NaN, 3): the valid pair normalises alone -> (-1, +1); the dropped sample 0.
    nan = float("nan")
    advantages, info = compute_advantages(
        np.array([1.0, nan, 3.0, 5.0, 7.0, nan]),
        list("aaabbb"),
        TrainConfig(samples_per_epoch=6, samples_per_prompt=3, advantage="group"),
        PerPromptStatTracker(),
    )
    np.testing.assert_allclose(advantages, [-1.0, 0.0, 1.0, -1.0, 1.0, 0.0], atol=1e-5)
    assert info["advantages/zero_spread_groups"] == 0.0
    batch, _ = compute_advantages(np.array([0.0, nan, 2.0, nan]), list("abcd"), train(advantage="batch"), PerPromptStatTracker())
    np.testing.assert_allclose(batch, [-1.0, 0.0, 1.0, 0.0], atol=1e-5)
    with pytest.raises(ValueError, match="every sample of the epoch was dropped"):
        compute_advantages(np.array([nan] * 4), list("abcd"), train(advantage="batch"), PerPromptStatTracker())


def test_sampling_busy_adds_up_each_actors_calls():
    # 4 chunks on 2 rollout actors, dispatched to whoever was free: actor 1 ran chunks 0, 1 and 3
    # (1 + 2 + 2 s), actor 0 only chunk 2 (3 s).
    timings = [
        {"busy_s": 1.0, "load_s": 0.1},
        {"busy_s": 2.0, "load_s": 0.3},
        {"busy_s": 3.0, "load_s": 0.0},
        {"busy_s": 2.0, "load_s": 0.0},
    ]
    busy = sampling_busy(timings, [1, 1, 0, 1], [0.5, 0.5, 0.5, 0.25], [0.1, 0.1, 0.1, 0.2], rollout_actors=2)
    expected = {"rollout/0": 3.0, "rollout/1": 5.0, "rollout": 8.0, "reward": 1.75, "reference": 0.5, "load": 0.3}
    assert busy == pytest.approx({**expected, "critical": 5.0 + 0.25 + 0.2})
    without_reference = sampling_busy(timings, [1, 1, 0, 1], [0.5] * 4, [], rollout_actors=2)
    assert without_reference["reference"] == 0.0 and without_reference["critical"] == pytest.approx(5.5)
    assert sampling_busy(timings[:1], [0], [0.5], [], rollout_actors=2)["rollout/1"] == 0.0  # an actor with no call: idle


def batch(**fields) -> EpochBatch:
    base = dict(
        epoch=3,
        version=2,
        trajectory_refs=["t0", "t1"],
        reference_refs=None,
        chunk_sizes=[2, 2],
        prompts=["a", "b", "c", "d"],
        rewards=np.array([0.0, 1.0, 0.5, 0.5], dtype=np.float32),
        advantages=np.array([-1, 1, 0, 0], dtype=np.float32),
        reward_info={"toy_fidelity/color": 0.5},
        advantage_info={},
        timings={"time/rollout_s": 2.0, "time/reward_s": 0.5, "time/reference_s": 0.0},
        busy={"rollout/0": 1.0, "rollout/1": 2.0, "rollout": 3.0, "reward": 1.0, "reference": 0.0, "load": 0.2, "critical": 2.5},
        rollout_calls=[1, 1],
    )
    return EpochBatch(**{**base, **fields})


def test_the_metrics_row_holds_every_required_key_and_derived_figures():
    metrics = epoch_metrics(
        batch(),
        {"kl/mean": 0.01, "policy/clipfrac": 0.1, "policy/approx_kl": 0.002, "is/ess_frac": 0.9},
        policy_version=3,
        samples_seen=12,
        pool_sizes={"rollout": 2, "reward": 1, "reference": 0},
        replay_stats={"replay/size": 4.0},
        learn_s=1.5,
        sync_s=0.1,
        sync_bytes=1024,
        epoch_s=5.0,
        eval_metrics={},
    )
    assert set(REQUIRED_KEYS) <= set(metrics)
    assert (metrics["epoch"], metrics["policy_version"], metrics["samples"], metrics["behaviour_version"]) == (3, 3, 12, 2)
    assert metrics["reward/mean"] == pytest.approx(0.5) and metrics["reward/std"] == pytest.approx(np.std([0, 1, 0.5, 0.5]))
    # Idle fraction: 1 - busy / (epoch seconds x actors); 2 rollout actors busy 3 s in a 5 s epoch -> 0.7.
    assert metrics["idle/rollout_frac"] == pytest.approx(0.7) and metrics["idle/reward_frac"] == pytest.approx(0.8)
    assert metrics["idle/learner_frac"] == pytest.approx(0.7)
    assert metrics["busy/rollout/1_s"] == 2.0 and metrics["idle/rollout/0_frac"] == pytest.approx(0.8)  # per rollout actor
    assert metrics["calls/rollout/0"] == metrics["calls/rollout/1"] == 1.0
    assert "idle/reference_frac" not in metrics and "busy/reference_s" not in metrics  # no reference pool
    assert metrics["time/critical_path_s"] == pytest.approx(2.5 + 1.5 + 0.2)
    assert metrics["throughput/samples_per_s"] == pytest.approx(4 / 5.0)
    assert metrics["reward/toy_fidelity/color"] == 0.5 and metrics["is/ess_frac"] == 0.9 and metrics["replay/size"] == 4.0
    # Same prompts, same digest; other prompts, another.
    again = epoch_metrics(
        batch(),
        {},
        policy_version=3,
        samples_seen=12,
        pool_sizes={"rollout": 1, "reward": 1},
        replay_stats={},
        learn_s=1.0,
        sync_s=0.0,
        sync_bytes=0,
        epoch_s=5.0,
        eval_metrics={},
    )
    other = epoch_metrics(
        batch(prompts=["a", "b", "c", "e"]),
        {},
        policy_version=3,
        samples_seen=12,
        pool_sizes={"rollout": 1, "reward": 1},
        replay_stats={},
        learn_s=1.0,
        sync_s=0.0,
        sync_bytes=0,
        epoch_s=5.0,
        eval_metrics={},
    )
    assert again["prompts/digest"] == metrics["prompts/digest"] != other["prompts/digest"]
    assert np.isnan(again["kl/mean"])  # not measured: NaN, written as null

    # The console line: an epoch without evaluation shows none; an evaluated one its eval and gold reward.
    line = summary_line(metrics, 10)
    assert line.startswith("epoch   3/10 | reward 0.5000") and "kl 1.00e-02" in line and "eval" not in line
    assert "kl n/a" in summary_line(again, 10)
    evaluated = {**metrics, "eval/reward_mean": 0.61234, "gold/mean": 0.25}
    assert "| clipfrac 0.100 | eval 0.6123, gold 0.2500 |" in summary_line(evaluated, 10)
    assert "| eval 0.6123 |" in summary_line({**evaluated, "gold/mean": None}, 10)


def test_shards_split_rows_evenly_and_group_runs_of_one_chunk():
    entries = batch().entries()
    assert [(e.chunk, e.row) for e in entries] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert shard_rows(4, 2) == [range(0, 2), range(2, 4)]
    refs = {(3, 0): ("t0", "r0"), (3, 1): ("t1", "r1")}
    whole = shard_descriptor(entries, range(0, 4), refs)
    assert whole["parts"] == [("t0", "r0", [0, 1]), ("t1", "r1", [0, 1])]
    np.testing.assert_array_equal(whole["advantages"], [-1, 1, 0, 0])
    np.testing.assert_array_equal(whole["versions"], [2, 2, 2, 2])
    assert shard_descriptor(entries, range(1, 3), refs)["parts"] == [("t0", "r0", [1]), ("t1", "r1", [0])]
