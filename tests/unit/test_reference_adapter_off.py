"""``train.reference: adapter_off``: the reference means from the trained network with its LoRA adapter switched off.

The reference pool holds a frozen copy of the base model; under a LoRA adapter the learner
holds the same base weights, so switching the adapter off must give that copy's Gaussian means
exactly, on the tiny SD (DDIM, UNet) and SD3 (flow, transformer) pipelines. The config,
the driver's resource demands and pool creation then leave the reference pool out.
"""

import numpy as np
import pytest
import torch

from actors.diffusion.flow_policy import FlowPolicy
from actors.diffusion.policy import DiffusionPolicy, load_policy
from actors.workers.reference import ReferenceWorker
from orchestrator.config import LoRAConfig, ModelConfig, load_config
from orchestrator.pools import demands
from tests.helpers.flow import PROMPTS

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", params=["sd", "sd3"])
def setup(request, tiny_pipeline_dir, sd3_dir):
    """(model section, trajectories sampled by a moved adapter, a learner copy holding that adapter)."""
    flow = request.param == "sd3"
    path = sd3_dir if flow else tiny_pipeline_dir
    model = ModelConfig(path=str(path), device="cpu", lora=LoRAConfig(rank=4, alpha=8.0))
    if flow:
        rollout = FlowPolicy.from_pretrained(path, device="cpu", max_sequence_length=16, lora_rank=4, lora_alpha=8.0)
    else:
        rollout = DiffusionPolicy.from_pretrained(path, device="cpu", lora_rank=4, lora_alpha=8.0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # move the adapter off its init (B = 0), so it really changes the model
        for p in rollout.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    trajectories, _ = rollout.sample(PROMPTS, seeds=[1, 2, 3], num_steps=3, eta=0.7 if flow else 1.0, guidance_scale=3.0, decode=False)
    learner = load_policy(model, unet_only=True)  # what a learner holds after a weight sync
    learner.load_lora_state_dict(rollout.lora_state_dict())
    return model, trajectories, learner


def test_the_adapter_off_means_are_the_frozen_reference_copy_s(setup):
    model, trajectories, learner = setup
    reference, _ = ReferenceWorker(model).reference_means(trajectories)  # what the reference pool computes
    learner.unet.train()  # as under the learner's engine
    trainable = [name for name, p in learner.unet.named_parameters() if p.requires_grad]
    adapted = learner.replay(trajectories)[1]
    with torch.no_grad(), learner.adapter_disabled():
        off = learner.replay(trajectories)[1]
    assert off.shape == reference.shape == adapted.shape
    # peft's switched-off layer calls its frozen base layer alone: the same weights and operations as the copy's
    np.testing.assert_array_equal(off, reference)
    assert np.abs(adapted - reference).max() > 1e-4  # the adapter acts, so equality above is not trivial
    # afterwards the adapter is on again, trainable, and the network back in train mode
    np.testing.assert_array_equal(learner.replay(trajectories)[1], adapted)
    assert [name for name, p in learner.unet.named_parameters() if p.requires_grad] == trainable and trainable
    assert learner.unet.training


def test_the_adapter_is_on_again_after_an_error_in_the_block(setup):
    _, trajectories, learner = setup
    adapted = learner.replay(trajectories)[1]
    with pytest.raises(RuntimeError, match="inside"), learner.adapter_disabled():
        raise RuntimeError("inside")
    np.testing.assert_array_equal(learner.replay(trajectories)[1], adapted)


def test_a_policy_without_an_adapter_or_with_a_merged_one_cannot_switch_it_off(tiny_pipeline_dir):
    full = DiffusionPolicy.from_pretrained(tiny_pipeline_dir, device="cpu", finetune="full", unet_only=True)
    with pytest.raises(ValueError, match="no LoRA adapter to switch off.*use train.reference: pool"):
        with full.adapter_disabled():
            pass
    merged = DiffusionPolicy.from_pretrained(tiny_pipeline_dir, device="cpu", unet_only=True)
    assert merged.merge_lora()
    with pytest.raises(ValueError, match="merged into the base weights; call unmerge_lora"):
        with merged.adapter_disabled():
            pass


POOLS = {"reference": {"num_actors": 0}}


def test_adapter_off_needs_lora_and_lets_dpok_run_without_a_reference_pool():
    cfg = load_config({"train": {"algorithm": "dpok", "reference": "adapter_off"}, "pools": POOLS})
    assert not cfg.reference_pool_used
    with pytest.raises(ValueError, match="pools.reference.num_actors must be >= 1 for algorithm dpok.*train.reference: adapter_off"):
        load_config({"train": {"algorithm": "dpok"}, "pools": POOLS})
    with pytest.raises(
        ValueError, match="train.reference must be pool when model.finetune is full, got adapter_off.*use model.finetune: lora"
    ):
        load_config({"train": {"reference": "adapter_off"}, "model": {"finetune": "full"}})
    with pytest.raises(ValueError, match="train.reference: expected one of 'pool', 'adapter_off', got 'copy'"):
        load_config({"train": {"reference": "copy"}})


@pytest.mark.parametrize("reference, started", [("pool", True), ("adapter_off", False)])
def test_the_driver_reserves_the_reference_pool_only_in_pool_mode(reference, started):
    # pools.reference keeps its default single actor: adapter_off ignores it
    cfg = load_config({"train": {"algorithm": "dpok", "reference": reference}})
    assert cfg.reference_pool_used is started
    wanted = demands(pools=cfg.pools, learner=cfg.learner, uses_reference=cfg.reference_pool_used)
    assert ("reference" in [demand.pool for demand in wanted]) is started
