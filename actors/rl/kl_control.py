"""DPOK's KL coefficient, adapted to a target KL: PPO's adaptive KL penalty.

DPOK (Fan et al. 2023; the survey's eq. 21) adds beta times the per-step KL between the
policy's and the frozen reference's transitions to the policy-gradient loss. A fixed beta
is either too weak for a reward the policy learns to exploit (the KL grows without bound)
or so strong that nothing is learned. PPO's adaptive variant (Schulman et al. 2017, sec. 4)
measures the KL d after each update and moves beta for the next one:

    d < d_targ / 1.5:  beta <- beta / 2
    d > d_targ * 1.5:  beta <- beta * 2

and leaves it where it is in between. A multiplicative step, rather than a proportional
controller (Ziegler et al. 2019), reaches a target orders of magnitude away in a few
epochs, and a KL inside the band never moves beta, so a run at its target keeps a constant
loss. beta stays within ``[low, high]``: early in a run the KL is far below any target
(the policy starts at the reference), and unbounded halving would leave beta at 1e-30
by the time the KL grows, too small to double back within the run. d is ``kl/mean``, the
KL of one denoising step with the ``log_prob_reduction`` convention of the losses
(:func:`actors.rl.losses.gaussian_kl`).
"""

from __future__ import annotations

import math


def adaptive_beta(
    beta: float,
    *,
    kl: float,
    target: float,
    tolerance: float = 1.5,
    factor: float = 2.0,
    low: float = 0.0,
    high: float = math.inf,
) -> float:
    """beta for the next update, after an update whose measured KL was ``kl``.

    ``beta * factor`` when ``kl > target * tolerance``, ``beta / factor`` when ``kl < target /
    tolerance``, else ``beta``; then clipped to ``[low, high]``. A KL that was not measured
    (NaN) leaves beta as it is.
    """
    if not (math.isfinite(beta) and beta >= 0):
        raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")
    if not (math.isfinite(target) and target > 0):
        raise ValueError(f"target must be a finite KL > 0, got {target!r}")
    if not (tolerance > 1 and factor > 1):
        raise ValueError(f"tolerance and factor must be > 1 (PPO uses 1.5 and 2), got {tolerance!r} and {factor!r}")
    if not 0 <= low <= high:
        raise ValueError(f"the bounds must satisfy 0 <= low <= high, got low={low!r}, high={high!r}")
    if not math.isfinite(kl):
        return beta
    if kl > target * tolerance:
        beta = beta * factor
    elif kl < target / tolerance:
        beta = beta / factor
    return min(max(beta, low), high)
