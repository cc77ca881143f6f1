"""Flow matching as a stochastic policy: the Flow-GRPO SDE step with its Gaussian log-probability.

Rectified-flow models (Stable Diffusion 3, FLUX.1) interpolate linearly between data and
noise and predict the velocity along that line:

    x_sigma = (1 - sigma) * x0 + sigma * noise,    v = noise - x0,    sigma in [0, 1]

Their sampler is the deterministic Euler ODE step ``x_next = x + dt * v`` with
``dt = sigma_next - sigma < 0``, which has no density. Flow-GRPO (Liu et al. 2025,
arXiv 2505.05470, "ODE to SDE") swaps it for a reverse-time SDE with the same marginals at
every sigma,

    dx = [v + std_dev_t**2 / (2 * sigma) * (x + (1 - sigma) * v)] dt + std_dev_t dw
    std_dev_t = a * sqrt(sigma / (1 - sigma))

where ``a`` is the noise level and ``x + (1 - sigma) * v`` is the model's estimate of the
noise (so the bracket is ``v - std_dev_t**2 / 2 * score``). One Euler-Maruyama step is the
isotropic Gaussian

    mean = x + dt * (v + std_dev_t**2 / (2 * sigma) * (x + (1 - sigma) * v))
         = x * (1 + std_dev_t**2 / (2 * sigma) * dt) + v * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
    std = std_dev_t * sqrt(-dt)
    x_next ~ N(mean, std**2 I)

whose log-density is exact and differentiable in the velocity; as ``a -> 0`` the mean tends
to the ODE step. Two ends of the schedule need care:

- ``sigma = 1`` (the first step) would divide by zero in ``std_dev_t``; there ``1 - sigma``
  is replaced by ``1 - sigma_next``, as flow_grpo does by using its schedule's second sigma.
  The first step's std is then exactly ``a``.
- ``sigma_next = 0`` (the last step) needs nothing special: ``std = a * sigma / sqrt(1 - sigma)``
  is finite and positive, so the last step is stochastic and scored like any other.

All maths runs in float32 whatever the network's dtype, as in ``ddim``.
"""

from __future__ import annotations

import torch

from actors.diffusion.ddim import Reduction, StepOutput, gaussian_step


def _time_shift(sigmas: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """SD3's static resolution shift: sigma' = shift * sigma / (1 + (shift - 1) * sigma)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flow_sigmas(num_steps: int, *, shift: float = 1.0, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The descending sigmas of diffusers' ``FlowMatchEulerDiscreteScheduler`` (static shift).

    Returns ``num_steps + 1`` float32 values from 1 down to a final 0; step ``i`` goes from
    ``sigmas[i]`` to ``sigmas[i + 1]``, and the transformer's timestep is
    ``sigmas[i] * num_train_timesteps``. Like diffusers (``set_timesteps(num_steps)``, no
    custom sigmas, no dynamic shifting), the spacing is linear between 1 and the *shifted*
    smallest training sigma, and the shift is applied once more on top; with ``shift = 1``
    this is simply ``linspace(1, 1 / num_train_timesteps, num_steps)`` followed by 0.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0 (1 means no shift; SD3 uses 3), got {shift}")
    if num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
    # diffusers' smallest sigma is taken from the already-shifted training schedule
    sigma_min = _time_shift(1.0 / num_train_timesteps, shift)
    sigmas = _time_shift(torch.linspace(1.0, sigma_min, num_steps, dtype=torch.float64), shift)
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float()


def sde_window(num_steps: int, window: tuple[int, int] | None) -> list[bool]:
    """Which of ``num_steps`` steps sample with the SDE; the others take the ODE step.

    ``window = (start, stop)`` is a half-open range of step indices, ``0 <= start < stop <=
    num_steps``, so ``(0, 2)`` makes the first two steps stochastic; ``None`` means every step.
    Only SDE steps have a log-probability, so only they are trained on.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if window is None:
        return [True] * num_steps
    if len(window) != 2:
        raise ValueError(f"window must be a (start, stop) pair of step indices or None, got {window!r}")
    start, stop = window
    if not 0 <= start < stop <= num_steps:
        raise ValueError(
            f"window {tuple(window)!r} must satisfy 0 <= start < stop <= num_steps = {num_steps} "
            "(a half-open range of step indices holding at least one step)"
        )
    return [start <= i < stop for i in range(num_steps)]


def _check_step_inputs(velocity: torch.Tensor, sample: torch.Tensor, sigmas: torch.Tensor, sigmas_next: torch.Tensor) -> None:
    if sample.ndim < 2:
        raise ValueError(f"sample must be (batch, ...) with at least one non-batch dim, got shape {tuple(sample.shape)}")
    if velocity.shape != sample.shape:
        raise ValueError(f"velocity shape {tuple(velocity.shape)} must equal sample shape {tuple(sample.shape)}")
    for name, value in (("sigmas", sigmas), ("sigmas_next", sigmas_next)):
        if value.shape != (sample.shape[0],):
            raise ValueError(f"{name} must be a (batch,) = ({sample.shape[0]},) tensor, got shape {tuple(value.shape)}")
    # one host sync per step; a wrong sigma would otherwise surface as NaN log-probs much later
    bad = (sigmas <= 0) | (sigmas > 1) | (sigmas_next < 0) | (sigmas_next >= sigmas)
    if bool(bad.any()):
        rows = bad.nonzero().flatten()[:4].tolist()
        pairs = ", ".join(f"row {i}: {sigmas[i].item():g} -> {sigmas_next[i].item():g}" for i in rows)
        raise ValueError(f"need 0 < sigmas <= 1 and 0 <= sigmas_next < sigmas (a step runs from noise at 1 towards data at 0), got {pairs}")


def flow_ode_step(*, velocity: torch.Tensor, sample: torch.Tensor, sigmas: torch.Tensor, sigmas_next: torch.Tensor) -> torch.Tensor:
    """The deterministic Euler step x + (sigma_next - sigma) * v, for steps outside the SDE window.

    ``sigmas`` and ``sigmas_next`` are ``(batch,)`` tensors, as in ``flow_sde_step_with_log_prob``.
    """
    _check_step_inputs(velocity, sample, sigmas, sigmas_next)
    shape = (-1,) + (1,) * (sample.ndim - 1)
    dt = (sigmas_next.float() - sigmas.float()).to(sample.device).view(shape)
    return sample.float() + dt * velocity.float()


def flow_sde_step_with_log_prob(
    *,
    velocity: torch.Tensor,
    sample: torch.Tensor,
    sigmas: torch.Tensor,
    sigmas_next: torch.Tensor,
    noise_level: float,
    prev_sample: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    reduction: Reduction = "mean",
) -> StepOutput:
    """One Flow-GRPO SDE step x_sigma -> x_sigma_next and its log-probability.

    ``sigmas`` and ``sigmas_next`` are ``(batch,)`` float tensors, so a batch may mix steps (the
    learner shuffles transitions). Give ``prev_sample`` to score a recorded transition;
    otherwise it is drawn as ``mean + std * noise`` (``noise`` required then, so callers own
    the randomness). ``noise_level`` is Flow-GRPO's ``a`` (0.7 in the paper).
    """
    if noise_level <= 0:
        raise ValueError(f"noise_level must be > 0 for the step to have a log-probability, got {noise_level}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"unknown reduction {reduction!r}; expected 'mean' or 'sum'")
    _check_step_inputs(velocity, sample, sigmas, sigmas_next)
    for name, value in (("prev_sample", prev_sample), ("noise", noise)):
        if value is not None and value.shape != sample.shape:
            raise ValueError(f"{name} shape {tuple(value.shape)} must equal sample shape {tuple(sample.shape)}")
    velocity = velocity.float()
    sample = sample.float()
    # 1. sigma, sigma_next and dt, shaped to broadcast over the non-batch dims
    shape = (-1,) + (1,) * (sample.ndim - 1)
    sigma = sigmas.float().to(sample.device).view(shape)
    sigma_next = sigmas_next.float().to(sample.device).view(shape)
    dt = sigma_next - sigma  # (batch, 1, ...), negative
    # 2. the SDE's diffusion coefficient; 1 - sigma vanishes at sigma = 1, where 1 - sigma_next stands in
    one_minus_sigma = torch.where(sigma < 1, 1 - sigma, 1 - sigma_next)
    std_dev_t = noise_level * (sigma / one_minus_sigma).sqrt()
    # 3. Euler-Maruyama mean: the ODE velocity plus the score correction, via the noise estimate
    noise_estimate = sample + (1 - sigma) * velocity
    mean = sample + dt * (velocity + std_dev_t**2 / (2 * sigma) * noise_estimate)
    std = std_dev_t * (-dt).sqrt()
    # 4. draw (unless scoring a given transition) and score
    return gaussian_step(mean, std, prev_sample=prev_sample, noise=noise, reduction=reduction)
