"""The flow-matching policy on a tiny random Stable Diffusion 3.5-format pipeline saved to disk.

What is particular to SD3, checked against diffusers' own ``StableDiffusion3Pipeline`` where it
defines the behaviour (prompt encoding, the ODE sampler the SDE reduces to, LoRA targets).
What every flow-matching policy must do alike (recomputed log-probs equal the recorded ones, a
training step moves them, LoRA files diffusers reads) is in test_flow_matching_policies.py.
"""

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from actors.diffusion import flow
from actors.diffusion.files import detect_family
from actors.diffusion.flow_policy import FlowPolicy
from actors.diffusion.generator import ImageGenerator, ImageJob
from actors.diffusion.policy import load_policy
from actors.toy.sd3 import build_random_sd3_pipeline
from orchestrator.config import LoRAConfig, ModelConfig
from tests.helpers.flow import PROMPTS, T5_TOKENS, perturb, step_inputs

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _load(path, **kwargs) -> FlowPolicy:
    kwargs = {"device": "cpu", "max_sequence_length": T5_TOKENS, "lora_rank": 4, "lora_alpha": 8.0, **kwargs}
    return FlowPolicy.from_pretrained(path, **kwargs)


@pytest.fixture(scope="module")
def rollout(sd3_dir):
    policy = _load(sd3_dir)
    perturb(policy.trainable_parameters())
    return policy


def _pipeline(path) -> StableDiffusion3Pipeline:
    pipe = StableDiffusion3Pipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------- the directory


@pytest.mark.parametrize(
    "class_name, why", [("PixArtAlphaPipeline", "PixArt .* is not supported yet"), ("KandinskyPipeline", "not a pipeline rayalign knows")]
)
def test_an_unsupported_pipeline_class_lists_the_supported_families(sd3_dir, tmp_path, class_name, why):
    copy = tmp_path / "other"
    shutil.copytree(sd3_dir, copy)
    index = json.loads((copy / "model_index.json").read_text())
    (copy / "model_index.json").write_text(json.dumps({**index, "_class_name": class_name}))
    supported = r"sd \(StableDiffusionPipeline\); sdxl \(StableDiffusionXLPipeline\); sd3 \(StableDiffusion3Pipeline\)"
    with pytest.raises(ValueError, match=rf"holds a {class_name} \({why}.*supported pipelines: {supported}"):
        detect_family(copy)


def test_a_ddim_pipeline_is_refused_by_the_flow_policy(tiny_pipeline_dir):
    with pytest.raises(ValueError, match=r"holds a sd pipeline: load it with DiffusionPolicy \(a DDIM model\)"):
        FlowPolicy.from_pretrained(tiny_pipeline_dir, device="cpu")


# ---------------------------------------------------------------------- conditioning


def test_prompt_embeddings_match_the_diffusers_pipeline(rollout, sd3_dir):
    pipe = _pipeline(sd3_dir)
    for encoder in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
        # frozen like ours: weights that require grad make CPU attention pick another kernel (~1e-7 apart)
        encoder.requires_grad_(False)
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
        PROMPTS, None, None, device=torch.device("cpu"), do_classifier_free_guidance=True, max_sequence_length=T5_TOKENS
    )
    ours = rollout.encode_prompts(PROMPTS)
    # 16 CLIP tokens (the toy tokenizer's length) then 16 T5 tokens, 32 features: 8 + 16 CLIP features zero-padded to T5's 32
    assert ours.embeds.shape == (3, 16 + T5_TOKENS, 32) and ours.pooled.shape == (3, 8 + 16)
    assert not ours.embeds[:, :16, 24:].any()
    torch.testing.assert_close(ours.embeds, embeds.float(), rtol=0, atol=0)
    torch.testing.assert_close(ours.pooled, pooled.float(), rtol=0, atol=0)
    # The empty caption is encoded once here, once per prompt (a batch of 3) there: batch-size rounding only.
    empty = rollout.negative_embeds()
    torch.testing.assert_close(empty.embeds, negative[0].float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(empty.pooled, negative_pooled[0].float(), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------- sampling


def test_sampling_records_sigmas_finite_log_probs_and_images(rollout):
    trajectories, images = rollout.sample(PROMPTS, seeds=[1, 2, 3], num_steps=4, guidance_scale=4.5)
    assert images.dtype == np.uint8 and images.shape == (3, 32, 32, 3)
    assert trajectories.latents.shape == (3, 5, 16, 8, 8)
    assert trajectories.log_probs.shape == (3, 4) and np.isfinite(trajectories.log_probs).all()
    sigmas = flow.flow_sigmas(4, shift=3.0).numpy()  # the checkpoint's scheduler shift
    assert trajectories.timesteps.dtype == np.float32 and trajectories.prev_timesteps.dtype == np.float32
    np.testing.assert_array_equal(trajectories.timesteps, sigmas[:-1])
    np.testing.assert_array_equal(trajectories.prev_timesteps, sigmas[1:])
    assert trajectories.pooled_prompt_embeds.shape == (3, 24) and trajectories.negative_pooled_prompt_embeds.shape == (24,)
    assert trajectories.negative_prompt_embeds.shape == (16 + T5_TOKENS, 32)
    assert trajectories.eta == 0.7  # Flow-GRPO's noise level is the default


def test_vanishing_noise_level_follows_the_diffusers_ode_sampler(sd3_dir):
    # As eta -> 0 the SDE step's mean tends to the Euler ODE step and its noise to 0, so the
    # trajectory must land where StableDiffusion3Pipeline's sampler does from the same noise:
    # this pins the timestep scale (sigma * 1000), the guidance and the sigma schedule.
    base = _load(sd3_dir, finetune="full")
    # eta = 1e-6: every step's noise is ~1e-6; a sigma passed unscaled moves the end by ~0.1, no guidance by ~0.5
    trajectories, images = base.sample(PROMPTS[:2], seeds=[3, 4], num_steps=3, eta=1e-6, guidance_scale=3.0)
    pipe = _pipeline(sd3_dir)
    settings = dict(
        num_inference_steps=3, guidance_scale=3.0, latents=torch.from_numpy(trajectories.latents[:, 0]), max_sequence_length=T5_TOKENS
    )
    expected = pipe(PROMPTS[:2], output_type="latent", **settings).images
    torch.testing.assert_close(torch.from_numpy(trajectories.latents[:, -1]), expected.float(), rtol=0, atol=1e-4)
    # and the VAE's shift and scale are undone as diffusers does (ignoring the shift moves pixels by ~25 levels)
    pixels = pipe(PROMPTS[:2], output_type="np", **settings).images * 255
    assert np.abs(images.astype(np.float32) - pixels).max() <= 1.0


# ---------------------------------------------------------------------- log-probs


def test_integer_timesteps_are_refused(rollout):
    trajectories, _ = rollout.sample(PROMPTS[:1], seeds=[0], num_steps=1, decode=False)
    inputs = step_inputs(trajectories) | {"timesteps": torch.tensor([981])}
    with pytest.raises(ValueError, match="takes sigmas in \\[0, 1\\] as timesteps.*DiffusionPolicy"):
        rollout.log_prob(**inputs)


# ---------------------------------------------------------------------- LoRA


def test_fresh_lora_does_not_change_the_model_and_targets_attention_and_feed_forward(sd3_dir):
    base = _load(sd3_dir, finetune="full")
    adapted = _load(sd3_dir)
    a, _ = base.sample(PROMPTS[:2], seeds=[3, 4], num_steps=2, decode=False)
    b, _ = adapted.sample(PROMPTS[:2], seeds=[3, 4], num_steps=2, decode=False)
    np.testing.assert_allclose(a.latents, b.latents, atol=1e-5)
    trainable = [name for name, p in adapted.transformer.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    for layer in ("attn.to_q", "attn.add_k_proj", "attn.to_add_out", "attn2.to_v", "ff.net.2", "ff_context.net.0.proj"):
        assert any(f".{layer}.lora_A" in name for name in trainable), layer
    assert not any(p.requires_grad for encoder in adapted.text_encoders for p in encoder.parameters())


def test_merged_adapter_samples_like_the_unmerged_one_and_unmerges_exactly(sd3_dir):
    policy = _load(sd3_dir)
    perturb(policy.trainable_parameters(), seed=1)
    frozen = {name: p.detach().clone() for name, p in policy.transformer.named_parameters() if not p.requires_grad}
    unmerged, _ = policy.sample(PROMPTS[:2], seeds=[5, 6], num_steps=2, guidance_scale=3.0, decode=False)
    assert policy.merge_lora() is True and policy.lora_merged
    merged, _ = policy.sample(PROMPTS[:2], seeds=[5, 6], num_steps=2, guidance_scale=3.0, decode=False)
    np.testing.assert_allclose(merged.latents, unmerged.latents, rtol=1e-5, atol=1e-4)
    with pytest.raises(RuntimeError, match="unmerge_lora"):
        policy.log_prob(**step_inputs(merged))
    policy.unmerge_lora()
    np.testing.assert_allclose(np.exp(policy.trajectory_log_probs(merged) - merged.log_probs), 1.0, atol=1e-4)
    assert all(torch.equal(frozen[name], p) for name, p in policy.transformer.named_parameters() if name in frozen)


def test_sd3_medium_layout_samples_and_rescores(tmp_path):
    # SD 3.0's plain MMDiT: no second attention, no query/key norm.
    path = build_random_sd3_pipeline(tmp_path / "sd3", seed=1, variant="sd3")
    policy = _load(path)
    assert not policy.transformer.config.dual_attention_layers and policy.transformer.config.qk_norm is None
    perturb(policy.trainable_parameters())
    trajectories, images = policy.sample(PROMPTS[:2], seeds=[1, 2], num_steps=2, guidance_scale=4.0)
    assert images.shape == (2, 32, 32, 3)
    np.testing.assert_allclose(np.exp(policy.trajectory_log_probs(trajectories, batch_size=1) - trajectories.log_probs), 1.0, atol=1e-4)


def test_the_serving_generator_runs_a_flow_policy_and_hot_swaps_its_adapter(rollout, sd3_dir, tmp_path):
    # ImageGenerator reaches the denoiser as policy.unet and loads adapters under its own names.
    directory = rollout.save_lora(tmp_path / "lora")
    base = _load(sd3_dir, finetune="full")
    generator = ImageGenerator(base, batch_size=2, pad_batches=False)
    assert generator.image_size == (32, 32)
    job = ImageJob(prompt=PROMPTS[0], seeds=(1, 2), num_steps=2, guidance_scale=4.5, eta=0.7)
    plain = generator.generate([job])[0].images
    generator.load_adapter(directory)
    adapted, without = generator.generate([job, dataclasses.replace(job, use_adapter=False)])
    _, expected = rollout.sample([PROMPTS[0]] * 2, seeds=[1, 2], num_steps=2, guidance_scale=4.5, eta=0.7)
    assert np.abs(adapted.images.astype(int) - expected.astype(int)).max() <= 1
    np.testing.assert_array_equal(without.images, plain)
    assert np.abs(adapted.images.astype(int) - plain.astype(int)).max() > 1


def _rescored_by_a_learner(path, **kwargs) -> tuple[FlowPolicy, np.ndarray]:
    """A rollout's trajectories and the ratio exp(learner - recorded) of a transformer-only copy, same settings."""
    rollout = _load(path, **kwargs)
    perturb(rollout.trainable_parameters())
    learner = _load(path, unet_only=True, **kwargs)
    learner.load_lora_state_dict(rollout.lora_state_dict())
    trajectories, _ = rollout.sample(PROMPTS, seeds=[1, 2, 3], num_steps=3, guidance_scale=5.0)
    assert trajectories.log_probs.dtype == np.float32 and np.isfinite(trajectories.log_probs).all()
    # same batch shape as sampling: half-precision kernels may round differently for another batch size
    return rollout, np.exp(learner.trajectory_log_probs(trajectories) - trajectories.log_probs)


@pytest.mark.gpu
def test_float16_on_cuda_keeps_the_ratio_exact(sd3_dir):
    rollout, ratio = _rescored_by_a_learner(sd3_dir, dtype="float16", device="cuda", gradient_checkpointing=True)
    assert rollout.vae.dtype == torch.float32  # force_upcast: SD3's VAE decodes in float32
    np.testing.assert_allclose(ratio, 1.0, atol=1e-4)


def test_load_policy_builds_flow_learner_and_reference_copies_from_a_model_config(sd3_dir):
    model = ModelConfig(path=str(sd3_dir), device="cpu", lora=LoRAConfig(rank=2, alpha=4.0, target_modules=("to_q", "add_q_proj")))
    learner = load_policy(model, unet_only=True)
    assert isinstance(learner, FlowPolicy) and learner.lora_config.r == 2 and learner.vae is None
    trainable = [name for name, p in learner.transformer.named_parameters() if p.requires_grad]
    assert trainable and all(".to_q.lora_" in name or ".add_q_proj.lora_" in name for name in trainable)
    reference = load_policy(model, trainable=False, unet_only=True)
    assert reference.lora_config is None and not reference.trainable_parameters()
