"""Every DeepSpeed ZeRO stage, with LoRA and with full fine-tuning, through the whole loop on 2 learners;
and a fully fine-tuned run evaluated and served from its checkpoint."""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from orchestrator.metrics import read_metrics
from orchestrator.run import train
from orchestrator.rundir import RunDir
from tests.helpers.cli import rayalign
from tests.helpers.runs import tiny_config


def trained_weights(run) -> dict[str, np.ndarray]:
    checkpoint = RunDir(run).latest_checkpoint()
    folder = checkpoint.lora if checkpoint.lora.exists() else checkpoint.unet
    name = "pytorch_lora_weights.safetensors" if folder == checkpoint.lora else "diffusion_pytorch_model.safetensors"
    return load_file(str(folder / name))


def zero_run(stage: int, finetune: str) -> dict:
    return {"train.epochs": 2, "learner.num_workers": 2, "learner.zero_stage": stage, "model.finetune": finetune}


@pytest.fixture(scope="module")
def full_run(ray_cluster, tiny_pipeline_dir, tmp_path_factory):
    """A fully fine-tuned run on 2 learners under ZeRO-3 (the UNet gathered from its partitions for every
    sync and checkpoint), at a learning rate that changes the images visibly."""
    run = tmp_path_factory.mktemp("full") / "run"
    train(tiny_config(tiny_pipeline_dir, **zero_run(3, "full"), **{"learner.learning_rate": 1e-2}), run, progress=False)
    return run


# Every stage once at least, full fine-tuning (the largest optimizer state) at the stages that partition it.
# ZeRO-2 with LoRA on 2 learners is the default of the presets and runs through the loop in
# test_train.py (two learners take the same step as one) and test_cluster.py (the 3-node run).
@pytest.mark.parametrize("stage, finetune", [(0, "lora"), (3, "lora"), (1, "full"), (2, "full"), (3, "full")])
def test_every_zero_stage_trains_through_the_loop(request, ray_cluster, tiny_pipeline_dir, tmp_path, stage, finetune):
    if (stage, finetune) == (3, "full"):
        run = request.getfixturevalue("full_run")  # the eval and serve tests below use this run too
    else:
        run = tmp_path / "run"
        train(tiny_config(tiny_pipeline_dir, **zero_run(stage, finetune), **{"learner.learning_rate": 1e-3}), run, progress=False)
    metrics = read_metrics(run)
    assert [m["epoch"] for m in metrics] == [1, 2]
    # The rollout actors sampled with exactly the weights the (partitioned) learners held.
    assert all(m["policy/onpolicy_gap"] < 1e-4 for m in metrics), [m["policy/onpolicy_gap"] for m in metrics]
    epoch_1 = RunDir(run).checkpoint(1)
    assert epoch_1.is_complete() and (epoch_1.lora if finetune == "lora" else epoch_1.unet).is_dir()
    weights = trained_weights(run)
    assert weights and all(np.isfinite(w).all() for w in weights.values())


def test_a_fully_fine_tuned_run_is_evaluated_from_its_checkpoint(full_run, tiny_pipeline_dir, tmp_path):
    common = ("--prompts", "toy-heldout", "--reward", "toy_fidelity", "--num-per-prompt", 1, "--steps", 3, "--seed", 2)
    trained = rayalign("eval", "--model", full_run, *common, "--output", tmp_path / "trained.json")
    assert trained.returncode == 0, trained.stderr
    base = rayalign("eval", "--model", tiny_pipeline_dir, *common, "--output", tmp_path / "base.json")
    assert base.returncode == 0, base.stderr
    assert json.loads((tmp_path / "trained.json").read_text())["model"] == str(full_run)
    from PIL import Image

    grid_trained = np.asarray(Image.open(tmp_path / "trained.png"), dtype=np.int16)
    grid_base = np.asarray(Image.open(tmp_path / "base.png"), dtype=np.int16)
    assert np.abs(grid_trained - grid_base).mean() > 0.5, "the trained UNet did not change the images"
    adapter = rayalign("eval", "--model", full_run, "--lora", full_run, *common, "--output", tmp_path / "x.json")
    assert adapter.returncode == 2 and "fine-tuned the whole UNet, it has no LoRA adapter: give the run as --model" in adapter.stderr


def test_a_fully_fine_tuned_run_is_served_from_its_checkpoint(full_run, tiny_pipeline_dir):
    from ray import serve

    from actors.diffusion.generator import ImageGenerator, ImageJob
    from actors.diffusion.images import encode_png
    from jobs.serve.app import deploy
    from orchestrator.config import ServeConfig, ServeLimitsConfig, ServeScalingConfig
    from tests.integration.test_serve import Server, free_port

    port = free_port()
    config = ServeConfig(
        model=str(full_run),
        device="cpu",
        limits=ServeLimitsConfig(default_steps=3),
        scaling=ServeScalingConfig(num_cpus_per_replica=1.0, max_ongoing_requests=16),
    )
    try:
        deploy(config, host="127.0.0.1", port=port, lora=None)
        server = Server(f"http://127.0.0.1:{port}", config)
        status, answer = server.json("POST", "/v1/images/generations", {"prompt": "a red circle on the left", "seed": 5}, headers=None)
        assert status == 200, answer
    finally:
        serve.shutdown()
    checkpoint = RunDir(full_run).latest_checkpoint()
    local = ImageGenerator.from_pretrained(tiny_pipeline_dir, device="cpu", unet_path=checkpoint.unet.uri, batch_size=16)
    (expected,) = local.generate([ImageJob(prompt="a red circle on the left", seeds=(5,), num_steps=3, guidance_scale=4.5, eta=1.0)])
    import base64

    assert base64.b64decode(answer["data"][0]["b64_json"]) == encode_png(expected.images[0])  # the served UNet is the trained one
