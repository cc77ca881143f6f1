"""Short real training runs on tiny pipelines, shared by the integration tests."""

import numpy as np
from safetensors.numpy import load_file

from orchestrator.config import load_config
from orchestrator.rundir import RunDir


def tiny_config(pipeline_dir, **overrides):
    """A seconds-per-epoch run on the tiny random pipeline: 8 samples, 3 DDIM steps."""
    base = {
        "seed": 3,
        "model": {"path": str(pipeline_dir), "lora": {"rank": 2, "alpha": 2.0}},
        "sampling": {"num_steps": 3, "batch_size": 4, "guidance_scale": 2.0},
        "reward": "jpeg_incompressibility",
        "train": {
            "algorithm": "ddpo_is",
            "epochs": 2,
            "samples_per_epoch": 8,
            "checkpoint_every": 1,
            "eval_every": 0,
            "stat_min_count": 2,
            "stat_buffer_size": 4,
            "clip_range": 0.2,
            "timestep_fraction": 1.0,
        },
        "learner": {
            "num_workers": 1,
            "micro_batch_size": 2,
            "gradient_accumulation_steps": 2,
            "learning_rate": 1.0e-2,
            "num_cpus_per_worker": 1,
        },
        "pools": {"rollout": {"num_cpus": 1}, "reward": {"num_cpus": 0.5}, "reference": {"num_actors": 1, "num_cpus": 0.5}},
    }
    return load_config(base, [f"{k}={v}" for k, v in overrides.items()])


def final_lora(run_dir):
    latest = RunDir(run_dir).latest_checkpoint()
    return load_file(str(latest.lora / "pytorch_lora_weights.safetensors"))


def assert_same_training(a: list[dict], b: list[dict], wa: dict, wb: dict) -> None:
    """Two runs' metrics rows and final trainable weights: the same samples, versions and prompts
    every epoch, rewards and weights equal within float tolerance."""
    for key in ("samples", "policy_version", "prompts/digest"):
        assert [m[key] for m in a] == [m[key] for m in b], key
    np.testing.assert_allclose([m["reward/mean"] for m in a], [m["reward/mean"] for m in b], rtol=1e-4)
    assert wa.keys() == wb.keys()
    for name in wa:
        np.testing.assert_allclose(wa[name], wb[name], rtol=1e-4, atol=1e-6, err_msg=name)
