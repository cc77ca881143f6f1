"""The sweep config (``rayalign sweep``): a base training config and a search space of its fields."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field, model_validator

from orchestrator.config.schema import FieldError, Section
from orchestrator.config.training import Name

SEARCH_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
"""How a swept field is drawn: ``grid`` (every value, crossed with the other grids),
``choice`` (one value at random), ``uniform`` / ``loguniform`` ([low, high]) and
``randint`` ([low, high), integers)."""

# Resources decide how many trials run at once, so they must be the same for every trial.
_UNSWEEPABLE_PREFIXES = ("pools.", "learner.num_workers", "learner.num_cpus_per_worker", "learner.num_gpus_per_worker")


class SweepSchedulerConfig(Section):
    """The trial scheduler: which trials Ray Tune stops early."""

    type: Literal["asha", "none"] = "asha"
    """"asha" (asynchronous successive halving on the sweep's metric, by epoch) or
    "none" (every trial runs all its epochs)."""

    grace_period: int = Field(1, ge=1)
    """Epochs every trial runs before ASHA may stop it; >= 1."""

    reduction_factor: float = Field(2.0, gt=1)
    """ASHA keeps the best 1/reduction_factor of the trials at each rung; > 1."""


class SweepConfig(Section):
    """A hyperparameter sweep (``rayalign sweep``): a base training config and a search
    space of its fields; every trial is a complete training run."""

    preset: str | None = None
    """Base training config: a shipped preset (toy-ddpo, toy-dpok, ...). Give this or
    ``config``."""

    config: str | None = None
    """Base training config: a YAML file (relative to the sweep file). Give this or
    ``preset``."""

    set: tuple[str, ...] = Field((), strict=False)
    """``dotted.key=value`` overrides of the base config for every trial, e.g.
    ``train.epochs=2``."""

    search_space: dict[str, Any] = Field(
        default_factory=dict,
        min_length=1,
        json_schema_extra={"why": "name at least one field to sweep, e.g. learner.learning_rate: {grid: [1.0e-4, 3.0e-4]}"},
    )
    """Swept fields by dotted name, each ``{KIND: VALUES}`` with KIND one of grid,
    choice (a list of values), uniform, loguniform, randint ([low, high]); e.g.
    ``learner.learning_rate: {loguniform: [1.0e-4, 1.0e-2]}``. Pool and learner
    resources cannot be swept (they decide how many trials fit at once)."""

    num_samples: int = Field(1, ge=1)
    """Trials drawn per grid point (the grid's points are crossed with this); >= 1."""

    metric: Name = "reward/mean"
    """Metric of metrics.jsonl that ranks trials and drives the scheduler."""

    mode: Literal["max", "min"] = "max"
    """Whether a higher or a lower ``metric`` is better."""

    scheduler: SweepSchedulerConfig = Field(default_factory=SweepSchedulerConfig)
    """Early stopping of poor trials."""

    max_concurrent_trials: int = Field(0, ge=0)
    """Trials running at once; 0 = as many as the cluster's resources fit (each trial
    needs its learners, pools and a small driver)."""

    trial_cpus: float = Field(0.1, gt=0)
    """Logical CPUs reserved for each trial's driver (it only coordinates); > 0."""

    seed: int = Field(0, ge=0)
    """Seed of the random draws of the search space; >= 0."""

    @model_validator(mode="after")
    def _consistent(self) -> "SweepConfig":
        if (self.preset is None) == (self.config is None):
            raise FieldError("preset", f"give exactly one of preset or config, got preset={self.preset!r}, config={self.config!r}")
        for key, spec in self.search_space.items():
            _check_search_spec(key, spec)
        return self


def _check_search_spec(key: str, spec: Any) -> None:
    where = f"search_space.{key}"
    if key.startswith(_UNSWEEPABLE_PREFIXES):
        raise FieldError(
            where, "cannot be swept: pool and learner resources decide how many trials fit at once; set them in the base config"
        )
    if not isinstance(spec, Mapping) or len(spec) != 1 or next(iter(spec)) not in SEARCH_KINDS:
        raise FieldError(
            where, f"must be a mapping with one key, one of {', '.join(SEARCH_KINDS)}, e.g. {{grid: [1.0e-4, 3.0e-4]}}; got {spec!r}"
        )
    kind, values = next(iter(spec.items()))
    if not isinstance(values, (list, tuple)) or not values:
        raise FieldError(where, f"{kind} needs a non-empty list, got {values!r}")
    if kind in ("uniform", "loguniform", "randint"):
        numbers_ok = len(values) == 2 and all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in values)
        if not numbers_ok or not values[0] < values[1]:
            raise FieldError(where, f"{kind} needs [low, high] with low < high, got {list(values)!r}")
        if kind == "loguniform" and values[0] <= 0:
            raise FieldError(where, f"loguniform needs low > 0, got {list(values)!r}")
        if kind == "randint" and not all(isinstance(v, int) for v in values):
            raise FieldError(where, f"randint needs integer bounds, got {list(values)!r}")
