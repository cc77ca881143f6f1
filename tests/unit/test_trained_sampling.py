"""An adapter carries the sampler settings it was trained with; eval and serve choose from them."""

import json

import pytest

from actors.toy.model import embedded_model_path, resolve_model_path
from jobs.sampling import choose_sampling, default_sampler, parse_window
from orchestrator.config import SamplingConfig, dump_yaml, load_config
from orchestrator.rundir import (
    SAMPLING_FILE,
    SamplerSettings,
    resolve_model,
    trained_model,
    trained_sampling,
    write_sampling,
)


def test_settings_are_written_beside_the_adapter_and_read_back(tmp_path):
    write_sampling(tmp_path, SamplingConfig(num_steps=10, eta=0.7, guidance_scale=1.0), "toy-sd3")
    assert json.loads((tmp_path / SAMPLING_FILE).read_text()) == {
        "num_steps": 10,
        "eta": 0.7,
        "guidance_scale": 1.0,
        "sde_window": None,
        "model": "toy-sd3",
    }
    settings, source = trained_sampling(tmp_path)
    assert settings == SamplerSettings(num_steps=10, eta=0.7, guidance_scale=1.0) and source == tmp_path / SAMPLING_FILE
    assert trained_model(tmp_path) == "toy-sd3"


def test_a_flow_run_s_sde_window_is_recorded_and_read_back(tmp_path):
    adapter = tmp_path / "epoch_0002" / "lora"
    adapter.mkdir(parents=True)
    # a checkpoint with only its config.yaml, then the sampling.json a run writes: both carry the window
    config = load_config(overrides=["sampling.num_steps=10", "sampling.eta=0.7", "sampling.sde_window=[0, 6]"])
    dump_yaml(config, adapter.parent / "config.yaml")
    windowed = SamplerSettings(num_steps=10, eta=0.7, guidance_scale=4.5, sde_window=(0, 6))
    assert trained_sampling(adapter)[0] == windowed
    write_sampling(adapter, SamplingConfig(num_steps=10, eta=0.7, sde_window=(0, 6)), "toy-sd3")
    assert json.loads((adapter / SAMPLING_FILE).read_text())["sde_window"] == [0, 6]
    assert trained_sampling(adapter)[0] == windowed
    assert "SDE on steps 0-5, ODE after" in windowed.describe()
    # a record written before windows were recorded: the checkpoint's config.yaml gives it, else there is none
    (adapter / SAMPLING_FILE).write_text('{"num_steps": 10, "eta": 0.7, "guidance_scale": 1.0}')
    assert trained_sampling(adapter)[0].sde_window == (0, 6)
    (adapter.parent / "config.yaml").write_text("sampling: [broken")  # a damaged config is said, not read as "no window"
    with pytest.raises(ValueError, match="config.yaml is not a readable run config"):
        trained_sampling(adapter)
    (adapter.parent / "config.yaml").unlink()
    assert trained_sampling(adapter)[0].sde_window is None


def test_the_base_model_of_an_adapter_comes_from_its_record_else_its_checkpoint_config(tmp_path):
    adapter = tmp_path / "epoch_0004" / "lora"
    adapter.mkdir(parents=True)
    assert trained_model(adapter) is None  # no record: the caller's default (the toy UNet model, or --model)
    dump_yaml(load_config(overrides=["model.path=/models/sd15"]), tmp_path / "epoch_0004" / "config.yaml")
    assert trained_model(adapter) == "/models/sd15"
    write_sampling(adapter, SamplingConfig(), None)  # trained on the embedded toy UNet model
    assert trained_model(adapter) is None
    # The embedded models' names resolve to their shipped directories; None is the toy UNet model.
    assert resolve_model(None, adapter) == (embedded_model_path("toy-t2i"), None)
    write_sampling(adapter, SamplingConfig(), "toy-sd3")
    assert resolve_model(None, adapter) == (embedded_model_path("toy-sd3"), None)
    assert resolve_model("/models/other", adapter) == ("/models/other", None)  # a given model wins


def test_an_embedded_model_name_resolves_unless_a_directory_has_that_name(tmp_path, monkeypatch):
    assert resolve_model_path(None) == embedded_model_path() == embedded_model_path("toy-t2i")
    assert resolve_model_path("toy-sd3") == embedded_model_path("toy-sd3")
    assert resolve_model_path("s3://bucket/models/sd35") == "s3://bucket/models/sd35"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "toy-sd3").mkdir()
    assert resolve_model_path("toy-sd3") == "toy-sd3"  # the user's own directory of that name
    with pytest.raises(ValueError, match="'toy-xl' is not an embedded model; they are toy-t2i, toy-sd3"):
        embedded_model_path("toy-xl")


def test_a_checkpoint_without_the_file_falls_back_to_its_config(tmp_path):
    # Checkpoints written before sampling.json existed still hold the run's config.yaml.
    adapter = tmp_path / "epoch_0004" / "lora"
    adapter.mkdir(parents=True)
    dump_yaml(load_config(overrides=["sampling.num_steps=12", "sampling.guidance_scale=2.5"]), tmp_path / "epoch_0004" / "config.yaml")
    settings, source = trained_sampling(adapter)
    assert settings == SamplerSettings(num_steps=12, eta=1.0, guidance_scale=2.5) and source.name == "config.yaml"


def test_an_adapter_with_no_record_has_no_trained_settings(tmp_path):
    (tmp_path / "lora").mkdir()
    assert trained_sampling(tmp_path / "lora") is None  # no config.yaml beside it
    assert trained_sampling(tmp_path) is None  # not in a checkpoint at all


@pytest.mark.parametrize(
    "text, words",
    [
        ("{broken", "is not readable JSON"),
        ('{"num_steps": 10, "eta": 1.0}', "must hold num_steps, eta and guidance_scale"),
        ('{"num_steps": 2.5, "eta": 1.0, "guidance_scale": 1.0}', "num_steps 2.5 is not an integer"),
        ('{"num_steps": 10, "eta": "high", "guidance_scale": 1.0}', "not valid"),
        ('{"num_steps": 10, "eta": 0.7, "guidance_scale": 1.0, "sde_window": [0, 12]}', "sde_window [0, 12] is not within the 10 steps"),
        ('{"num_steps": 10, "eta": 0.7, "guidance_scale": 1.0, "sde_window": "early"}', "sde_window 'early' is not a [start, stop] pair"),
    ],
)
def test_a_damaged_record_is_a_clear_error(tmp_path, text, words):
    (tmp_path / SAMPLING_FILE).write_text(text)
    with pytest.raises(ValueError) as caught:
        trained_sampling(tmp_path)
    assert words in str(caught.value) and str(tmp_path / SAMPLING_FILE) in str(caught.value)


TRAINED = (SamplerSettings(num_steps=10, eta=1.0, guidance_scale=1.0), "run/checkpoints/epoch_0160/lora/sampling.json")


def test_given_settings_win_then_training_then_the_defaults():
    nothing = {"num_steps": None, "eta": None, "guidance_scale": None}
    as_trained = choose_sampling(nothing, TRAINED)
    assert as_trained.settings == TRAINED[0] and set(as_trained.sources.values()) == {"trained"} and not as_trained.differences
    assert choose_sampling(nothing, None).settings == default_sampler() == SamplerSettings(num_steps=20, eta=1.0, guidance_scale=4.5)

    mixed = choose_sampling({**nothing, "guidance_scale": 4.5}, TRAINED, names={"guidance_scale": "--guidance-scale"})
    assert mixed.settings == SamplerSettings(num_steps=10, eta=1.0, guidance_scale=4.5)
    assert mixed.sources == {"num_steps": "trained", "eta": "trained", "guidance_scale": "given"}
    # One line per differing setting, naming both values and where the training one came from.
    (line,) = mixed.differences
    assert line.startswith("--guidance-scale 4.5 differs from the 1 the adapter was trained with") and TRAINED[1] in line


def test_a_given_setting_equal_to_training_is_no_difference():
    same = choose_sampling({"num_steps": 10, "eta": 1, "guidance_scale": None}, TRAINED)
    assert same.differences == () and same.sources["num_steps"] == "given"
    assert same.record()["trained"] == {"num_steps": 10, "eta": 1.0, "guidance_scale": 1.0, "sde_window": None}


def test_the_sde_window_comes_with_the_trained_number_of_steps_only():
    windowed = (SamplerSettings(num_steps=10, eta=0.7, guidance_scale=1.0, sde_window=(0, 6)), "run/lora/sampling.json")
    nothing = {"num_steps": None, "eta": None, "guidance_scale": None}
    assert choose_sampling(nothing, windowed).settings.sde_window == (0, 6)
    assert choose_sampling({**nothing, "eta": 0.3}, windowed).settings.sde_window == (0, 6)  # only the steps decide
    assert choose_sampling({**nothing, "num_steps": 10}, windowed).differences == ()
    # the window names steps of a 10-step schedule: with 20 steps there is none, and the user is told
    other = choose_sampling({**nothing, "num_steps": 20}, windowed, names={"num_steps": "--steps"})
    assert other.settings == SamplerSettings(num_steps=20, eta=0.7, guidance_scale=1.0, sde_window=None)
    assert len(other.differences) == 2 and "SDE on steps 0-5 of 10" in other.differences[1]
    assert "with 20 steps every step takes the SDE" in other.differences[1]
    assert choose_sampling(nothing, None).settings.sde_window is None  # no run: no window


def test_a_given_window_wins_and_a_difference_from_training_is_said():
    windowed = (SamplerSettings(num_steps=10, eta=0.7, guidance_scale=1.0, sde_window=(0, 6)), "run/lora/sampling.json")
    nothing = {"num_steps": None, "eta": None, "guidance_scale": None}
    names = {"sde_window": "--sde-window"}
    every_step = choose_sampling({**nothing, "sde_window": parse_window("none")}, windowed, names=names)
    assert every_step.settings.sde_window is None
    (line,) = every_step.differences
    assert line.startswith("--sde-window none (SDE on every step) differs from the 0,6 (SDE on steps 0-5)") and "run/lora" in line
    narrower = choose_sampling({**nothing, "sde_window": parse_window("0,2")}, windowed, names=names)
    assert narrower.settings.sde_window == (0, 2) and len(narrower.differences) == 1
    assert choose_sampling({**nothing, "sde_window": parse_window(" 0,6")}, windowed).differences == ()  # the trained one: no warning
    base = choose_sampling({"num_steps": 10, "eta": 0.7, "guidance_scale": 1.0, "sde_window": (0, 6)}, None)  # a base model, as trained
    assert base.settings.sde_window == (0, 6) and base.differences == ()
    with pytest.raises(ValueError, match="--sde-window 'early' must be START,STOP \\(e.g. 0,6: the SDE on steps 0-5\\) or none"):
        parse_window("early")
