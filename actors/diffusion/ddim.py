"""DDIM as a stochastic policy: one denoising step with its Gaussian log-probability.

Notation follows DDIM (Song et al. 2021, eq. 12) and DDPO (Black et al. 2023, sec. 4.3):
for a step from timestep ``t`` to ``t_prev`` with cumulative signal rates ``alpha_t`` and
``alpha_prev``,

    x0_hat = (x_t - sqrt(1 - alpha_t) * eps) / sqrt(alpha_t)
    sigma_t = eta * sqrt((1 - alpha_prev) / (1 - alpha_t)) * sqrt(1 - alpha_t / alpha_prev)
    mu_t = sqrt(alpha_prev) * x0_hat + sqrt(1 - alpha_prev - sigma_t**2) * eps
    x_prev ~ N(mu_t, sigma_t**2 I)

so with ``eta > 0`` each step is an isotropic Gaussian policy whose log-density is exact
and differentiable in the network output. All maths runs in float32 whatever the
network's dtype: log-prob differences of 1e-4 matter for importance ratios.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, Sequence

import torch

Reduction = Literal["mean", "sum"]
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


@dataclasses.dataclass(frozen=True)
class StepOutput:
    prev_sample: torch.Tensor
    """x_{t_prev}: drawn from the step's Gaussian, or the one given. (batch, C, H, W)"""
    log_prob: torch.Tensor
    """log N(prev_sample; mean, std^2), reduced over non-batch dims. (batch,)"""
    mean: torch.Tensor
    """mu_t, the Gaussian's mean. (batch, C, H, W)"""
    std: torch.Tensor
    """sigma_t, broadcastable to the sample. (batch, 1, 1, 1)"""


def previous_timesteps(timesteps: torch.Tensor, *, num_train_timesteps: int, num_inference_steps: int) -> torch.Tensor:
    """The timestep each DDIM step lands on; negative means "past the last step"."""
    return timesteps - num_train_timesteps // num_inference_steps


def _gather(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, final_alpha_cumprod: float) -> torch.Tensor:
    """alpha_cumprod at each timestep, ``final_alpha_cumprod`` where the timestep is negative."""
    safe = timesteps.clamp(min=0).to(alphas_cumprod.device)
    values = alphas_cumprod[safe]
    return torch.where(timesteps.to(values.device) >= 0, values, torch.full_like(values, final_alpha_cumprod))


def predict_x0_and_eps(
    model_output: torch.Tensor, sample: torch.Tensor, alpha_t: torch.Tensor, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn the network output into (x0_hat, eps_hat) for any of diffusers' parametrisations."""
    sqrt_a, sqrt_1ma = alpha_t.sqrt(), (1 - alpha_t).sqrt()
    if prediction_type == "epsilon":
        eps = model_output
        x0 = (sample - sqrt_1ma * eps) / sqrt_a
    elif prediction_type == "v_prediction":
        x0 = sqrt_a * sample - sqrt_1ma * model_output
        eps = sqrt_a * model_output + sqrt_1ma * sample
    elif prediction_type == "sample":
        x0 = model_output
        eps = (sample - sqrt_a * x0) / sqrt_1ma
    else:
        raise ValueError(f"unsupported prediction_type {prediction_type!r}; expected 'epsilon', 'v_prediction' or 'sample'")
    return x0, eps


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, reduction: Reduction = "mean") -> torch.Tensor:
    """log N(x; mean, std^2 I) per sample, summed (exact density) or averaged over dims."""
    log_density = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - _HALF_LOG_2PI
    dims = tuple(range(1, x.ndim))
    if reduction == "sum":
        return log_density.sum(dim=dims)
    if reduction == "mean":
        return log_density.mean(dim=dims)
    raise ValueError(f"unknown reduction {reduction!r}; expected 'mean' or 'sum'")


def ddim_step_with_log_prob(
    *,
    model_output: torch.Tensor,
    sample: torch.Tensor,
    timesteps: torch.Tensor,
    prev_timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    final_alpha_cumprod: float,
    eta: float,
    prediction_type: str = "epsilon",
    prev_sample: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    reduction: Reduction = "mean",
) -> StepOutput:
    """One stochastic DDIM step x_t -> x_{t_prev} and its log-probability.

    ``timesteps`` and ``prev_timesteps`` are ``(batch,)`` integer tensors, so a batch may mix
    timesteps (the learner shuffles transitions). Give ``prev_sample`` to score a recorded
    transition; otherwise it is drawn as ``mean + std * noise`` (``noise`` required then, so
    callers own the randomness).
    """
    if eta <= 0:
        raise ValueError(f"eta must be > 0 for the step to have a log-probability, got {eta}")
    model_output = model_output.float()
    sample = sample.float()
    shape = (-1,) + (1,) * (sample.ndim - 1)
    alphas_cumprod = alphas_cumprod.float()
    # 1. cumulative signal rates at t and t_prev, shaped to broadcast over (C, H, W)
    alpha_t = _gather(alphas_cumprod, timesteps, final_alpha_cumprod).view(shape)
    alpha_prev = _gather(alphas_cumprod, prev_timesteps, final_alpha_cumprod).view(shape)
    # 2. predicted clean sample and noise
    x0, eps = predict_x0_and_eps(model_output, sample, alpha_t, prediction_type)
    # 3. sigma_t (DDIM eq. 16) scaled by eta
    variance = (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)
    std = eta * variance.clamp(min=1e-20).sqrt()
    # 4. mean: the direction pointing to x_t keeps the remaining noise budget
    mean = alpha_prev.sqrt() * x0 + (1 - alpha_prev - std**2).clamp(min=0).sqrt() * eps
    # 5. draw (unless scoring a given transition) and score
    return gaussian_step(mean, std, prev_sample=prev_sample, noise=noise, reduction=reduction)


def gaussian_step(
    mean: torch.Tensor,
    std: torch.Tensor,
    *,
    prev_sample: torch.Tensor | None,
    noise: torch.Tensor | None,
    reduction: Reduction = "mean",
) -> StepOutput:
    """The step N(mean, std^2 I): ``prev_sample`` scored if given, else drawn as ``mean + std * noise``, with its log-prob.

    Shared by every sampler whose step is an isotropic Gaussian (DDIM, the flow SDE).
    """
    if prev_sample is None:
        if noise is None:
            raise ValueError("give either prev_sample (to score) or noise (to sample)")
        prev_sample = mean + std * noise.float()
    prev_sample = prev_sample.float()
    log_prob = gaussian_log_prob(prev_sample.detach(), mean, std, reduction)
    return StepOutput(prev_sample=prev_sample, log_prob=log_prob, mean=mean, std=std)


def guided_output(unconditional: torch.Tensor, conditional: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance: uncond + w * (cond - uncond); w = 1 is the conditional model."""
    return unconditional + guidance_scale * (conditional - unconditional)


def inference_timesteps(scheduler, num_steps: int) -> Sequence[int]:
    """The descending timesteps of a ``num_steps`` DDIM schedule, as the scheduler defines them."""
    scheduler.set_timesteps(num_steps)
    return scheduler.timesteps.tolist()
