"""Tests for actors/rewards/registry.py: registry conformance, each reward's meaning, combination, errors."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from actors.rewards.registry import (
    LAZY,
    REWARDS,
    CombinedReward,
    RewardFn,
    all_rewards,
    build_reward,
    check_scores,
    configured_rewards,
    is_configured_reward,
    register_reward,
    resolve_reward,
    score_batch,
)
from actors.toy import world as toy_world

USER_REWARD = "tests.helpers.user_reward:mean_brightness"


def toy_batch(size: int, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """Ground-truth renders of the first ``size`` training captions: input every reward accepts."""
    prompts = toy_world.train_prompts()[:size]
    return toy_world.render_batch(prompts, range(seed, seed + size)), prompts


def pil_jpeg_kb(image: np.ndarray) -> float:
    """The expected JPEG size, encoded here independently of the reward code."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=95)
    return len(buffer.getvalue()) / 1000


# --------------------------------------------------------------------------------------
# Conformance: every registered reward. A new reward is covered by registering it; one
# that takes options also needs a row in the ``reward_options`` fixture (tests/conftest.py).
# --------------------------------------------------------------------------------------


def runnable(name: str, reward_options) -> RewardFn:
    """The registered reward ``name``, configured with the test options when it takes options."""
    return resolve_reward(name, reward_options.get(name))


def test_lazily_named_rewards_are_what_their_module_registers():
    all_rewards()
    for module in set(LAZY.values()):
        registered = {name for name, entry in REWARDS.items() if entry.__module__ == module}
        assert registered == {name for name, owner in LAZY.items() if owner == module}


def test_checking_a_toy_reward_config_imports_neither_torch_nor_transformers():
    # The driver checks the reward config before any actor starts; a model reward's imports cost seconds there.
    code = (
        "import sys; from actors.rewards.registry import build_reward; build_reward([('toy_fidelity', 1.0)]).check(); "
        "print(sorted(m for m in ('torch', 'transformers', 'diffusers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_every_configured_reward_has_test_options(reward_options):
    assert set(configured_rewards()) <= set(reward_options), "add the new reward's options to the reward_options fixture"


@pytest.mark.parametrize("name", sorted(all_rewards()))
def test_reward_conformance(name, reward_options):
    reward = runnable(name, reward_options)
    images, prompts = toy_batch(8)
    scores, info = score_batch(reward, images, prompts, name=name)
    assert scores.shape == (8,)
    assert scores.dtype == np.float32
    assert np.isfinite(scores).all()
    assert isinstance(info, dict) and all(isinstance(key, str) for key in info)

    again, _ = score_batch(reward, images, prompts, name=name)
    np.testing.assert_array_equal(again, scores)

    # Scores of an image must not depend on which other images share its batch. Model
    # rewards run float32 matrix products whose summation order may follow the batch
    # shape, so agreement is to float32 rounding rather than bit for bit.
    head, _ = score_batch(reward, images[:3], prompts[:3], name=name)
    tail, _ = score_batch(reward, images[3:], prompts[3:], batch_index=1, name=name)
    np.testing.assert_allclose(np.concatenate([head, tail]), scores, rtol=1e-5, atol=1e-6)


def test_registered_reward_returned_directly_matches_registry_name():
    images, prompts = toy_batch(2)
    for name, fn in all_rewards().items():
        if not is_configured_reward(fn):
            np.testing.assert_array_equal(score_batch(fn, images, prompts)[0], score_batch(name, images, prompts)[0])


# --------------------------------------------------------------------------------------
# JPEG
# --------------------------------------------------------------------------------------


def test_flat_image_is_more_compressible_than_noise():
    flat = np.full((1, 32, 32, 3), 128, dtype=np.uint8)
    noise = np.random.default_rng(0).integers(0, 256, size=(1, 32, 32, 3), dtype=np.uint8)
    images = np.concatenate([flat, noise])
    compressibility, _ = score_batch("jpeg_compressibility", images, ["flat", "noise"])
    assert compressibility[0] > compressibility[1]


def test_jpeg_scores_are_pil_kilobytes_and_opposite():
    images, prompts = toy_batch(4)
    expected_kb = np.array([pil_jpeg_kb(image) for image in images], dtype=np.float32)

    incompressibility, info = score_batch("jpeg_incompressibility", images, prompts)
    compressibility, _ = score_batch("jpeg_compressibility", images, prompts)

    np.testing.assert_array_equal(incompressibility, expected_kb)
    np.testing.assert_array_equal(compressibility, -incompressibility)
    np.testing.assert_array_equal(info["jpeg_kb"], expected_kb)


# --------------------------------------------------------------------------------------
# toy_fidelity
# --------------------------------------------------------------------------------------


def test_toy_fidelity_is_high_on_ground_truth_renders():
    captions = [p.caption for p in toy_world.all_prompts()]
    prompts = [caption for caption in captions for _ in range(3)]
    seeds = [seed for _ in captions for seed in range(3)]
    images = toy_world.render_batch(prompts, seeds)

    scores, info = score_batch("toy_fidelity", images, prompts)

    assert len(prompts) == 270
    assert scores.mean() >= 0.99
    assert min(info["color_acc"], info["shape_acc"], info["position_acc"]) >= 0.99


def test_toy_fidelity_is_low_when_every_attribute_is_wrong():
    colors, positions = list(toy_world.COLORS), list(toy_world.POSITIONS)
    truths = toy_world.all_prompts()
    # Shift each attribute by one step (cyclically), so all three differ from the truth.
    wrong = [
        toy_world.ToyPrompt(
            colors[(colors.index(p.color) + 1) % len(colors)],
            toy_world.SHAPES[(toy_world.SHAPES.index(p.shape) + 1) % len(toy_world.SHAPES)],
            positions[(positions.index(p.position) + 1) % len(positions)],
        ).caption
        for p in truths
    ]
    images = toy_world.render_batch([p.caption for p in truths], range(len(truths)))

    scores, _ = score_batch("toy_fidelity", images, wrong)

    assert scores.mean() <= 0.2


def test_toy_fidelity_of_background_only_is_zero():
    blank = np.full((1, 32, 32, 3), toy_world.BACKGROUND, dtype=np.uint8)
    scores, info = score_batch("toy_fidelity", blank, ["a red circle on the left"])
    assert scores[0] == 0.0
    assert info == {"color_acc": 0.0, "shape_acc": 0.0, "position_acc": 0.0}


def test_toy_fidelity_wrong_shape_scores_two_thirds_and_per_attribute_accuracy():
    image = toy_world.render("a red circle on the left", seed=0)
    images = np.stack([image, image])
    prompts = ["a red circle on the left", "a red square on the left"]

    scores, info = score_batch("toy_fidelity", images, prompts)

    # First caption: 3 of 3 attributes shown. Second: colour and position right, shape wrong.
    assert scores[0] == np.float32(1.0)
    assert scores[1] == np.float32(2.0 / 3.0)
    # Over the batch: colour 2/2, shape 1/2, position 2/2.
    assert info == {"color_acc": 1.0, "shape_acc": 0.5, "position_acc": 1.0}


def test_toy_fidelity_agrees_with_toy_world_fidelity():
    images, prompts = toy_batch(6)
    shuffled = prompts[1:] + prompts[:1]  # mismatched captions give partial scores too
    scores, _ = score_batch("toy_fidelity", images, shuffled)
    expected = [toy_world.fidelity(image, prompt) for image, prompt in zip(images, shuffled)]
    np.testing.assert_array_equal(scores, np.array(expected, dtype=np.float32))


def test_toy_fidelity_rejects_a_caption_outside_the_grammar():
    images, _ = toy_batch(1)
    with pytest.raises(ValueError, match=r"toy_fidelity.*not a toy-world caption"):
        score_batch("toy_fidelity", images, ["a photo of a cat"])


# --------------------------------------------------------------------------------------
# CombinedReward / build_reward
# --------------------------------------------------------------------------------------


def test_combined_reward_is_the_weighted_sum():
    image = toy_world.render("a red circle on the left", seed=0)
    images = np.stack([image, image])
    prompts = ["a red circle on the left", "a red square on the left"]
    kb = [pil_jpeg_kb(image)] * 2
    # Fidelity is 1 and 2/3 (see the two-thirds test); incompressibility is the JPEG kB.
    expected = np.array([0.5 * 1.0 + 2.0 * kb[0], 0.5 * (2.0 / 3.0) + 2.0 * kb[1]], dtype=np.float32)

    combined = CombinedReward((("toy_fidelity", 0.5), ("jpeg_incompressibility", 2.0)))
    scores, info = score_batch(combined, images, prompts)

    np.testing.assert_allclose(scores, expected, rtol=1e-6)
    np.testing.assert_array_equal(info["toy_fidelity/score"], np.float32([1.0, 2.0 / 3.0]))
    np.testing.assert_array_equal(info["jpeg_incompressibility/score"], np.float32(kb))
    assert info["toy_fidelity/shape_acc"] == 0.5
    assert set(info) == {
        "toy_fidelity/score",
        "toy_fidelity/color_acc",
        "toy_fidelity/shape_acc",
        "toy_fidelity/position_acc",
        "jpeg_incompressibility/score",
        "jpeg_incompressibility/jpeg_kb",
    }
    assert combined.name == "0.5*toy_fidelity + 2*jpeg_incompressibility"


@pytest.mark.parametrize("name", sorted(all_rewards()))
def test_single_component_with_weight_one_equals_the_reward(name, reward_options):
    images, prompts = toy_batch(4)
    alone, _ = score_batch(runnable(name, reward_options), images, prompts)
    options = {name: reward_options[name]} if name in reward_options else None
    combined, info = score_batch(build_reward(name, options=options), images, prompts)
    np.testing.assert_array_equal(combined, alone)
    np.testing.assert_array_equal(info[f"{name}/score"], alone)


def test_build_reward_accepts_pairs_as_lists_from_yaml():
    reward = build_reward([["toy_fidelity", 1], [USER_REWARD, 0.25]])
    assert reward.components == (("toy_fidelity", 1.0), (USER_REWARD, 0.25))


@pytest.mark.parametrize(
    ("components", "match"),
    [
        ((), "at least one"),
        ((("toy_fidelity", float("nan")),), "toy_fidelity.*finite"),
        ((("toy_fidelity", float("inf")),), "toy_fidelity.*finite"),
        ((("toy_fidelity", "1"),), "toy_fidelity.*finite number"),
        ((("toy_fidelity",),), r"\(name, weight\) pair"),
        ((("toy_fidelity", 1.0), ("toy_fidelity", 2.0)), "more than once"),
        ((("no_such_reward", 1.0),), "unknown reward 'no_such_reward'"),
        ("toy_fidelity", "sequence of \\(name, weight\\) pairs"),
    ],
)
def test_combined_reward_rejects_bad_components_at_construction(components, match):
    with pytest.raises(ValueError, match=match):
        CombinedReward(components)


def test_combined_reward_error_names_the_failing_component_and_batch():
    broken = "tests.helpers.user_reward:nan_for_first_image"
    reward = CombinedReward((("toy_fidelity", 1.0), (broken, 1.0)))
    images, prompts = toy_batch(2)
    with pytest.raises(ValueError, match=rf"reward '{broken}' \(batch 7\).*NaN at positions \[0\]"):
        score_batch(reward, images, prompts, batch_index=7)


# --------------------------------------------------------------------------------------
# Registry and name resolution
# --------------------------------------------------------------------------------------


def test_register_reward_adds_and_rejects_duplicates():
    def constant(images, prompts, metadata):
        return np.zeros(len(images), dtype=np.float32), {}

    try:
        assert register_reward("test_constant")(constant) is constant
        assert resolve_reward("test_constant") is constant
        with pytest.raises(ValueError, match="'test_constant' is already registered"):
            register_reward("test_constant")(constant)
    finally:
        REWARDS.pop("test_constant", None)  # keep the global registry as the conformance test saw it


@pytest.mark.parametrize("bad_name", ["", "a:b", 3])
def test_register_reward_rejects_bad_names(bad_name):
    with pytest.raises(ValueError, match="non-empty string without ':'"):
        register_reward(bad_name)


def test_user_reward_resolves_from_module_path():
    from tests.helpers import user_reward

    assert resolve_reward(USER_REWARD) is user_reward.mean_brightness
    images = np.zeros((2, 4, 4, 3), dtype=np.uint8)
    images[1] = 255
    scores, info = score_batch(USER_REWARD, images, ["dark", "bright"])
    np.testing.assert_array_equal(scores, np.float32([0.0, 1.0]))
    assert info == {"num_prompts": 2.0}


def test_unknown_name_lists_every_registered_reward():
    with pytest.raises(ValueError) as excinfo:
        resolve_reward("jpeg_compresibility")
    message = str(excinfo.value)
    assert "'jpeg_compresibility'" in message
    for name in REWARDS:
        assert name in message
    assert "package.module:function" in message


@pytest.mark.parametrize(
    ("path", "match"),
    [
        ("tests.helpers.no_such_module:fn", r"'tests.helpers.no_such_module:fn'.*cannot import module.*No module named"),
        ("tests.helpers.user_reward:no_such_fn", r"'tests.helpers.user_reward:no_such_fn'.*no attribute 'no_such_fn'"),
        ("tests.helpers.user_reward:NOT_A_FUNCTION", r"'NOT_A_FUNCTION' is a int, not a function"),
        (":mean_brightness", "not of the form 'package.module:function'"),
        ("tests.helpers.user_reward:", "not of the form 'package.module:function'"),
    ],
)
def test_bad_module_path_errors(path, match):
    with pytest.raises(ValueError, match=match):
        resolve_reward(path)


# --------------------------------------------------------------------------------------
# Validation of what a reward returns, and of score_batch's inputs
# --------------------------------------------------------------------------------------


def returns_nan(images, prompts, metadata):
    return np.array([0.0, np.nan, 1.0], dtype=np.float32), {}


def returns_inf(images, prompts, metadata):
    return np.array([np.inf, 0.0, -np.inf], dtype=np.float32), {}


def returns_wrong_shape(images, prompts, metadata):
    return np.zeros((3, 1), dtype=np.float32), {}


def returns_list(images, prompts, metadata):
    return [0.0, 0.0, 0.0], {}


def returns_scores_only(images, prompts, metadata):
    return np.zeros(3, dtype=np.float32)


def returns_strings(images, prompts, metadata):
    return np.array(["a", "b", "c"]), {}


def returns_bad_info(images, prompts, metadata):
    return np.zeros(3, dtype=np.float32), {"note": "text"}


@pytest.mark.parametrize(
    ("reward", "match"),
    [
        (returns_nan, r"1 non-finite.*NaN at positions \[1\], inf at positions \[\]"),
        (returns_inf, r"2 non-finite.*NaN at positions \[\], inf at positions \[0, 2\]"),
        (returns_wrong_shape, r"shape \(3, 1\); expected \(3,\)"),
        (returns_list, r"type list; expected a numpy array of shape \(3,\)"),
        (returns_scores_only, r"returned ndarray; expected a \(scores, info\) tuple"),
        (returns_strings, r"dtype <U1; expected real numbers"),
        (returns_bad_info, r"info\['note'\] of type str"),
    ],
)
def test_bad_reward_output_names_reward_and_batch(reward, match):
    images = np.zeros((3, 8, 8, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"reward 'broken_reward_2' \(batch 5\)") as excinfo:
        score_batch(reward, images, ["x"] * 3, batch_index=5, name="broken_reward_2")
    assert excinfo.match(match)


def test_check_scores_converts_to_float32():
    scores = check_scores("r", np.array([1, 2], dtype=np.int64), batch_size=2, batch_index=0)
    assert scores.dtype == np.float32
    np.testing.assert_array_equal(scores, [1.0, 2.0])


def test_check_scores_catches_float32_overflow():
    with pytest.raises(ValueError, match=r"reward 'r' \(batch 3\).*inf at positions \[0\]"):
        check_scores("r", np.array([1e300, 0.0]), batch_size=2, batch_index=3)


def test_error_uses_function_name_when_no_name_given():
    images = np.zeros((3, 8, 8, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"reward 'returns_nan' \(batch 0\)"):
        score_batch(returns_nan, images, ["x"] * 3)


@pytest.mark.parametrize(
    ("images", "prompts", "metadata", "match"),
    [
        (np.zeros((2, 8, 8, 3), dtype=np.float32), ["a", "b"], None, "uint8.*got dtype float32"),
        (np.zeros((2, 3, 8, 8), dtype=np.uint8), ["a", "b"], None, r"\(batch, H, W, 3\), got \(2, 3, 8, 8\)"),
        (np.zeros((8, 8, 3), dtype=np.uint8), ["a"], None, r"\(batch, H, W, 3\), got \(8, 8, 3\)"),
        (np.zeros((0, 8, 8, 3), dtype=np.uint8), [], None, "empty batch"),
        ([[0]], ["a"], None, "numpy uint8 array"),
        (np.zeros((2, 8, 8, 3), dtype=np.uint8), ["a"], None, "1 prompts for 2 images"),
        (np.zeros((2, 8, 8, 3), dtype=np.uint8), "ab", None, "sequence of str"),
        (np.zeros((2, 8, 8, 3), dtype=np.uint8), ["a", 3], None, r"positions \[1\]"),
        (np.zeros((2, 8, 8, 3), dtype=np.uint8), ["a", "b"], [{}], "1 metadata entries for 2 images"),
        (np.zeros((2, 8, 8, 3), dtype=np.uint8), ["a", "b"], [{}, "x"], r"positions \[1\]"),
    ],
)
def test_score_batch_rejects_bad_inputs(images, prompts, metadata, match):
    with pytest.raises(ValueError, match=match):
        score_batch("jpeg_incompressibility", images, prompts, metadata)


def test_score_batch_normalises_missing_metadata_to_empty_dicts():
    seen = []

    def records_metadata(images, prompts, metadata):
        seen.append(list(metadata))
        return np.zeros(len(images), dtype=np.float32), {}

    images = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    score_batch(records_metadata, images, ["a", "b"])
    score_batch(records_metadata, images, ["a", "b"], [{"step": 1}, {"step": 2}])
    assert seen == [[{}, {}], [{"step": 1}, {"step": 2}]]


def test_a_non_finite_score_is_an_error_naming_the_reward_the_prompt_and_the_value():
    images, prompts = toy_batch(4)
    with pytest.raises(ValueError) as caught:
        score_batch("tests.helpers.user_reward:nan_for_circles", images, prompts)
    first = next(i for i, p in enumerate(prompts) if "circle" in p)
    assert "nan_for_circles" in str(caught.value) and f"the first, nan for prompt {prompts[first]!r}" in str(caught.value)


def test_the_reward_worker_drops_only_the_samples_the_reward_fails_on():
    from actors.workers.reward import RewardWorker
    from orchestrator.config import RewardConfig

    images, prompts = toy_batch(8)
    circles = np.array(["circle" in p for p in prompts])
    assert circles.any() and not circles.all()
    name = "tests.helpers.user_reward:nan_for_circles"
    scores, _, _ = RewardWorker(RewardConfig(components=({"name": name},), on_invalid="drop")).score(images, prompts, 0)
    assert np.isnan(scores[circles]).all() and np.isfinite(scores[~circles]).all()
    with pytest.raises(ValueError, match="non-finite"):
        RewardWorker(RewardConfig(components=({"name": name},))).score(images, prompts, 0)
