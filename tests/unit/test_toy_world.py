"""Tests for actors/toy/world.py: caption grammar, train/held-out split, rendering, verifier."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from actors.toy import world as toy_world
from actors.toy.world import ToyPrompt

# --------------------------------------------------------------------------------------
# Caption grammar
# --------------------------------------------------------------------------------------


def test_article_is_an_before_orange_and_a_otherwise():
    for color in toy_world.COLORS:
        caption = ToyPrompt(color, "circle", "on the left").caption
        expected_article = "an" if color == "orange" else "a"
        assert caption == f"{expected_article} {color} circle on the left"


def test_there_are_90_distinct_prompts_and_each_caption_round_trips():
    prompts = toy_world.all_prompts()
    assert len(prompts) == 6 * 3 * 5 == 90
    assert len({p.caption for p in prompts}) == 90
    for prompt in prompts:
        assert toy_world.parse_prompt(prompt.caption) == prompt


def test_parse_tolerates_case_and_extra_spaces():
    assert toy_world.parse_prompt("  An  ORANGE triangle at the top ") == ToyPrompt("orange", "triangle", "at the top")


@pytest.mark.parametrize(
    ("caption", "match"),
    [
        ("a pink circle on the left", r"unknown color 'pink'; allowed: red, green, blue, yellow, purple, orange"),
        ("a red hexagon on the left", r"unknown shape 'hexagon'; allowed: circle, square, triangle"),
        ("a red circle on the top", r"unknown position 'on the top'; allowed: on the left, "),
        ("a orange circle on the left", r"wrong article, write 'an orange circle on the left'"),
        ("an red circle on the left", r"wrong article, write 'a red circle on the left'"),
        ("red circle on the left", r"not a toy-world caption; expected 'a\|an <color> <shape> <position>'"),
        ("a photo of a cat", r"not a toy-world caption"),
        ("", r"not a toy-world caption"),
    ],
)
def test_bad_captions_raise_helpful_errors(caption, match):
    with pytest.raises(ValueError, match=match):
        toy_world.parse_prompt(caption)


# --------------------------------------------------------------------------------------
# Train / held-out split
# --------------------------------------------------------------------------------------


def test_split_sizes_disjoint_and_covering():
    train, held_out = toy_world.train_prompts(), toy_world.held_out_prompts()
    assert len(train) == 72 and len(held_out) == 18
    assert set(train).isdisjoint(held_out)
    assert set(train) | set(held_out) == {p.caption for p in toy_world.all_prompts()}


def test_each_color_shape_pair_has_four_train_positions_and_one_held_out():
    train = [toy_world.parse_prompt(c) for c in toy_world.train_prompts()]
    held_out = [toy_world.parse_prompt(c) for c in toy_world.held_out_prompts()]
    for color, shape in itertools.product(toy_world.COLORS, toy_world.SHAPES):
        assert sum(p.color == color and p.shape == shape for p in train) == 4, (color, shape)
        assert sum(p.color == color and p.shape == shape for p in held_out) == 1, (color, shape)


def test_every_attribute_value_appears_in_training():
    train = [toy_world.parse_prompt(c) for c in toy_world.train_prompts()]
    assert {p.color for p in train} == set(toy_world.COLORS)
    assert {p.shape for p in train} == set(toy_world.SHAPES)
    assert {p.position for p in train} == set(toy_world.POSITIONS)


def test_held_out_rule_by_hand():
    # red (0) + 2 * circle (0) + "on the left" (0) = 0, divisible by 5: held out.
    assert toy_world.is_held_out(ToyPrompt("red", "circle", "on the left"))
    # green (1) + 2 * square (1) + "at the bottom" (3) = 6: trained on.
    assert not toy_world.is_held_out(ToyPrompt("green", "square", "at the bottom"))
    # orange (5) + 2 * triangle (2) + "on the right" (1) = 10: held out.
    assert toy_world.is_held_out(ToyPrompt("orange", "triangle", "on the right"))


# --------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------


def test_render_shape_dtype_and_determinism():
    image = toy_world.render("a red circle on the left", seed=3)
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image, toy_world.render("a red circle on the left", seed=3))
    assert not np.array_equal(image, toy_world.render("a red circle on the left", seed=4))


def test_render_accepts_toy_prompt_and_caption_alike():
    prompt = ToyPrompt("orange", "triangle", "at the top")
    np.testing.assert_array_equal(toy_world.render(prompt, seed=0), toy_world.render(prompt.caption, seed=0))


def test_render_batch_stacks_renders():
    prompts = ["a red circle on the left", "an orange square at the top"]
    batch = toy_world.render_batch(prompts, [0, 1])
    assert batch.shape == (2, 32, 32, 3) and batch.dtype == np.uint8
    np.testing.assert_array_equal(batch[1], toy_world.render(prompts[1], seed=1))


def test_render_corners_are_background_and_shape_uses_its_colour():
    image = toy_world.render("a blue square in the center", seed=0)
    # Centre shapes span at most 16 +- (7.5 + 1) pixels, so the corners stay empty.
    np.testing.assert_array_equal(image[0, 0], toy_world.BACKGROUND)
    np.testing.assert_array_equal(image[16, 16], toy_world.COLORS["blue"])


def test_background_is_far_from_every_palette_colour():
    background = np.array(toy_world.BACKGROUND, dtype=np.float64)
    for name, rgb in toy_world.COLORS.items():
        assert np.linalg.norm(np.array(rgb) - background) > 90, name


# --------------------------------------------------------------------------------------
# Verifier
# --------------------------------------------------------------------------------------


def test_detect_reads_back_every_ground_truth_render():
    misread = []
    for prompt, seed in itertools.product(toy_world.all_prompts(), range(3)):
        found = toy_world.detect(toy_world.render(prompt, seed))
        if (found.color, found.shape, found.position) != (prompt.color, prompt.shape, prompt.position):
            misread.append((prompt.caption, seed, found))
    assert misread == []


def test_detect_finds_nothing_on_a_blank_image():
    blank = np.full((32, 32, 3), toy_world.BACKGROUND, dtype=np.uint8)
    assert toy_world.detect(blank) == toy_world.Detection(None, None, None)


def test_detect_rejects_images_without_three_channels():
    with pytest.raises(ValueError, match=r"expected an \(H, W, 3\) image"):
        toy_world.detect(np.zeros((32, 32), dtype=np.uint8))


def test_fidelity_counts_matching_attributes():
    image = toy_world.render("a red circle on the left", seed=0)
    assert toy_world.fidelity(image, "a red circle on the left") == 1.0
    assert toy_world.fidelity(image, "a red square on the left") == pytest.approx(2 / 3)
    assert toy_world.fidelity(image, "a green square on the right") == 0.0
