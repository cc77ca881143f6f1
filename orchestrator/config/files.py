"""Config files: YAML in and out (``1e-4`` read as a float), and ``dotted.key=value`` overrides."""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel

from orchestrator.config.schema import from_dict, show, to_dict

T = TypeVar("T", bound=BaseModel)

# YAML 1.1 (PyYAML) reads only "1.0e-4" as a float; this adds "1e-4", "1e4", "1.5E3".
_EXPONENT = re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")


class _Loader(yaml.SafeLoader):
    pass


class _Dumper(yaml.SafeDumper):
    """Quotes strings such as ``"1e-4"`` that the loader would read as floats."""


for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT, list("-+0123456789"))


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of ``data`` with each ``"dotted.key=value"`` set (the value read as YAML)."""
    if isinstance(overrides, str):
        raise TypeError(f"overrides must be a sequence of 'key=value' strings, got the string {overrides!r}")
    result = copy.deepcopy(dict(data))
    for override in overrides:
        key, sep, raw = override.partition("=")
        keys = key.strip().split(".")
        if not sep or not all(keys):
            raise ValueError(f"config override {override!r} must look like 'dotted.key=value', e.g. 'sampling.num_steps=10'")
        try:
            value = parse_yaml(raw)
        except yaml.YAMLError as error:
            raise ValueError(f"cannot parse the value of config override {override!r} as YAML: {error}") from None
        node = result
        for depth, part in enumerate(keys[:-1]):
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                where = ".".join(keys[: depth + 1])
                raise ValueError(
                    f"cannot apply config override {override!r}: {where!r} is {show(node)}, not a mapping; "
                    f"override {where!r} as a whole instead"
                )
        node[keys[-1]] = value
    return result


def read_yaml_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A YAML file holding a mapping (an empty file: an empty mapping); errors name the file."""
    try:
        data = parse_yaml(Path(path).expanduser().read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"config file {str(path)!r} does not exist") from None
    except OSError as error:
        raise ValueError(f"cannot read config file {str(path)!r}: {error}") from None
    except yaml.YAMLError as error:
        raise ValueError(f"config file {str(path)!r} is not valid YAML: {error}") from None
    if not isinstance(data, (dict, type(None))):
        raise ValueError(f"config file {str(path)!r} must contain a mapping of sections (seed:, model:, ...), got {type(data).__name__}")
    return data or {}


def load_config(source: str | os.PathLike[str] | Mapping[str, Any] | None, overrides: Sequence[str], cls: type[T]) -> T:
    """``cls`` from a YAML file, a mapping or nothing (all defaults), with ``overrides`` applied."""
    data = read_yaml_file(source) if isinstance(source, (str, os.PathLike)) else dict(source or {})
    return from_dict(cls, apply_overrides(data, overrides))


def config_to_yaml(model: BaseModel) -> str:
    """YAML that :func:`load_config` reads back to an equal model."""
    return yaml.dump(to_dict(model), Dumper=_Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True)
