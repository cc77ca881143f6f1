"""The diffusion policy on a tiny random SD-1.5-format pipeline loaded from disk."""

import json

import numpy as np
import pytest
import torch

from actors.diffusion.files import LORA_CONFIG_NAME, LORA_WEIGHTS_NAME
from actors.diffusion.policy import DiffusionPolicy
from tests.helpers.transitions import step_inputs

PROMPTS = [
    "a red circle on the left",
    "an orange square at the top",
    "a blue triangle in the center",
    "a green circle at the bottom",
    "a purple square on the right",
    "a yellow triangle at the top",
]


def _perturb(parameters, scale=0.05, seed=0):
    """Move trainable weights off their init so LoRA B != 0 and the adapter really acts."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in parameters:
            p.add_(torch.randn(p.shape, generator=generator) * scale)


@pytest.fixture(scope="module")
def lora_policy(tiny_pipeline_dir):
    policy = DiffusionPolicy.from_pretrained(tiny_pipeline_dir, finetune="lora", lora_rank=4, lora_alpha=8.0, device="cpu")
    _perturb(policy.trainable_parameters())
    return policy


@pytest.mark.parametrize("guidance_scale", [1.0, 4.5], ids=["cfg-off", "cfg-on"])
@pytest.mark.parametrize("recompute_batch", [6, 4, 1])
def test_recomputed_log_probs_equal_recorded(lora_policy, guidance_scale, recompute_batch):
    trajectories, _ = lora_policy.sample(PROMPTS, seeds=list(range(6)), num_steps=4, guidance_scale=guidance_scale)
    recomputed = lora_policy.trajectory_log_probs(trajectories, batch_size=recompute_batch)
    ratio = np.exp(recomputed - trajectories.log_probs)
    np.testing.assert_allclose(ratio, 1.0, atol=1e-4)
    assert trajectories.log_probs.shape == (6, 4)
    assert trajectories.latents.shape[:2] == (6, 5)


def test_recompute_matches_with_full_finetune_and_sum_reduction(tiny_pipeline_dir):
    policy = DiffusionPolicy.from_pretrained(tiny_pipeline_dir, finetune="full", device="cpu")
    _perturb(policy.trainable_parameters(), scale=0.01)
    trajectories, _ = policy.sample(PROMPTS[:4], seeds=[7, 8, 9, 10], num_steps=3, guidance_scale=3.0, reduction="sum")
    recomputed = policy.trajectory_log_probs(trajectories, batch_size=3, reduction="sum")
    # The exact (summed) log-density adds up per-element rounding over C*H*W terms,
    # so its tolerance is relative to that sum's size.
    np.testing.assert_allclose(recomputed, trajectories.log_probs, rtol=1e-5, atol=1e-3)


def test_log_prob_changes_with_weights_and_has_gradients(lora_policy):
    trajectories, _ = lora_policy.sample(PROMPTS[:2], seeds=[0, 1], num_steps=2)
    out = lora_policy.log_prob(**step_inputs(trajectories))
    out.log_prob.sum().backward()
    grads = [p.grad for p in lora_policy.trainable_parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum().item() for g in grads) > 0
    lora_policy.unet.zero_grad(set_to_none=True)


def test_same_seed_same_images_and_different_seed_differs(lora_policy):
    _, first = lora_policy.sample(PROMPTS[:3], seeds=[1, 2, 3], num_steps=3)
    _, again = lora_policy.sample(PROMPTS[:3], seeds=[1, 2, 3], num_steps=3)
    trajectories, other = lora_policy.sample(PROMPTS[:3], seeds=[4, 5, 6], num_steps=3)
    assert first.dtype == np.uint8 and first.shape == (3, 32, 32, 3)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(trajectories.latents[:, 0], lora_policy.sample(PROMPTS[:3], seeds=[1, 2, 3], num_steps=3)[0].latents[:, 0])
    assert np.abs(first.astype(int) - other.astype(int)).sum() > 0


def test_sample_does_not_depend_on_batch_companions(lora_policy):
    alone, _ = lora_policy.sample(PROMPTS[:1], seeds=[42], num_steps=3)
    together, _ = lora_policy.sample(PROMPTS, seeds=[42, 1, 2, 3, 4, 5], num_steps=3)
    np.testing.assert_allclose(alone.latents[0], together.latents[0], atol=1e-4)


def test_lora_only_adapter_trains_and_base_is_frozen(tiny_pipeline_dir):
    policy = DiffusionPolicy.from_pretrained(
        tiny_pipeline_dir, finetune="lora", lora_rank=2, lora_target_modules=("to_q", "to_v"), device="cpu"
    )
    named = dict(policy.unet.named_parameters())
    trainable = [n for n, p in named.items() if p.requires_grad]
    assert trainable and all("lora" in n for n in trainable)
    assert all(("to_q" in n or "to_v" in n) for n in trainable)
    assert not any(p.requires_grad for p in policy.vae.parameters())
    assert not any(p.requires_grad for p in policy.text_encoder.parameters())
    full = DiffusionPolicy.from_pretrained(tiny_pipeline_dir, finetune="full", device="cpu")
    assert all(p.requires_grad for p in full.unet.parameters())


def test_fresh_lora_does_not_change_the_model(tiny_pipeline_dir):
    base = DiffusionPolicy.from_pretrained(tiny_pipeline_dir, finetune="full", device="cpu")
    adapted = DiffusionPolicy.from_pretrained(tiny_pipeline_dir, finetune="lora", device="cpu")
    a, _ = base.sample(PROMPTS[:2], seeds=[3, 4], num_steps=3)
    b, _ = adapted.sample(PROMPTS[:2], seeds=[3, 4], num_steps=3)
    np.testing.assert_allclose(a.latents, b.latents, atol=1e-5)


def test_lora_save_load_round_trip_and_diffusers_compatibility(lora_policy, tiny_pipeline_dir, tmp_path):
    directory = lora_policy.save_lora(tmp_path / "lora")
    assert (directory / LORA_WEIGHTS_NAME).is_file()
    assert json.loads((directory / LORA_CONFIG_NAME).read_text())["r"] == 4
    restored = DiffusionPolicy.from_pretrained(tiny_pipeline_dir, lora_path=directory, device="cpu")
    original, _ = lora_policy.sample(PROMPTS[:2], seeds=[11, 12], num_steps=3)
    reloaded, _ = restored.sample(PROMPTS[:2], seeds=[11, 12], num_steps=3)
    np.testing.assert_allclose(original.log_probs, reloaded.log_probs, atol=1e-6)

    # The same file loads with diffusers' own LoRA loader.
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(directory, weight_name=LORA_WEIGHTS_NAME)
    lora_keys = [k for k in pipe.unet.state_dict() if "lora" in k]
    assert len(lora_keys) == len(lora_policy.lora_state_dict())


def test_loading_errors_name_the_problem(tmp_path, tiny_pipeline_dir):
    with pytest.raises(ValueError, match="is not a directory"):
        DiffusionPolicy.from_pretrained(tmp_path / "nope")
    (tmp_path / "half" / "unet").mkdir(parents=True)
    with pytest.raises(ValueError, match="missing vae/, text_encoder/, tokenizer/, scheduler/"):
        DiffusionPolicy.from_pretrained(tmp_path / "half")
    with pytest.raises(ValueError, match="lacks pytorch_lora_weights.safetensors"):
        DiffusionPolicy.from_pretrained(tiny_pipeline_dir, lora_path=tmp_path)
    with pytest.raises(ValueError, match="dtype 'fp8'"):
        DiffusionPolicy.from_pretrained(tiny_pipeline_dir, dtype="fp8")


def test_pickle_weights_are_refused(tmp_path, tiny_pipeline_dir):
    import shutil

    copy = tmp_path / "pickled"
    shutil.copytree(tiny_pipeline_dir, copy)
    weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(copy / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match="safetensors only"):
        DiffusionPolicy.from_pretrained(copy)


def test_sampling_argument_errors(lora_policy):
    with pytest.raises(ValueError, match="one seed per prompt"):
        lora_policy.sample(PROMPTS[:2], seeds=[1])
    with pytest.raises(ValueError, match="eta must be > 0"):
        lora_policy.sample(PROMPTS[:1], seeds=[1], eta=0.0)


def _adapter_policy(tiny_pipeline_dir, seed, **kwargs):
    policy = DiffusionPolicy.from_pretrained(
        tiny_pipeline_dir,
        finetune="lora",
        lora_rank=4,
        lora_alpha=8.0,
        lora_target_modules=["to_q", "to_k", "to_v", "to_out.0", "ff.net.2"],
        device="cpu",
        **kwargs,
    )
    _perturb(policy.trainable_parameters(), seed=seed)
    return policy


def _frozen_weights(policy):
    return {name: p.detach().clone() for name, p in policy.unet.named_parameters() if not p.requires_grad}


def test_merged_adapter_samples_like_the_unmerged_one_and_unmerges_exactly(tiny_pipeline_dir):
    policy = _adapter_policy(tiny_pipeline_dir, seed=1)
    frozen = _frozen_weights(policy)
    unmerged, _ = policy.sample(PROMPTS[:3], seeds=[5, 6, 7], num_steps=3, guidance_scale=3.0)

    assert policy.merge_lora() is True and policy.lora_merged
    assert any(not torch.equal(frozen[name], p) for name, p in policy.unet.named_parameters() if name in frozen), (
        "merging changed no weight"
    )
    merged, _ = policy.sample(PROMPTS[:3], seeds=[5, 6, 7], num_steps=3, guidance_scale=3.0)
    np.testing.assert_allclose(merged.latents, unmerged.latents, rtol=1e-5, atol=1e-4)  # float rounding, relative to |x| up to ~15
    np.testing.assert_allclose(np.exp(merged.log_probs - unmerged.log_probs), 1.0, atol=1e-4)
    # The unmerged model's recomputation (what a learner does) agrees with the merged rollout.
    policy.unmerge_lora()
    np.testing.assert_allclose(np.exp(policy.trajectory_log_probs(merged) - merged.log_probs), 1.0, atol=1e-4)

    # Unmerging restores every frozen weight bit for bit, even after several merge cycles.
    for _ in range(3):
        policy.merge_lora()
        policy.unmerge_lora()
    assert not policy.lora_merged
    assert all(torch.equal(frozen[name], p) for name, p in policy.unet.named_parameters() if name in frozen)


def test_loading_adapter_weights_into_a_merged_policy_keeps_it_merged_and_current(tiny_pipeline_dir):
    rollout = _adapter_policy(tiny_pipeline_dir, seed=1)
    learner = _adapter_policy(tiny_pipeline_dir, seed=2)  # other adapter weights, as after an update
    rollout.merge_lora()
    rollout.load_lora_state_dict(learner.lora_state_dict())
    assert rollout.lora_merged
    sampled, _ = rollout.sample(PROMPTS[:2], seeds=[3, 4], num_steps=3)
    expected, _ = learner.sample(PROMPTS[:2], seeds=[3, 4], num_steps=3)
    np.testing.assert_allclose(sampled.latents, expected.latents, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.exp(sampled.log_probs - expected.log_probs), 1.0, atol=1e-4)


def test_a_merged_policy_refuses_to_compute_gradients_and_half_precision_stays_unmerged(tiny_pipeline_dir):
    policy = _adapter_policy(tiny_pipeline_dir, seed=1)
    trajectories, _ = policy.sample(PROMPTS[:2], seeds=[0, 1], num_steps=2)
    policy.merge_lora()
    batch = step_inputs(trajectories)
    with pytest.raises(RuntimeError, match="unmerge_lora"):
        policy.log_prob(**batch)
    with torch.no_grad():
        policy.log_prob(**batch)  # values without gradients are fine
    policy.unmerge_lora()
    policy.log_prob(**batch).log_prob.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.trainable_parameters())

    half = _adapter_policy(tiny_pipeline_dir, seed=1, dtype="bfloat16")
    assert half.merge_lora() is False and not half.lora_merged
    with pytest.raises(ValueError, match="no LoRA adapter to merge"):
        DiffusionPolicy.from_pretrained(tiny_pipeline_dir, finetune="full", device="cpu").merge_lora()
