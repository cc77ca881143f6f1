"""RL losses for diffusion policies: DDPO (score-function and PPO-clipped) and DPOK.

Every loss is a pure function of per-transition tensors; one row of a batch is one
denoising transition x_t -> x_{t-1} sampled from the policy, with its own advantage:

    log_prob:      log p_theta(x_{t-1} | x_t, c) under the current parameters   (batch,)
    old_log_prob:  the same, recorded when the transition was sampled           (batch,)
    advantages:    normalised reward of the trajectory the transition came from (batch,)
    mean, ref_mean: mu_t of the policy's / the frozen reference's Gaussian       (batch, C, H, W)
    std:           sigma_t, shared by both Gaussians                            (batch, 1, 1, 1)

Notation follows DDPO (Black et al. 2023, sec. 4; the survey's eqs. 17-19) and DPOK
(Fan et al. 2023, eq. 21 of the survey). The losses are *minimised*, so "maximise
advantage-weighted likelihood" appears as ``-advantages * ...``.

``advantages``, ``old_log_prob``, ``ref_mean`` and ``std`` are treated as constants
(detached): gradients flow only through ``log_prob`` and ``mean``, the outputs of the
network being trained.

Adding an algorithm is one loss function, one line in :data:`ALGORITHMS` and one row in
the conformance table of ``tests/unit/test_losses.py``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch

from actors.diffusion.ddim import Reduction

_REDUCTIONS = ("mean", "sum")


@dataclasses.dataclass(frozen=True)
class LossOutput:
    loss: torch.Tensor
    """The scalar to call ``backward()`` on; differentiable in ``log_prob`` / ``mean``."""
    stats: dict[str, float]
    """Detached diagnostics as python floats, keys namespaced (``policy/clipfrac``, ``kl/mean``)."""


# --------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------


def _check_per_transition(**tensors: torch.Tensor) -> None:
    """All tensors are 1-D ``(batch,)`` and of one shape; ``ValueError`` naming the odd one."""
    (first_name, first), *rest = tensors.items()
    if first.ndim != 1:
        raise ValueError(f"{first_name} must have shape (batch,), one value per transition; got {tuple(first.shape)}")
    for name, tensor in rest:
        if tensor.shape != first.shape:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)} but {first_name} has shape {tuple(first.shape)}; "
                f"every per-transition input must be (batch,) with the same batch"
            )


def _check_gaussians(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor) -> None:
    if mean.ndim < 2:
        raise ValueError(f"mean must have shape (batch, C, H, W) or at least (batch, dims); got {tuple(mean.shape)}")
    if ref_mean.shape != mean.shape:
        raise ValueError(f"ref_mean has shape {tuple(ref_mean.shape)} but mean has shape {tuple(mean.shape)}; they must match")
    per_sample = (mean.shape[0],) + (1,) * (mean.ndim - 1)
    if std.shape != per_sample:
        raise ValueError(
            f"std has shape {tuple(std.shape)}; expected {per_sample}, one sigma_t per sample (as ddim_step_with_log_prob returns it)"
        )


def _check_clip_range(clip_range: float) -> None:
    if not (isinstance(clip_range, (int, float)) and math.isfinite(clip_range) and clip_range > 0):
        raise ValueError(f"clip_range must be a finite number > 0 (DDPO uses 1e-4), got {clip_range!r}")


def _check_beta(beta: float) -> None:
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta >= 0):
        raise ValueError(f"beta must be a finite number >= 0 (0 turns the KL penalty off), got {beta!r}")


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _weights_arg(is_weights: torch.Tensor | None) -> dict[str, torch.Tensor]:
    return {} if is_weights is None else {"is_weights": is_weights}


def _weighted_mean(per_transition: torch.Tensor, is_weights: torch.Tensor | None) -> torch.Tensor:
    """Batch mean, each row weighted by its (constant) importance weight when given."""
    if is_weights is None:
        return per_transition.mean()
    return (is_weights.detach() * per_transition).mean()


# --------------------------------------------------------------------------------------
# Importance weights for replayed (off-policy) transitions
# --------------------------------------------------------------------------------------


def truncated_is_weights(
    *, old_log_prob: torch.Tensor, behaviour_log_prob: torch.Tensor, truncation: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """w = min(p_old / p_behaviour, C) per transition, and statistics of the ratios.

    ``old_log_prob`` is log p under the learner's weights at the start of the update,
    ``behaviour_log_prob`` the one recorded by the (older) policy that sampled the
    transition. Truncating at C bounds the variance a rare transition can add (IMPALA's
    rho-bar, Espeholt et al. 2018). Statistics: the untruncated ratio's mean and max, the
    fraction truncated, and the effective sample size (sum w)^2 / (n sum w^2) as a
    fraction of n (1 when all weights are equal).
    """
    _check_per_transition(old_log_prob=old_log_prob, behaviour_log_prob=behaviour_log_prob)
    if not (isinstance(truncation, (int, float)) and math.isfinite(truncation) and truncation > 0):
        raise ValueError(f"truncation must be a finite number > 0 (the C of min(ratio, C)), got {truncation!r}")
    with torch.no_grad():
        ratio = torch.exp(old_log_prob.double() - behaviour_log_prob.double())  # (batch,)
        weights = torch.clamp(ratio, max=truncation)  # (batch,)
        stats = {
            "is/ratio_mean": ratio.mean().item(),
            "is/ratio_max": ratio.max().item(),
            "is/truncated_frac": (ratio > truncation).double().mean().item(),
            "is/ess_frac": (weights.sum().pow(2) / (weights.numel() * weights.pow(2).sum())).item(),
        }
    return weights.to(old_log_prob.dtype), stats


# --------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------


def ddpo_sf_loss(*, log_prob: torch.Tensor, advantages: torch.Tensor, is_weights: torch.Tensor | None = None) -> LossOutput:
    """DDPO_SF: the score-function (REINFORCE) estimator, loss = -mean(A * log_prob).

    Its gradient is -mean(A * grad log_prob): only valid on-policy, i.e. for one gradient
    step per batch of samples.
    """
    _check_per_transition(log_prob=log_prob, advantages=advantages, **_weights_arg(is_weights))
    advantages = advantages.detach()
    loss = _weighted_mean(-(advantages * log_prob), is_weights)
    stats = {"loss/policy": loss.item(), "policy/log_prob_mean": log_prob.detach().mean().item()}
    return LossOutput(loss=loss, stats=stats)


def ddpo_is_loss(
    *,
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
    is_weights: torch.Tensor | None = None,
) -> LossOutput:
    """DDPO_IS: importance-sampled, PPO-clipped, so samples can be reused for several steps.

    ratio = exp(log_prob - old_log_prob)
    loss  = mean(max(-A * ratio, -A * clip(ratio, 1 - clip_range, 1 + clip_range)))

    The max of the two (negated) terms is the pessimistic bound: once the ratio has moved
    past 1 +/- clip_range in the direction the advantage pushes it, the clipped term wins
    and the transition contributes no gradient.

    With replay, ``old_log_prob`` is the learner's own policy at the start of the update
    (the proximal policy) and ``is_weights`` = min(p_old / p_behaviour, C) corrects for the
    older policy that sampled the transition: each row's term is multiplied by its weight.
    """
    _check_per_transition(log_prob=log_prob, old_log_prob=old_log_prob, advantages=advantages, **_weights_arg(is_weights))
    _check_clip_range(clip_range)
    advantages = advantages.detach()
    log_ratio = log_prob - old_log_prob.detach()  # (batch,)
    ratio = torch.exp(log_ratio)  # (batch,)
    unclipped = -advantages * ratio  # (batch,)
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)  # (batch,)
    loss = _weighted_mean(torch.maximum(unclipped, clipped), is_weights)
    with torch.no_grad():
        stats = {
            "loss/policy": loss.item(),
            "policy/clipfrac": ((ratio - 1.0).abs() > clip_range).float().mean().item(),
            # DDPO logs this second-order estimate of KL(old || new) rather than the exact KL
            "policy/approx_kl": (0.5 * log_ratio.pow(2).mean()).item(),
            "policy/ratio_mean": ratio.mean().item(),
            "policy/ratio_max": ratio.max().item(),
        }
    return LossOutput(loss=loss, stats=stats)


def gaussian_kl(*, mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor, reduction: Reduction = "mean") -> torch.Tensor:
    """KL(N(mean, std^2 I) || N(ref_mean, std^2 I)) per sample, shape (batch,).

    With equal variances the log-determinant and trace terms cancel, leaving
    ||mean - ref_mean||^2 / (2 std^2). ``reduction="sum"`` sums over the latent dims (the
    exact KL); ``"mean"`` averages over them, matching the ``"mean"`` log-prob convention
    of :func:`actors.diffusion.ddim.gaussian_log_prob` so that beta means the same thing for both.
    Computed in float32; differentiable in ``mean`` only.
    """
    _check_gaussians(mean, ref_mean, std)
    _check_reduction(reduction)
    mean = mean.float()
    ref_mean = ref_mean.detach().float()
    std = std.detach().float()
    kl_per_dim = (mean - ref_mean).pow(2) / (2 * std.pow(2))  # (batch, C, H, W)
    dims = tuple(range(1, mean.ndim))
    if reduction == "sum":
        return kl_per_dim.sum(dim=dims)
    return kl_per_dim.mean(dim=dims)


def dpok_loss(
    *,
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    mean: torch.Tensor,
    ref_mean: torch.Tensor,
    std: torch.Tensor,
    beta: float,
    clip_range: float,
    reduction: Reduction = "mean",
    is_weights: torch.Tensor | None = None,
) -> LossOutput:
    """DPOK: the clipped policy term of :func:`ddpo_is_loss` plus beta * per-step KL.

    loss = ddpo_is_loss(...) + beta * mean_batch(gaussian_kl(mean, ref_mean, std))

    The KL term is DPOK's upper bound on KL(p_theta(x_0) || p_ref(x_0)): the sum over
    steps of the KL between the two models' transitions from the same x_t (survey eq. 21).
    Each row contributes its own step, so averaging over a batch of transitions estimates
    that sum up to the constant factor of the number of steps. ``is_weights`` weight the
    policy term only: the KL is a property of the current policy, whoever sampled x_t.
    """
    _check_per_transition(log_prob=log_prob, old_log_prob=old_log_prob, advantages=advantages)
    _check_gaussians(mean, ref_mean, std)
    if mean.shape[0] != log_prob.shape[0]:
        raise ValueError(
            f"mean has batch {mean.shape[0]} but log_prob has batch {log_prob.shape[0]}; pass the Gaussians of the same transitions"
        )
    _check_beta(beta)
    _check_clip_range(clip_range)
    policy = ddpo_is_loss(log_prob=log_prob, old_log_prob=old_log_prob, advantages=advantages, clip_range=clip_range, is_weights=is_weights)
    kl = gaussian_kl(mean=mean, ref_mean=ref_mean, std=std, reduction=reduction)  # (batch,)
    kl_loss = beta * kl.mean()
    loss = policy.loss + kl_loss
    with torch.no_grad():
        stats = {
            **policy.stats,
            "loss/kl": kl_loss.item(),
            "kl/mean": kl.mean().item(),
            "kl/max": kl.max().item(),
        }
    return LossOutput(loss=loss, stats=stats)


# --------------------------------------------------------------------------------------
# Registry: one uniform signature per algorithm
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LossInputs:
    """One batch of transitions, everything any algorithm may need."""

    log_prob: torch.Tensor
    """log p_theta(x_{t-1} | x_t, c) under the current parameters. (batch,)"""
    old_log_prob: torch.Tensor
    """The log-prob recorded at sampling time. (batch,)"""
    advantages: torch.Tensor
    """One advantage per transition (its trajectory's). (batch,)"""
    mean: torch.Tensor | None = None
    """mu_t of the policy's Gaussian; algorithms with a KL penalty only. (batch, C, H, W)"""
    ref_mean: torch.Tensor | None = None
    """mu_t of the frozen reference model's Gaussian from the same x_t. (batch, C, H, W)"""
    std: torch.Tensor | None = None
    """sigma_t, shared by both Gaussians. (batch, 1, 1, 1)"""
    is_weights: torch.Tensor | None = None
    """Truncated importance weights of replayed transitions; None when on-policy. (batch,)"""


@dataclasses.dataclass(frozen=True)
class AlgorithmParams:
    """Hyperparameters of the losses; each algorithm reads the ones it uses."""

    clip_range: float = 1e-4
    """PPO clip epsilon on the importance ratio (DDPO's default, 1e-4)."""
    beta: float = 0.01
    """Weight of the KL penalty to the reference model (DPOK only)."""
    kl_reduction: Reduction = "mean"
    """How the KL is reduced over latent dims: "mean" (like the log-probs) or "sum" (exact)."""

    def __post_init__(self) -> None:
        _check_clip_range(self.clip_range)
        _check_beta(self.beta)
        _check_reduction(self.kl_reduction)


LossFn = Callable[[LossInputs, AlgorithmParams], LossOutput]


def _ddpo_sf(inputs: LossInputs, params: AlgorithmParams) -> LossOutput:
    return ddpo_sf_loss(log_prob=inputs.log_prob, advantages=inputs.advantages, is_weights=inputs.is_weights)


def _ddpo_is(inputs: LossInputs, params: AlgorithmParams) -> LossOutput:
    return ddpo_is_loss(
        log_prob=inputs.log_prob,
        old_log_prob=inputs.old_log_prob,
        advantages=inputs.advantages,
        clip_range=params.clip_range,
        is_weights=inputs.is_weights,
    )


def _dpok(inputs: LossInputs, params: AlgorithmParams) -> LossOutput:
    missing = [name for name in ("mean", "ref_mean", "std") if getattr(inputs, name) is None]
    if missing:
        raise ValueError(f"dpok needs the policy's and the reference model's Gaussians; LossInputs is missing {', '.join(missing)}")
    return dpok_loss(
        log_prob=inputs.log_prob,
        old_log_prob=inputs.old_log_prob,
        advantages=inputs.advantages,
        mean=inputs.mean,
        ref_mean=inputs.ref_mean,
        std=inputs.std,
        beta=params.beta,
        clip_range=params.clip_range,
        reduction=params.kl_reduction,
        is_weights=inputs.is_weights,
    )


ALGORITHMS: dict[str, LossFn] = {
    "ddpo_sf": _ddpo_sf,
    "ddpo_is": _ddpo_is,
    "dpok": _dpok,
}
"""Every algorithm's loss by name, all called as ``loss_fn(inputs, params)``."""

_NEEDS_REFERENCE = frozenset({"dpok"})


def get_algorithm(name: str) -> LossFn:
    """The loss of algorithm ``name``; ``ValueError`` listing the valid names otherwise."""
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; expected one of: {', '.join(sorted(ALGORITHMS))}")
    return ALGORITHMS[name]


def needs_reference(name: str) -> bool:
    """Whether algorithm ``name`` needs the reference model's Gaussian (``ref_mean``)."""
    get_algorithm(name)
    return name in _NEEDS_REFERENCE
