"""The Flow-GRPO SDE step as a Gaussian policy: diffusers' schedule, hand-computed steps, marginals."""

import math

import diffusers
import pytest
import torch

from actors.diffusion import flow


def _step(**overrides):
    kwargs = dict(
        velocity=torch.full((1, 1, 1, 1), 2.0),
        sample=torch.full((1, 1, 1, 1), 1.0),
        sigmas=torch.tensor([0.5]),
        sigmas_next=torch.tensor([0.25]),
        noise_level=0.5,
        prev_sample=torch.full((1, 1, 1, 1), 0.5),
    )
    kwargs.update(overrides)
    return flow.flow_sde_step_with_log_prob(**kwargs)


def _mixed_batch(seed=0):
    """Four transitions from different steps of a shifted schedule, first and last step included."""
    sigmas = flow.flow_sigmas(10, shift=3.0)
    index = torch.tensor([0, 3, 7, 9])
    g = torch.Generator().manual_seed(seed)
    return dict(
        velocity=torch.randn(4, 2, 3, 3, generator=g),
        sample=torch.randn(4, 2, 3, 3, generator=g),
        sigmas=sigmas[index],
        sigmas_next=sigmas[index + 1],
    ), torch.randn(4, 2, 3, 3, generator=g)


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("num_steps", [1, 2, 10, 28])
def test_sigmas_match_diffusers_flow_match_euler_scheduler(shift, num_steps):
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(num_steps)
    sigmas = flow.flow_sigmas(num_steps, shift=shift)
    assert sigmas.dtype == torch.float32
    assert sigmas.shape == (num_steps + 1,)
    assert sigmas[0].item() == 1.0 and sigmas[-1].item() == 0.0
    torch.testing.assert_close(sigmas, scheduler.sigmas.float(), rtol=0, atol=1e-6)


def test_mean_std_and_log_prob_match_hand_computation():
    # sigma = 0.5, sigma_next = 0.25, a = 0.5, x = 1, v = 2:
    # std_dev_t = 0.5 * sqrt(0.5 / 0.5) = 0.5, dt = -0.25
    # mean = x * (1 + 0.25 / 1 * -0.25) + v * (1 + 0.25 * 0.5 / 1) * -0.25 = 0.9375 - 0.5625 = 0.375
    # std = 0.5 * sqrt(0.25) = 0.25
    # log N(0.5; 0.375, 0.25^2) = -(0.125^2) / (2 * 0.0625) - log(0.25) - log(2 pi) / 2 = 0.342356
    out = _step()
    assert out.mean.item() == pytest.approx(0.375, rel=1e-6)
    assert out.std.item() == pytest.approx(0.25, rel=1e-6)
    expected = -0.125 - math.log(0.25) - 0.5 * math.log(2 * math.pi)
    assert out.log_prob.item() == pytest.approx(expected, rel=1e-6)
    assert out.log_prob.item() == pytest.approx(0.342356, abs=1e-6)


def test_first_step_at_sigma_one_has_std_equal_to_the_noise_level():
    # At sigma = 1, 1 - sigma is replaced by 1 - sigma_next = 0.1 (flow_grpo's sigmas[1]):
    # std_dev_t^2 = 0.49 / 0.1 = 4.9, std = sqrt(4.9) * sqrt(0.1) = 0.7
    # mean = x + dt * (v + 4.9 / 2 * (x + 0 * v)) = 1 - 0.1 * (2 + 2.45) = 0.555
    out = _step(sigmas=torch.tensor([1.0]), sigmas_next=torch.tensor([0.9]), noise_level=0.7)
    assert out.std.item() == pytest.approx(0.7, rel=1e-6)
    assert out.mean.item() == pytest.approx(0.555, rel=1e-6)
    assert math.isfinite(out.log_prob.item())


def test_last_step_to_sigma_zero_is_a_proper_gaussian():
    # sigma = 0.2 -> 0: std = a * sqrt(0.2 / 0.8) * sqrt(0.2) = 0.7 * 0.5 * 0.447214 = 0.156525
    out = _step(sigmas=torch.tensor([0.2]), sigmas_next=torch.tensor([0.0]), noise_level=0.7)
    assert out.std.item() == pytest.approx(0.7 * 0.5 * math.sqrt(0.2), rel=1e-6)
    assert math.isfinite(out.log_prob.item())


def test_step_equals_flow_grpo_expanded_formula_on_a_mixed_batch():
    # The module writes the mean as x + dt * (v + std_dev_t^2 / (2 sigma) * noise_estimate);
    # Flow-GRPO expands it per coefficient. Here the expanded form, with sigma = 1 using the
    # schedule's second sigma in 1 - sigma, as in flow_grpo's sd3_sde_with_logprob.py.
    inputs, noise = _mixed_batch()
    schedule = flow.flow_sigmas(10, shift=3.0)
    a = 0.7
    out = flow.flow_sde_step_with_log_prob(**inputs, noise_level=a, noise=noise)
    x, v = inputs["sample"], inputs["velocity"]
    sigma = inputs["sigmas"].view(-1, 1, 1, 1)
    dt = inputs["sigmas_next"].view(-1, 1, 1, 1) - sigma
    std_dev_t = a * torch.sqrt(sigma / (1 - torch.where(sigma == 1, schedule[1], sigma)))
    mean = x * (1 + std_dev_t**2 / (2 * sigma) * dt) + v * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
    torch.testing.assert_close(out.mean, mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.std, std_dev_t * torch.sqrt(-dt), rtol=1e-6, atol=0)
    torch.testing.assert_close(out.prev_sample, mean + std_dev_t * torch.sqrt(-dt) * noise, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_log_prob_equals_torch_normal(reduction):
    inputs, noise = _mixed_batch()
    out = flow.flow_sde_step_with_log_prob(**inputs, noise_level=0.7, noise=noise, reduction=reduction)
    density = torch.distributions.Normal(out.mean, out.std.expand_as(out.mean)).log_prob(out.prev_sample)
    expected = density.sum(dim=(1, 2, 3)) if reduction == "sum" else density.mean(dim=(1, 2, 3))
    torch.testing.assert_close(out.log_prob, expected, rtol=1e-5, atol=1e-5)


def test_rescoring_the_drawn_sample_gives_importance_ratio_one():
    inputs, noise = _mixed_batch()
    drawn = flow.flow_sde_step_with_log_prob(**inputs, noise_level=0.7, noise=noise)
    scored = flow.flow_sde_step_with_log_prob(**inputs, noise_level=0.7, prev_sample=drawn.prev_sample)
    ratio = torch.exp(scored.log_prob - drawn.log_prob)
    assert (ratio - 1).abs().max().item() <= 1e-6
    # and a different transition scores differently, so the check above can fail
    other = flow.flow_sde_step_with_log_prob(**inputs, noise_level=0.7, prev_sample=drawn.prev_sample + 0.1)
    assert (other.log_prob - drawn.log_prob).abs().min().item() > 1e-3


def test_mixed_steps_in_one_batch_equal_separate_calls():
    inputs, noise = _mixed_batch()
    together = flow.flow_sde_step_with_log_prob(**inputs, noise_level=0.7, noise=noise)
    for i in range(4):
        alone = flow.flow_sde_step_with_log_prob(
            **{name: value[i : i + 1] for name, value in inputs.items()}, noise_level=0.7, noise=noise[i : i + 1]
        )
        torch.testing.assert_close(together.prev_sample[i : i + 1], alone.prev_sample, rtol=0, atol=0)
        torch.testing.assert_close(together.log_prob[i : i + 1], alone.log_prob, rtol=0, atol=0)
    ode = flow.flow_ode_step(**inputs)
    for i in range(4):
        alone = flow.flow_ode_step(**{name: value[i : i + 1] for name, value in inputs.items()})
        torch.testing.assert_close(ode[i : i + 1], alone, rtol=0, atol=0)


def test_mean_tends_to_the_ode_euler_step_as_noise_level_vanishes():
    inputs, _ = _mixed_batch()
    ode = flow.flow_ode_step(**inputs)
    # by hand: ode = x + (sigma_next - sigma) * v
    dt = (inputs["sigmas_next"] - inputs["sigmas"]).view(-1, 1, 1, 1)
    torch.testing.assert_close(ode, inputs["sample"] + dt * inputs["velocity"])

    def gap(a):
        return (flow.flow_sde_step_with_log_prob(**inputs, noise_level=a, prev_sample=ode).mean - ode).abs().max().item()

    assert gap(1e-3) < 1e-5
    assert gap(0.7) > 1e-2
    # the SDE's correction to the drift is proportional to a^2
    assert gap(0.2) / gap(0.1) == pytest.approx(4.0, rel=1e-3)


def test_log_prob_is_differentiable_in_the_velocity_only():
    inputs, noise = _mixed_batch()
    velocity = inputs.pop("velocity").requires_grad_(True)
    out = flow.flow_sde_step_with_log_prob(**inputs, velocity=velocity, noise_level=0.7, noise=noise)
    (grad,) = torch.autograd.grad(out.log_prob.sum(), velocity)
    # the drawn sample is detached inside the log-prob: at prev_sample = mean + std * noise the
    # gradient is d/dmean of -(x' - mean)^2 / (2 std^2) = noise / std, times dmean/dv
    assert torch.isfinite(grad).all() and grad.abs().sum().item() > 0


def test_bf16_inputs_compute_in_float32():
    inputs, noise = _mixed_batch()
    low = {name: value.bfloat16() if name in ("velocity", "sample") else value for name, value in inputs.items()}
    out = flow.flow_sde_step_with_log_prob(**low, noise_level=0.7, noise=noise.bfloat16())
    assert out.mean.dtype == out.prev_sample.dtype == out.log_prob.dtype == torch.float32
    assert flow.flow_ode_step(**low).dtype == torch.float32


def test_ode_with_the_exact_velocity_of_a_point_mass_lands_on_it():
    # Data is the constant c: x_sigma = (1 - sigma) c + sigma n gives n = (x - (1 - sigma) c) / sigma
    # and v = n - c = (x - c) / sigma, so every Euler step stays on the straight line to c.
    c, sigmas = 0.7, flow.flow_sigmas(20)
    x = torch.randn(64, 1, generator=torch.Generator().manual_seed(0))
    for i in range(20):
        x = flow.flow_ode_step(velocity=(x - c) / sigmas[i], sample=x, sigmas=sigmas[i].expand(64), sigmas_next=sigmas[i + 1].expand(64))
    torch.testing.assert_close(x, torch.full_like(x, c), rtol=0, atol=1e-5)


def test_sde_keeps_the_marginals_of_a_point_mass():
    # Same toy data as above: the marginal at sigma is N((1 - sigma) c, sigma^2). The SDE must track
    # it (up to Euler-Maruyama error, here ~8% on the std) and still land on c. A sign error in the
    # score term or a missing (1 - sigma) or sqrt(-dt) factor moves the std ratio by > 15%.
    c, num_steps, n = 0.7, 20, 4096
    sigmas = flow.flow_sigmas(num_steps)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, generator=g)
    for i in range(num_steps):
        out = flow.flow_sde_step_with_log_prob(
            velocity=(x - c) / sigmas[i],
            sample=x,
            sigmas=sigmas[i].expand(n),
            sigmas_next=sigmas[i + 1].expand(n),
            noise_level=0.7,
            noise=torch.randn(n, 1, generator=g),
        )
        x = out.prev_sample
        sigma_next = sigmas[i + 1].item()
        if sigma_next >= 0.4:
            assert x.mean().item() == pytest.approx((1 - sigma_next) * c, abs=0.05)
            assert x.std().item() / sigma_next == pytest.approx(1.0, abs=0.12)
    assert x.mean().item() == pytest.approx(c, abs=0.01)
    assert x.std().item() < 0.05


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(noise_level=0.0), "noise_level must be > 0"),
        (dict(prev_sample=None), "give either prev_sample"),
        (dict(reduction="max"), "unknown reduction"),
        (dict(sigmas=torch.tensor([1.5])), "0 < sigmas <= 1"),
        (dict(sigmas=torch.tensor([0.0]), sigmas_next=torch.tensor([0.0])), "0 < sigmas <= 1"),
        (dict(sigmas_next=torch.tensor([0.5])), "sigmas_next < sigmas"),
        (dict(sigmas_next=torch.tensor([-0.1])), "0 <= sigmas_next"),
        (dict(sigmas=torch.tensor(0.5)), r"sigmas must be a \(batch,\)"),
        (dict(sigmas_next=torch.tensor([0.25, 0.25])), r"sigmas_next must be a \(batch,\)"),
        (dict(velocity=torch.ones(1, 1, 2, 1)), "velocity shape"),
        (dict(prev_sample=torch.ones(2, 1, 1, 1)), "prev_sample shape"),
        (dict(sample=torch.ones(1), velocity=torch.ones(1)), "at least one non-batch dim"),
    ],
)
def test_bad_step_inputs_raise(overrides, match):
    with pytest.raises(ValueError, match=match):
        _step(**overrides)


def test_sde_window_marks_a_half_open_range_of_steps():
    assert flow.sde_window(3, None) == [True, True, True]
    assert flow.sde_window(5, (0, 2)) == [True, True, False, False, False]
    assert flow.sde_window(5, (3, 5)) == [False, False, False, True, True]


@pytest.mark.parametrize(
    "num_steps, window, match",
    [
        (0, None, "num_steps must be >= 1"),
        (5, (2, 2), "0 <= start < stop <= num_steps = 5"),
        (5, (3, 1), "0 <= start < stop"),
        (5, (-1, 2), "0 <= start"),
        (5, (0, 6), "stop <= num_steps = 5"),
        (5, (0, 1, 2), "must be a \\(start, stop\\) pair"),
    ],
)
def test_bad_sde_window_raises(num_steps, window, match):
    with pytest.raises(ValueError, match=match):
        flow.sde_window(num_steps, window)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_steps=0), "num_steps must be >= 1"),
        (dict(num_steps=4, shift=0.0), "shift must be > 0"),
        (dict(num_steps=4, num_train_timesteps=0), "num_train_timesteps must be >= 1"),
    ],
)
def test_bad_schedule_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        flow.flow_sigmas(**kwargs)
