"""The flow-matching policy on a tiny random Stable Diffusion 3.5-format pipeline saved to disk.

Checked against diffusers' own ``StableDiffusion3Pipeline`` where it defines the behaviour
(prompt encoding, the ODE sampler the SDE reduces to, LoRA files), and against itself where
RL needs it (recomputed log-probs equal the recorded ones; a training step moves them).
"""

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from safetensors.torch import load_file

from actors.diffusion import flow
from actors.diffusion.files import LORA_CONFIG_NAME, LORA_WEIGHTS_NAME, SD3, check_pipeline_dir, detect_family
from actors.diffusion.flow_policy import FlowPolicy
from actors.diffusion.generator import ImageGenerator, ImageJob
from actors.diffusion.lora import unet_lora_state_dict
from actors.diffusion.policy import load_policy
from actors.rl.losses import ddpo_is_loss
from actors.toy.sd3 import build_random_sd3_pipeline
from orchestrator.config import LoRAConfig, ModelConfig
from tests.helpers.flow import PROMPTS, T5_TOKENS, perturb, step_inputs

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _load(path, **kwargs) -> FlowPolicy:
    kwargs = {"device": "cpu", "max_sequence_length": T5_TOKENS, "lora_rank": 4, "lora_alpha": 8.0, **kwargs}
    return FlowPolicy.from_pretrained(path, **kwargs)


def _learner_copy(path, rollout: FlowPolicy) -> FlowPolicy:
    """What a learner holds after a weight sync: the transformer only, with the rollout's adapter weights."""
    learner = _load(path, unet_only=True)
    learner.load_lora_state_dict(rollout.lora_state_dict())
    return learner


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


def test_sd3_directories_are_recognised_with_and_without_a_model_index(sd3_dir, tmp_path):
    assert detect_family(sd3_dir) is SD3 and check_pipeline_dir(sd3_dir) == sd3_dir
    copy = tmp_path / "no-index"
    shutil.copytree(sd3_dir, copy)
    (copy / "model_index.json").unlink()
    assert detect_family(copy) is SD3


@pytest.mark.parametrize("left_out", ["text_encoder_3", "tokenizer_3"])
def test_a_directory_without_the_t5_encoder_is_refused_naming_the_part(sd3_dir, tmp_path, left_out):
    copy = tmp_path / "clip-only"
    shutil.copytree(sd3_dir, copy, ignore=shutil.ignore_patterns(left_out))
    pattern = rf"not a complete sd3 pipeline directory: missing {left_out}/.*T5 encoder.*is not supported"
    with pytest.raises(ValueError, match=pattern):
        check_pipeline_dir(copy)
    with pytest.raises(ValueError, match=pattern):
        FlowPolicy.from_pretrained(copy, device="cpu")


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


def test_same_seeds_give_the_same_images_whatever_the_batch(rollout):
    _, alone = rollout.sample(PROMPTS[1:2], seeds=[42], num_steps=3)
    together_trajectories, together = rollout.sample(PROMPTS, seeds=[7, 42, 8], num_steps=3)
    alone_trajectories, again = rollout.sample(PROMPTS[1:2], seeds=[42], num_steps=3)
    np.testing.assert_array_equal(alone, again)
    np.testing.assert_allclose(alone_trajectories.latents[0], together_trajectories.latents[1], atol=1e-5)
    assert np.abs(alone[0].astype(int) - together[1].astype(int)).max() <= 1  # a rounding step at most
    assert np.abs(together[0].astype(int) - together[1].astype(int)).sum() > 0


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


def test_sampling_argument_errors(rollout):
    with pytest.raises(ValueError, match="one seed per prompt"):
        rollout.sample(PROMPTS[:2], seeds=[1])
    with pytest.raises(ValueError, match="eta \\(the SDE noise level\\) must be > 0"):
        rollout.sample(PROMPTS[:1], seeds=[1], eta=0.0)


# ---------------------------------------------------------------------- log-probs


@pytest.mark.parametrize("guidance_scale", [1.0, 4.5], ids=["cfg-off", "cfg-on"])
@pytest.mark.parametrize("recompute_batch", [3, 2])
def test_recomputed_log_probs_equal_recorded(rollout, guidance_scale, recompute_batch):
    trajectories, _ = rollout.sample(PROMPTS, seeds=[5, 6, 7], num_steps=3, guidance_scale=guidance_scale, decode=False)
    recomputed = rollout.trajectory_log_probs(trajectories, batch_size=recompute_batch)
    np.testing.assert_allclose(np.exp(recomputed - trajectories.log_probs), 1.0, atol=1e-4)


def test_a_transformer_only_learner_reproduces_the_rollout_log_probs(rollout, sd3_dir):
    learner = _learner_copy(sd3_dir, rollout)
    assert learner.vae is None and learner.text_encoders == ()
    trajectories, _ = rollout.sample(PROMPTS, seeds=[1, 2, 3], num_steps=3, guidance_scale=4.5, reduction="sum", decode=False)
    recomputed = learner.trajectory_log_probs(trajectories, batch_size=2, reduction="sum")
    # the summed log-density adds rounding over 16 * 8 * 8 terms: a tolerance relative to its size
    np.testing.assert_allclose(recomputed, trajectories.log_probs, rtol=1e-5, atol=1e-3)
    with pytest.raises(ValueError, match="unet_only=True.*cannot encode prompts"):
        learner.sample(PROMPTS[:1], seeds=[0], num_steps=1)


def test_one_optimizer_step_on_the_adapter_moves_the_log_probs_and_keeps_them_finite(rollout, sd3_dir):
    learner = _learner_copy(sd3_dir, rollout)
    trajectories, _ = rollout.sample(PROMPTS, seeds=[4, 5, 6], num_steps=2, guidance_scale=3.0, decode=False)
    frozen = {name: p.detach().clone() for name, p in learner.unet.named_parameters() if not p.requires_grad}
    before = learner.trajectory_log_probs(trajectories)
    optimizer = torch.optim.AdamW(learner.trainable_parameters(), lr=1e-2)
    out = learner.log_prob(**step_inputs(trajectories, step=1))
    loss = ddpo_is_loss(
        log_prob=out.log_prob,
        old_log_prob=torch.from_numpy(trajectories.log_probs[:, 1]),
        advantages=torch.tensor([1.0, -0.5, -0.5]),
        clip_range=0.2,
    )
    loss.loss.backward()
    assert all(p.grad is not None for p in learner.trainable_parameters())
    optimizer.step()
    after = learner.trajectory_log_probs(trajectories)
    assert np.isfinite(after).all()
    assert np.abs(after - before).max() > 1e-5
    assert all(torch.equal(frozen[name], p) for name, p in learner.unet.named_parameters() if name in frozen)

    # The learner's weight-sync format (diffusers' lora.down/lora.up names) loads into a rollout copy.
    synced = _load(sd3_dir)
    synced.load_lora_state_dict(unet_lora_state_dict(learner.transformer))
    np.testing.assert_allclose(np.exp(synced.trajectory_log_probs(trajectories) - after), 1.0, atol=1e-4)


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


def test_saved_lora_round_trips_and_loads_into_the_diffusers_pipeline(rollout, sd3_dir, tmp_path):
    directory = rollout.save_lora(tmp_path / "lora")
    assert json.loads((directory / LORA_CONFIG_NAME).read_text())["r"] == 4
    restored = _load(sd3_dir, lora_path=directory)
    original, _ = rollout.sample(PROMPTS[:2], seeds=[11, 12], num_steps=2, decode=False)
    reloaded, _ = restored.sample(PROMPTS[:2], seeds=[11, 12], num_steps=2, decode=False)
    np.testing.assert_allclose(original.log_probs, reloaded.log_probs, atol=1e-6)

    pipe = _pipeline(sd3_dir)

    def generate():
        return pipe(
            PROMPTS[:1],
            num_inference_steps=2,
            max_sequence_length=T5_TOKENS,
            output_type="np",
            generator=torch.Generator().manual_seed(0),
        ).images

    plain = generate()
    pipe.load_lora_weights(directory, weight_name=LORA_WEIGHTS_NAME)
    adapted = generate()
    assert np.abs(adapted - plain).max() > 1e-3
    # diffusers applies the adapter at our scale (alpha / rank = 2, read from the file's metadata):
    # its transformer and ours give the same velocity.
    inputs = dict(
        hidden_states=torch.from_numpy(original.latents[:, 1]),
        timestep=torch.full((2,), 500.0),
        encoder_hidden_states=torch.from_numpy(original.prompt_embeds),
        pooled_projections=torch.from_numpy(original.pooled_prompt_embeds),
        return_dict=False,
    )
    with torch.no_grad():
        torch.testing.assert_close(pipe.transformer(**inputs)[0], rollout.transformer(**inputs)[0], rtol=1e-5, atol=1e-5)


def test_a_learner_written_adapter_loads_into_the_diffusers_pipeline_and_back(rollout, sd3_dir, tmp_path):
    # A learner writes its checkpoint from the weights it syncs: diffusers' lora.down/lora.up names, as numpy.
    weights = {name: tensor.numpy() for name, tensor in unet_lora_state_dict(rollout.transformer).items()}
    directory = rollout.save_lora(tmp_path / "lora", weights)
    keys = load_file(directory / LORA_WEIGHTS_NAME).keys()
    assert all(key.startswith("transformer.") and (".lora_A." in key or ".lora_B." in key) for key in keys)  # SD3's file layout
    restored = _load(sd3_dir, lora_path=directory)
    pipe = _pipeline(sd3_dir)
    pipe.load_lora_weights(directory, weight_name=LORA_WEIGHTS_NAME)
    trajectories, _ = rollout.sample(PROMPTS[:2], seeds=[1, 2], num_steps=2, decode=False)
    inputs = dict(
        hidden_states=torch.from_numpy(trajectories.latents[:, 1]),
        timestep=torch.full((2,), 300.0),
        encoder_hidden_states=torch.from_numpy(trajectories.prompt_embeds),
        pooled_projections=torch.from_numpy(trajectories.pooled_prompt_embeds),
        return_dict=False,
    )
    with torch.no_grad():
        ours = rollout.transformer(**inputs)[0]
        torch.testing.assert_close(restored.transformer(**inputs)[0], ours, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(pipe.transformer(**inputs)[0], ours, rtol=1e-5, atol=1e-5)  # at our scale, alpha / rank = 2


def test_weights_keyed_for_a_unet_are_refused(rollout):
    state = {f"unet.{k}": v for k, v in rollout.lora_state_dict().items()}
    with pytest.raises(ValueError, match="keyed for a UNet"):
        rollout.load_lora_state_dict(state)


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


def test_bfloat16_frozen_weights_with_float32_adapter_and_log_prob_maths(sd3_dir):
    rollout, ratio = _rescored_by_a_learner(sd3_dir, dtype="bfloat16")
    assert {p.dtype for p in rollout.trainable_parameters()} == {torch.float32}
    assert {p.dtype for p in rollout.transformer.parameters() if not p.requires_grad} == {torch.bfloat16}
    np.testing.assert_allclose(ratio, 1.0, atol=1e-4)


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
