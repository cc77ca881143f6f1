"""Advantage estimators: hand-computed normalisations, the stat tracker's buffers and resume."""

import json

import numpy as np
import pytest

from actors.rl import advantages as adv
from actors.rl.advantages import PerPromptStatTracker

# std values used below: population std (ddof=0), plus EPS = 1e-6 in every denominator
SQRT_2_3 = (2 / 3) ** 0.5  # std of three rewards spaced 1 apart, e.g. [1, 2, 3]


# --------------------------------------------------------------------------------------
# PerPromptStatTracker
# --------------------------------------------------------------------------------------


def test_tracker_falls_back_to_batch_statistics_below_min_count():
    # each prompt has 2 rewards < min_count 3, so the whole batch normalises:
    # rewards [1, 3, 5, 7]: mean 4, std sqrt((9 + 1 + 1 + 9) / 4) = sqrt(5) = 2.236068
    # -> [-3, -1, 1, 3] / 2.236068 = [-1.341641, -0.447214, 0.447214, 1.341641]
    tracker = PerPromptStatTracker(buffer_size=3, min_count=3)
    out = tracker.update(["a", "a", "b", "b"], np.array([1.0, 3.0, 5.0, 7.0]))
    assert out.dtype == np.float32
    assert out.tolist() == pytest.approx([-1.341641, -0.447214, 0.447214, 1.341641], rel=1e-5)
    assert tracker.stats() == {"advantages/tracked_prompts": 2.0, "advantages/mean_buffer_length": 2.0}


def test_tracker_uses_each_prompts_buffer_once_min_count_is_reached():
    tracker = PerPromptStatTracker(buffer_size=3, min_count=3)
    tracker.update(["a", "a", "b", "b"], np.array([1.0, 3.0, 5.0, 7.0]))
    # buffers now a = [1, 3, 2]: mean 2, std sqrt((1 + 1 + 0) / 3) = sqrt(2/3) = 0.816497
    #             b = [5, 7, 9]: mean 7, std sqrt((4 + 0 + 4) / 3) = sqrt(8/3) = 1.632993
    # a: (2 - 2) / 0.816497 = 0;  b: (9 - 7) / 1.632993 = 1.224745
    # (the batch fallback would have given mean 5.5, std 3.5 -> [-1, 1])
    out = tracker.update(["a", "b"], np.array([2.0, 9.0]))
    assert out.tolist() == pytest.approx([0.0, 2 / (2 * SQRT_2_3 + 1e-6)], abs=1e-6)
    assert out[1] == pytest.approx(1.224745, rel=1e-5)


def test_tracker_mixes_tracked_and_fallback_prompts_in_one_batch_and_keeps_only_the_last_buffer_size():
    tracker = PerPromptStatTracker(buffer_size=3, min_count=3)
    tracker.update(["a", "a", "a"], np.array([1.0, 3.0, 2.0]))
    out = tracker.update(["a", "c", "c"], np.array([4.0, 0.0, 6.0]))
    # a's buffer drops its oldest reward: [3, 2, 4], mean 3, std sqrt(2/3) -> (4 - 3) / 0.816497 = 1.224745
    # (had it kept [1, 3, 2, 4] it would be (4 - 2.5) / 1.118034 = 1.341641)
    # c has 2 < 3 rewards -> batch [4, 0, 6]: mean 10/3, std sqrt((4 + 100 + 64) / 9 / 3) = sqrt(56/9) = 2.494438
    # -> (0 - 3.333333) / 2.494438 = -1.336306, (6 - 3.333333) / 2.494438 = 1.069045
    assert out.tolist() == pytest.approx([1.224745, -1.336306, 1.069045], rel=1e-5)
    assert tracker.state_dict()["buffers"] == {"a": [3.0, 2.0, 4.0], "c": [0.0, 6.0]}
    assert tracker.stats()["advantages/mean_buffer_length"] == 2.5


def _batches(seed, count):
    rng = np.random.default_rng(seed)
    prompts = ["a cat", "a dog", "a red cube"]
    return [([prompts[i] for i in rng.integers(0, len(prompts), size=6)], rng.normal(size=6).astype(np.float32)) for _ in range(count)]


def test_tracker_state_dict_survives_json_and_resumes_identically():
    history, future = _batches(seed=0, count=5), _batches(seed=1, count=4)
    original = PerPromptStatTracker(buffer_size=4, min_count=2)
    for prompts, rewards in history:
        original.update(prompts, rewards)
    restored = PerPromptStatTracker(buffer_size=4, min_count=2)
    restored.load_state_dict(json.loads(json.dumps(original.state_dict())))
    assert restored.state_dict() == original.state_dict()
    for prompts, rewards in future:
        assert np.array_equal(restored.update(prompts, rewards), original.update(prompts, rewards))
    assert restored.state_dict() == original.state_dict()


def test_tracker_state_dict_with_other_settings_is_rejected():
    state = PerPromptStatTracker(buffer_size=4, min_count=2).state_dict()
    with pytest.raises(ValueError, match="saved with buffer_size=4 but this tracker has buffer_size=8"):
        PerPromptStatTracker(buffer_size=8, min_count=2).load_state_dict(state)
    with pytest.raises(ValueError, match="missing"):
        PerPromptStatTracker().load_state_dict({"buffers": {}})


def test_tracker_settings_are_validated():
    with pytest.raises(ValueError, match="min_count \\(16\\) > buffer_size \\(8\\)"):
        PerPromptStatTracker(buffer_size=8, min_count=16)
    with pytest.raises(ValueError, match="buffer_size must be an int >= 1"):
        PerPromptStatTracker(buffer_size=0, min_count=1)
    with pytest.raises(ValueError, match="min_count must be an int >= 1"):
        PerPromptStatTracker(buffer_size=4, min_count=0)


def test_tracker_input_validation():
    tracker = PerPromptStatTracker()
    with pytest.raises(ValueError, match=r"len\(prompts\) = 1 but len\(rewards\) = 2"):
        tracker.update(["a"], np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="got a single str"):
        tracker.update("ab", np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="prompts must be strings"):
        tracker.update(["a", 3], np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="must be finite; got nan at index 1"):
        tracker.update(["a", "b"], np.array([1.0, np.nan]))
    assert tracker.state_dict()["buffers"] == {}, "a rejected batch must not touch the buffers"


# --------------------------------------------------------------------------------------
# batch / group normalisation, clipping
# --------------------------------------------------------------------------------------


def test_batch_normalize_hand_values():
    # [1, 2, 3, 4]: mean 2.5, std sqrt((2.25 + 0.25 + 0.25 + 2.25) / 4) = sqrt(1.25) = 1.118034
    out = adv.batch_normalize(np.array([1.0, 2.0, 3.0, 4.0]))
    assert out.tolist() == pytest.approx([-1.341641, -0.447214, 0.447214, 1.341641], rel=1e-5)
    # all-equal rewards: 0 / (0 + EPS) = 0, not NaN
    assert adv.batch_normalize(np.array([2.0, 2.0])).tolist() == [0.0, 0.0]


def test_group_normalize_hand_values_and_zero_spread_groups():
    # x: [1, 3] mean 2 std 1 -> [-1, 1] / (1 + 1e-6); y: [5, 5] all equal -> 0; z: one sample -> 0
    out = adv.group_normalize(np.array([1.0, 3.0, 5.0, 5.0, 2.0]), ["x", "x", "y", "y", "z"])
    assert out.advantages.dtype == np.float32
    assert out.advantages.tolist() == pytest.approx([-1 / (1 + 1e-6), 1 / (1 + 1e-6), 0.0, 0.0, 0.0])
    assert out.zero_spread_groups == 2


def test_group_normalize_handles_interleaved_groups_and_exactly_zeros_equal_rewards():
    # group 0 = positions 0, 2: [1, 3] -> [-1, 1]; group 1 = positions 1, 3: [10, 20], mean 15 std 5 -> [-1, 1]
    advantages, zero_spread = adv.group_normalize(np.array([1.0, 10.0, 3.0, 20.0]), [0, 1, 0, 1])
    assert advantages.tolist() == pytest.approx([-1.0, -1.0, 1.0, 1.0], rel=1e-5)
    assert zero_spread == 0
    # mean([0.1] * 3) rounds to 0.10000000000000002: still exactly 0, not 1e-17 / 1e-6
    advantages, zero_spread = adv.group_normalize(np.array([0.1, 0.1, 0.1]), ["p"] * 3)
    assert advantages.tolist() == [0.0, 0.0, 0.0] and zero_spread == 1


def test_clip_advantages():
    out = adv.clip_advantages(np.array([-3.0, -0.5, 0.0, 2.0, 7.0], dtype=np.float32), max_abs=2.0)
    assert out.tolist() == [-2.0, -0.5, 0.0, 2.0, 2.0]
    assert out.dtype == np.float32
    for max_abs in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="max_abs must be a finite number > 0"):
            adv.clip_advantages(out, max_abs=max_abs)


@pytest.mark.parametrize(
    "rewards, match",
    [
        (np.array([[1.0, 2.0]]), "must be 1-D"),
        (np.array([]), "rewards is empty"),
        (np.array([1.0, np.inf]), "must be finite"),
    ],
)
def test_reward_validation(rewards, match):
    with pytest.raises(ValueError, match=match):
        adv.batch_normalize(rewards)
    with pytest.raises(ValueError, match=match):
        adv.group_normalize(rewards, list(range(rewards.size)))


def test_group_ids_must_match_rewards():
    with pytest.raises(ValueError, match=r"len\(group_ids\) = 3 but len\(rewards\) = 2"):
        adv.group_normalize(np.array([1.0, 2.0]), [0, 0, 1])
