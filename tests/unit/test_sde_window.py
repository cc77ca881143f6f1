"""An SDE window (Flow-GRPO-Fast): the flow policy samples with the SDE on a range of steps and with the ODE elsewhere.

On a tiny random SD3 pipeline: the window's steps are all that is recorded and they recompute
exactly; outside it the sampler is diffusers' own deterministic ODE sampler (checked against
``StableDiffusion3Pipeline`` from the latents at both ends of the window); a window over every
step is the plain sampler; bad windows are refused by the policy, the config, the driver and
the rollout actor of a DDIM model.
"""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from actors.diffusion import flow
from actors.diffusion.flow_policy import FlowPolicy
from actors.diffusion.trajectory import Trajectories
from actors.evaluate import evaluate, sample_seed
from actors.rewards.registry import build_reward
from actors.workers.rollout import RolloutWorker
from orchestrator.config import Config, ModelConfig, SamplingConfig, load_config
from orchestrator.run import check_names

PROMPTS = ["a red circle on the left", "a blue square at the top"]
T5_TOKENS = 16
"""Short T5 sequences keep the tiny transformer cheap; the pipeline's default is 256."""


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def policy(sd3_dir) -> FlowPolicy:
    """A LoRA policy whose adapter was moved off its init (B = 0), so it really changes the model."""
    policy = FlowPolicy.from_pretrained(sd3_dir, device="cpu", max_sequence_length=T5_TOKENS, lora_rank=4, lora_alpha=8.0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    return policy


def test_only_the_window_is_recorded_and_it_recomputes_exactly(policy):
    trajectories, images = policy.sample(PROMPTS, seeds=[1, 2], num_steps=4, guidance_scale=4.5, sde_window=(1, 3))
    sigmas = flow.flow_sigmas(4, shift=policy.shift).numpy()
    assert (trajectories.first_step, trajectories.num_steps, trajectories.num_inference_steps) == (1, 2, 4)
    assert trajectories.latents.shape == (2, 3, 16, 8, 8) and trajectories.log_probs.shape == (2, 2)
    np.testing.assert_array_equal(trajectories.timesteps, sigmas[1:3])
    np.testing.assert_array_equal(trajectories.prev_timesteps, sigmas[2:4])
    assert images.shape == (2, 32, 32, 3)
    # replay, the reference pool and the learner read only these steps: each must score as at sampling (ratio 1)
    for batch_size in (2, 1):
        recomputed = policy.trajectory_log_probs(trajectories, batch_size=batch_size)
        np.testing.assert_allclose(np.exp(recomputed - trajectories.log_probs), 1.0, atol=1e-4)
    # a sub-batch and a concatenation keep the window; a different window does not concatenate
    picked = trajectories.select([1])
    assert picked.first_step == 1 and Trajectories.concatenate([picked, trajectories]).first_step == 1
    other, _ = policy.sample(PROMPTS[:1], seeds=[3], num_steps=4, guidance_scale=4.5, sde_window=(0, 2), decode=False)
    with pytest.raises(ValueError, match="cannot be concatenated"):
        Trajectories.concatenate([trajectories, other])


def test_outside_the_window_the_sampler_is_diffusers_ode_from_the_window_s_ends(sd3_dir):
    # The base model (no adapter), so diffusers' pipeline runs the same network. Window [1, 3) of 4
    # steps: step 0 and step 3 are Euler ODE steps. The pipeline's callback after step 0 sees the
    # latent the window starts from; after step 2 it is handed the window's last latent, and the
    # pipeline's remaining ODE step must end where ours did (compared after decoding).
    base = FlowPolicy.from_pretrained(sd3_dir, device="cpu", max_sequence_length=T5_TOKENS, finetune="full")
    seeds = [3, 4]
    trajectories, images = base.sample(PROMPTS, seeds=seeds, num_steps=4, eta=0.7, guidance_scale=3.0, sde_window=(1, 3))
    initial = torch.stack([torch.randn(16, 8, 8, generator=torch.Generator().manual_seed(s)) for s in seeds])
    seen = {}

    def at_step_end(pipe, i, t, tensors):
        seen[i] = tensors["latents"].clone()
        return {"latents": torch.from_numpy(trajectories.latents[:, -1])} if i == 2 else {}

    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_dir)
    pipe.set_progress_bar_config(disable=True)
    pixels = (
        pipe(
            PROMPTS,
            num_inference_steps=4,
            guidance_scale=3.0,
            latents=initial,
            max_sequence_length=T5_TOKENS,
            output_type="np",
            callback_on_step_end=at_step_end,
        ).images
        * 255
    )
    torch.testing.assert_close(torch.from_numpy(trajectories.latents[:, 0]), seen[0].float(), rtol=0, atol=1e-4)
    assert not torch.allclose(torch.from_numpy(trajectories.latents[:, -1]), seen[2].float(), atol=1e-2)  # the window's SDE noise acted
    assert np.abs(images.astype(np.float32) - pixels).max() <= 1.0


def test_a_window_over_every_step_is_the_plain_sampler_and_windows_share_the_seed_s_noise(policy):
    settings = dict(seeds=[5, 6], num_steps=3, guidance_scale=4.5)
    plain, plain_images = policy.sample(PROMPTS, **settings)
    whole, whole_images = policy.sample(PROMPTS, **settings, sde_window=(0, 3))
    for name in ("latents", "log_probs", "timesteps", "prev_timesteps"):
        np.testing.assert_array_equal(getattr(whole, name), getattr(plain, name))
    np.testing.assert_array_equal(whole_images, plain_images)
    assert whole.first_step == plain.first_step == 0
    # step i's noise does not depend on the window: an early window is the plain trajectory's beginning
    early, _ = policy.sample(PROMPTS, **settings, sde_window=(0, 2), decode=False)
    np.testing.assert_array_equal(early.latents, plain.latents[:, :3])
    np.testing.assert_array_equal(early.log_probs, plain.log_probs[:, :2])


@pytest.mark.parametrize("window", [(2, 2), (3, 1), (0, 5), (-1, 2), (0, 1, 2)])
def test_the_policy_refuses_a_window_outside_the_steps(policy, window):
    with pytest.raises(ValueError, match=r"window.* must (satisfy 0 <= start < stop <= num_steps = 4|be a \(start, stop\) pair)"):
        policy.sample(PROMPTS[:1], seeds=[0], num_steps=4, sde_window=window)


@pytest.mark.parametrize("window", [[2, 2], [3, 1], [0, 5], [-1, 2]])
def test_the_config_refuses_a_window_outside_the_steps(window):
    with pytest.raises(
        ValueError, match=rf"sde_window must be \[start, stop\] with 0 <= start < stop <= num_steps = 4.*got \[{window[0]}, "
    ):
        SamplingConfig(num_steps=4, sde_window=window)
    with pytest.raises(ValueError, match="sampling.sde_window"):
        load_config({"sampling": {"num_steps": 4, "sde_window": window}})


def test_the_window_sets_the_steps_the_learner_trains_among():
    cfg = load_config({"sampling": {"num_steps": 10, "sde_window": [0, 4]}, "train": {"timestep_fraction": 0.5}})
    assert cfg.sampling.recorded_steps == 4 and cfg.train.trained_steps(cfg.sampling.recorded_steps) == 2
    assert SamplingConfig(num_steps=10).recorded_steps == 10
    # learner.timesteps_per_pass must divide the window's trained steps, not those of all num_steps
    with pytest.raises(ValueError, match="learner.timesteps_per_pass must divide the 2 denoising steps.*sde_window length"):
        load_config(
            {"sampling": {"num_steps": 10, "sde_window": [0, 4]}, "train": {"timestep_fraction": 0.5}, "learner": {"timesteps_per_pass": 3}}
        )


def test_a_ddim_model_refuses_a_window_at_the_driver_and_in_the_rollout_actor(tiny_pipeline_dir):
    with pytest.raises(ValueError, match="sde_window is set, but model.path is the embedded toy UNet model.*set sampling.sde_window: null"):
        check_names(Config(sampling=SamplingConfig(num_steps=3, sde_window=(0, 1))))
    cfg = load_config({"model": {"path": str(tiny_pipeline_dir)}, "sampling": {"num_steps": 3, "sde_window": [0, 1]}})
    with pytest.raises(ValueError, match="a sd model sampled with DDIM; the window .* is for flow-matching models \\(sd3, flux\\)"):
        check_names(cfg)
    with pytest.raises(
        ValueError, match="holds a sd model, whose sampler \\(DiffusionPolicy\\) records every step.*set sampling.sde_window: null"
    ):
        RolloutWorker(ModelConfig(path=str(tiny_pipeline_dir), device="cpu"), cfg.sampling)


def test_a_flow_model_accepts_a_window_and_its_rollout_actor_samples_it(sd3_dir):
    cfg = load_config({"model": {"path": str(sd3_dir), "device": "cpu"}, "sampling": {"num_steps": 3, "sde_window": [0, 2], "eta": 0.7}})
    check_names(cfg)
    worker = RolloutWorker(cfg.model, cfg.sampling)
    trajectories, images, _ = worker.sample(PROMPTS, seeds=[1, 2])
    assert (trajectories.first_step, trajectories.num_steps, trajectories.num_inference_steps) == (0, 2, 3)
    assert images.shape[0] == 2


def test_eval_samples_with_the_window_it_is_given_and_a_ddim_model_refuses_one(policy, tiny_pipeline_dir):
    from actors.diffusion.policy import DiffusionPolicy

    reward = build_reward("jpeg_incompressibility")
    settings = {"num_per_prompt": 1, "seed": 0, "num_steps": 4, "eta": 0.7, "guidance_scale": 1.0, "batch_size": 2, "progress": False}
    windowed = evaluate(policy, PROMPTS, reward, sde_window=(0, 2), **settings)
    plain = evaluate(policy, PROMPTS, reward, **settings)
    seeds = [sample_seed(0, p, 0) for p in PROMPTS]
    _, sampled = policy.sample(PROMPTS, seeds=seeds, num_steps=4, eta=0.7, guidance_scale=1.0, sde_window=(0, 2))
    np.testing.assert_array_equal(windowed.images, sampled)  # the policy's windowed sampler, image for image
    assert not np.array_equal(windowed.images, plain.images)  # the ODE on steps 2-3 makes other images from the same noise
    ddim = DiffusionPolicy.from_pretrained(tiny_pipeline_dir, device="cpu")
    with pytest.raises(ValueError, match="samples every step with DDIM; windows are for flow-matching models"):
        evaluate(ddim, PROMPTS, reward, sde_window=(0, 2), **settings)
