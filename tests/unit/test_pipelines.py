"""Every supported model family through the one policy interface, on tiny random pipelines saved to disk.

Each family is loaded through the public loader (``load_policy`` on a ``ModelConfig``),
samples with log-probs, is re-scored by a UNet-only copy (what learners and reference
actors load), and takes one real optimizer step on its LoRA adapter.
"""

import dataclasses
import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from actors.diffusion import families
from actors.diffusion.files import LORA_WEIGHTS_NAME, SD, SDXL, detect_family
from actors.diffusion.flow_policy import SD3_LORA_TARGETS, FlowPolicy
from actors.diffusion.policy import UNET_LORA_TARGETS, DiffusionPolicy, load_policy, pretrained_policy
from actors.diffusion.trajectory import Trajectories
from actors.rl.losses import ddpo_is_loss
from actors.toy.sd3 import build_random_sd3_pipeline
from orchestrator.config import LoRAConfig, ModelConfig
from tests.helpers.transitions import step_inputs

PROMPTS = ["a red circle on the left", "a blue square at the top", "a green triangle in the center"]
VARIANTS = ["sd15", "sd2-v", "sdxl"]


def _model(path, **overrides) -> ModelConfig:
    return ModelConfig(path=str(path), device="cpu", lora=LoRAConfig(rank=4, alpha=8.0), **overrides)


def _perturbed_rollout_policy(path) -> DiffusionPolicy:
    """A rollout-side policy whose adapter really acts (LoRA B moved off zero)."""
    policy = load_policy(_model(path))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in policy.trainable_parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    return policy


def _learner_copy(path, rollout: DiffusionPolicy) -> DiffusionPolicy:
    """What a learner holds after a weight sync: the UNet only, with the rollout's adapter weights."""
    learner = load_policy(_model(path), unet_only=True)
    learner.load_lora_state_dict(rollout.lora_state_dict())
    return learner


@pytest.fixture(scope="module", params=VARIANTS)
def family(request, family_pipeline_dirs):
    path = family_pipeline_dirs[request.param]
    rollout = _perturbed_rollout_policy(path)
    return request.param, path, rollout, _learner_copy(path, rollout)


def test_families_are_recognised_with_their_prediction_type(family_pipeline_dirs):
    expected = {"sd15": (SD, "epsilon"), "sd2-v": (SD, "v_prediction"), "sdxl": (SDXL, "epsilon")}
    for variant, (family, prediction_type) in expected.items():
        path = family_pipeline_dirs[variant]
        assert detect_family(path) is family
        assert json.loads((path / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == prediction_type
        assert load_policy(_model(path), unet_only=True).prediction_type == prediction_type


@pytest.mark.parametrize("guidance_scale", [1.0, 5.0], ids=["cfg-off", "cfg-on"])
def test_learner_recomputes_the_recorded_log_probs(family, guidance_scale):
    variant, _, rollout, learner = family
    trajectories, images = rollout.sample(PROMPTS, seeds=[1, 2, 3], num_steps=3, guidance_scale=guidance_scale)
    assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8
    if variant == "sdxl":
        assert trajectories.pooled_prompt_embeds.shape == (3, 16)
        # force_zeros_for_empty_prompt: SDXL base's unconditional branch is all zeros.
        assert not trajectories.negative_pooled_prompt_embeds.any() and not trajectories.negative_prompt_embeds.any()
        assert trajectories.prompt_embeds.shape[-1] == 32  # two 16-wide encoders, concatenated
    else:
        assert trajectories.pooled_prompt_embeds is None
    # The UNet-only learner copy, in a different batch split, reproduces every behaviour log-prob.
    recomputed = learner.trajectory_log_probs(trajectories, batch_size=2)
    np.testing.assert_allclose(np.exp(recomputed - trajectories.log_probs), 1.0, atol=1e-4)


def test_one_training_step_changes_the_adapter_and_stays_finite(family):
    _, path, rollout, _ = family
    learner = _learner_copy(path, rollout)
    trajectories, _ = rollout.sample(PROMPTS, seeds=[4, 5, 6], num_steps=2, guidance_scale=3.0)
    before = {name: p.detach().clone() for name, p in learner.unet.named_parameters() if p.requires_grad}
    frozen_before = {name: p.detach().clone() for name, p in learner.unet.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW(learner.trainable_parameters(), lr=1e-2)
    step = 0
    out = learner.log_prob(
        latents=torch.from_numpy(trajectories.latents[:, step]),
        next_latents=torch.from_numpy(trajectories.latents[:, step + 1]),
        timesteps=torch.full((3,), int(trajectories.timesteps[step])),
        prev_timesteps=torch.full((3,), int(trajectories.prev_timesteps[step])),
        prompt_embeds=torch.from_numpy(trajectories.prompt_embeds),
        negative_prompt_embeds=torch.from_numpy(trajectories.negative_prompt_embeds),
        pooled_prompt_embeds=trajectories.tensor("pooled_prompt_embeds"),
        negative_pooled_prompt_embeds=trajectories.tensor("negative_pooled_prompt_embeds"),
        guidance_scale=trajectories.guidance_scale,
        eta=trajectories.eta,
    )
    loss = ddpo_is_loss(
        log_prob=out.log_prob,
        old_log_prob=torch.from_numpy(trajectories.log_probs[:, step]),
        advantages=torch.tensor([1.0, -0.5, -0.5]),
        clip_range=0.2,
    )
    loss.loss.backward()
    optimizer.step()
    after = dict(learner.unet.named_parameters())
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert changed and all("lora" in name for name in changed)
    assert all(torch.isfinite(after[name]).all() for name in before)
    assert all(torch.equal(frozen_before[name], after[name]) for name in frozen_before)


def test_a_learner_written_adapter_loads_into_the_diffusers_pipeline_at_its_own_scale(family, tmp_path):
    # The adapter has alpha 8 and rank 4 (scale 2). The file must tell diffusers so: without the
    # config in its metadata, diffusers takes alpha = rank and applies the adapter at half strength.
    variant, path, rollout, _ = family
    weights = {name: tensor.numpy() for name, tensor in rollout.lora_state_dict().items()}  # as the learner ships them
    directory = rollout.save_lora(tmp_path / "lora", weights)
    pipeline_cls = StableDiffusionXLPipeline if variant == "sdxl" else StableDiffusionPipeline
    pipe = pipeline_cls.from_pretrained(path, **({} if variant == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}))
    trajectories, _ = rollout.sample(PROMPTS[:2], seeds=[1, 2], num_steps=2, guidance_scale=3.0, decode=False)
    inputs = dict(
        sample=torch.from_numpy(trajectories.latents[:, 1]),
        timestep=torch.full((2,), 500),
        encoder_hidden_states=torch.from_numpy(trajectories.prompt_embeds),
    )
    if variant == "sdxl":
        time_ids = families.add_time_ids(height=rollout.image_size, width=rollout.image_size).expand(2, -1)
        inputs["added_cond_kwargs"] = {"text_embeds": torch.from_numpy(trajectories.pooled_prompt_embeds), "time_ids": time_ids}
    with torch.no_grad():
        plain = pipe.unet(**inputs).sample
        pipe.load_lora_weights(directory, weight_name=LORA_WEIGHTS_NAME)
        theirs, ours = pipe.unet(**inputs).sample, rollout.unet(**inputs).sample
    assert (ours - plain).abs().max() > 1e-3  # the adapter's effect is large enough for a wrong scale to show
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_the_loader_picks_the_policy_class_and_its_default_lora_targets(family_pipeline_dirs, tmp_path):
    sd3 = build_random_sd3_pipeline(tmp_path / "sd3")
    # lora.target_modules is null by default: each class adapts its own default layers
    flow = load_policy(ModelConfig(path=str(sd3), device="cpu"), unet_only=True)
    assert isinstance(flow, FlowPolicy) and set(flow.lora_config.target_modules) == set(SD3_LORA_TARGETS)
    assert isinstance(pretrained_policy(sd3, finetune="full", device="cpu", unet_only=True), FlowPolicy)
    unet = load_policy(ModelConfig(path=str(family_pipeline_dirs["sd15"]), device="cpu"), unet_only=True)
    assert isinstance(unet, DiffusionPolicy) and set(unet.lora_config.target_modules) == set(UNET_LORA_TARGETS)
    with pytest.raises(ValueError, match="holds a sd3 pipeline, a flow-matching model: load it with FlowPolicy"):
        DiffusionPolicy.from_pretrained(sd3, device="cpu")


def test_unet_only_policy_refuses_to_sample(family_pipeline_dirs):
    policy = load_policy(_model(family_pipeline_dirs["sdxl"]), unet_only=True)
    assert policy.vae is None and policy.text_encoders == ()
    with pytest.raises(ValueError, match="unet_only=True.*cannot encode prompts"):
        policy.sample(PROMPTS[:1], seeds=[0], num_steps=2)


def test_sdxl_trajectories_without_pooled_embeddings_are_refused(family_pipeline_dirs):
    path = family_pipeline_dirs["sdxl"]
    trajectories, _ = load_policy(_model(path)).sample(PROMPTS[:1], seeds=[0], num_steps=1)
    stripped = dataclasses.replace(trajectories, pooled_prompt_embeds=None, negative_pooled_prompt_embeds=None)
    with pytest.raises(ValueError, match="needs pooled prompt embeddings"):
        load_policy(_model(path), unet_only=True).trajectory_log_probs(stripped)
    with pytest.raises(ValueError, match="with and without pooled"):
        Trajectories.concatenate([trajectories, stripped])


# ---------------------------------------------------------------------- memory features


def _saved_bytes_and_grads(policy: DiffusionPolicy, trajectories: Trajectories) -> tuple[int, list[torch.Tensor]]:
    """Bytes autograd keeps for the backward pass of one guided log-prob, and the LoRA gradients."""
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = policy.log_prob(**step_inputs(trajectories))
    out.log_prob.sum().backward()
    grads = [p.grad.clone() for p in policy.trainable_parameters()]
    policy.unet.zero_grad(set_to_none=True)
    return sum(saved), grads


def test_gradient_checkpointing_keeps_less_for_backward_and_gives_the_same_gradients(tiny_pipeline_dir):
    torch.manual_seed(0)
    plain = load_policy(_model(tiny_pipeline_dir), unet_only=True)
    torch.manual_seed(0)
    checkpointed = load_policy(_model(tiny_pipeline_dir, gradient_checkpointing=True), unet_only=True)
    assert checkpointed.unet.is_gradient_checkpointing and not plain.unet.is_gradient_checkpointing
    trajectories, _ = load_policy(_model(tiny_pipeline_dir)).sample(PROMPTS, seeds=[1, 2, 3], num_steps=2, guidance_scale=3.0)
    plain_bytes, plain_grads = _saved_bytes_and_grads(plain, trajectories)
    checkpointed_bytes, checkpointed_grads = _saved_bytes_and_grads(checkpointed, trajectories)
    # Measured on this tiny UNet: about 4x fewer bytes kept; the real saving grows with depth.
    assert checkpointed_bytes < plain_bytes / 2
    for a, b in zip(plain_grads, checkpointed_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_bfloat16_frozen_weights_with_float32_adapter_and_log_prob_maths(tiny_pipeline_dir):
    policy = load_policy(_model(tiny_pipeline_dir, dtype="bfloat16"))
    assert {p.dtype for p in policy.trainable_parameters()} == {torch.float32}
    assert {p.dtype for p in policy.unet.parameters() if not p.requires_grad} == {torch.bfloat16}
    trajectories, images = policy.sample(PROMPTS, seeds=[1, 2, 3], num_steps=3, guidance_scale=4.0)
    assert trajectories.log_probs.dtype == np.float32 and np.isfinite(trajectories.log_probs).all()
    learner = load_policy(_model(tiny_pipeline_dir, dtype="bfloat16"), unet_only=True)
    learner.load_lora_state_dict(policy.lora_state_dict())
    # Same batch shape as sampling: half-precision kernels may round differently for another batch size.
    recomputed = learner.trajectory_log_probs(trajectories)
    np.testing.assert_allclose(np.exp(recomputed - trajectories.log_probs), 1.0, atol=1e-4)


def test_float16_on_cpu_is_an_error_that_names_the_alternatives(tiny_pipeline_dir):
    with pytest.raises(ValueError, match="float16 needs a CUDA device.*bfloat16.*float32"):
        load_policy(_model(tiny_pipeline_dir, dtype="float16"))


@pytest.mark.gpu
@pytest.mark.parametrize("variant", VARIANTS)
def test_float16_on_cuda_keeps_the_ratio_exact(family_pipeline_dirs, variant):
    path = family_pipeline_dirs[variant]
    model = ModelConfig(path=str(path), device="cuda", dtype="float16", gradient_checkpointing=True)
    rollout = load_policy(model)
    learner = load_policy(model, unet_only=True)
    learner.load_lora_state_dict(rollout.lora_state_dict())
    trajectories, _ = rollout.sample(PROMPTS, seeds=[1, 2, 3], num_steps=3, guidance_scale=5.0)
    recomputed = learner.trajectory_log_probs(trajectories)
    np.testing.assert_allclose(np.exp(recomputed - trajectories.log_probs), 1.0, atol=1e-4)
