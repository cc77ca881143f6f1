"""Model rewards (actors/rewards/models.py) and their converters, on tiny random checkpoints.

Every converted reward is checked against an independent computation from the original
checkpoint layout (tests/helpers/reference_models.py): the same number, to float32
rounding, means every tensor was renamed, split and transposed correctly.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, CLIPModel

from actors.rewards.convert import convert_reward, load_pickle_state
from actors.rewards.nets import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ImageSpec,
    preprocess_images,
)
from actors.rewards.registry import (
    build_reward,
    build_reward_from_config,
    resolve_reward,
    score_batch,
)
from actors.toy import world as toy_world
from orchestrator.config import RewardComponent, RewardConfig, load_config
from tests.helpers.tiny_rewards import IMAGE_SIZE


def toy_batch(size: int = 6):
    prompts = toy_world.train_prompts()[:size]
    return toy_world.render_batch(prompts, range(size)), prompts


def spec(size: int = IMAGE_SIZE) -> ImageSpec:
    return ImageSpec(size=size, crop=size, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)


# --------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------


def test_preprocess_of_a_flat_image_is_the_normalised_colour():
    image = np.full((1, 48, 48, 3), (255, 0, 51), dtype=np.uint8)
    pixels = preprocess_images(image, spec())
    # Resizing a flat image keeps its colour; then (value / 255 - mean) / std per channel.
    expected = (np.array([1.0, 0.0, 0.2]) - np.array(OPENAI_CLIP_MEAN)) / np.array(OPENAI_CLIP_STD)
    assert pixels.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE) and pixels.dtype == torch.float32
    np.testing.assert_allclose(pixels[0].mean(dim=(1, 2)).numpy(), expected, rtol=1e-5)


def test_preprocess_resizes_the_short_side_and_crops_the_centre():
    # A 40 x 80 (H x W) image: left half black, right half white. Resized to 32 x 64, the
    # centre 32 x 32 crop spans columns 16..47, i.e. exactly half black and half white.
    image = np.zeros((1, 40, 80, 3), dtype=np.uint8)
    image[:, :, 40:] = 255
    pixels = preprocess_images(image, ImageSpec(size=32, crop=32, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)))
    expected = np.asarray(Image.fromarray(image[0]).resize((64, 32), Image.BICUBIC).crop((16, 0, 48, 32)), dtype=np.float32) / 255
    np.testing.assert_array_equal(pixels[0].permute(1, 2, 0).numpy(), expected)
    assert pixels[0, :, :, :8].max() < 0.05 and pixels[0, :, :, -8:].min() > 0.95


# --------------------------------------------------------------------------------------
# Each model reward equals the computation on the original checkpoint
# --------------------------------------------------------------------------------------


def test_aesthetic_is_the_published_mlp_on_normalised_clip_embeddings(tiny_reward_models):
    images, prompts = toy_batch()
    scores, _ = score_batch(resolve_reward("aesthetic", tiny_reward_models.options()["aesthetic"]), images, prompts)

    clip = CLIPModel.from_pretrained(tiny_reward_models.clip).eval()
    with torch.no_grad():
        embedding = clip.visual_projection(clip.vision_model(pixel_values=preprocess_images(images, spec())).pooler_output)
        embedding = embedding / embedding.norm(dim=-1, keepdim=True)
        expected = tiny_reward_models.aesthetic_head.layers(embedding).squeeze(-1).numpy()
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)


def test_hpsv2_conversion_reproduces_the_openclip_checkpoint(tiny_reward_models):
    images, prompts = toy_batch()
    scores, _ = score_batch(resolve_reward("hpsv2", tiny_reward_models.options()["hpsv2"]), images, prompts)

    tokenizer = AutoTokenizer.from_pretrained(tiny_reward_models.hpsv2)
    ids = tokenizer(prompts, padding="max_length", max_length=16, return_tensors="pt")["input_ids"]
    model = tiny_reward_models.openclip
    with torch.no_grad():
        # HPSv2's score: the diagonal of normalised image features @ normalised text features.T.
        expected = (model.encode_image(preprocess_images(images, spec())) * model.encode_text(ids)).sum(-1).numpy()
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)
    assert np.ptp(scores) > 0.01  # the images are told apart, so the comparison means something


def test_imagereward_conversion_reproduces_the_blip_checkpoint(tiny_reward_models):
    images, prompts = toy_batch()
    scores, _ = score_batch(resolve_reward("imagereward", tiny_reward_models.options()["imagereward"]), images, prompts)

    tokenizer = AutoTokenizer.from_pretrained(tiny_reward_models.imagereward)
    tokens = tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    with torch.no_grad():
        expected = tiny_reward_models.imagereward_model.score(
            preprocess_images(images, spec()), tokens["input_ids"], tokens["attention_mask"]
        ).numpy()
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)
    assert tokens["input_ids"][0, 0] == tokenizer.cls_token_id  # ImageReward scores from the [CLS] position


def test_pickscore_and_clip_score_are_scaled_cosines_of_the_same_model(tiny_reward_models):
    options = tiny_reward_models.options()
    images, prompts = toy_batch()
    # Mismatched prompts give some negative cosines, which CLIPScore clips to zero.
    prompts = prompts[3:] + prompts[:3]
    pick, _ = score_batch(resolve_reward("pickscore", options["pickscore"]), images, prompts)
    clip, _ = score_batch(resolve_reward("clip_score", {**options["clip_score"], "scale": 100.0}), images, prompts)

    logit_scale = float(CLIPModel.from_pretrained(tiny_reward_models.clip).logit_scale.detach().exp())
    cosine = pick / logit_scale
    assert (cosine < 0).any() and (cosine > 0).any()
    np.testing.assert_allclose(clip, 100.0 * np.maximum(cosine, 0.0), rtol=1e-5, atol=1e-6)


def test_model_reward_splits_large_batches_by_batch_size(tiny_reward_models):
    images, prompts = toy_batch(6)
    options = tiny_reward_models.options()["hpsv2"]
    whole, _ = score_batch(resolve_reward("hpsv2", {**options, "batch_size": 6}), images, prompts)
    split, _ = score_batch(resolve_reward("hpsv2", {**options, "batch_size": 4}), images, prompts)
    np.testing.assert_allclose(split, whole, rtol=1e-5, atol=1e-6)


def test_bfloat16_scores_are_close_to_float32(tiny_reward_models):
    images, prompts = toy_batch(4)
    options = tiny_reward_models.options()["imagereward"]
    full, _ = score_batch(resolve_reward("imagereward", options), images, prompts)
    half, _ = score_batch(resolve_reward("imagereward", {**options, "dtype": "bfloat16"}), images, prompts)
    assert half.dtype == np.float32
    np.testing.assert_allclose(half, full, atol=0.05)


# --------------------------------------------------------------------------------------
# Options, lazy loading and configuration
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "options", "match"),
    [
        ("aesthetic", {}, r"options.weights is required.*sac\+logos\+ava1-l14-linearMSE.pth.*rayalign convert-reward aesthetic"),
        ("hpsv2", {}, r"options.weights is required.*HPS_v2.1_compressed.pt.*rayalign convert-reward hpsv2"),
        ("imagereward", {}, r"options.weights is required.*ImageReward.pt.*rayalign convert-reward imagereward"),
        ("clip_score", {"batch_size": 0}, r"reward 'clip_score': options.batch_size must be >= 1, got 0"),
        ("clip_score", {"scale": -1.0}, r"options.scale must be > 0"),
        ("pickscore", {"device": "gpu"}, r"options.device must be one of 'auto', 'cpu', 'cuda', 'cuda:N'"),
        ("pickscore", {"dtype": "fp16"}, r"options.dtype: expected one of 'float32', 'float16', 'bfloat16'"),
        ("aesthetic", {"weights": "x", "wieghts": "y"}, r"unknown config key 'options.wieghts' \(did you mean 'weights'\?\)"),
    ],
)
def test_bad_options_fail_at_construction_naming_the_option(name, options, match):
    with pytest.raises(ValueError, match=match):
        resolve_reward(name, options)


def test_construction_loads_nothing_and_check_names_the_missing_file(tmp_path):
    reward = resolve_reward("imagereward", {"weights": str(tmp_path / "missing")})  # no error: nothing is read yet
    with pytest.raises(
        ValueError, match=r"options.weights='.*missing' does not exist.*ImageReward.pt.*THUDM/ImageReward.*convert-reward imagereward"
    ):
        reward.check()


def test_a_pickle_checkpoint_is_refused_with_the_conversion_command(tiny_reward_models, tmp_path):
    with pytest.raises(ValueError, match=r"\.safetensors file.*rayalign convert-reward aesthetic --input FILE.pth"):
        resolve_reward("aesthetic", {"weights": str(tiny_reward_models.aesthetic_pth), "clip": str(tiny_reward_models.clip)}).check()
    pickled = tmp_path / "pickled-clip"
    pickled.mkdir()
    shutil.copy(tiny_reward_models.clip / "config.json", pickled)
    torch.save(load_pickle_state_from_safetensors(tiny_reward_models.clip), pickled / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"only pickle weights \(pytorch_model.bin\).*rayalign convert-reward clip --input"):
        resolve_reward("clip_score", {"weights": str(pickled)}).check()


def load_pickle_state_from_safetensors(directory):
    from safetensors.torch import load_file

    return load_file(str(directory / "model.safetensors"))


def test_hub_id_resolves_from_the_local_cache_only(tiny_reward_models, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(
        ValueError, match=r"'tiny-org/tiny-clip' is not a local path and is not in the local Hugging Face cache.*hf download"
    ):
        resolve_reward("clip_score", {"weights": "tiny-org/tiny-clip"}).check()

    # The cache layout huggingface_hub writes: refs/main names a snapshot folder.
    repo = tmp_path / "models--tiny-org--tiny-clip"
    shutil.copytree(tiny_reward_models.clip, repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    images, prompts = toy_batch(2)
    from_cache, _ = score_batch(resolve_reward("clip_score", {"weights": "tiny-org/tiny-clip", "scale": 100.0}), images, prompts)
    from_path, _ = score_batch(resolve_reward("clip_score", {"weights": str(tiny_reward_models.clip), "scale": 100.0}), images, prompts)
    np.testing.assert_array_equal(from_cache, from_path)


def test_aesthetic_head_must_match_the_clip_width(tiny_reward_models, tmp_path):
    from safetensors.torch import save_file

    wide = tmp_path / "wide.safetensors"
    save_file(
        {
            "layers.0.weight": torch.zeros(4, 24),
            "layers.0.bias": torch.zeros(4),
            "layers.1.weight": torch.zeros(1, 4),
            "layers.1.bias": torch.zeros(1),
        },
        str(wide),
    )
    reward = resolve_reward("aesthetic", {"weights": str(wide), "clip": str(tiny_reward_models.clip), "device": "cpu"})
    with pytest.raises(ValueError, match=r"takes 24-d embeddings but the CLIP .* makes 16-d ones"):
        reward.load()


def test_reward_options_come_from_yaml_config(tiny_reward_models, tmp_path):
    options = tiny_reward_models.options()["aesthetic"]
    path = tmp_path / "run.yaml"
    path.write_text(
        "reward:\n"
        "  - name: aesthetic\n"
        "    weight: 0.5\n"
        f"    options: {{weights: {options['weights']}, clip: {options['clip']}, device: cpu, batch_size: 2}}\n"
        "  - toy_fidelity\n"
    )
    cfg = load_config(path)
    assert cfg.reward.components[0] == RewardComponent(name="aesthetic", weight=0.5, options={**options, "batch_size": 2})
    images, prompts = toy_batch(3)
    combined, info = score_batch(build_reward_from_config(cfg.reward), images, prompts)
    alone, _ = score_batch(resolve_reward("aesthetic", options), images, prompts)
    np.testing.assert_allclose(info["aesthetic/score"], alone, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(combined, 0.5 * alone + info["toy_fidelity/score"], rtol=1e-5, atol=1e-6)


def test_options_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"reward.components\[0\].options: expected a mapping"):
        load_config({"reward": [{"name": "aesthetic", "options": "weights=/x"}]})


@pytest.mark.parametrize(
    ("components", "options", "match"),
    [
        (
            (("jpeg_compressibility", 1.0),),
            {"jpeg_compressibility": {"device": "cpu"}},
            r"'jpeg_compressibility' takes no options, got \['device'\]",
        ),
        (
            (("toy_fidelity", 1.0),),
            {"aesthetic": {"weights": "x"}},
            r"options given for reward\(s\) \['aesthetic'\] that are not components",
        ),
    ],
)
def test_combined_reward_rejects_misplaced_options(components, options, match):
    with pytest.raises(ValueError, match=match):
        build_reward(components, options=options)


def test_reward_worker_loads_models_at_start(tiny_reward_models, tmp_path):
    from actors.workers.reward import RewardWorker

    options = tiny_reward_models.options()["imagereward"]
    worker = RewardWorker(RewardConfig(components=(RewardComponent(name="imagereward", options=options),)))
    images, prompts = toy_batch(3)
    scores, info, timing = worker.score(images, prompts, batch_index=0)
    assert scores.shape == (3,) and set(info) == {"imagereward/score"} and timing["busy_s"] > 0

    with pytest.raises(ValueError, match=r"reward 'imagereward'.*does not exist"):
        RewardWorker(RewardConfig(components=(RewardComponent(name="imagereward", options={"weights": str(tmp_path / "nope")}),)))


def test_training_preflight_checks_reward_weights_before_any_actor(tmp_path):
    from orchestrator.run import check_names

    cfg = load_config({"reward": [{"name": "hpsv2", "options": {"weights": str(tmp_path / "no-hps")}}]})
    with pytest.raises(ValueError, match=r"reward 'hpsv2': options.weights='.*no-hps' does not exist"):
        check_names(cfg)


# --------------------------------------------------------------------------------------
# Converters
# --------------------------------------------------------------------------------------


def test_conversion_records_provenance_and_never_overwrites(tiny_reward_models, tmp_path):
    record = json.loads((tiny_reward_models.aesthetic / "conversion.json").read_text())
    assert (
        record["kind"] == "aesthetic" and record["source"] == tiny_reward_models.aesthetic_pth.name and len(record["source_sha256"]) == 64
    )
    with pytest.raises(ValueError, match="already exists and is not an empty directory"):
        convert_reward("aesthetic", source=tiny_reward_models.aesthetic_pth, output=tiny_reward_models.aesthetic)
    assert sorted(p.name for p in tiny_reward_models.aesthetic.iterdir()) == ["conversion.json", "model.safetensors"]


def test_failed_conversion_leaves_nothing_behind(tiny_reward_models, tmp_path):
    out = tmp_path / "hps"
    with pytest.raises(ValueError, match=r"tokenizer has \d+ tokens but .* word embeddings have \d+ rows"):
        convert_reward(
            "hpsv2",
            source=tiny_reward_models.hpsv2_pt,
            output=out,
            tokenizer=str(tiny_reward_models.bert_tokenizer),
            vision_heads=2,
            text_heads=2,
        )
    assert list(tmp_path.iterdir()) == []


class NotATensor:
    """Pickled by reference to this class: what the restricted unpickler must refuse."""


def test_restricted_unpickler_refuses_arbitrary_objects(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"layers.0.weight": torch.zeros(1, 2), "payload": NotATensor()}, path)
    with pytest.raises(ValueError, match=r"objects other than tensors.*torch.save\(model.state_dict\(\)"):
        load_pickle_state(path)


def test_pickle_state_unwraps_wrappers_and_data_parallel_prefix(tmp_path):
    path = tmp_path / "wrapped.pt"
    torch.save({"state_dict": {"module.layers.0.weight": torch.ones(1, 2)}}, path)
    assert list(load_pickle_state(path)) == ["layers.0.weight"]


def test_clip_conversion_turns_a_pickle_directory_into_safetensors(tiny_reward_models, tmp_path):
    pickled = tmp_path / "pickscore-like"
    shutil.copytree(tiny_reward_models.clip, pickled)
    torch.save(load_pickle_state_from_safetensors(pickled), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    out = convert_reward("clip", source=pickled, output=tmp_path / "converted")
    assert not list(out.glob("*.bin")) and (out / "tokenizer_config.json").is_file()
    images, prompts = toy_batch(3)
    converted, _ = score_batch(resolve_reward("pickscore", {"weights": str(out), "processor": None}), images, prompts)
    original, _ = score_batch(resolve_reward("pickscore", {"weights": str(tiny_reward_models.clip), "processor": None}), images, prompts)
    np.testing.assert_array_equal(converted, original)


def test_openclip_heads_must_be_given_when_the_width_is_unusual(tiny_reward_models, tmp_path):
    with pytest.raises(ValueError, match=r"attention heads of a 32-wide tower.*--vision-heads"):
        convert_reward("hpsv2", source=tiny_reward_models.hpsv2_pt, output=tmp_path / "o", tokenizer=str(tiny_reward_models.hpsv2))


def test_aesthetic_conversion_rejects_a_non_mlp_checkpoint(tiny_reward_models, tmp_path):
    with pytest.raises(ValueError, match=r"not an aesthetic MLP state dict: unexpected keys"):
        convert_reward("aesthetic", source=tiny_reward_models.imagereward_pt, output=tmp_path / "o")
