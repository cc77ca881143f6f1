"""Every shipped preset loads, validates, and is what its name promises."""

import pytest

from orchestrator.config import load_preset, preset_names


def test_the_promised_presets_exist():
    assert {"toy-ddpo", "toy-dpok", "toy-compressibility", "toy-flow-grpo", "toy-hacking", "quickstart"} <= set(preset_names())


GPU_PRESETS = ["sd15-aesthetic-ddpo", "sd15-imagereward-dpok", "sdxl-pickscore-grpo", "sd35m-pickscore-grpo", "flux-dev-hpsv2-grpo"]
FLOW_PRESETS = ["sd35m-pickscore-grpo", "flux-dev-hpsv2-grpo"]
"""The flow-matching presets (SD3.5, FLUX): Flow-GRPO's SDE, group advantages, the KL reference from the learners."""


@pytest.mark.parametrize("name", preset_names())
def test_preset_loads_and_splits_evenly(name):
    cfg = load_preset(name)
    assert cfg.train.samples_per_epoch % (cfg.learner.num_workers * cfg.learner.micro_batch_size) == 0
    if name not in GPU_PRESETS:
        assert cfg.model.path in (None, "toy-sd3")  # the toy presets run on an embedded model


def test_real_model_presets_validate_without_weights_and_ask_for_gpus():
    assert set(GPU_PRESETS) <= set(preset_names())
    for name in GPU_PRESETS:
        cfg = load_preset(name)
        assert cfg.model.path and cfg.model.dtype in ("float16", "bfloat16") and cfg.model.gradient_checkpointing
        assert cfg.learner.num_gpus_per_worker >= 1 and cfg.pools.rollout.num_gpus >= 1 and cfg.pools.reward.num_gpus > 0
        if cfg.pools.reference.num_actors:
            assert cfg.pools.reference.num_gpus > 0
    ddpo, dpok, grpo = (load_preset(name) for name in ("sd15-aesthetic-ddpo", "sd15-imagereward-dpok", "sdxl-pickscore-grpo"))
    assert ddpo.train.algorithm == "ddpo_is" and [c.name for c in ddpo.reward.components] == ["aesthetic"]
    assert (
        dpok.train.algorithm == "dpok"
        and dpok.pools.reference.num_actors >= 1
        and [c.name for c in dpok.reward.components] == ["imagereward"]
    )
    assert (
        grpo.train.advantage == "group" and grpo.train.samples_per_prompt > 1 and [c.name for c in grpo.reward.components] == ["pickscore"]
    )
    assert "xl" in grpo.model.path


def test_flow_matching_presets_follow_flow_grpo_without_a_reference_copy():
    sd35, flux = (load_preset(name) for name in FLOW_PRESETS)
    for cfg in (sd35, flux):
        assert cfg.model.dtype == "bfloat16" and cfg.model.finetune == "lora"
        assert cfg.train.algorithm == "dpok" and cfg.train.beta > 0 and cfg.train.reference == "adapter_off"
        assert not cfg.reference_pool_used  # no second copy of the transformer
        assert cfg.train.advantage == "group" and cfg.train.samples_per_prompt == 24  # Flow-GRPO's group size
        assert cfg.train.timestep_selection == "earliest" and cfg.train.trained_steps(cfg.sampling.num_steps) == cfg.sampling.num_steps - 1
    assert "3.5-medium" in sd35.model.path and [c.name for c in sd35.reward.components] == ["pickscore"]
    assert (sd35.sampling.num_steps, sd35.sampling.eta, sd35.sampling.guidance_scale) == (10, 0.7, 4.5)
    assert (sd35.model.lora.rank, sd35.model.lora.alpha) == (32, 64.0)
    assert "FLUX.1-dev" in flux.model.path and [c.name for c in flux.reward.components] == ["hpsv2"]
    assert flux.sampling.guidance_scale == 3.5 and flux.sampling.sde_window is None  # distilled guidance; no window for FLUX yet
    assert (flux.model.lora.rank, flux.model.lora.alpha) == (64, 128.0)


@pytest.mark.parametrize("name", GPU_PRESETS)
def test_running_a_real_model_preset_without_its_weights_names_the_missing_path(name, tmp_path):
    from orchestrator.run import train

    cfg = load_preset(name)
    # Fails in the pre-flight checks, before Ray or any actor starts.
    with pytest.raises(ValueError, match=f"model path '{cfg.model.path}' does not exist.*set model.path"):
        train(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_toy_presets_match_their_names():
    ddpo, dpok, jpeg = load_preset("toy-ddpo"), load_preset("toy-dpok"), load_preset("toy-compressibility")
    assert ddpo.train.algorithm == "ddpo_is" and [c.name for c in ddpo.reward.components] == ["toy_fidelity"]
    assert ddpo.learner.num_workers == 2 and ddpo.learner.zero_stage == 2
    assert all(p.num_actors >= 1 for p in (ddpo.pools.rollout, ddpo.pools.reward, ddpo.pools.reference))
    assert dpok.train.algorithm == "dpok" and dpok.train.beta > 0 and dpok.pools.reference.num_actors >= 1
    assert dpok.train.kl_target is not None  # beta adapts: a fixed beta held the policy still or let it drift
    # toy-ddpo's recipe, only the KL anchor added
    assert (dpok.learner, dpok.sampling, dpok.model.lora) == (ddpo.learner, ddpo.sampling, ddpo.model.lora)
    assert [c.name for c in jpeg.reward.components] == ["jpeg_compressibility"]


def test_overrides_apply_to_presets_and_unknown_names_list_the_valid_ones():
    assert load_preset("quickstart", ["train.epochs=3"]).train.epochs == 3
    with pytest.raises(ValueError, match="unknown preset 'toy'.*quickstart"):
        load_preset("toy")


def test_toy_flow_grpo_trains_the_embedded_flow_model_with_flow_grpo_on_cpu():
    cfg = load_preset("toy-flow-grpo")
    assert cfg.model.path == "toy-sd3" and cfg.model.dtype == "float32" and cfg.model.device == "auto"
    assert cfg.train.advantage == "group" and cfg.train.samples_per_prompt > 1
    assert [c.name for c in cfg.reward.components] == ["toy_fidelity"]
    assert 0 < cfg.sampling.eta < 1  # the Flow-GRPO SDE's noise level
    assert cfg.learner.num_gpus_per_worker == 0 and cfg.pools.rollout.num_gpus == 0
    # The recipe that raised toy_fidelity by 0.16 in 25 minutes (docs/notes/toy-flow-tuning.md):
    # SDE on the early steps only, every recorded step trained, and a KL guard against the base
    # model that the learners compute with their adapter off (no reference pool).
    assert cfg.sampling.sde_window == (0, 6) and cfg.sampling.recorded_steps == 6 and cfg.train.timestep_fraction == 1.0
    assert cfg.train.algorithm == "dpok" and cfg.train.beta > 0 and cfg.train.kl_target > 0
    assert cfg.train.reference == "adapter_off" and not cfg.reference_pool_used
    assert cfg.train.epochs * 7.0 <= 29 * 60  # 128 samples an epoch take 6-7 s on 2 cores: it fits 30 minutes


def test_the_reward_hacking_preset_trains_on_compressibility_and_watches_fidelity():
    cfg = load_preset("toy-hacking")
    assert [c.name for c in cfg.reward.components] == ["jpeg_compressibility"]  # a blank image scores best
    assert [c.name for c in cfg.train.gold_reward.components] == ["toy_fidelity"]
    assert cfg.train.early_stop.gold_drop > 0 and 0 < cfg.train.eval_every < cfg.train.epochs
    assert cfg.model.path is None and cfg.train.eval_every % cfg.train.checkpoint_every == 0
