"""Rewards: named, batched scoring functions for generated images, and their registry.

A reward is a plain function::

    reward(images, prompts, metadata) -> (scores, info)

    images:   np.ndarray uint8, (batch, H, W, 3)
    prompts:  sequence of str, one per image
    metadata: sequence of dicts, one per image (empty dicts when the caller has none)
    scores:   np.ndarray float32, (batch,) -- higher is better, always finite
    info:     dict str -> float | np.ndarray, per-batch diagnostics for logging

or a *configured* reward: a class with a nested config class ``Options`` (its
settings, e.g. a weights path, a device, a batch size), constructed as
``cls(options=Options(...))`` and then called like the function above. Its constructor
only stores the options; ``check()`` (optional) verifies cheaply that the files it needs
exist, and ``load()`` (optional) loads weights, once; the first call loads too. Model
rewards (:mod:`actors.rewards.models`) and the remote scoring service
(:mod:`actors.rewards.http`) are configured rewards.

Adding a reward is one function or class decorated with :func:`register_reward` (the
shipped ones live in :mod:`actors.rewards.builtin`, ``models`` and ``http``; the package
imports ``builtin`` and ``http`` so they register, and names ``models``' rewards with
:func:`register_lazily`, so torch and transformers load only where a model reward is used)
plus one row in the reward conformance test (``tests/unit/test_rewards.py``). Users can also name
a reward of their own as ``"package.module:function"`` (or ``"package.module:Class"``
for a configured one) without touching this file.

Callers go through :func:`score_batch`, which checks the inputs, calls the reward and
validates what comes back, so a broken reward fails loudly at the batch that broke it
instead of training on NaN.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from typing import Any, Callable, Mapping, Sequence, Union

import numpy as np

from orchestrator.config import Section, from_dict

Info = dict[str, Union[float, np.ndarray]]
RewardFn = Callable[[np.ndarray, Sequence[str], Sequence[Mapping[str, Any]]], tuple[np.ndarray, Info]]
RewardEntry = Union[RewardFn, type]
"""What the registry holds: a reward function, or a configured reward class (see the module docstring)."""

REWARDS: dict[str, RewardEntry] = {}
"""Every registered reward by name; fill it with :func:`register_reward`."""

LAZY: dict[str, str] = {}
"""Rewards known by name before their module is imported: name -> the module that registers it."""


def register_lazily(module: str, *names: str) -> None:
    """Name rewards that ``module`` registers when imported, without importing it yet.

    The driver checks a config and a toy reward's actor scores images without paying for
    the imports a model reward needs; naming one of these rewards imports its module.
    """
    for name in names:
        LAZY[name] = module


def known_rewards() -> list[str]:
    """Every reward name: registered, or named by :func:`register_lazily`."""
    return sorted(set(REWARDS) | set(LAZY))


def all_rewards() -> dict[str, RewardEntry]:
    """:data:`REWARDS` with every lazily named reward imported and registered."""
    for name in list(LAZY):
        _registered(name)
    return REWARDS


def _registered(name: str) -> RewardEntry | None:
    """The registry's entry for ``name``, importing the module that registers it if it is named lazily."""
    if name not in REWARDS and name in LAZY:
        importlib.import_module(LAZY[name])
        if name not in REWARDS:
            raise RuntimeError(f"importing {LAZY[name]} did not register reward {name!r}, which it is named for")
    return REWARDS.get(name)


def register_reward(name: str) -> Callable[[RewardEntry], RewardEntry]:
    """Decorator adding a reward function or configured reward class to :data:`REWARDS`
    under ``name``; returns it unchanged."""
    if not isinstance(name, str) or not name or ":" in name:
        # ':' is reserved for the 'package.module:function' form of resolve_reward.
        raise ValueError(f"reward name must be a non-empty string without ':', got {name!r}")

    def decorator(entry: RewardEntry) -> RewardEntry:
        if name in LAZY and name not in REWARDS and entry.__module__ != LAZY[name]:
            raise ValueError(f"reward {name!r} is already named by {LAZY[name]}; pick another name")
        if name in REWARDS:
            raise ValueError(f"reward {name!r} is already registered (by {REWARDS[name].__module__}); pick another name")
        if isinstance(entry, type) and not is_configured_reward(entry):
            raise ValueError(
                f"reward class {entry.__name__} registered as {name!r} needs a nested config class 'Options' "
                "(an orchestrator.config.Section)"
            )
        REWARDS[name] = entry
        return entry

    return decorator


def is_configured_reward(entry: Any) -> bool:
    """True for a configured reward class: a class with a config class ``Options``."""
    options = getattr(entry, "Options", None)
    return isinstance(entry, type) and isinstance(options, type) and issubclass(options, Section)


def configured_rewards() -> list[str]:
    """Names of the registered rewards that take options (model and remote rewards)."""
    return sorted(name for name, entry in all_rewards().items() if is_configured_reward(entry))


# --------------------------------------------------------------------------------------
# Resolving names
# --------------------------------------------------------------------------------------


def resolve_reward(name: str, options: Mapping[str, Any] | None = None) -> RewardFn:
    """The reward called ``name``: a key of :data:`REWARDS` or ``"package.module:function"``.

    A configured reward class is constructed with ``options`` (validated against its
    ``Options`` config class; nothing is loaded yet). A plain function takes no options.
    """
    if not isinstance(name, str):
        raise ValueError(f"a reward name must be a string, got {type(name).__name__} {name!r}")
    if options is not None and not isinstance(options, Mapping):
        raise ValueError(f"reward {name!r}: options must be a mapping of option name to value, got {type(options).__name__}")
    entry = _registered(name)
    if entry is None and ":" in name:
        entry = _import_reward(name)
    elif entry is None:
        raise ValueError(
            f"unknown reward {name!r}; registered rewards: {', '.join(known_rewards())}. "
            f"A reward of your own can be named as 'package.module:function'."
        )
    if is_configured_reward(entry):
        return entry(options=parse_reward_options(name, entry.Options, options or {}))
    if options:
        raise ValueError(
            f"reward {name!r} takes no options, got {sorted(options)}; rewards with options: {', '.join(configured_rewards())}"
        )
    return entry


def parse_reward_options(name: str, options_cls: type, options: Mapping[str, Any]) -> Any:
    """``options`` as an ``options_cls`` instance; ``ValueError`` naming the reward, the option and what is allowed."""
    try:
        return from_dict(options_cls, dict(options), path="options")
    except ValueError as error:
        raise ValueError(f"reward {name!r}: {error}") from None


def _import_reward(path: str) -> RewardFn:
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute or ":" in attribute:
        raise ValueError(f"reward {path!r} is not of the form 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"reward {path!r}: cannot import module {module_name!r}: {err!r}") from err
    if not hasattr(module, attribute):
        raise ValueError(f"reward {path!r}: module {module_name!r} has no attribute {attribute!r}")
    fn = getattr(module, attribute)
    if not callable(fn):
        raise ValueError(f"reward {path!r}: {attribute!r} is a {type(fn).__name__}, not a function")
    return fn


# --------------------------------------------------------------------------------------
# Validating what a reward returns
# --------------------------------------------------------------------------------------


def _where(reward_name: str, batch_index: int) -> str:
    return f"reward {reward_name!r} (batch {batch_index})"


def check_scores(reward_name: str, scores: Any, batch_size: int, batch_index: int, prompts: Sequence[str] | None = None) -> np.ndarray:
    """``scores`` as float32 ``(batch_size,)``; ``ValueError`` naming reward and batch (and the first bad
    score's prompt and value) if it is not one finite score per image."""
    where = _where(reward_name, batch_index)
    if not isinstance(scores, np.ndarray):
        raise ValueError(f"{where} returned scores of type {type(scores).__name__}; expected a numpy array of shape ({batch_size},)")
    if scores.shape != (batch_size,):
        raise ValueError(f"{where} returned scores of shape {scores.shape}; expected ({batch_size},), one score per image")
    if not (np.issubdtype(scores.dtype, np.floating) or np.issubdtype(scores.dtype, np.integer)):
        raise ValueError(f"{where} returned scores of dtype {scores.dtype}; expected real numbers (float32)")
    with np.errstate(over="ignore"):  # overflow to inf is reported just below, with positions
        scores = scores.astype(np.float32)
    nan, inf = np.flatnonzero(np.isnan(scores)), np.flatnonzero(np.isinf(scores))
    if nan.size or inf.size:
        first = int(min(nan.tolist() + inf.tolist()))
        prompt = f" for prompt {prompts[first]!r}" if prompts is not None and first < len(prompts) else ""
        raise ValueError(
            f"{where} returned {nan.size + inf.size} non-finite score(s) as float32 "
            f"(NaN at positions {nan.tolist()}, inf at positions {inf.tolist()}; the first, {scores[first]}{prompt}); "
            f"a reward must give every image a finite score, e.g. 0 for an image it cannot read "
            f"(reward.on_invalid: drop leaves such samples out instead of stopping the run)"
        )
    return scores


def check_info(reward_name: str, info: Any, batch_index: int) -> Info:
    """``info`` unchanged if it is a dict of str -> number or array; ``ValueError`` otherwise."""
    where = _where(reward_name, batch_index)
    if not isinstance(info, dict):
        raise ValueError(f"{where} returned info of type {type(info).__name__}; expected a dict (use {{}} for none)")
    for key, value in info.items():
        if not isinstance(key, str):
            raise ValueError(f"{where} returned an info key {key!r} of type {type(key).__name__}; keys must be str")
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number, np.ndarray)):
            raise ValueError(f"{where} returned info[{key!r}] of type {type(value).__name__}; expected a float or numpy array")
    return info


def _call_checked(
    reward_name: str,
    reward: RewardFn,
    images: np.ndarray,
    prompts: Sequence[str],
    metadata: Sequence[Mapping[str, Any]],
    batch_index: int,
) -> tuple[np.ndarray, Info]:
    output = reward(images, prompts, metadata)
    if not (isinstance(output, tuple) and len(output) == 2):
        raise ValueError(f"{_where(reward_name, batch_index)} returned {type(output).__name__}; expected a (scores, info) tuple")
    scores, info = output
    return check_scores(reward_name, scores, len(images), batch_index, prompts), check_info(reward_name, info, batch_index)


# --------------------------------------------------------------------------------------
# Combining rewards
# --------------------------------------------------------------------------------------


def _check_component(component: Any) -> tuple[str, float]:
    if isinstance(component, str) or not isinstance(component, Sequence) or len(component) != 2:
        raise ValueError(f"a reward component must be a (name, weight) pair, got {component!r}")
    name, weight = component
    if not isinstance(name, str):
        raise ValueError(f"reward component name must be a string, got {name!r}")
    if isinstance(weight, bool) or not isinstance(weight, (int, float, np.number)) or not math.isfinite(weight):
        raise ValueError(f"reward {name!r}: weight must be a finite number, got {weight!r}")
    return name, float(weight)


@dataclasses.dataclass(frozen=True)
class CombinedReward:
    """Weighted sum of rewards: ``sum_k weight_k * reward_k(images, prompts, metadata)``.

    Names are resolved (and options validated) at construction, so a typo fails when the
    config is loaded, not at the first batch; model weights load only in :meth:`load` or
    at the first call. ``info`` holds each component's raw scores under
    ``"<name>/score"`` and its own info under ``"<name>/<key>"``.
    """

    components: tuple[tuple[str, float], ...]
    """``(name, weight)`` pairs; a name is a registered reward or ``"package.module:function"``."""
    options: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    """Options of configured rewards by component name, e.g. ``{"aesthetic": {"weights": "/models/aesthetic"}}``."""
    _fns: tuple[RewardFn, ...] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.components, str) or not isinstance(self.components, Sequence):
            raise ValueError(f"CombinedReward needs a sequence of (name, weight) pairs, got {self.components!r}")
        components = tuple(_check_component(c) for c in self.components)
        if not components:
            raise ValueError(f"CombinedReward needs at least one (name, weight) pair; registered rewards: {', '.join(known_rewards())}")
        names = [name for name, _ in components]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            # Their info keys would collide; one entry with the summed weight means the same.
            raise ValueError(f"reward(s) {duplicates} listed more than once; list each once with the summed weight")
        if not isinstance(self.options, Mapping):
            raise ValueError(f"CombinedReward options must map reward names to option mappings, got {type(self.options).__name__}")
        strays = sorted(set(self.options) - set(names))
        if strays:
            raise ValueError(f"options given for reward(s) {strays} that are not components; components: {names}")
        object.__setattr__(self, "components", components)
        object.__setattr__(self, "_fns", tuple(resolve_reward(name, self.options.get(name)) for name in names))

    @property
    def name(self) -> str:
        """Readable formula, e.g. ``"0.5*toy_fidelity + 2*jpeg_incompressibility"``."""
        return " + ".join(f"{weight:g}*{name}" for name, weight in self.components)

    def check(self) -> None:
        """Cheap checks that every configured component's files exist (nothing is loaded)."""
        for fn in self._fns:
            if hasattr(fn, "check"):
                fn.check()

    def load(self) -> None:
        """Load every configured component's weights now (otherwise the first call does)."""
        for fn in self._fns:
            if hasattr(fn, "load"):
                fn.load()

    def __call__(
        self,
        images: np.ndarray,
        prompts: Sequence[str],
        metadata: Sequence[Mapping[str, Any]],
        *,
        batch_index: int = 0,
    ) -> tuple[np.ndarray, Info]:
        """Score a batch; each component's output is validated (errors name the component)."""
        total = np.zeros(len(images), dtype=np.float64)  # (batch,)
        info: Info = {}
        for (name, weight), fn in zip(self.components, self._fns):
            scores, component_info = _call_checked(name, fn, images, prompts, metadata, batch_index)
            total += weight * scores.astype(np.float64)
            info[f"{name}/score"] = scores
            info.update({f"{name}/{key}": value for key, value in component_info.items()})
        return total.astype(np.float32), info


def build_reward(
    components: str | Sequence[tuple[str, float]],
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> CombinedReward:
    """A :class:`CombinedReward` from a reward name (weight 1) or a list of ``(name, weight)``
    pairs, with ``options`` for its configured rewards by name."""
    if isinstance(components, str):
        components = ((components, 1.0),)
    return CombinedReward(components, options=dict(options or {}))


def build_reward_from_config(reward: Any) -> CombinedReward:
    """A :class:`CombinedReward` from a ``RewardConfig`` (its components' names, weights and options)."""
    return build_reward(
        [(c.name, c.weight) for c in reward.components],
        options={c.name: c.options for c in reward.components if c.options},
    )


# --------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------


def _check_images(images: Any) -> int:
    if not isinstance(images, np.ndarray):
        raise ValueError(f"images must be a numpy uint8 array (batch, H, W, 3), got {type(images).__name__}")
    if images.dtype != np.uint8:
        raise ValueError(
            f"images must be uint8 (batch, H, W, 3), got dtype {images.dtype}; "
            f"convert [0, 1] floats with (images * 255).round().clip(0, 255).astype(np.uint8)"
        )
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must have shape (batch, H, W, 3), got {images.shape}; channels go last")
    if images.shape[0] == 0:
        raise ValueError("images is an empty batch; score at least one image")
    return images.shape[0]


def _check_prompts(prompts: Any, batch_size: int) -> list[str]:
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise ValueError(f"prompts must be a sequence of str (one per image), got {type(prompts).__name__}")
    if len(prompts) != batch_size:
        raise ValueError(f"got {len(prompts)} prompts for {batch_size} images; pass one prompt per image")
    bad = [i for i, prompt in enumerate(prompts) if not isinstance(prompt, str)]
    if bad:
        raise ValueError(f"prompts must be str; prompts at positions {bad} are not")
    return list(prompts)


def _check_metadata(metadata: Any, batch_size: int) -> list[Mapping[str, Any]]:
    if metadata is None:
        return [{} for _ in range(batch_size)]
    if isinstance(metadata, (str, Mapping)) or not isinstance(metadata, Sequence):
        raise ValueError(f"metadata must be None or a sequence of dicts (one per image), got {type(metadata).__name__}")
    if len(metadata) != batch_size:
        raise ValueError(f"got {len(metadata)} metadata entries for {batch_size} images; pass one dict per image or None")
    bad = [i for i, entry in enumerate(metadata) if not isinstance(entry, Mapping)]
    if bad:
        raise ValueError(f"metadata entries must be dicts; entries at positions {bad} are not")
    return list(metadata)


def score_batch(
    reward: str | RewardFn | CombinedReward,
    images: np.ndarray,
    prompts: Sequence[str],
    metadata: Sequence[Mapping[str, Any]] | None = None,
    *,
    batch_index: int = 0,
    name: str | None = None,
) -> tuple[np.ndarray, Info]:
    """Score one batch of images: check inputs, call ``reward``, validate its output.

    Args:
        reward: a reward function, a :class:`CombinedReward`, or a name for :func:`resolve_reward`.
        images: uint8 ``(batch, H, W, 3)``.
        prompts: one str per image.
        metadata: one dict per image, or ``None`` for empty dicts.
        batch_index: position of this batch in the run, quoted in errors.
        name: the reward's name in errors; defaults to its registry name or ``__name__``.

    Returns:
        ``(scores, info)``: float32 ``(batch,)`` finite scores and the reward's diagnostics.
    """
    if isinstance(batch_index, bool) or not isinstance(batch_index, int) or batch_index < 0:
        raise ValueError(f"batch_index must be a non-negative int, got {batch_index!r}")
    if isinstance(reward, str):
        name, reward = name or reward, resolve_reward(reward)
    batch_size = _check_images(images)
    prompts = _check_prompts(prompts, batch_size)
    metadata = _check_metadata(metadata, batch_size)
    if isinstance(reward, CombinedReward):
        # Components validate themselves so an error names the component that broke.
        name = name or reward.name
        output = reward(images, prompts, metadata, batch_index=batch_index)
        return check_scores(name, output[0], batch_size, batch_index, prompts), output[1]
    if not callable(reward):
        raise ValueError(f"reward must be callable or a reward name, got {type(reward).__name__}")
    name = name or getattr(reward, "__name__", None) or getattr(reward, "name", None) or repr(reward)
    return _call_checked(name, reward, images, prompts, metadata, batch_index)
