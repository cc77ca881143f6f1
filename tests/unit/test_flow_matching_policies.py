"""What every flow-matching policy (SD3 and FLUX) must do alike, on the tiny random pipelines.

One table row per family; a new family is one more row. The family files
(test_flow_policy.py, test_flux_policy.py) keep what is particular to one model: its sigma
schedule, its conditioning, its LoRA targets and the diffusers sampler it reduces to.
"""

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from safetensors.torch import load_file

from actors.diffusion.files import FLUX, LORA_CONFIG_NAME, LORA_WEIGHTS_NAME, SD3, check_pipeline_dir, detect_family
from actors.diffusion.flow_policy import FlowPolicy
from actors.diffusion.flux_policy import FluxPolicy
from actors.diffusion.lora import unet_lora_state_dict
from actors.diffusion.policy import pretrained_policy
from actors.rl.losses import ddpo_is_loss
from tests.helpers.flow import PROMPTS, T5_TOKENS, perturb, step_inputs, transformer_inputs

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    """"sd3" or "flux", as :func:`tests.helpers.flow.transformer_inputs` takes it."""
    policy: type
    pipeline: type
    directory_fixture: str
    family: object
    t5_parts: tuple[str, str]
    """The T5 encoder's and tokenizer's folders."""
    guidance_scale: float
    """A scale that changes the model's output: CFG for SD3, the distilled guidance input for FLUX."""
    pipeline_size: dict
    """What the diffusers pipeline needs to sample the tiny model's 32 x 32 images."""


FAMILIES = {
    "sd3": Family("sd3", FlowPolicy, StableDiffusion3Pipeline, "sd3_dir", SD3, ("text_encoder_3", "tokenizer_3"), 4.5, {}),
    "flux": Family("flux", FluxPolicy, FluxPipeline, "flux_dir", FLUX, ("text_encoder_2", "tokenizer_2"), 3.5, {"height": 32, "width": 32}),
}


@dataclasses.dataclass
class Model:
    family: Family
    path: object
    rollout: object
    """A policy with a fresh adapter moved off its init, so that it really changes the model."""

    def load(self, **kwargs):
        kwargs = {"device": "cpu", "max_sequence_length": T5_TOKENS, "lora_rank": 4, "lora_alpha": 8.0, **kwargs}
        return self.family.policy.from_pretrained(self.path, **kwargs)

    def learner_copy(self):
        """What a learner holds after a weight sync: the transformer only, with the rollout's adapter weights."""
        learner = self.load(unet_only=True)
        learner.load_lora_state_dict(self.rollout.lora_state_dict())
        return learner

    def pipeline(self):
        pipe = self.family.pipeline.from_pretrained(self.path)
        pipe.set_progress_bar_config(disable=True)
        return pipe


@pytest.fixture(scope="module", params=list(FAMILIES))
def model(request) -> Model:
    family = FAMILIES[request.param]
    made = Model(family, request.getfixturevalue(family.directory_fixture), None)
    made.rollout = made.load()
    perturb(made.rollout.trainable_parameters())
    return made


# ---------------------------------------------------------------------- the directory


def test_directories_are_recognised_with_and_without_a_model_index(model, tmp_path):
    assert detect_family(model.path) is model.family.family and check_pipeline_dir(model.path) == model.path
    copy = tmp_path / "no-index"
    shutil.copytree(model.path, copy)
    (copy / "model_index.json").unlink()
    assert detect_family(copy) is model.family.family  # SD3 and FLUX told apart by the transformer's class
    assert isinstance(pretrained_policy(model.path, device="cpu", max_sequence_length=T5_TOKENS), model.family.policy)


@pytest.mark.parametrize("part", [0, 1], ids=["encoder", "tokenizer"])
def test_a_directory_without_the_t5_encoder_is_refused_naming_the_part(model, tmp_path, part):
    left_out = model.family.t5_parts[part]
    copy = tmp_path / "clip-only"
    shutil.copytree(model.path, copy, ignore=shutil.ignore_patterns(left_out))
    pattern = rf"not a complete {model.family.name} pipeline directory: missing {left_out}/.*T5 encoder.*is not supported"
    with pytest.raises(ValueError, match=pattern):
        check_pipeline_dir(copy)
    with pytest.raises(ValueError, match=pattern):
        model.family.policy.from_pretrained(copy, device="cpu")


# ---------------------------------------------------------------------- sampling


def test_same_seeds_give_the_same_images_whatever_the_batch(model):
    alone_trajectories, alone = model.rollout.sample(PROMPTS[1:2], seeds=[42], num_steps=3)
    together_trajectories, together = model.rollout.sample(PROMPTS, seeds=[7, 42, 8], num_steps=3)
    _, again = model.rollout.sample(PROMPTS[1:2], seeds=[42], num_steps=3)
    np.testing.assert_array_equal(alone, again)
    np.testing.assert_allclose(alone_trajectories.latents[0], together_trajectories.latents[1], atol=1e-5)
    assert np.abs(alone[0].astype(int) - together[1].astype(int)).max() <= 1  # a rounding step at most
    assert np.abs(together[0].astype(int) - together[1].astype(int)).sum() > 0


def test_sampling_argument_errors(model):
    with pytest.raises(ValueError, match="one seed per prompt"):
        model.rollout.sample(PROMPTS[:2], seeds=[1])
    with pytest.raises(ValueError, match="eta \\(the SDE noise level\\) must be > 0"):
        model.rollout.sample(PROMPTS[:1], seeds=[1], eta=0.0)


# ---------------------------------------------------------------------- log-probs


@pytest.mark.parametrize("guided", [False, True], ids=["guidance-1", "guidance-on"])
@pytest.mark.parametrize("recompute_batch", [3, 2])
def test_recomputed_log_probs_equal_recorded(model, guided, recompute_batch):
    scale = model.family.guidance_scale if guided else 1.0
    trajectories, _ = model.rollout.sample(PROMPTS, seeds=[5, 6, 7], num_steps=3, guidance_scale=scale, decode=False)
    recomputed = model.rollout.trajectory_log_probs(trajectories, batch_size=recompute_batch)
    np.testing.assert_allclose(np.exp(recomputed - trajectories.log_probs), 1.0, atol=1e-4)


def test_a_transformer_only_learner_reproduces_the_rollout_log_probs(model):
    learner = model.learner_copy()
    assert learner.vae is None and learner.text_encoders == ()
    trajectories, _ = model.rollout.sample(
        PROMPTS, seeds=[1, 2, 3], num_steps=3, guidance_scale=model.family.guidance_scale, reduction="sum", decode=False
    )
    recomputed = learner.trajectory_log_probs(trajectories, batch_size=2, reduction="sum")
    # the summed log-density adds rounding over 16 * 8 * 8 terms: a tolerance relative to its size
    np.testing.assert_allclose(recomputed, trajectories.log_probs, rtol=1e-5, atol=1e-3)
    with pytest.raises(ValueError, match="unet_only=True.*cannot encode prompts"):
        learner.sample(PROMPTS[:1], seeds=[0], num_steps=1)


def test_one_optimizer_step_on_the_adapter_moves_the_log_probs_and_keeps_them_finite(model):
    learner = model.learner_copy()
    trajectories, _ = model.rollout.sample(PROMPTS, seeds=[4, 5, 6], num_steps=2, guidance_scale=3.0, decode=False)
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
    synced = model.load()
    synced.load_lora_state_dict(unet_lora_state_dict(learner.transformer))
    np.testing.assert_allclose(np.exp(synced.trajectory_log_probs(trajectories) - after), 1.0, atol=1e-4)


def test_bfloat16_frozen_weights_with_float32_adapter_and_log_prob_maths(model):
    rollout = model.load(dtype="bfloat16")
    perturb(rollout.trainable_parameters())
    learner = model.load(dtype="bfloat16", unet_only=True)
    learner.load_lora_state_dict(rollout.lora_state_dict())
    assert {p.dtype for p in rollout.trainable_parameters()} == {torch.float32}
    assert {p.dtype for p in rollout.transformer.parameters() if not p.requires_grad} == {torch.bfloat16}
    trajectories, _ = rollout.sample(PROMPTS, seeds=[1, 2, 3], num_steps=3, guidance_scale=model.family.guidance_scale, decode=False)
    assert trajectories.log_probs.dtype == np.float32 and np.isfinite(trajectories.log_probs).all()
    # same batch shape as sampling: half-precision kernels may round differently for another batch size
    np.testing.assert_allclose(np.exp(learner.trajectory_log_probs(trajectories) - trajectories.log_probs), 1.0, atol=1e-4)


# ---------------------------------------------------------------------- LoRA files


def test_saved_lora_round_trips_and_loads_into_the_diffusers_pipeline(model, tmp_path):
    directory = model.rollout.save_lora(tmp_path / "lora")
    assert json.loads((directory / LORA_CONFIG_NAME).read_text())["r"] == 4
    restored = model.load(lora_path=directory)
    original, _ = model.rollout.sample(PROMPTS[:2], seeds=[11, 12], num_steps=2, decode=False)
    reloaded, _ = restored.sample(PROMPTS[:2], seeds=[11, 12], num_steps=2, decode=False)
    np.testing.assert_allclose(original.log_probs, reloaded.log_probs, atol=1e-6)

    pipe = model.pipeline()

    def generate():
        return pipe(
            PROMPTS[:1],
            num_inference_steps=2,
            max_sequence_length=T5_TOKENS,
            output_type="np",
            generator=torch.Generator().manual_seed(0),
            **model.family.pipeline_size,
        ).images

    plain = generate()
    pipe.load_lora_weights(directory, weight_name=LORA_WEIGHTS_NAME)
    adapted = generate()
    assert np.abs(adapted - plain).max() > 1e-3
    # diffusers applies the adapter at our scale (alpha / rank = 2, read from the file's metadata),
    # on the same layers: its transformer and ours give the same velocity.
    inputs = transformer_inputs(model.family.name, original, step=1, sigma=0.5)
    with torch.no_grad():
        torch.testing.assert_close(pipe.transformer(**inputs)[0], model.rollout.transformer(**inputs)[0], rtol=1e-5, atol=1e-5)


def test_a_learner_written_adapter_loads_into_the_diffusers_pipeline_and_back(model, tmp_path):
    # A learner writes its checkpoint from the weights it syncs: diffusers' lora.down/lora.up names, as numpy.
    weights = {name: tensor.numpy() for name, tensor in unet_lora_state_dict(model.rollout.transformer).items()}
    directory = model.rollout.save_lora(tmp_path / "lora", weights)
    keys = load_file(directory / LORA_WEIGHTS_NAME).keys()
    assert all(key.startswith("transformer.") and (".lora_A." in key or ".lora_B." in key) for key in keys)  # diffusers' file layout
    restored = model.load(lora_path=directory)
    pipe = model.pipeline()
    pipe.load_lora_weights(directory, weight_name=LORA_WEIGHTS_NAME)
    trajectories, _ = model.rollout.sample(PROMPTS[:2], seeds=[1, 2], num_steps=2, decode=False)
    inputs = transformer_inputs(model.family.name, trajectories, step=1, sigma=0.3)
    with torch.no_grad():
        ours = model.rollout.transformer(**inputs)[0]
        torch.testing.assert_close(restored.transformer(**inputs)[0], ours, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(pipe.transformer(**inputs)[0], ours, rtol=1e-5, atol=1e-5)  # at our scale, alpha / rank = 2


def test_weights_keyed_for_a_unet_are_refused(model):
    state = {f"unet.{k}": v for k, v in model.rollout.lora_state_dict().items()}
    with pytest.raises(ValueError, match="keyed for a UNet"):
        model.rollout.load_lora_state_dict(state)
