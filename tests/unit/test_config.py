"""Tests for orchestrator/config: defaults, YAML round trips, overrides, and every kind of load error.

The error tests are the catalogue of what a user sees for a bad config: each row is a
representative mistake and the words its message must contain.
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal

import pydantic
import pytest
import yaml
from pydantic import Field

from actors.rl.schedules import learning_rate_at
from orchestrator.config import (
    Config,
    LearnerConfig,
    LoRAConfig,
    ModelConfig,
    RewardComponent,
    RewardConfig,
    SamplingConfig,
    Section,
    ServeConfig,
    apply_overrides,
    config_to_yaml,
    dump_yaml,
    from_dict,
    load_config,
    parse_yaml,
    replace,
    to_dict,
)


def raises_with(*fragments: str):
    """pytest.raises(ValueError) whose message must contain every fragment verbatim."""
    return pytest.raises(ValueError, match="(?s)" + "".join(f"(?=.*{re.escape(f)})" for f in fragments))


# A small tree exercising field types the sections use in other combinations.
class _Leaf(Section):
    name: str
    """The leaf's name."""
    size: int = 1
    """Its size."""


class _Tree(Section):
    maybe: float | None = None
    """An optional number."""
    choice: Literal["a", "b"] = "a"
    """A choice."""
    leaves: tuple[_Leaf, ...] = Field((), strict=False)
    """Nested sections in a list."""
    extra: dict[str, Any] = Field(default_factory=dict)
    """Free-form data."""
    weights: dict[str, float] = Field(default_factory=dict)
    """Numbers by name."""
    flag: bool = False
    """A switch."""


# ------------------------------------------------------------------------------ defaults and round trips


def test_defaults_load():
    cfg = load_config()
    assert cfg == Config() == load_config({})
    assert cfg.sampling.num_steps == 20 and cfg.sampling.eta == 1.0
    assert cfg.model.path is None and cfg.model.finetune == "lora"
    assert cfg.model.lora.target_modules is None  # each policy class's default layers (a UNet's: to_q, to_k, to_v, to_out.0)
    assert cfg.reward.components == (RewardComponent(name="toy_fidelity", weight=1.0),)


def test_partial_mapping_keeps_other_defaults():
    cfg = load_config({"sampling": {"num_steps": 5}})
    assert cfg.sampling == SamplingConfig(num_steps=5)
    assert cfg.model == ModelConfig()


NON_DEFAULT = [
    "seed=7",
    "model.path=/models/sd15",
    "model.finetune=full",
    "model.lora.rank=16",
    "model.lora.target_modules=[to_q, to_v]",
    "model.dtype=bfloat16",
    "model.device=cuda:1",
    "sampling.eta=0.5",
    "sampling.log_prob_reduction=sum",
    "reward={toy_fidelity: 1.0, jpeg_compressibility: -0.1}",
]


def test_to_dict_from_dict_round_trip():
    cfg = load_config(overrides=NON_DEFAULT)
    plain = to_dict(cfg)
    assert plain["model"]["lora"]["target_modules"] == ["to_q", "to_v"]  # tuples become lists
    assert from_dict(Config, plain) == cfg


def test_yaml_file_round_trip(tmp_path):
    cfg = load_config(overrides=NON_DEFAULT)
    path = tmp_path / "nested" / "run.yaml"
    dump_yaml(cfg, path)
    assert load_config(path) == cfg
    assert load_config(str(path)) == cfg
    # The file is plain YAML any reader understands.
    assert yaml.safe_load(path.read_text()) == to_dict(cfg)


def test_yaml_quotes_strings_that_would_read_back_as_floats():
    cfg = load_config(overrides=["model.path='1e-4'"])
    assert cfg.model.path == "1e-4"
    assert load_config(yaml.safe_load(config_to_yaml(cfg))) == cfg
    assert parse_yaml(config_to_yaml(cfg))["model"]["path"] == "1e-4"


def test_exponent_without_dot_reads_as_float(tmp_path):
    # Plain PyYAML (YAML 1.1) reads "1e-1" as a string; the config loader must not.
    path = tmp_path / "run.yaml"
    path.write_text("sampling:\n  eta: 1e-1\n")
    assert load_config(path).sampling.eta == pytest.approx(0.1)
    assert load_config(overrides=["sampling.eta=5E-1"]).sampling.eta == pytest.approx(0.5)


def test_empty_file_means_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing set\n")
    assert load_config(path) == Config()


def test_generic_field_types_round_trip():
    data = {
        "maybe": 2,
        "choice": "b",
        "leaves": [{"name": "p"}, {"name": "q", "size": 2}],
        "extra": {"nested": {"k": [1, 2]}},
        "weights": {"w": 1},
        "flag": True,
    }
    tree = from_dict(_Tree, data)
    assert tree == _Tree(
        maybe=2.0,
        choice="b",
        leaves=(_Leaf(name="p"), _Leaf(name="q", size=2)),
        extra={"nested": {"k": [1, 2]}},
        weights={"w": 1.0},
        flag=True,
    )
    assert isinstance(tree.maybe, float) and isinstance(tree.weights["w"], float)
    assert from_dict(_Tree, to_dict(tree)) == tree
    assert from_dict(_Tree, {"maybe": None}).maybe is None


def test_dict_fields_are_copied():
    source = {"extra": {"nested": {"k": [1]}}}
    tree = from_dict(_Tree, source)
    source["extra"]["nested"]["k"].append(2)
    assert tree.extra == {"nested": {"k": [1]}}
    assert type(tree.extra) is dict


# ------------------------------------------------------------------------------ overrides


@pytest.mark.parametrize(
    ("override", "get", "expected"),
    [
        ("sampling.num_steps=10", lambda c: c.sampling.num_steps, 10),
        ("model.lora.rank=8", lambda c: c.model.lora.rank, 8),
        ("model.lora.target_modules=[to_q, to_v]", lambda c: c.model.lora.target_modules, ("to_q", "to_v")),
        ("model.path=null", lambda c: c.model.path, None),
        ("model.path=/a=b", lambda c: c.model.path, "/a=b"),  # split at the first '=' only
        ("sampling.guidance_scale=7", lambda c: c.sampling.guidance_scale, 7.0),
        ("seed=3", lambda c: c.seed, 3),
        (
            "reward.components=[{name: toy_fidelity, weight: 0.5}, {name: jpeg_compressibility}]",
            lambda c: c.reward.components,
            (RewardComponent(name="toy_fidelity", weight=0.5), RewardComponent(name="jpeg_compressibility", weight=1.0)),
        ),
        (
            "reward.components=[toy_fidelity, jpeg_compressibility]",
            lambda c: [x.name for x in c.reward.components],
            ["toy_fidelity", "jpeg_compressibility"],
        ),
    ],
)
def test_override_sets_value(override, get, expected):
    assert get(load_config(overrides=[override])) == expected


def test_overrides_apply_in_order_on_top_of_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("sampling:\n  num_steps: 30\n  batch_size: 4\n")
    cfg = load_config(path, overrides=["sampling.num_steps=10", "sampling.num_steps=12"])
    assert (cfg.sampling.num_steps, cfg.sampling.batch_size) == (12, 4)


def test_apply_overrides_copies_and_creates_intermediates():
    data = {"sampling": {"num_steps": 30}}
    result = apply_overrides(data, ["sampling.eta=0.5", "model.lora.rank=2"])
    assert result == {"sampling": {"num_steps": 30, "eta": 0.5}, "model": {"lora": {"rank": 2}}}
    assert data == {"sampling": {"num_steps": 30}}


@pytest.mark.parametrize("override", ["sampling.num_steps", "=3", "sampling..num_steps=3"])
def test_malformed_override(override):
    with raises_with(repr(override)):
        apply_overrides({}, [override])


def test_override_without_equals_shows_expected_form():
    with raises_with("'sampling.num_steps'", "dotted.key=value"):
        load_config(overrides=["sampling.num_steps"])


def test_override_through_a_non_mapping():
    with raises_with("'reward'", "'toy_fidelity'", "not a mapping"):
        apply_overrides({"reward": "toy_fidelity"}, ["reward.components=[a]"])


def test_override_value_that_is_not_yaml():
    with raises_with("sampling.num_steps=[1", "YAML"):
        apply_overrides({}, ["sampling.num_steps=[1"])


# ------------------------------------------------------------------------------ key and type errors


def test_nested_unknown_key_suggests_closest_name():
    with raises_with("'sampling.nm_steps'", "did you mean 'num_steps'", "valid keys under 'sampling'", "batch_size"):
        load_config(overrides=["sampling.nm_steps=10"])


def test_unknown_key_without_close_match_lists_valid_keys():
    with pytest.raises(ValueError, match="valid keys under 'model.lora': rank, alpha") as info:
        load_config({"model": {"lora": {"zzzzzz": 1}}})
    assert "did you mean" not in str(info.value)


def test_unknown_top_level_key():
    with raises_with("'sampleing'", "did you mean 'sampling'", "at the top level"):
        load_config({"sampleing": {}})


@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        ("sampling.num_steps=ten", ["sampling.num_steps", "expected int", "'ten' (str)"]),
        ("sampling.num_steps=true", ["sampling.num_steps", "expected int", "True (bool)"]),
        ("sampling.num_steps=2.5", ["sampling.num_steps", "expected int", "2.5 (float)"]),
        ("sampling.eta=false", ["sampling.eta", "expected float", "False (bool)"]),
        ("sampling.eta=[1]", ["sampling.eta", "expected float", "[1] (list)"]),
        ("model.path=3", ["model.path", "expected str or null", "3 (int)"]),
        ("model.lora.target_modules=to_q", ["model.lora.target_modules", "expected a list of str", "'to_q'"]),
        ("model.lora=3", ["model.lora", "expected a mapping of LoRAConfig fields", "3 (int)"]),
        ("reward.components=[{weight: 1.0}]", ["reward.components[0]", "missing required field 'name'"]),
        ("reward.components=[a, {name: b, weight: x}]", ["reward.components[1].weight", "expected float", "'x'"]),
        ("sampling.sde_window=[0, '2']", ["sampling.sde_window[1]", "expected int", "'2' (str)"]),
        ("sampling.sde_window=[0, true]", ["sampling.sde_window[1]", "expected int", "True (bool)"]),
        ("sampling.sde_window=2", ["sampling.sde_window", "expected a list or null", "2 (int)"]),
    ],
)
def test_wrong_type(override, fragments):
    with raises_with(*fragments):
        load_config(overrides=[override])


def test_int_accepted_for_float():
    eta = load_config(overrides=["sampling.eta=1"]).sampling.eta
    assert eta == 1.0 and type(eta) is float


def test_literal_error_lists_choices():
    with raises_with("model.dtype", "'fp16'", "'float32', 'float16', 'bfloat16'"):
        load_config(overrides=["model.dtype=fp16"])


def test_literal_error_suggests_close_choice():
    with raises_with("sampling.log_prob_reduction", "'means'", "did you mean 'mean'"):
        load_config(overrides=["sampling.log_prob_reduction=means"])


def test_generic_type_errors():
    with raises_with("extra", "expected a mapping"):
        from_dict(_Tree, {"extra": [1]})
    with raises_with("leaves[0].size", "expected int"):
        from_dict(_Tree, {"leaves": [{"name": "p", "size": "big"}]})
    with raises_with("expected a mapping of _Tree fields", "[1] (list)"):
        from_dict(_Tree, [1])


# ------------------------------------------------------------------------------ range errors


@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        ("sampling.num_steps=0", ["sampling.num_steps must be >= 1 and <= 1000, got 0"]),
        ("sampling.num_steps=1001", ["sampling.num_steps must be", "got 1001"]),
        ("sampling.eta=0", ["sampling.eta must be > 0", "got 0", "log-probs need eta > 0"]),
        ("sampling.eta=1.5", ["sampling.eta must be > 0 and <= 1", "got 1.5"]),
        ("sampling.eta=.nan", ["sampling.eta must be finite", "got nan"]),
        ("sampling.guidance_scale=0.5", ["sampling.guidance_scale must be >= 1.0", "got 0.5", "turns"]),
        ("sampling.guidance_scale=.inf", ["sampling.guidance_scale must be finite", "got inf"]),
        ("sampling.batch_size=0", ["sampling.batch_size must be >= 1, got 0"]),
        ("model.lora.rank=0", ["model.lora.rank must be >= 1, got 0"]),
        ("model.lora.alpha=0", ["model.lora.alpha must be > 0, got 0"]),
        ("model.lora.dropout=1", ["model.lora.dropout must be >= 0 and < 1, got 1"]),
        ("model.lora.target_modules=[]", ["model.lora.target_modules must not be empty"]),
        ("model.lora.target_modules=[to_q, '']", ["model.lora.target_modules must not contain empty names"]),
        ("model.device=gpu", ["model.device must be one of", "'cuda:N'", "got 'gpu'"]),
        ("model.path=''", ["model.path must be a directory path or null"]),
        ("seed=-1", ["seed must be >= 0, got -1"]),
        ("reward.components=[]", ["reward.components must not be empty"]),
        ("reward.components=[a, a]", ["reward.components must name each reward once", "'a'"]),
        ("reward.components=[' a']", ["reward.components[0].name must be a non-empty string without surrounding spaces", "' a'"]),
        ("reward.components=[{name: a, weight: .inf}]", ["reward.components[0].weight must be finite, got inf"]),
        ("learner.timesteps_per_pass=-1", ["learner.timesteps_per_pass must be >= 0, got -1"]),
        (
            "sampling.sde_window=[0, 21]",
            ["sampling.sde_window must be [start, stop] with 0 <= start < stop <= num_steps = 20", "got [0, 21]"],
        ),
        ("sampling.sde_window=[3, 3]", ["sampling.sde_window must be [start, stop]", "at least one step", "got [3, 3]"]),
        ("train.reference=frozen_copy", ["train.reference", "'frozen_copy'", "'pool', 'adapter_off'"]),
        # defaults: 20 DDIM steps, timestep_fraction 1.0, so 20 steps trained per trajectory
        (
            "learner.timesteps_per_pass=3",
            ["learner.timesteps_per_pass", "must divide the 20 denoising steps trained per trajectory", "got 3"],
        ),
    ],
)
def test_out_of_range(override, fragments):
    with raises_with(*fragments):
        load_config(overrides=[override])


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_valid_devices(device):
    assert load_config(overrides=[f"model.device={device}"]).model.device == device


def test_direct_construction_validates_too():
    with raises_with("num_steps must be >= 1 and <= 1000, got 0"):
        SamplingConfig(num_steps=0)
    with raises_with("dropout must be >= 0 and < 1, got 1.0"):
        LoRAConfig(dropout=1.0)


# ------------------------------------------------------------------------------ files


def test_missing_file_names_it(tmp_path):
    path = tmp_path / "nope.yaml"
    with raises_with(str(path), "does not exist"):
        load_config(path)


def test_non_mapping_yaml_names_file(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- seed\n- model\n")
    with raises_with(str(path), "must contain a mapping", "list"):
        load_config(path)


def test_invalid_yaml_names_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("sampling: {num_steps: 3\n")
    with raises_with(str(path), "not valid YAML"):
        load_config(path)


def test_errors_in_file_values_name_dotted_path(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  lora:\n    rank: 0\n")
    with raises_with("model.lora.rank must be >= 1, got 0"):
        load_config(path)


# ------------------------------------------------------------------------------ reward shorthands


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("toy_fidelity", (RewardComponent(name="toy_fidelity", weight=1.0),)),
        (
            {"toy_fidelity": 1.0, "jpeg_compressibility": 1},
            (RewardComponent(name="toy_fidelity", weight=1.0), RewardComponent(name="jpeg_compressibility", weight=1.0)),
        ),
        (
            ["toy_fidelity", {"name": "jpeg_compressibility", "weight": 0.1}],
            (RewardComponent(name="toy_fidelity", weight=1.0), RewardComponent(name="jpeg_compressibility", weight=0.1)),
        ),
        ({"components": [{"name": "a", "weight": 2.0}]}, (RewardComponent(name="a", weight=2.0),)),
        ({}, RewardConfig().components),
    ],
)
def test_reward_shorthands_normalise_to_components(value, expected):
    cfg = load_config({"reward": value})
    assert cfg.reward.components == expected
    assert all(type(c.weight) is float for c in cfg.reward.components)


def test_reward_shorthand_from_yaml_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("reward:\n  toy_fidelity: 1.0\n  jpeg_compressibility: 0.1\n")
    cfg = load_config(path)
    assert cfg.reward == RewardConfig(
        components=(RewardComponent(name="toy_fidelity"), RewardComponent(name="jpeg_compressibility", weight=0.1))
    )
    # Dumped in canonical form, which loads back equal.
    assert load_config(to_dict(cfg)) == cfg


def test_reward_shorthand_bad_weight():
    with raises_with("reward:", "weight of reward 'toy_fidelity' must be a number", "{'weight': 1.0}"):
        load_config({"reward": {"toy_fidelity": {"weight": 1.0}}})


def test_reward_of_wrong_shape():
    with raises_with("reward", "expected a mapping of RewardConfig fields", "3 (int)"):
        load_config({"reward": 3})


# ------------------------------------------------------------------------------ immutability and style


def test_frozen():
    cfg = Config()
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        cfg.seed = 1  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        cfg.sampling.num_steps = 1  # type: ignore[misc]
    assert isinstance(load_config(overrides=["model.lora.target_modules=[to_q, to_v]"]).model.lora.target_modules, tuple)


def test_replace_validates_the_copy():
    cfg = Config()
    assert replace(cfg.sampling, num_steps=5).num_steps == 5 and cfg.sampling.num_steps == 20
    with raises_with("num_steps must be >= 1 and <= 1000, got 0"):
        replace(cfg.sampling, num_steps=0)
    assert replace(ServeConfig(), model="/models/sd15").model == "/models/sd15"  # a field may be called "model"


def _sections(cls: type[Section]) -> list[type[Section]]:
    found = [cls]
    for sub in cls.__subclasses__():
        found += _sections(sub)
    return found


def test_every_config_field_has_a_docstring():
    # STYLE.md: a docstring right under every field of every section; pydantic keeps it as the description.
    import actors.rewards  # noqa: F401  (the reward option sections register on import)
    from orchestrator.config import ServeConfig, SweepConfig  # noqa: F401

    missing = [
        f"{cls.__name__}.{name}"
        for cls in _sections(Section)
        if cls.__module__.startswith(("orchestrator", "actors"))
        for name, info in cls.model_fields.items()
        if not (info.description or "").strip()
    ]
    assert len(_sections(Section)) > 20 and not missing, f"fields without a docstring: {missing}"


def test_stat_min_count_cannot_exceed_the_buffer():
    # Per-prompt statistics would never be used; say so instead of clamping silently.
    with pytest.raises(ValueError, match=r"train\.stat_min_count must be <= stat_buffer_size \(8\), got 9"):
        load_config({"train": {"stat_buffer_size": 8, "stat_min_count": 9}})


def test_replay_and_async_settings_are_checked_with_their_names():
    assert Config().train.mode == "sync" and Config().samples_per_update == Config().train.samples_per_epoch
    with pytest.raises(ValueError, match="replay.max_staleness must be >= 1 when train.mode is async"):
        load_config({"train": {"mode": "async"}, "replay": {"max_staleness": 0}})
    with pytest.raises(ValueError, match=r"replay.capacity must be >= the samples of one update \(64"):
        load_config({"train": {"samples_per_epoch": 32}, "replay": {"samples_per_update": 64, "capacity": 40}})
    with pytest.raises(ValueError, match="replay.samples_per_update must be 0 or >= train.samples_per_epoch"):
        load_config({"train": {"samples_per_epoch": 32}, "replay": {"samples_per_update": 16}})
    with pytest.raises(ValueError, match="replay.samples_per_update must be divisible by"):
        load_config({"train": {"samples_per_epoch": 32}, "replay": {"samples_per_update": 34}})
    with pytest.raises(ValueError, match="replay.is_truncation must be > 0"):
        load_config({"replay": {"is_truncation": 0}})
    with pytest.raises(ValueError, match="train.mode"):
        load_config({"train": {"mode": "fast"}})


def test_learning_rate_schedules():
    constant = LearnerConfig(learning_rate=1e-3)
    assert [learning_rate_at(constant, epoch=e, epochs=5) for e in (1, 3, 5)] == [1e-3, 1e-3, 1e-3]
    cosine = LearnerConfig(learning_rate=1e-3, lr_schedule="cosine", lr_final_fraction=0.1)
    # Half a cosine from the peak at epoch 1 to 10 % at epoch 5; the midpoint is halfway.
    rates = [learning_rate_at(cosine, epoch=e, epochs=5) for e in range(1, 6)]
    assert rates[0] == pytest.approx(1e-3) and rates[2] == pytest.approx(0.55e-3) and rates[4] == pytest.approx(1e-4)
    assert rates[1] == pytest.approx(1e-4 + 0.9e-3 * (1 + math.cos(math.pi / 4)) / 2)
    assert all(a > b for a, b in zip(rates, rates[1:]))
    # A one-epoch run trains at the peak; epochs past the end stay at the floor.
    assert learning_rate_at(cosine, epoch=1, epochs=1) == 1e-3
    assert learning_rate_at(cosine, epoch=7, epochs=5) == pytest.approx(1e-4)


@pytest.mark.parametrize("field, value", [("lr_final_fraction", 1.5), ("lr_final_fraction", -0.1), ("lr_schedule", "linear")])
def test_learning_rate_schedule_fields_are_checked(field, value):
    with pytest.raises(ValueError, match=f"learner.{field}"):
        from_dict(Config, {"learner": {field: value}})
