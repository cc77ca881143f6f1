"""Distributed training end to end on a real local Ray cluster, with tiny real models."""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from orchestrator import checkpoint as ckpt
from orchestrator.config import load_config
from orchestrator.metrics import REQUIRED_KEYS, read_metrics
from orchestrator.run import train


def tiny_config(pipeline_dir, **overrides):
    """A seconds-per-epoch run on the tiny random pipeline: 8 samples, 3 DDIM steps."""
    base = {
        "seed": 3,
        "model": {"path": str(pipeline_dir), "lora": {"rank": 2, "alpha": 2.0}},
        "sampling": {"num_steps": 3, "batch_size": 4, "guidance_scale": 2.0},
        "reward": "jpeg_incompressibility",
        "train": {"algorithm": "ddpo_is", "epochs": 2, "samples_per_epoch": 8, "checkpoint_every": 1, "eval_every": 0,
                  "stat_min_count": 2, "stat_buffer_size": 4, "clip_range": 0.2, "timestep_fraction": 1.0},
        "learner": {"num_workers": 1, "micro_batch_size": 2, "gradient_accumulation_steps": 2, "learning_rate": 1.0e-2, "num_cpus_per_worker": 1},
        "pools": {"rollout": {"num_cpus": 1}, "reward": {"num_cpus": 0.5}, "reference": {"num_actors": 1, "num_cpus": 0.5}},
    }
    return load_config(base, [f"{k}={v}" for k, v in overrides.items()])


def final_lora(run_dir):
    latest = ckpt.latest_checkpoint(run_dir / "checkpoints")
    return load_file(str(latest / "lora" / "pytorch_lora_weights.safetensors"))


def test_run_writes_every_output(ray_cluster, tiny_pipeline_dir, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(tiny_pipeline_dir, **{"train.eval_every": 2, "train.eval_prompts": "toy-heldout"}), run, progress=False)
    metrics = read_metrics(run)
    assert [m["epoch"] for m in metrics] == [1, 2]
    for m in metrics:
        assert set(REQUIRED_KEYS) <= set(m)
        assert m["samples"] == 8 * m["epoch"] and m["policy_version"] == m["epoch"]
        assert m["kl/mean"] is not None and m["kl/mean"] >= 0  # reference pool present: KL logged
        # Sync mode is on-policy: the rollout actors sampled with exactly the learner's weights.
        assert m["policy/onpolicy_gap"] < 1e-4
    assert metrics[1]["kl/mean"] > 0  # measured while training: the policy has left the reference
    assert (run / "config.yaml").is_file() and load_config(run / "config.yaml") == tiny_config(tiny_pipeline_dir, **{"train.eval_every": 2, "train.eval_prompts": "toy-heldout"})
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "images" / "epoch_0000.png").is_file() and (run / "images" / "epoch_0002.png").is_file()
    latest = ckpt.latest_checkpoint(run / "checkpoints")
    assert latest.name == "epoch_0002" and (latest / "COMPLETE").is_file()
    assert json.loads((latest / "state.json").read_text())["samples_seen"] == 16
    assert not list((run / "checkpoints").glob(".tmp-*"))
    # The trained adapter loads through the public loader and differs from a fresh one.
    from actors.policy import DiffusionPolicy, resolve_lora_dir

    policy = DiffusionPolicy.from_pretrained(tiny_pipeline_dir, lora_path=resolve_lora_dir(run), device="cpu")
    assert policy.lora_config.r == 2


def test_resume_equals_an_uninterrupted_run(ray_cluster, tiny_pipeline_dir, tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    train(tiny_config(tiny_pipeline_dir, **{"train.epochs": 4}), full, progress=False)
    train(tiny_config(tiny_pipeline_dir, **{"train.epochs": 2}), split, progress=False)
    halfway = final_lora(split)
    train(tiny_config(tiny_pipeline_dir, **{"train.epochs": 4}), split, resume=True, progress=False)
    a, b = read_metrics(full), read_metrics(split)
    assert [m["epoch"] for m in b] == [1, 2, 3, 4]
    for key in ("samples", "policy_version", "prompts/digest"):
        assert [m[key] for m in a] == [m[key] for m in b], key
    np.testing.assert_allclose([m["reward/mean"] for m in a], [m["reward/mean"] for m in b], rtol=1e-4)
    wa, wb = final_lora(full), final_lora(split)
    assert wa.keys() == wb.keys()
    for name in wa:
        np.testing.assert_allclose(wa[name], wb[name], rtol=1e-4, atol=1e-6, err_msg=name)
    # Training went on after the resume, so the equality above is not two untouched copies.
    assert max(float(np.abs(wb[n] - halfway[n]).max()) for n in wb) > 1e-4


def test_two_learners_take_the_same_step_as_one(ray_cluster, tiny_pipeline_dir, tmp_path):
    # One optimizer step over the whole epoch (global batch 8 = workers x micro x accumulation),
    # all timesteps trained: sharding and gradient averaging must not change the update, and
    # neither must stacking all 3 denoising steps of a trajectory into one pass.
    common = {"train.epochs": 1, "train.timestep_fraction": 1.0, "learner.micro_batch_size": 2, "learner.zero_stage": 2}
    one = tiny_config(tiny_pipeline_dir, **common, **{"learner.num_workers": 1, "learner.gradient_accumulation_steps": 4})
    two = tiny_config(tiny_pipeline_dir, **common, **{"learner.num_workers": 2, "learner.gradient_accumulation_steps": 2})
    stacked = tiny_config(tiny_pipeline_dir, **common, **{"learner.num_workers": 2, "learner.gradient_accumulation_steps": 2, "learner.timesteps_per_pass": 3})
    train(one, tmp_path / "one", progress=False)
    train(two, tmp_path / "two", progress=False)
    train(stacked, tmp_path / "stacked", progress=False)
    w1, w2, w3 = final_lora(tmp_path / "one"), final_lora(tmp_path / "two"), final_lora(tmp_path / "stacked")
    moved = 0.0
    for name in w1:
        np.testing.assert_allclose(w1[name], w2[name], rtol=1e-4, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(w1[name], w3[name], rtol=1e-4, atol=1e-6, err_msg=name)
        moved = max(moved, float(np.abs(w1[name]).max()))
    assert moved > 0


def test_cosine_schedule_reaches_its_floor_at_the_last_epoch(ray_cluster, tiny_pipeline_dir, tmp_path):
    # Floor 0: the last epoch trains at rate 0, so the optimizer (AdamW: weight decay is
    # scaled by the rate too) leaves the weights exactly where the previous epoch put them.
    run = tmp_path / "run"
    cfg = tiny_config(tiny_pipeline_dir, **{"train.epochs": 3, "learner.lr_schedule": "cosine", "learner.lr_final_fraction": 0.0})
    train(cfg, run, progress=False)
    assert [m["optim/lr"] for m in read_metrics(run)] == pytest.approx([1e-2, 5e-3, 0.0], abs=1e-12)
    second = load_file(str(run / "checkpoints" / "epoch_0002" / "lora" / "pytorch_lora_weights.safetensors"))
    third = final_lora(run)
    first_moves = max(float(np.abs(second[n]).max()) for n in second)
    assert first_moves > 0
    for name in third:
        np.testing.assert_array_equal(third[name], second[name], err_msg=name)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"train.algorithm": "ppo"}, "train.algorithm"),
        ({"reward": "aesthetics"}, "unknown reward 'aesthetics'"),
        ({"train.samples_per_epoch": 7}, "must be divisible by learner.num_workers * learner.micro_batch_size"),
        ({"pools.rollout.num_cpus": 64}, "pool 'rollout' does not fit"),
        ({"learner.num_gpus_per_worker": 1}, "pool 'learner' does not fit"),
    ],
)
def test_bad_configs_fail_fast_with_a_clear_error(ray_cluster, tiny_pipeline_dir, tmp_path, overrides, message):
    import time

    started = time.perf_counter()
    with pytest.raises(ValueError, match=message.replace("*", r"\*").replace("(", r"\(")):
        train(tiny_config(tiny_pipeline_dir, **overrides), tmp_path / "bad", progress=False)
    assert time.perf_counter() - started < 30  # an error, not a hang on an unschedulable actor
    assert not (tmp_path / "bad" / "checkpoints").exists()


def test_refuses_to_overwrite_a_run_and_resume_needs_a_checkpoint(ray_cluster, tiny_pipeline_dir, tmp_path):
    with pytest.raises(ValueError, match="no complete checkpoint"):
        train(tiny_config(tiny_pipeline_dir), tmp_path / "empty", resume=True, progress=False)
    run = tmp_path / "run"
    train(tiny_config(tiny_pipeline_dir, **{"train.epochs": 1}), run, progress=False)
    with pytest.raises(ValueError, match="already holds a run"):
        train(tiny_config(tiny_pipeline_dir, **{"train.epochs": 1}), run, progress=False)
    with pytest.raises(ValueError, match=r"differs from the run's in \['train.clip_range'\]"):
        train(tiny_config(tiny_pipeline_dir, **{"train.epochs": 2, "train.clip_range": 0.3}), run, resume=True, progress=False)


def test_dpok_larger_beta_keeps_the_policy_closer_to_the_reference(ray_cluster, tiny_pipeline_dir, tmp_path):
    # Same seed, same samples in epoch 1; only beta differs. The KL penalty must hold the
    # policy nearer the frozen reference, so the KL measured while training is lower.
    common = {"train.algorithm": "dpok", "train.epochs": 3, "learner.learning_rate": 3.0e-2, "train.clip_range": 10.0}
    small = tiny_config(tiny_pipeline_dir, **common, **{"train.beta": 0.0})
    large = tiny_config(tiny_pipeline_dir, **common, **{"train.beta": 1000.0})
    train(small, tmp_path / "small", progress=False)
    train(large, tmp_path / "large", progress=False)
    kl_small = [m["kl/mean"] for m in read_metrics(tmp_path / "small")]
    kl_large = [m["kl/mean"] for m in read_metrics(tmp_path / "large")]
    assert all(k is not None and k >= 0 for k in kl_small + kl_large)
    assert kl_large[-1] < kl_small[-1]
    assert sum(kl_large) < sum(kl_small)


def test_group_sampling_repeats_each_prompt_and_normalises_within_groups(ray_cluster, tiny_pipeline_dir, tmp_path):
    from orchestrator.loop import epoch_prompts

    prompts, seeds = epoch_prompts([f"p{i}" for i in range(10)], seed=1, epoch=2, count=8, per_prompt=4)
    assert prompts[:4] == [prompts[0]] * 4 and prompts[4:] == [prompts[4]] * 4 and prompts[0] != prompts[4]
    assert len(set(seeds)) == 8
    run = tmp_path / "group"
    train(tiny_config(tiny_pipeline_dir, **{"train.samples_per_prompt": 4, "train.advantage": "group", "train.epochs": 1}), run, progress=False)
    (m,) = read_metrics(run)
    assert 0 <= m["advantages/zero_spread_groups"] <= 2


def test_sdxl_trains_end_to_end_with_pooled_embeddings_shipped_to_learner_and_reference(ray_cluster, family_pipeline_dirs, tmp_path):
    sdxl = family_pipeline_dirs["sdxl"]
    run = tmp_path / "run"
    train(tiny_config(sdxl, **{"train.epochs": 1, "train.algorithm": "dpok"}), run, progress=False)
    (metrics,) = read_metrics(run)
    # The UNet-only learner re-scored the rollout's SDXL trajectories exactly, and the reference pool's KL is real.
    assert metrics["policy/onpolicy_gap"] < 1e-4
    assert np.isfinite(metrics["kl/mean"]) and metrics["kl/mean"] > 0
    from actors.policy import DiffusionPolicy, resolve_lora_dir

    trained = final_lora(run)
    assert trained and all(np.isfinite(v).all() for v in trained.values())
    policy = DiffusionPolicy.from_pretrained(sdxl, lora_path=resolve_lora_dir(run), device="cpu")
    _, images = policy.sample(["a red circle on the left"], seeds=[0], num_steps=2)
    assert images.shape == (1, 32, 32, 3)
