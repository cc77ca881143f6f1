"""The DDIM step as a Gaussian policy: hand-computed means, variances and log-densities."""

import math

import pytest
import torch

from actors.diffusion import ddim


def _step(**overrides):
    kwargs = dict(
        model_output=torch.full((1, 1, 1, 1), 0.5),
        sample=torch.full((1, 1, 1, 1), 1.0),
        timesteps=torch.tensor([1]),
        prev_timesteps=torch.tensor([0]),
        alphas_cumprod=torch.tensor([0.9, 0.5]),
        final_alpha_cumprod=1.0,
        eta=1.0,
        prev_sample=torch.full((1, 1, 1, 1), 0.8),
    )
    kwargs.update(overrides)
    return ddim.ddim_step_with_log_prob(**kwargs)


def test_mean_std_and_log_prob_match_hand_computation():
    # alpha_t = 0.5, alpha_prev = 0.9, eps = 0.5, x_t = 1:
    # x0 = (1 - sqrt(0.5) * 0.5) / sqrt(0.5) = 1.41421 - 0.5 = 0.914214
    # sigma^2 = (1 - 0.9) / (1 - 0.5) * (1 - 0.5 / 0.9) = 0.2 * 0.444444 = 0.0888889
    # mu = sqrt(0.9) * 0.914214 + sqrt(1 - 0.9 - 0.0888889) * 0.5 = 0.867303 + 0.0527046 = 0.920008
    # log N(0.8; mu, sigma^2) = -(0.8 - mu)^2 / (2 sigma^2) - log(sigma) - log(2 pi) / 2
    out = _step()
    x0 = (1 - math.sqrt(0.5) * 0.5) / math.sqrt(0.5)
    var = 0.1 / 0.5 * (1 - 0.5 / 0.9)
    mu = math.sqrt(0.9) * x0 + math.sqrt(1 - 0.9 - var) * 0.5
    expected = -((0.8 - mu) ** 2) / (2 * var) - 0.5 * math.log(var) - 0.5 * math.log(2 * math.pi)
    assert out.std.item() == pytest.approx(math.sqrt(var), rel=1e-6)
    assert out.mean.item() == pytest.approx(mu, rel=1e-6)
    assert out.mean.item() == pytest.approx(0.920008, abs=1e-5)
    assert out.log_prob.item() == pytest.approx(expected, rel=1e-5)


def test_eta_scales_std_and_eta_zero_is_rejected():
    full = _step(eta=1.0)
    half = _step(eta=0.5)
    assert half.std.item() == pytest.approx(0.5 * full.std.item(), rel=1e-6)
    with pytest.raises(ValueError, match="eta must be > 0"):
        _step(eta=0.0)


def test_eta_one_variance_is_the_ddpm_posterior_variance_for_adjacent_steps():
    # For t_prev = t - 1 the DDIM sigma at eta = 1 is DDPM's beta_tilde_t.
    betas = torch.linspace(1e-4, 0.02, 1000)
    alphas_cumprod = torch.cumprod(1 - betas, dim=0)
    t = 500
    out = _step(alphas_cumprod=alphas_cumprod, timesteps=torch.tensor([t]), prev_timesteps=torch.tensor([t - 1]))
    beta_tilde = (1 - alphas_cumprod[t - 1]) / (1 - alphas_cumprod[t]) * betas[t]
    assert out.std.item() ** 2 == pytest.approx(beta_tilde.item(), rel=1e-4)


def test_last_step_uses_final_alpha():
    out = _step(prev_timesteps=torch.tensor([-19]), final_alpha_cumprod=0.95)
    explicit = _step(prev_timesteps=torch.tensor([0]), alphas_cumprod=torch.tensor([0.95, 0.5]))
    torch.testing.assert_close(out.mean, explicit.mean)
    torch.testing.assert_close(out.log_prob, explicit.log_prob)


def test_log_prob_equals_torch_normal_and_reductions():
    torch.manual_seed(0)
    x, mean = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    std = torch.tensor([0.1, 0.5, 2.0]).view(3, 1, 1, 1)
    reference = torch.distributions.Normal(mean, std.expand_as(mean)).log_prob(x)
    torch.testing.assert_close(ddim.gaussian_log_prob(x, mean, std, "sum"), reference.sum(dim=(1, 2, 3)))
    torch.testing.assert_close(ddim.gaussian_log_prob(x, mean, std, "mean"), reference.mean(dim=(1, 2, 3)))
    with pytest.raises(ValueError, match="unknown reduction"):
        ddim.gaussian_log_prob(x, mean, std, "max")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_parametrisations_recover_x0_and_eps(prediction_type):
    torch.manual_seed(1)
    x0, eps = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    alpha = torch.tensor([0.3, 0.8]).view(2, 1, 1, 1)
    x_t = alpha.sqrt() * x0 + (1 - alpha).sqrt() * eps
    output = {"epsilon": eps, "v_prediction": alpha.sqrt() * eps - (1 - alpha).sqrt() * x0, "sample": x0}[prediction_type]
    got_x0, got_eps = ddim.predict_x0_and_eps(output, x_t, alpha, prediction_type)
    torch.testing.assert_close(got_x0, x0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_eps, eps, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="unsupported prediction_type"):
        ddim.predict_x0_and_eps(output, x_t, alpha, "flow")


def test_sampling_draws_mean_plus_std_noise_and_scores_itself():
    noise = torch.full((1, 1, 1, 1), 2.0)
    drawn = _step(prev_sample=None, noise=noise)
    torch.testing.assert_close(drawn.prev_sample, drawn.mean + drawn.std * noise)
    # log N(mu + 2 sigma; mu, sigma^2) = -2 - log sigma - log(2 pi) / 2
    assert drawn.log_prob.item() == pytest.approx(-2 - math.log(drawn.std.item()) - 0.5 * math.log(2 * math.pi), rel=1e-5)
    with pytest.raises(ValueError, match="prev_sample"):
        _step(prev_sample=None)


def test_mixed_timesteps_in_one_batch_equal_separate_calls():
    betas = torch.linspace(1e-4, 0.02, 1000)
    alphas_cumprod = torch.cumprod(1 - betas, dim=0)
    torch.manual_seed(2)
    out, x, nxt = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2)
    t, t_prev = torch.tensor([901, 51]), torch.tensor([851, 1])
    kw = dict(alphas_cumprod=alphas_cumprod, final_alpha_cumprod=0.99915, eta=1.0)
    both = ddim.ddim_step_with_log_prob(model_output=out, sample=x, timesteps=t, prev_timesteps=t_prev, prev_sample=nxt, **kw)
    for i in range(2):
        one = ddim.ddim_step_with_log_prob(
            model_output=out[i : i + 1],
            sample=x[i : i + 1],
            timesteps=t[i : i + 1],
            prev_timesteps=t_prev[i : i + 1],
            prev_sample=nxt[i : i + 1],
            **kw,
        )
        torch.testing.assert_close(both.log_prob[i : i + 1], one.log_prob)


def test_guidance_is_linear_extrapolation():
    u, c = torch.tensor([1.0]), torch.tensor([3.0])
    assert ddim.guided_output(u, c, 1.0).item() == 3.0  # w = 1: the conditional model
    assert ddim.guided_output(u, c, 4.5).item() == 1.0 + 4.5 * 2.0
