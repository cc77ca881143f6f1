"""Serving-side generation: batch-independent images and atomic LoRA hot swaps, without Ray."""

import numpy as np
import pytest

from actors.diffusion.files import LORA_CONFIG_NAME, LORA_WEIGHTS_NAME
from actors.diffusion.generator import ImageGenerator, ImageJob, adapter_version
from tests.helpers.adapters import make_adapter

STEPS = 3


@pytest.fixture(scope="module")
def generator(tiny_pipeline_dir):
    import torch

    # One thread, as a serving replica with one CPU runs: on a shared 2-core machine more
    # threads only wait on each other.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield ImageGenerator.from_pretrained(tiny_pipeline_dir, device="cpu", batch_size=4, pad_batches=True)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def adapters(tiny_pipeline_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {
        "a": make_adapter(tiny_pipeline_dir, root / "run" / "checkpoints" / "epoch_0002" / "lora", seed=1),
        "b": make_adapter(tiny_pipeline_dir, root / "b", seed=2, rank=2, target_modules=("to_q", "to_v")),
    }


def job(prompt="a red circle on the left", seeds=(7,), steps=STEPS, guidance=4.5, eta=1.0, use_adapter=True):
    return ImageJob(prompt=prompt, seeds=tuple(seeds), num_steps=steps, guidance_scale=guidance, eta=eta, use_adapter=use_adapter)


def test_image_size_is_what_the_model_makes(generator):
    assert generator.image_size == (32, 32)
    (result,) = generator.generate([job(seeds=(1, 2))])
    assert result.images.shape == (2, 32, 32, 3) and result.images.dtype == np.uint8


def test_an_image_does_not_depend_on_the_jobs_beside_it(generator):
    alone = generator.generate([job()])[0].images[0]
    crowd = [
        job(prompt="a blue square at the top", seeds=(1, 2)),
        job(),
        job(prompt="a green triangle in the center", seeds=(3,)),
        job(prompt="a red circle on the left", seeds=(9, 10, 11)),
    ]
    before = dict(generator.stats)
    results = generator.generate(crowd)
    # 7 images at batch size 4: two denoising batches, the second padded with one throw-away sample.
    assert generator.stats["batches"] - before["batches"] == 2 and generator.stats["padding"] - before["padding"] == 1
    np.testing.assert_array_equal(results[1].images[0], alone)
    assert not np.array_equal(results[0].images[0], alone)
    assert [r.images.shape[0] for r in results] == [2, 1, 1, 3]


def test_without_padding_batches_run_at_their_own_size(generator):
    from actors.diffusion.generator import ImageGenerator

    unpadded = ImageGenerator(generator.policy, batch_size=4, pad_batches=False)
    results = unpadded.generate([job(seeds=(1, 2)), job(prompt="a blue square at the top", seeds=(3,))])
    assert unpadded.stats == {"batches": 1, "images": 3, "padding": 0, "largest_batch": 3}
    assert [r.images.shape[0] for r in results] == [2, 1]


def test_settings_are_grouped_not_mixed(generator):
    few, many = job(steps=2), job(steps=4)
    mixed = generator.generate([few, many])
    np.testing.assert_array_equal(mixed[0].images, generator.generate([few])[0].images)
    np.testing.assert_array_equal(mixed[1].images, generator.generate([many])[0].images)
    assert not np.array_equal(mixed[0].images, mixed[1].images)


def test_hot_swap_serves_the_new_adapter_and_keeps_base_on_request(generator, adapters):
    base = generator.generate([job()])[0]
    assert base.adapter_version is None
    info = generator.load_adapter(adapters["a"])
    assert info.version == adapter_version(adapters["a"]) and info.version.startswith("epoch_0002@") and info.rank == 4
    adapted, base_again = generator.generate([job(), job(use_adapter=False)])
    assert adapted.adapter_version == info.version and base_again.adapter_version is None
    assert not np.array_equal(adapted.images, base.images)
    np.testing.assert_array_equal(base_again.images, base.images)

    # A different rank and target set swaps in just as well; the old adapter is gone.
    generator.load_adapter(adapters["b"])
    other = generator.generate([job()])[0]
    assert other.adapter_version.startswith("b@") and not np.array_equal(other.images, adapted.images)
    generator.load_adapter(adapters["a"])
    np.testing.assert_array_equal(generator.generate([job()])[0].images, adapted.images)
    generator.unload_adapter()
    assert generator.adapter is None
    np.testing.assert_array_equal(generator.generate([job()])[0].images, base.images)


def _truncated(path, tmp_path):
    bad = tmp_path / "truncated"
    bad.mkdir()
    (bad / LORA_CONFIG_NAME).write_bytes((path / LORA_CONFIG_NAME).read_bytes())
    (bad / LORA_WEIGHTS_NAME).write_bytes((path / LORA_WEIGHTS_NAME).read_bytes()[:300])
    return bad


def _no_weights(path, tmp_path):
    bad = tmp_path / "no-weights"
    bad.mkdir()
    (bad / LORA_CONFIG_NAME).write_bytes((path / LORA_CONFIG_NAME).read_bytes())
    return bad


def _bad_config(path, tmp_path):
    bad = tmp_path / "bad-config"
    bad.mkdir()
    (bad / LORA_CONFIG_NAME).write_text("{not json")
    (bad / LORA_WEIGHTS_NAME).write_bytes((path / LORA_WEIGHTS_NAME).read_bytes())
    return bad


def _wrong_rank(path, tmp_path):
    # Weights of a rank-4 adapter under a config that says rank 2: shapes do not fit.
    import json

    bad = tmp_path / "wrong-rank"
    bad.mkdir()
    config = json.loads((path / LORA_CONFIG_NAME).read_text())
    config["r"] = 2
    (bad / LORA_CONFIG_NAME).write_text(json.dumps(config))
    (bad / LORA_WEIGHTS_NAME).write_bytes((path / LORA_WEIGHTS_NAME).read_bytes())
    return bad


def _missing_tensors(path, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "missing-tensors"
    bad.mkdir()
    (bad / LORA_CONFIG_NAME).write_bytes((path / LORA_CONFIG_NAME).read_bytes())
    tensors = load_file(path / LORA_WEIGHTS_NAME)
    save_file(dict(list(tensors.items())[: len(tensors) // 2]), bad / LORA_WEIGHTS_NAME)
    return bad


@pytest.mark.parametrize(
    "corrupt, words",
    [
        (_truncated, "not a readable safetensors file"),
        (_no_weights, f"lacks {LORA_WEIGHTS_NAME}"),
        (_bad_config, "not a readable JSON adapter config"),
        (_wrong_rank, "do not fit"),
        (_missing_tensors, "lack"),
    ],
)
def test_a_bad_adapter_leaves_the_served_weights_alone(generator, adapters, tmp_path, corrupt, words):
    info = generator.load_adapter(adapters["a"])
    before = generator.generate([job(seeds=(3, 4))])[0]
    bad = corrupt(adapters["a"], tmp_path)
    with pytest.raises(ValueError, match=words) as caught:
        generator.load_adapter(bad)
    assert str(bad) in str(caught.value)
    assert generator.adapter == info
    after = generator.generate([job(seeds=(3, 4))])[0]
    assert after.adapter_version == info.version
    np.testing.assert_array_equal(after.images, before.images)
    generator.unload_adapter()
