"""The config engine: pydantic v2 checks every value; this module words its errors as ours.

A :class:`Section` is frozen, refuses unknown keys, is strict (``true`` is no int, ``"3"`` no
number; an int is a float), refuses NaN and infinity, and documents every field with the
docstring under it. Ranges are pydantic constraints; ``json_schema_extra`` may give the
``why`` or what is ``allowed``. Rules across fields raise :class:`FieldError`.
"""

from __future__ import annotations

import copy
import difflib
import re
import typing
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import annotated_types
from pydantic import BaseModel, ConfigDict, ValidationError

T = TypeVar("T", bound=BaseModel)


class Section(BaseModel):
    """Base of every config section; built in code, its errors read as from a file."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False, use_attribute_docstrings=True)

    def __init__(self, /, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as error:
            raise _Invalid(error, type(self)) from None


class _Invalid(ValueError):
    """A section that failed validation; pydantic calls ``__init__`` for nested sections, so the enclosing one re-reads it."""

    def __init__(self, error: ValidationError, cls: type[BaseModel]) -> None:
        super().__init__(_describe(error, cls, ""))
        self.error, self.cls = error, cls


class FieldError(ValueError):
    """A rule across fields was broken; the message names ``field`` relative to the section."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"{field} {detail}")
        self.field, self.detail = field, detail


_TYPES = {
    "int_type": "int",
    "float_type": "float",
    "bool_type": "bool",
    "string_type": "str",
    "tuple_type": "a list",
    "dict_type": "a mapping",
}
_BOUNDS = {annotated_types.Gt: ">", annotated_types.Ge: ">=", annotated_types.Lt: "<", annotated_types.Le: "<="}


def _join(path: str, key: object) -> str:
    return f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else str(key)


def show(value: Any) -> str:
    text = repr(value)
    return f"{text[:77] + '...' if len(text) > 80 else text} ({type(value).__name__})"


def _walk(cls: type[BaseModel], loc: Sequence[Any]) -> tuple[type[BaseModel] | None, Any]:
    """The model holding the field at ``loc``, and the field's FieldInfo."""
    owner, info = None, None
    for key in loc:
        if isinstance(key, int) or cls is None:
            continue
        owner, info = cls, cls.model_fields.get(key)
        inner = [a for a in typing.get_args(info.annotation) or (info.annotation,) if isinstance(a, type)] if info else []
        cls = next((a for a in inner if issubclass(a, BaseModel)), None)
    return owner, info


def _message(error: dict[str, Any], root: type[BaseModel], prefix: str) -> str:
    loc, kind, value, path = error["loc"], error["type"], error.get("input"), prefix
    for key in loc:
        path = _join(path, key)
    owner, info = _walk(root, loc)
    extra = (info.json_schema_extra if info else None) or {}
    if kind == "extra_forbidden":
        valid = list(owner.model_fields) if owner else []
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        where = f"under {path.rsplit('.', 1)[0]!r}" if "." in path else "at the top level"
        return f"unknown config key {path!r}{hint}; valid keys {where}: {', '.join(valid)}"
    if kind == "missing":
        return f"{path.rsplit('.', 1)[0] if '.' in path else 'config'}: missing required field {str(loc[-1])!r} for {owner.__name__}"
    if kind in ("value_error", "assertion_error"):
        cause = error["ctx"]["error"]
        if isinstance(cause, _Invalid):
            return _describe(cause.error, cause.cls, path)
        if isinstance(cause, FieldError):
            return f"{_join(path, cause.field)} {cause.detail}"
        return f"{path}: {cause}" if path else str(cause)
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal", "finite_number", "too_short"):
        bounds = [
            f"{_BOUNDS[type(m)]} {getattr(m, type(m).__name__.lower())}" for m in (info.metadata if info else []) if type(m) in _BOUNDS
        ]
        if kind == "finite_number":
            bounds.insert(0, "finite")
        must = "must not be empty" if kind == "too_short" else f"must be {' and '.join(bounds)}"
        why = f" ({extra['why']})" if "why" in extra else ""
        return f"{path} {must}, got {value!r}{why}"
    if kind == "string_pattern_mismatch":
        return f"{path} must be {extra.get('allowed', 'a string matching ' + error['ctx']['pattern'])}, got {value!r}"
    if kind == "literal_error":
        choices = [c.strip("'") for c in re.findall(r"'[^']*'", error["ctx"]["expected"])]
        close = difflib.get_close_matches(value, choices, n=1) if isinstance(value, str) else []
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"{path}: expected one of {', '.join(map(repr, choices))}, got {show(value)}{hint}"
    if kind == "model_type":
        expected = f"a mapping of {(_walk(root, (*loc, ''))[0] or root).__name__} fields"
    else:
        expected = _TYPES.get(kind, error["msg"].lower())
        args = typing.get_args(info.annotation) if info is not None and not isinstance(loc[-1], int) else ()
        nullable = type(None) in args
        if nullable:  # what the non-null branch holds, e.g. tuple[str, ...] | None
            args = next((typing.get_args(arg) for arg in args if arg is not type(None)), ())
        expected += f" of {args[0].__name__}" if kind == "tuple_type" and args[-1:] == (...,) else ""
        expected += " or null" if nullable else ""
    return f"{path}: expected {expected}, got {show(value)}" if path else f"expected {expected}, got {show(value)}"


def _describe(error: ValidationError, cls: type[BaseModel], path: str) -> str:
    return "; ".join(_message(e, cls, path) for e in error.errors()[:5])


def from_dict(cls: type[T], data: Any, *, path: str = "") -> T:
    """``cls`` from plain data; a ``ValueError`` names every bad field by its dotted path (under ``path``)."""
    try:
        return cls.model_validate(copy.deepcopy(data))  # a config never shares mutable data with its caller
    except ValidationError as error:
        raise ValueError(_describe(error, cls, path)) from None


def to_dict(model: BaseModel) -> dict[str, Any]:
    """Plain data (lists for tuples) that :func:`from_dict` reads back to an equal model."""
    return model.model_dump(mode="json")


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config (:func:`to_dict`'s form) as dotted keys (``train.epochs``); lists and empty sections stay values."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping) and value:
            flat.update(flatten_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def replace(section: T, /, **changes: Any) -> T:
    """A copy of ``section`` with ``changes``, validated like the original."""
    return from_dict(type(section), {**dict(section), **changes})
