"""The config tree: typed, frozen pydantic models loaded from YAML and validated at load.

A run is described by one :class:`Config`; the server by a :class:`ServeConfig`; a sweep
by a :class:`SweepConfig`. Typical use::

    cfg = load_config("run.yaml", overrides=["sampling.num_steps=10", "model.lora.rank=8"])
    cfg = load_preset("toy-ddpo", ["train.epochs=5"])

Every error is a ``ValueError`` that names the field by its dotted path, the bad value and
what is allowed. The engine is :mod:`orchestrator.config.schema` (YAML and overrides:
:mod:`~orchestrator.config.files`); the sections live in
:mod:`~orchestrator.config.training`, :mod:`~orchestrator.config.serving` and
:mod:`~orchestrator.config.sweep`; shipped presets in ``presets/``.

This package is the bottom layer of rayalign: it imports nothing else of the project, and
every other package may import it (see docs/architecture.md).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from orchestrator.config import files
from orchestrator.config.files import apply_overrides, config_to_yaml, parse_yaml
from orchestrator.config.schema import FieldError, Section, flatten_config, from_dict, replace, to_dict
from orchestrator.config.serving import (
    ServeBatchingConfig,
    ServeConfig,
    ServeLimitsConfig,
    ServeScalingConfig,
)
from orchestrator.config.sweep import SEARCH_KINDS, SweepConfig, SweepSchedulerConfig
from orchestrator.config.training import (
    Config,
    Device,
    EarlyStopConfig,
    LearnerConfig,
    LoRAConfig,
    ModelConfig,
    Name,
    PoolConfig,
    PoolsConfig,
    ReplayConfig,
    RewardComponent,
    RewardConfig,
    SamplingConfig,
    TrainConfig,
)

__all__ = [
    "SEARCH_KINDS",
    "Config",
    "Device",
    "EarlyStopConfig",
    "FieldError",
    "LearnerConfig",
    "LoRAConfig",
    "ModelConfig",
    "Name",
    "PoolConfig",
    "PoolsConfig",
    "ReplayConfig",
    "RewardComponent",
    "RewardConfig",
    "SamplingConfig",
    "Section",
    "ServeBatchingConfig",
    "ServeConfig",
    "ServeLimitsConfig",
    "ServeScalingConfig",
    "SweepConfig",
    "SweepSchedulerConfig",
    "TrainConfig",
    "apply_overrides",
    "config_to_yaml",
    "dump_yaml",
    "from_dict",
    "load_config",
    "load_preset",
    "parse_yaml",
    "preset_names",
    "replace",
    "to_dict",
    "flatten_config",
]

T = TypeVar("T", bound=Section)


def load_config(
    source: str | os.PathLike[str] | Mapping[str, Any] | None = None, overrides: Sequence[str] = (), cls: type[T] = Config
) -> T:  # type: ignore[assignment]
    """A config from a YAML file path, a mapping or nothing (all defaults), with ``key=value`` overrides.

    Raises:
        ValueError: the file is missing, unreadable, not YAML or not a mapping (the message
            names the file), or an override or value is invalid (it names the dotted field).
    """
    return files.load_config(source, overrides, cls)


def dump_yaml(cfg: Section, path: str | os.PathLike[str]) -> None:
    """Write :func:`config_to_yaml` of ``cfg`` to ``path``, creating parent directories."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config_to_yaml(cfg), encoding="utf-8")


def preset_names() -> list[str]:
    """Names of the configs shipped in ``orchestrator/config/presets``."""
    files = resources.files("orchestrator.config").joinpath("presets").iterdir()
    return sorted(p.name[: -len(".yaml")] for p in files if p.name.endswith(".yaml"))


def load_preset(name: str, overrides: Sequence[str] = ()) -> Config:
    """A shipped preset by name, with ``key=value`` overrides applied."""
    names = preset_names()
    if name not in names:
        raise ValueError(f"unknown preset {name!r}; available presets: {', '.join(names)}")
    text = resources.files("orchestrator.config").joinpath("presets", f"{name}.yaml").read_text()
    return load_config(parse_yaml(text) or {}, overrides)
