"""Guards against reward hacking: DPOK's adaptive beta, the best checkpoint by a gold reward, early stop.

A policy optimised against a reward learns whatever the reward pays for, wanted or not:
DDPO's JPEG compressibility is maximised by flat, blank images, and a learned reward model is
exploited where it was never fit (reward hacking, the survey's sec. 3.3; among the remedies
for reward overfitting that DRaFT tried are early stopping and KL regularisation, its sec.
4.1). rayalign's three guards, each optional:

- ``train.gold_reward``: a second reward that the controller scores on the eval images and
  never trains on; the training reward rising while it falls is the sign;
- ``train.kl_target``: DPOK's beta adapted after every epoch to hold ``kl/mean`` near the
  target (:func:`actors.rl.kl_control.adaptive_beta`); the learners receive it with each update;
- ``train.early_stop``: end the run when the gold reward falls too far below its best or the
  KL exceeds a bound, keeping the best checkpoint as ``checkpoints/best``.

What they decide is a pure function of what an epoch measured (:func:`after_epoch`). Their
state, :class:`GuardState`, is saved in each checkpoint's ``state.json``, so a resumed run
continues with the beta and the best it had.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from actors.rl.kl_control import adaptive_beta
from orchestrator.config import EarlyStopConfig, TrainConfig
from orchestrator.rundir import BEST, CHECKPOINTS_DIR, RunDir, checkpoint_name

BETA_RANGE = 100.0
"""With ``train.kl_target``, beta moves within ``[train.beta / BETA_RANGE, train.beta * BETA_RANGE]``."""


@dataclasses.dataclass(frozen=True)
class GuardState:
    """What the guards carry from epoch to epoch (and through a checkpoint)."""

    beta: float
    """DPOK's KL coefficient for the next update: ``train.beta`` at first, adapted with ``train.kl_target``."""
    best_epoch: int | None = None
    """The epoch whose checkpoint ``checkpoints/best`` names; None before one is kept."""
    best_gold: float | None = None
    """``gold/mean`` at ``best_epoch``; None without a gold reward."""
    stopped_epoch: int | None = None
    """The epoch after which ``train.early_stop`` ended the run; None while it runs on."""
    reason: str | None = None
    """Why it stopped, in words."""

    @classmethod
    def start(cls, train: TrainConfig) -> GuardState:
        return cls(beta=train.beta)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GuardState:
        return cls(**data)


def early_stop_reason(rule: EarlyStopConfig, *, kl: float, gold: float | None, best: GuardState) -> str | None:
    """Why to stop after an epoch that measured ``kl`` (NaN: not measured) and ``gold`` (None: not an
    eval epoch), given the best so far; None to go on.

    The KL rule fires when ``kl > max_kl``; the gold rule when ``best_gold - gold > gold_drop``.
    """
    if rule.max_kl is not None and math.isfinite(kl) and kl > rule.max_kl:
        return f"kl/mean {kl:.4g} is above early_stop.max_kl = {rule.max_kl:g}"
    if rule.gold_drop is not None and gold is not None and best.best_gold is not None and best.best_gold - gold > rule.gold_drop:
        return (
            f"gold/mean {gold:.4g} fell {best.best_gold - gold:.4g} below its best, {best.best_gold:.4g} at epoch "
            f"{best.best_epoch}, more than early_stop.gold_drop = {rule.gold_drop:g}"
        )
    return None


def after_epoch(state: GuardState, train: TrainConfig, *, epoch: int, kl: float, gold: float | None, checkpointed: bool) -> GuardState:
    """The guards after ``epoch``: beta for the next update, the best checkpoint so far, whether to stop.

    ``kl`` is the epoch's ``kl/mean`` (NaN when not measured) and ``gold`` its ``gold/mean``
    (None at an epoch without eval); ``checkpointed`` says whether the epoch's checkpoint is
    written (only a checkpointed epoch can be the best). With a gold reward the best is the
    highest ``gold/mean`` (the earliest of equals); without one, every checkpoint within the
    bounds is the best so far. An epoch that stops the run is never the best.
    """
    if train.kl_target is not None:
        low, high = train.beta / BETA_RANGE, train.beta * BETA_RANGE
        state = dataclasses.replace(state, beta=adaptive_beta(state.beta, kl=kl, target=train.kl_target, low=low, high=high))
    rule = train.early_stop
    if rule is None:
        return state
    reason = early_stop_reason(rule, kl=kl, gold=gold, best=state)
    if reason is not None:
        return dataclasses.replace(state, stopped_epoch=epoch, reason=reason)
    if not checkpointed:
        return state
    if train.gold_reward is None:
        return dataclasses.replace(state, best_epoch=epoch)
    if gold is not None and (state.best_gold is None or gold > state.best_gold):
        return dataclasses.replace(state, best_epoch=epoch, best_gold=gold)
    return state


def end_line(state: GuardState, *, epochs: int, checkpoints: str) -> str:
    """The line a run with ``train.early_stop`` ends with: why it ended, and which checkpoint is best."""
    if state.best_epoch is None:
        best = f"no checkpoint was kept as the best (none was written within the bounds before the stop), so there is no {BEST}"
    else:
        gold = f", gold/mean {state.best_gold:.4g}" if state.best_gold is not None else ""
        name = checkpoint_name(state.best_epoch)
        best = f"best checkpoint {checkpoints}/{name} (epoch {state.best_epoch}{gold}; {CHECKPOINTS_DIR}/{BEST} names it)"
    if state.stopped_epoch is not None:
        return f"early stop after epoch {state.stopped_epoch} of {epochs}: {state.reason}; {best}"
    return f"no early stop in {epochs} epochs; {best}"


def read_end_line(run: RunDir, train: TrainConfig) -> str | None:
    """:func:`end_line` from the run's latest checkpoint (the last epoch's, or the stop's), or None without one."""
    latest = run.latest_checkpoint()
    data = latest.read_state().get("guards") if latest is not None else None
    return end_line(GuardState.from_dict(data), epochs=train.epochs, checkpoints=run.checkpoints.uri) if data else None
