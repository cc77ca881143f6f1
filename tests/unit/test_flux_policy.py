"""The FLUX policy on a tiny random FLUX.1-dev-format pipeline saved to disk.

What is particular to FLUX, checked against diffusers' own ``FluxPipeline`` where it defines the
behaviour (prompt encoding, the sigma schedule and its resolution-dependent shift, packing, the
distilled guidance input, the ODE sampler the SDE reduces to, LoRA targets).
What every flow-matching policy must do alike (recomputed log-probs equal the recorded ones, a
training step moves them, LoRA files diffusers reads) is in test_flow_matching_policies.py.
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from actors.diffusion.flux_policy import (
    FluxPolicy,
    check_conditioning,
    check_latent_channels,
    flux_sigmas,
    pack_latents,
    unpack_latents,
)
from actors.toy.flux import build_random_flux_pipeline
from tests.helpers.flow import PROMPTS, T5_TOKENS, perturb, step_inputs

SIZE = 32
"""The tiny pipeline's images are 32 x 32 pixels: 8 x 8 latents, 16 packed tokens."""


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _load(path, **kwargs) -> FluxPolicy:
    kwargs = {"device": "cpu", "max_sequence_length": T5_TOKENS, "lora_rank": 4, "lora_alpha": 8.0, **kwargs}
    return FluxPolicy.from_pretrained(path, **kwargs)


@pytest.fixture(scope="module")
def rollout(flux_dir):
    policy = _load(flux_dir)
    perturb(policy.trainable_parameters())
    return policy


def _pipeline(path) -> FluxPipeline:
    pipe = FluxPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------- the directory


def test_another_family_is_refused_by_the_flux_policy(tiny_pipeline_dir):
    with pytest.raises(ValueError, match="holds a sd pipeline: load it with DiffusionPolicy"):
        FluxPolicy.from_pretrained(tiny_pipeline_dir, device="cpu")


def test_too_long_captions_are_refused(flux_dir):
    with pytest.raises(ValueError, match="max_sequence_length must be between 1 and 512"):
        FluxPolicy.from_pretrained(flux_dir, device="cpu", max_sequence_length=513)


def test_parts_from_different_models_are_refused_at_load():
    transformer = SimpleNamespace(in_channels=64, joint_attention_dim=4096, pooled_projection_dim=768)
    clip, t5 = SimpleNamespace(config=SimpleNamespace(hidden_size=512)), SimpleNamespace(config=SimpleNamespace(d_model=4096))
    with pytest.raises(ValueError, match="different models: text_encoder gives 512 pooled features but the transformer expects 768"):
        check_conditioning(transformer, [clip, t5])
    fill = SimpleNamespace(in_channels=384)  # FLUX.1 Fill: latents, masked image and mask side by side
    with pytest.raises(ValueError, match="reads 384 features a token.*not a FLUX.1 text-to-image transformer"):
        check_latent_channels(fill, {"latent_channels": 16})


# ---------------------------------------------------------------------- pure functions


@pytest.mark.parametrize("dynamic", [True, False], ids=["dev-dynamic-shift", "schnell-static"])
@pytest.mark.parametrize("num_steps, image_seq_len", [(1, 16), (4, 1024), (28, 4096)])
def test_sigmas_are_the_flux_pipelines(dynamic, num_steps, image_seq_len):
    # What FluxPipeline.__call__ hands its scheduler: linspace(1, 1/n, n) and, for dynamic shifting, mu from the token count.
    if dynamic:
        config = dict(use_dynamic_shifting=True, shift=3.0, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    else:
        config = dict(shift=1.0)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, **config)
    mu = calculate_shift(image_seq_len, 256, 4096, 0.5, 1.15)
    scheduler.set_timesteps(num_steps, sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
    ours = flux_sigmas(num_steps, image_seq_len=image_seq_len, scheduler_config=scheduler.config)
    torch.testing.assert_close(ours, scheduler.sigmas, rtol=0, atol=1e-6)
    if dynamic and image_seq_len == 4096:
        # at 1024 x 1024 (4096 tokens) mu = 1.15: each sigma s becomes e^mu s / (1 + (e^mu - 1) s), so 0.5 -> 0.7595
        assert abs(flux_sigmas(2, image_seq_len=4096, scheduler_config=scheduler.config)[1].item() - 0.7595) < 1e-4


def test_unsupported_scheduler_options_are_refused():
    with pytest.raises(ValueError, match="use_karras_sigmas.*does not implement"):
        flux_sigmas(4, image_seq_len=16, scheduler_config={"use_karras_sigmas": True})


def test_packing_is_the_flux_pipelines_and_unpacking_inverts_it():
    latents = torch.randn(2, 16, 6, 4, generator=torch.Generator().manual_seed(0))
    packed = pack_latents(latents)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(latents, 2, 16, 6, 4), rtol=0, atol=0)
    torch.testing.assert_close(unpack_latents(packed, 6, 4), latents, rtol=0, atol=0)
    with pytest.raises(ValueError, match="height and width must be even"):
        pack_latents(torch.zeros(1, 16, 5, 4))


# ---------------------------------------------------------------------- conditioning


def test_prompt_embeddings_match_the_diffusers_pipeline(rollout, flux_dir):
    pipe = _pipeline(flux_dir)
    for encoder in (pipe.text_encoder, pipe.text_encoder_2):
        # frozen like ours: weights that require grad make CPU attention pick another kernel (~1e-7 apart)
        encoder.requires_grad_(False)
    embeds, pooled, _ = pipe.encode_prompt(PROMPTS, None, device=torch.device("cpu"), max_sequence_length=T5_TOKENS)
    ours = rollout.encode_prompts(PROMPTS)
    # 16 T5 tokens of 32 features; the CLIP encoder's 8 pooled features
    assert ours.embeds.shape == (3, T5_TOKENS, 32) and ours.pooled.shape == (3, 8)
    torch.testing.assert_close(ours.embeds, embeds.float(), rtol=0, atol=0)
    torch.testing.assert_close(ours.pooled, pooled.float(), rtol=0, atol=0)
    empty_embeds, empty_pooled, _ = pipe.encode_prompt([""], None, device=torch.device("cpu"), max_sequence_length=T5_TOKENS)
    empty = rollout.negative_embeds()
    torch.testing.assert_close(empty.embeds, empty_embeds[0].float(), rtol=0, atol=0)
    torch.testing.assert_close(empty.pooled, empty_pooled[0].float(), rtol=0, atol=0)


# ---------------------------------------------------------------------- sampling


def test_sampling_records_unpacked_latents_sigmas_finite_log_probs_and_images(rollout):
    trajectories, images = rollout.sample(PROMPTS, seeds=[1, 2, 3], num_steps=4)
    assert images.dtype == np.uint8 and images.shape == (3, SIZE, SIZE, 3)
    assert trajectories.latents.shape == (3, 5, 16, 8, 8)
    assert trajectories.log_probs.shape == (3, 4) and np.isfinite(trajectories.log_probs).all()
    sigmas = flux_sigmas(4, image_seq_len=16, scheduler_config=rollout.scheduler.config).numpy()
    assert trajectories.timesteps.dtype == np.float32 and trajectories.prev_timesteps.dtype == np.float32
    np.testing.assert_array_equal(trajectories.timesteps, sigmas[:-1])
    np.testing.assert_array_equal(trajectories.prev_timesteps, sigmas[1:])
    assert trajectories.pooled_prompt_embeds.shape == (3, 8) and trajectories.negative_pooled_prompt_embeds.shape == (8,)
    assert trajectories.negative_prompt_embeds.shape == (T5_TOKENS, 32)
    assert (trajectories.eta, trajectories.guidance_scale) == (0.7, 3.5)  # Flow-GRPO's noise level, FLUX.1-dev's guidance


def test_vanishing_noise_level_follows_the_diffusers_sampler(flux_dir):
    # As eta -> 0 the SDE step tends to the Euler ODE step, so the trajectory must land where
    # FluxPipeline's sampler does from the same initial latents: this pins the sigmas and their
    # resolution-dependent shift (without it the end moves by ~0.06), the guidance input (1 instead
    # of 3 moves it by ~0.15), the packing and the token positions.
    base = _load(flux_dir, finetune="full")
    trajectories, images = base.sample(PROMPTS[:2], seeds=[3, 4], num_steps=3, eta=1e-6, guidance_scale=3.0)
    pipe = _pipeline(flux_dir)
    settings = dict(height=SIZE, width=SIZE, num_inference_steps=3, guidance_scale=3.0, max_sequence_length=T5_TOKENS)
    start = pack_latents(torch.from_numpy(trajectories.latents[:, 0]))
    expected = pipe(PROMPTS[:2], latents=start, output_type="latent", **settings).images  # packed
    torch.testing.assert_close(pack_latents(torch.from_numpy(trajectories.latents[:, -1])), expected.float(), rtol=0, atol=1e-4)
    other_guidance = pipe(PROMPTS[:2], latents=start, output_type="latent", **{**settings, "guidance_scale": 1.0}).images
    assert (other_guidance - expected).abs().max() > 1e-2  # so the comparison above does see the guidance
    # The same initial latents as FluxPipeline draws from each seed's generator, and the VAE's shift and scale undone as it does.
    generators = [torch.Generator().manual_seed(seed) for seed in (3, 4)]
    pixels = pipe(PROMPTS[:2], generator=generators, output_type="np", **settings).images * 255
    assert np.abs(images.astype(np.float32) - pixels).max() <= 1.0


def test_a_model_without_guidance_embeds_ignores_the_scale_and_follows_schnells_sampler(tmp_path):
    path = build_random_flux_pipeline(tmp_path / "schnell", seed=1, guidance_embeds=False)
    policy = _load(path, finetune="full")
    assert not policy.transformer.config.guidance_embeds and not policy.scheduler.config.use_dynamic_shifting
    unguided, _ = policy.sample(PROMPTS[:2], seeds=[5, 6], num_steps=2, eta=1e-6, guidance_scale=0.0, decode=False)
    guided, _ = policy.sample(PROMPTS[:2], seeds=[5, 6], num_steps=2, eta=1e-6, guidance_scale=3.5, decode=False)
    np.testing.assert_array_equal(guided.latents, unguided.latents)
    np.testing.assert_array_equal(guided.timesteps, [1.0, 0.5])  # no shift at all
    pipe = _pipeline(path)
    start = pack_latents(torch.from_numpy(guided.latents[:, 0]))
    expected = pipe(
        PROMPTS[:2],
        latents=start,
        height=SIZE,
        width=SIZE,
        num_inference_steps=2,
        guidance_scale=0.0,
        max_sequence_length=T5_TOKENS,
        output_type="latent",
    ).images
    torch.testing.assert_close(pack_latents(torch.from_numpy(guided.latents[:, -1])), expected.float(), rtol=0, atol=1e-4)


def test_an_sde_window_records_its_steps_only(rollout):
    full, full_images = rollout.sample(PROMPTS[:2], seeds=[1, 2], num_steps=4)
    covering, covering_images = rollout.sample(PROMPTS[:2], seeds=[1, 2], num_steps=4, sde_window=(0, 4))
    np.testing.assert_array_equal(covering.latents, full.latents)
    np.testing.assert_array_equal(covering_images, full_images)
    window, _ = rollout.sample(PROMPTS[:2], seeds=[1, 2], num_steps=4, sde_window=(1, 3), decode=False)
    assert window.first_step == 1 and window.num_inference_steps == 4
    assert window.latents.shape == (2, 3, 16, 8, 8) and window.log_probs.shape == (2, 2)
    np.testing.assert_array_equal(window.timesteps, full.timesteps[1:3])
    np.testing.assert_array_equal(window.prev_timesteps, full.prev_timesteps[1:3])
    np.testing.assert_allclose(np.exp(rollout.trajectory_log_probs(window) - window.log_probs), 1.0, atol=1e-4)


# ---------------------------------------------------------------------- log-probs


def test_bad_transitions_are_refused(rollout):
    trajectories, _ = rollout.sample(PROMPTS[:1], seeds=[0], num_steps=1, decode=False)
    inputs = step_inputs(trajectories)
    with pytest.raises(ValueError, match="takes sigmas in \\[0, 1\\] as timesteps.*DiffusionPolicy"):
        rollout.log_prob(**inputs | {"timesteps": torch.tensor([981])})
    with pytest.raises(ValueError, match="takes unpacked latents \\(batch, C, H, W\\)"):
        rollout.log_prob(**inputs | {"latents": pack_latents(inputs["latents"])})


# ---------------------------------------------------------------------- LoRA


def test_fresh_lora_does_not_change_the_model_and_targets_both_block_types(flux_dir):
    base = _load(flux_dir, finetune="full")
    adapted = _load(flux_dir)
    a, _ = base.sample(PROMPTS[:2], seeds=[3, 4], num_steps=2, decode=False)
    b, _ = adapted.sample(PROMPTS[:2], seeds=[3, 4], num_steps=2, decode=False)
    np.testing.assert_allclose(a.latents, b.latents, atol=1e-5)
    trainable = [name for name, p in adapted.transformer.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    double = ("attn.to_q", "attn.add_k_proj", "attn.to_out.0", "attn.to_add_out", "ff.net.2", "ff_context.net.0.proj")
    for layer in [f"transformer_blocks.0.{name}" for name in double] + [
        f"single_transformer_blocks.0.{name}" for name in ("attn.to_q", "attn.to_v", "proj_mlp", "proj_out")
    ]:
        assert any(name.startswith(f"{layer}.lora_A") for name in trainable), layer
    # the final output projection shares the single blocks' proj_out name but stays frozen
    assert not any(name.startswith(("proj_out.", "norm_out.", "x_embedder.", "context_embedder.")) for name in trainable)
    assert not any(p.requires_grad for encoder in adapted.text_encoders for p in encoder.parameters())
