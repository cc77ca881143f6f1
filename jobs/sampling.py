"""Which sampler settings ``rayalign eval`` and ``serve`` use: the user's, else the adapter's training ones.

An adapter trained with 10 DDIM steps and no guidance scores its training reward only
when sampled that way, so a trained run is evaluated and served with the settings it was
trained with unless the user asks for others (and is warned when those differ).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

from orchestrator.config import SamplingConfig
from orchestrator.rundir import SAMPLER_FIELDS, SamplerSettings


def default_sampler() -> SamplerSettings:
    """The settings used without a training record or a user's choice: :class:`SamplingConfig`'s defaults."""
    defaults = SamplingConfig()
    return SamplerSettings(num_steps=defaults.num_steps, eta=defaults.eta, guidance_scale=defaults.guidance_scale)


@dataclasses.dataclass(frozen=True)
class ChosenSampling:
    """The settings to sample with, where each came from, and what differs from training."""

    settings: SamplerSettings
    sources: dict[str, str]
    """Per field: "given" (a flag, the serve config or a request), "trained" or "default"."""
    trained: SamplerSettings | None
    trained_from: Path | None
    differences: tuple[str, ...]
    """One line per given setting that differs from the adapter's training setting."""

    def origin(self) -> str:
        """Where the settings came from, in words, e.g. "as trained: RUN/.../sampling.json"."""
        sources = set(self.sources.values())
        if sources == {"trained"}:
            return f"as trained: {self.trained_from}"
        if sources == {"default"}:
            return "the defaults"
        parts = ", ".join(f"{name} {kind}" for name, kind in self.sources.items())
        return parts + (f"; trained: {self.trained_from}" if self.trained_from else "")

    def record(self) -> dict[str, Any]:
        """What eval's JSON and the server's status report."""
        return {
            **dataclasses.asdict(self.settings),
            "sources": dict(self.sources),
            "trained": dataclasses.asdict(self.trained) if self.trained else None,
            "trained_from": str(self.trained_from) if self.trained_from else None,
        }


def _window_words(window: tuple[int, int] | None) -> str:
    return "none (SDE on every step)" if window is None else f"{window[0]},{window[1]} (SDE on steps {window[0]}-{window[1] - 1})"


def parse_window(text: str) -> tuple[int, int] | str:
    """``--sde-window START,STOP`` (the SDE on steps START..STOP-1, the ODE step on the others) or ``none``."""
    if text.strip().lower() == "none":
        return "none"
    parts = text.split(",")
    try:
        start, stop = (int(part) for part in parts)
    except ValueError:
        raise ValueError(f"--sde-window {text!r} must be START,STOP (e.g. 0,6: the SDE on steps 0-5) or none") from None
    return start, stop


def choose_sampling(
    given: Mapping[str, Any], trained: tuple[SamplerSettings, Path] | None, *, names: Mapping[str, str] | None = None
) -> ChosenSampling:
    """Each setting from ``given`` if not None, else from training, else :func:`default_sampler`'s.

    A flow-matching run's SDE window (``sampling.sde_window``) comes with its training settings
    while the number of steps is the trained one; ``given["sde_window"]`` ("none" or a pair)
    overrides it.

    ``names`` maps a field to how the user spells it (``--steps``, ``limits.default_steps``)
    for the lines in :attr:`ChosenSampling.differences`.
    """
    trained_settings, trained_from = trained if trained else (None, None)
    values, sources, differences = {}, {}, []
    for name in SAMPLER_FIELDS:
        value = given.get(name)
        if value is not None:
            values[name], sources[name] = value, "given"
            if trained_settings is not None and float(value) != float(getattr(trained_settings, name)):
                spelled = (names or {}).get(name, name)
                differences.append(
                    f"{spelled} {value:g} differs from the {getattr(trained_settings, name):g} the adapter was trained with "
                    f"({trained_from}); its training reward was measured with {getattr(trained_settings, name):g}"
                )
        elif trained_settings is not None:
            values[name], sources[name] = getattr(trained_settings, name), "trained"
        else:
            values[name], sources[name] = getattr(default_sampler(), name), "default"
    # The SDE window (flow-matching runs) names steps of the trained schedule, so it holds only
    # with the trained number of steps; with others every step takes the SDE, said as a difference.
    window = getattr(trained_settings, "sde_window", None)
    asked = given.get("sde_window")  # "none" (every step SDE), a (start, stop) pair, or None: not given
    if asked is not None:
        asked = None if asked == "none" else (int(asked[0]), int(asked[1]))
        if trained_settings is not None and asked != window:
            differences.append(
                f"{(names or {}).get('sde_window', 'sde_window')} {_window_words(asked)} differs from the {_window_words(window)} the "
                f"adapter was trained with ({trained_from})"
            )
        window = asked
    elif window is not None and values["num_steps"] != trained_settings.num_steps:
        differences.append(
            f"the adapter was trained with the SDE on steps {window[0]}-{window[1] - 1} of {trained_settings.num_steps} and the ODE "
            f"step after ({trained_from}); with {values['num_steps']} steps every step takes the SDE"
        )
        window = None
    values["sde_window"] = window
    return ChosenSampling(
        settings=SamplerSettings(**values),
        sources=sources,
        trained=trained_settings,
        trained_from=trained_from,
        differences=tuple(differences),
    )
