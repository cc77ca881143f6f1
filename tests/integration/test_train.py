"""Distributed training end to end on a real local Ray cluster, with tiny real models."""

import numpy as np
import pytest
from safetensors.numpy import load_file

from jobs.bench.faults import kill_driver_then_resume
from orchestrator.config import load_config
from orchestrator.metrics import REQUIRED_KEYS, read_metrics
from orchestrator.run import train
from orchestrator.rundir import RunDir
from tests.helpers.runs import assert_same_training, final_lora, tiny_config

# A cosine schedule with floor 0: the last epoch trains at rate 0 (see test_cosine_schedule_...).
WRITTEN = {"train.eval_every": 2, "train.eval_prompts": "toy-heldout", "learner.lr_schedule": "cosine", "learner.lr_final_fraction": 0.0}


@pytest.fixture(scope="module")
def written_run(ray_cluster, tiny_pipeline_dir, tmp_path_factory):
    """A 2-epoch run with evaluation, the reference pool and checkpoints: what most tests here read."""
    run = tmp_path_factory.mktemp("written") / "run"
    # --resume with nothing to resume starts the run (a re-submitted job's fixed entrypoint).
    train(tiny_config(tiny_pipeline_dir, **WRITTEN), run, resume=True, progress=False)
    return run


def test_run_writes_every_output(written_run, tiny_pipeline_dir):
    run = written_run
    metrics = read_metrics(run)
    assert [m["epoch"] for m in metrics] == [1, 2]
    for m in metrics:
        assert set(REQUIRED_KEYS) <= set(m)
        assert m["samples"] == 8 * m["epoch"] and m["policy_version"] == m["epoch"]
        assert m["kl/mean"] is not None and m["kl/mean"] >= 0  # reference pool present: KL logged
        # Sync mode is on-policy: the rollout actors sampled with exactly the learner's weights.
        assert m["policy/onpolicy_gap"] < 1e-4
    assert metrics[1]["kl/mean"] > 0  # measured while training: the policy has left the reference
    # Where the time before the first epoch went, in the first epoch's metrics only.
    phases = {k: v for k, v in metrics[0].items() if k.startswith("time/startup/")}
    assert {"connect_s", "learner_group_s", "learner_imports_s", "learner_init_s", "pools_wait_s"} <= {k.split("/")[-1] for k in phases}
    assert all(v >= 0 for v in phases.values()) and sum(phases.values()) <= metrics[0]["time/startup_s"] + 0.5
    assert not any(k.startswith("time/startup") for k in metrics[1])
    assert (run / "config.yaml").is_file() and load_config(run / "config.yaml") == tiny_config(tiny_pipeline_dir, **WRITTEN)
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "images" / "epoch_0000.png").is_file() and (run / "images" / "epoch_0002.png").is_file()
    latest = RunDir(run).latest_checkpoint()
    assert latest.name == "epoch_0002" and latest.is_complete()
    assert latest.read_state()["samples_seen"] == 16
    assert not list((run / "checkpoints").glob(".tmp-*"))
    # The trained adapter loads through the public loader and differs from a fresh one.
    from actors.diffusion.policy import DiffusionPolicy
    from orchestrator.rundir import resolve_lora_dir

    policy = DiffusionPolicy.from_pretrained(tiny_pipeline_dir, lora_path=resolve_lora_dir(run), device="cpu")
    assert policy.lora_config.r == 2


def test_a_driver_killed_then_resumed_equals_an_uninterrupted_run(ray_cluster, tiny_pipeline_dir, tmp_path):
    # `rayalign train` in its own process, SIGKILLed once checkpoint 1 is complete (its pools and
    # learners go with it), then the same command with --resume: the 3 epochs equal one run's.
    cfg = tiny_config(tiny_pipeline_dir, **{"train.epochs": 3})
    full, split = tmp_path / "full", tmp_path / "split"
    train(cfg, full, progress=False)
    kill_driver_then_resume(cfg, split, address=ray_cluster.cluster.address)
    a, b = read_metrics(full), read_metrics(split)
    assert [m["epoch"] for m in b] == [1, 2, 3]
    log = split.with_name("split.log").read_text()
    assert log.count("resuming from") == 1 and "(epoch 1 of 3)" in log, log[-3000:]
    assert_same_training(a, b, final_lora(full), final_lora(split))


def test_two_learners_take_the_same_step_as_one(ray_cluster, tiny_pipeline_dir, tmp_path):
    # One optimizer step over the whole epoch (global batch 8 = workers x micro x accumulation),
    # all timesteps trained: sharding and gradient averaging must not change the update, and
    # neither must stacking all 3 denoising steps of a trajectory into one pass.
    common = {"train.epochs": 1, "train.timestep_fraction": 1.0, "learner.micro_batch_size": 2, "learner.zero_stage": 2}
    # One learner, one step per pass; two learners, all 3 steps of a trajectory stacked in one pass.
    one = tiny_config(tiny_pipeline_dir, **common, **{"learner.num_workers": 1, "learner.gradient_accumulation_steps": 4})
    two = tiny_config(
        tiny_pipeline_dir, **common, **{"learner.num_workers": 2, "learner.gradient_accumulation_steps": 2, "learner.timesteps_per_pass": 3}
    )
    train(one, tmp_path / "one", progress=False)
    train(two, tmp_path / "two", progress=False)
    w1, w2 = final_lora(tmp_path / "one"), final_lora(tmp_path / "two")
    moved = 0.0
    for name in w1:
        np.testing.assert_allclose(w1[name], w2[name], rtol=1e-4, atol=1e-6, err_msg=name)
        moved = max(moved, float(np.abs(w1[name]).max()))
    assert moved > 0


def test_cosine_schedule_reaches_its_floor_at_the_last_epoch(written_run):
    # Floor 0 over 2 epochs: the last epoch trains at rate 0, so the optimizer (AdamW: weight decay
    # is scaled by the rate too) leaves the weights exactly where the previous epoch put them.
    assert [m["optim/lr"] for m in read_metrics(written_run)] == pytest.approx([1e-2, 0.0], abs=1e-12)
    first = load_file(str(written_run / "checkpoints" / "epoch_0001" / "lora" / "pytorch_lora_weights.safetensors"))
    assert max(float(np.abs(first[n]).max()) for n in first) > 0
    last = final_lora(written_run)
    for name in last:
        np.testing.assert_array_equal(last[name], first[name], err_msg=name)


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


def test_refuses_to_overwrite_a_run_and_resume_needs_a_checkpoint(written_run, tiny_pipeline_dir, tmp_path):
    with pytest.raises(ValueError, match="no complete checkpoint .* to resume, and no --preset or --config"):
        train(None, tmp_path / "empty", resume=True, progress=False)
    before = sorted(p.name for p in (written_run / "checkpoints").iterdir())
    with pytest.raises(ValueError, match="already holds a run"):
        train(tiny_config(tiny_pipeline_dir, **{"train.epochs": 1}), written_run, progress=False)
    with pytest.raises(ValueError, match=r"differs from the run's in \['train.clip_range'\]"):
        train(
            tiny_config(tiny_pipeline_dir, **WRITTEN, **{"train.epochs": 3, "train.clip_range": 0.3}),
            written_run,
            resume=True,
            progress=False,
        )
    assert sorted(p.name for p in (written_run / "checkpoints").iterdir()) == before  # refused before writing anything


def test_dpok_larger_beta_keeps_the_policy_closer_to_the_reference(ray_cluster, tiny_pipeline_dir, tmp_path):
    # Same seed, same samples in epoch 1; only beta differs. The KL penalty must hold the
    # policy nearer the frozen reference, so the KL measured while training is lower.
    common = {"train.algorithm": "dpok", "train.epochs": 2, "learner.learning_rate": 3.0e-2, "train.clip_range": 10.0}
    small = tiny_config(tiny_pipeline_dir, **common, **{"train.beta": 0.0})
    large = tiny_config(tiny_pipeline_dir, **common, **{"train.beta": 1000.0})
    train(small, tmp_path / "small", progress=False)
    train(large, tmp_path / "large", progress=False)
    kl_small = [m["kl/mean"] for m in read_metrics(tmp_path / "small")]
    kl_large = [m["kl/mean"] for m in read_metrics(tmp_path / "large")]
    assert all(k is not None and k >= 0 for k in kl_small + kl_large)
    assert kl_large[-1] < kl_small[-1]
    assert sum(kl_large) < sum(kl_small)


def test_sdxl_trains_end_to_end_with_pooled_embeddings_and_group_advantages(ray_cluster, family_pipeline_dirs, tmp_path):
    # Also the group advantages (GRPO-style) through the loop: 2 prompts x 4 samples, normalised within each group.
    sdxl = family_pipeline_dirs["sdxl"]
    run = tmp_path / "run"
    group = {"train.samples_per_prompt": 4, "train.advantage": "group"}
    train(tiny_config(sdxl, **{"train.epochs": 1, "train.algorithm": "dpok", **group}), run, progress=False)
    (metrics,) = read_metrics(run)
    assert 0 <= metrics["advantages/zero_spread_groups"] <= 2
    # The UNet-only learner re-scored the rollout's SDXL trajectories exactly, and the reference pool's KL is real.
    assert metrics["policy/onpolicy_gap"] < 1e-4
    assert np.isfinite(metrics["kl/mean"]) and metrics["kl/mean"] > 0
    from actors.diffusion.policy import DiffusionPolicy
    from orchestrator.rundir import resolve_lora_dir

    trained = final_lora(run)
    assert trained and all(np.isfinite(v).all() for v in trained.values())
    policy = DiffusionPolicy.from_pretrained(sdxl, lora_path=resolve_lora_dir(run), device="cpu")
    _, images = policy.sample(["a red circle on the left"], seeds=[0], num_steps=2)
    assert images.shape == (1, 32, 32, 3)
