"""Every shipped preset loads, validates, and is what its name promises."""

import pytest

from orchestrator.config import load_preset, preset_names


def test_the_promised_presets_exist():
    assert {"toy-ddpo", "toy-dpok", "toy-compressibility", "quickstart"} <= set(preset_names())


@pytest.mark.parametrize("name", preset_names())
def test_preset_loads_and_splits_evenly(name):
    cfg = load_preset(name)
    assert cfg.train.samples_per_epoch % (cfg.learner.num_workers * cfg.learner.micro_batch_size) == 0
    assert cfg.model.path is None  # the toy presets run on the embedded model


def test_toy_presets_match_their_names():
    ddpo, dpok, jpeg = load_preset("toy-ddpo"), load_preset("toy-dpok"), load_preset("toy-compressibility")
    assert ddpo.train.algorithm == "ddpo_is" and [c.name for c in ddpo.reward.components] == ["toy_fidelity"]
    assert ddpo.learner.num_workers == 2 and ddpo.learner.zero_stage == 2
    assert all(p.num_actors >= 1 for p in (ddpo.pools.rollout, ddpo.pools.reward, ddpo.pools.reference))
    assert dpok.train.algorithm == "dpok" and dpok.train.beta > 0 and dpok.pools.reference.num_actors >= 1
    assert [c.name for c in jpeg.reward.components] == ["jpeg_compressibility"]


def test_overrides_apply_to_presets_and_unknown_names_list_the_valid_ones():
    assert load_preset("quickstart", ["train.epochs=3"]).train.epochs == 3
    with pytest.raises(ValueError, match="unknown preset 'toy'.*quickstart"):
        load_preset("toy")
