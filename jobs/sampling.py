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


def choose_sampling(
    given: Mapping[str, Any], trained: tuple[SamplerSettings, Path] | None, *, names: Mapping[str, str] | None = None
) -> ChosenSampling:
    """Each setting from ``given`` if not None, else from training, else :func:`default_sampler`'s.

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
    return ChosenSampling(
        settings=SamplerSettings(**values),
        sources=sources,
        trained=trained_settings,
        trained_from=trained_from,
        differences=tuple(differences),
    )
