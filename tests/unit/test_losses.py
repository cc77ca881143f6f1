"""DDPO and DPOK losses: hand-computed values, gradient directions, and a conformance table."""

import math

import pytest
import torch

from actors.rl import losses
from actors.rl.losses import AlgorithmParams, LossInputs


def _leaf(values):
    return torch.tensor(values, dtype=torch.float32, requires_grad=True)


# --------------------------------------------------------------------------------------
# DDPO_SF
# --------------------------------------------------------------------------------------


def test_ddpo_sf_value_and_gradient_raise_log_prob_of_positive_advantages():
    # log_prob = [-1, -3], A = [2, -1]: A * log_prob = [-2, 3], mean 0.5, loss = -0.5.
    # d loss / d log_prob_i = -A_i / batch = [-1, 0.5]: a descent step (minus the gradient)
    # raises the log-prob of the positive-advantage sample and lowers the other's.
    log_prob = _leaf([-1.0, -3.0])
    out = losses.ddpo_sf_loss(log_prob=log_prob, advantages=torch.tensor([2.0, -1.0]))
    out.loss.backward()
    assert out.loss.item() == pytest.approx(-0.5)
    assert log_prob.grad.tolist() == pytest.approx([-1.0, 0.5])
    assert log_prob.grad[0] < 0 < log_prob.grad[1]
    assert out.stats["policy/log_prob_mean"] == pytest.approx(-2.0)
    assert out.stats["loss/policy"] == pytest.approx(-0.5)


def test_ddpo_sf_treats_advantages_as_constants():
    advantages = _leaf([1.0, -1.0])
    losses.ddpo_sf_loss(log_prob=_leaf([0.5, 0.5]), advantages=advantages).loss.backward()
    assert advantages.grad is None


# --------------------------------------------------------------------------------------
# DDPO_IS
# --------------------------------------------------------------------------------------


def test_ddpo_is_hand_values():
    # log_prob = [0, ln 1.5], old = [0, 0], A = [1, -2], clip 0.2: ratio = [1, 1.5].
    # row 0: -A * ratio = -1, -A * clip(1) = -1 -> max -1
    # row 1: -A * ratio = 2 * 1.5 = 3, -A * clip(1.5, 0.8, 1.2) = 2 * 1.2 = 2.4 -> max 3
    #        (a negative advantage with a grown ratio is not clipped: the loss stays pessimistic)
    # loss = (-1 + 3) / 2 = 1.0
    # clipfrac: |ratio - 1| = [0, 0.5] > 0.2 for one of two -> 0.5
    # approx_kl = 0.5 * mean([0, ln(1.5)^2]) = 0.25 * 0.405465^2 = 0.0411005
    out = losses.ddpo_is_loss(
        log_prob=_leaf([0.0, math.log(1.5)]),
        old_log_prob=torch.tensor([0.0, 0.0]),
        advantages=torch.tensor([1.0, -2.0]),
        clip_range=0.2,
    )
    assert out.loss.item() == pytest.approx(1.0, rel=1e-6)
    assert out.stats["loss/policy"] == pytest.approx(1.0, rel=1e-6)
    assert out.stats["policy/clipfrac"] == pytest.approx(0.5)
    assert out.stats["policy/approx_kl"] == pytest.approx(0.0411005, rel=1e-5)
    assert out.stats["policy/ratio_mean"] == pytest.approx(1.25, rel=1e-6)
    assert out.stats["policy/ratio_max"] == pytest.approx(1.5, rel=1e-6)


def test_ddpo_is_clips_only_where_the_advantage_pushes_the_ratio_out_of_range():
    # clip 0.2 -> band [0.8, 1.2]; old_log_prob = 0 so ratio = exp(log_prob); batch of 5.
    #   ratio  A    -A*ratio  -A*clip(ratio)  max    clipped?  d/d log_prob = -A*ratio/5 or 0
    #   1.5   +1    -1.5      -1.2            -1.2   yes       0
    #   0.5   -1     0.5       0.8             0.8   yes       0
    #   0.5   +1    -0.5      -0.8            -0.5   no       -0.1
    #   1.5   -1     1.5       1.2             1.5   no        0.3
    #   1.1   +1    -1.1      -1.1            -1.1   no       -0.22  (inside the band)
    # loss = (-1.2 + 0.8 - 0.5 + 1.5 - 1.1) / 5 = -0.1
    # clipfrac counts |ratio - 1| > 0.2 whatever the sign of A (as DDPO logs it): 4 / 5
    ratio = [1.5, 0.5, 0.5, 1.5, 1.1]
    log_prob = _leaf([math.log(r) for r in ratio])
    out = losses.ddpo_is_loss(
        log_prob=log_prob,
        old_log_prob=torch.zeros(5),
        advantages=torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0]),
        clip_range=0.2,
    )
    out.loss.backward()
    assert out.loss.item() == pytest.approx(-0.1, abs=1e-6)
    assert log_prob.grad.tolist() == pytest.approx([0.0, 0.0, -0.1, 0.3, -0.22], abs=1e-6)
    assert out.stats["policy/clipfrac"] == pytest.approx(0.8)


def test_ddpo_is_gradient_equals_ddpo_sf_gradient_on_policy():
    # At log_prob = old_log_prob the ratio is 1 and inside the clip band, and
    # d/d log_prob of -A * exp(log_prob - old) = -A * ratio = -A, the score-function gradient.
    values = [-1.3, 0.2, 2.0]
    advantages = torch.tensor([0.5, -1.5, 2.0])
    sf_log_prob, is_log_prob = _leaf(values), _leaf(values)
    losses.ddpo_sf_loss(log_prob=sf_log_prob, advantages=advantages).loss.backward()
    losses.ddpo_is_loss(log_prob=is_log_prob, old_log_prob=torch.tensor(values), advantages=advantages, clip_range=1e-4).loss.backward()
    assert is_log_prob.grad.tolist() == pytest.approx(sf_log_prob.grad.tolist())
    assert sf_log_prob.grad.tolist() == pytest.approx([-0.5 / 3, 1.5 / 3, -2.0 / 3])


def test_ddpo_is_treats_old_log_prob_as_constant():
    old_log_prob = _leaf([0.1, 0.2])
    losses.ddpo_is_loss(
        log_prob=_leaf([0.1, 0.2]), old_log_prob=old_log_prob, advantages=torch.tensor([1.0, 1.0]), clip_range=0.2
    ).loss.backward()
    assert old_log_prob.grad is None


# --------------------------------------------------------------------------------------
# Gaussian KL
# --------------------------------------------------------------------------------------


def _two_gaussians():
    # sample 0: mean [1, 2], ref [0, 0], std 1 -> per-dim diff^2 / (2 std^2) = [0.5, 2.0]
    # sample 1: mean [3, 3], ref [1, 3], std 2 -> per-dim [4 / 8, 0] = [0.5, 0.0]
    mean = torch.tensor([[1.0, 2.0], [3.0, 3.0]]).view(2, 1, 1, 2)
    ref_mean = torch.tensor([[0.0, 0.0], [1.0, 3.0]]).view(2, 1, 1, 2)
    std = torch.tensor([1.0, 2.0]).view(2, 1, 1, 1)
    return mean, ref_mean, std


def test_gaussian_kl_hand_values_for_both_reductions():
    # sum over the two dims: [2.5, 0.5]; mean over them: [1.25, 0.25]
    mean, ref_mean, std = _two_gaussians()
    assert losses.gaussian_kl(mean=mean, ref_mean=ref_mean, std=std, reduction="sum").tolist() == pytest.approx([2.5, 0.5])
    assert losses.gaussian_kl(mean=mean, ref_mean=ref_mean, std=std).tolist() == pytest.approx([1.25, 0.25])


def test_gaussian_kl_sum_is_the_exact_kl_of_the_two_normals():
    generator = torch.Generator().manual_seed(0)
    mean = torch.randn(3, 2, 4, 4, generator=generator)
    ref_mean = torch.randn(3, 2, 4, 4, generator=generator)
    std = torch.rand(3, 1, 1, 1, generator=generator) + 0.1
    p = torch.distributions.Normal(mean, std.expand_as(mean))
    q = torch.distributions.Normal(ref_mean, std.expand_as(mean))
    exact = torch.distributions.kl_divergence(p, q).sum(dim=(1, 2, 3))
    kl = losses.gaussian_kl(mean=mean, ref_mean=ref_mean, std=std, reduction="sum")
    assert kl.shape == (3,)
    assert torch.allclose(kl, exact, rtol=1e-5)


def test_gaussian_kl_is_zero_for_equal_means_and_pulls_mean_towards_ref():
    mean, ref_mean, std = _two_gaussians()
    assert losses.gaussian_kl(mean=mean, ref_mean=mean.clone(), std=std).tolist() == [0.0, 0.0]
    # d kl_0 / d mean_0 = (mean - ref) / (std^2 * dims) = [1, 2] / 2 = [0.5, 1.0] ("mean" over 2 dims):
    # descent moves mean towards ref; the reference gets no gradient
    mean = mean.clone().requires_grad_(True)
    ref_mean = ref_mean.clone().requires_grad_(True)
    losses.gaussian_kl(mean=mean, ref_mean=ref_mean, std=std)[0].backward()
    assert mean.grad[0].flatten().tolist() == pytest.approx([0.5, 1.0])
    assert ref_mean.grad is None


def test_gaussian_kl_works_in_float32():
    mean, ref_mean, std = _two_gaussians()
    kl = losses.gaussian_kl(mean=mean.half(), ref_mean=ref_mean.half(), std=std.half())
    assert kl.dtype == torch.float32


# --------------------------------------------------------------------------------------
# DPOK
# --------------------------------------------------------------------------------------


def _dpok(beta, reduction="mean", **overrides):
    mean, ref_mean, std = _two_gaussians()
    kwargs = dict(
        log_prob=_leaf([0.0, math.log(1.5)]),
        old_log_prob=torch.tensor([0.0, 0.0]),
        advantages=torch.tensor([1.0, -2.0]),
        mean=mean,
        ref_mean=ref_mean,
        std=std,
        beta=beta,
        clip_range=0.2,
        reduction=reduction,
    )
    kwargs.update(overrides)
    return losses.dpok_loss(**kwargs)


def test_dpok_hand_values():
    # policy term: the ddpo_is hand example above, 1.0.
    # KL "mean" = [1.25, 0.25] -> batch mean 0.75; beta 0.1 -> 0.075; loss = 1.075
    # KL "sum"  = [2.5, 0.5]   -> batch mean 1.5;  beta 0.1 -> 0.15;  loss = 1.15
    out = _dpok(beta=0.1)
    assert out.loss.item() == pytest.approx(1.075, rel=1e-6)
    assert out.stats["loss/policy"] == pytest.approx(1.0, rel=1e-6)
    assert out.stats["loss/kl"] == pytest.approx(0.075, rel=1e-6)
    assert out.stats["kl/mean"] == pytest.approx(0.75)
    assert out.stats["kl/max"] == pytest.approx(1.25)
    assert out.stats["policy/clipfrac"] == pytest.approx(0.5)
    assert _dpok(beta=0.1, reduction="sum").loss.item() == pytest.approx(1.15, rel=1e-6)


def test_dpok_is_ddpo_is_plus_beta_kl_exactly():
    generator = torch.Generator().manual_seed(1)
    old_log_prob = torch.randn(6, generator=generator)
    log_prob = old_log_prob + 0.1 * torch.randn(6, generator=generator)
    advantages = torch.randn(6, generator=generator)
    mean = torch.randn(6, 2, 3, 3, generator=generator)
    ref_mean = mean + 0.3 * torch.randn(6, 2, 3, 3, generator=generator)
    std = torch.rand(6, 1, 1, 1, generator=generator) + 0.5
    beta = 0.37
    policy = losses.ddpo_is_loss(log_prob=log_prob, old_log_prob=old_log_prob, advantages=advantages, clip_range=0.05)
    kl = losses.gaussian_kl(mean=mean, ref_mean=ref_mean, std=std)
    out = losses.dpok_loss(
        log_prob=log_prob,
        old_log_prob=old_log_prob,
        advantages=advantages,
        mean=mean,
        ref_mean=ref_mean,
        std=std,
        beta=beta,
        clip_range=0.05,
    )
    assert out.loss.item() == pytest.approx((policy.loss + beta * kl.mean()).item(), rel=1e-6)
    for key, value in policy.stats.items():
        assert out.stats[key] == pytest.approx(value)


def test_dpok_with_beta_zero_is_ddpo_is():
    log_prob = _leaf([0.0, math.log(1.5)])
    out = _dpok(beta=0.0, log_prob=log_prob)
    out.loss.backward()
    reference = _leaf([0.0, math.log(1.5)])
    is_out = losses.ddpo_is_loss(log_prob=reference, old_log_prob=torch.zeros(2), advantages=torch.tensor([1.0, -2.0]), clip_range=0.2)
    is_out.loss.backward()
    assert out.loss.item() == is_out.loss.item()
    assert log_prob.grad.tolist() == reference.grad.tolist()
    assert out.stats["loss/kl"] == 0.0


def test_dpok_loss_grows_with_beta_when_means_differ():
    values = [_dpok(beta=beta).loss.item() for beta in (0.0, 0.01, 0.1, 1.0)]
    assert values == sorted(values) and len(set(values)) == 4


def test_dpok_kl_gradient_reaches_the_policy_mean():
    mean, ref_mean, std = _two_gaussians()
    mean.requires_grad_(True)
    _dpok(beta=0.1, mean=mean).loss.backward()
    # beta * mean over batch of 2 of the per-sample KL gradient [0.5, 1.0] (sample 0) -> 0.1 / 2 * [0.5, 1.0]
    assert mean.grad[0].flatten().tolist() == pytest.approx([0.025, 0.05])


# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------


def test_mismatched_per_transition_shapes_are_rejected_with_both_shapes():
    with pytest.raises(ValueError, match=r"old_log_prob has shape \(3,\) but log_prob has shape \(2,\)"):
        losses.ddpo_is_loss(log_prob=torch.zeros(2), old_log_prob=torch.zeros(3), advantages=torch.zeros(2), clip_range=0.1)
    with pytest.raises(ValueError, match=r"advantages has shape \(2, 1\)"):
        losses.ddpo_sf_loss(log_prob=torch.zeros(2), advantages=torch.zeros(2, 1))
    with pytest.raises(ValueError, match=r"log_prob must have shape \(batch,\)"):
        losses.ddpo_sf_loss(log_prob=torch.zeros(2, 4), advantages=torch.zeros(2, 4))


def test_mismatched_gaussian_shapes_are_rejected():
    mean, ref_mean, std = _two_gaussians()
    with pytest.raises(ValueError, match="ref_mean has shape"):
        losses.gaussian_kl(mean=mean, ref_mean=ref_mean[:1], std=std)
    with pytest.raises(ValueError, match="std has shape"):
        losses.gaussian_kl(mean=mean, ref_mean=ref_mean, std=std.view(2))
    with pytest.raises(ValueError, match="reduction must be one of"):
        losses.gaussian_kl(mean=mean, ref_mean=ref_mean, std=std, reduction="max")
    with pytest.raises(ValueError, match="mean has batch 2 but log_prob has batch 3"):
        _dpok(beta=0.1, log_prob=torch.zeros(3), old_log_prob=torch.zeros(3), advantages=torch.zeros(3))


@pytest.mark.parametrize("clip_range", [0.0, -0.1, float("nan")])
def test_clip_range_must_be_positive(clip_range):
    with pytest.raises(ValueError, match="clip_range must be a finite number > 0"):
        losses.ddpo_is_loss(log_prob=torch.zeros(2), old_log_prob=torch.zeros(2), advantages=torch.zeros(2), clip_range=clip_range)
    with pytest.raises(ValueError, match="clip_range"):
        AlgorithmParams(clip_range=clip_range)


def test_beta_must_be_non_negative():
    with pytest.raises(ValueError, match=r"beta must be a finite number >= 0.*got -0.5"):
        _dpok(beta=-0.5)
    with pytest.raises(ValueError, match="kl_reduction|reduction"):
        AlgorithmParams(kl_reduction="max")


def test_unknown_algorithm_lists_the_valid_names():
    with pytest.raises(ValueError, match="unknown algorithm 'ppo'; expected one of: ddpo_is, ddpo_sf, dpok"):
        losses.get_algorithm("ppo")
    with pytest.raises(ValueError, match="unknown algorithm"):
        losses.needs_reference("ppo")


# --------------------------------------------------------------------------------------
# Conformance: every registered algorithm, one row each
# --------------------------------------------------------------------------------------

CONFORMANCE = [
    # (name, needs the reference model's Gaussian)
    ("ddpo_sf", False),
    ("ddpo_is", False),
    ("dpok", True),
]


def _inputs(*, batch=8, ratio_one=False, zero_advantages=False, seed=0):
    generator = torch.Generator().manual_seed(seed)
    old_log_prob = torch.randn(batch, generator=generator)
    log_prob = old_log_prob.clone() if ratio_one else old_log_prob + 0.1 * torch.randn(batch, generator=generator)
    advantages = torch.zeros(batch) if zero_advantages else torch.randn(batch, generator=generator)
    mean = torch.randn(batch, 4, 2, 2, generator=generator)
    return LossInputs(
        log_prob=log_prob.requires_grad_(True),
        old_log_prob=old_log_prob,
        advantages=advantages,
        mean=mean.requires_grad_(True),
        ref_mean=mean.detach() + 0.2 * torch.randn(batch, 4, 2, 2, generator=generator),
        std=torch.rand(batch, 1, 1, 1, generator=generator) + 0.1,
    )


def test_conformance_table_covers_every_registered_algorithm():
    assert {name for name, _ in CONFORMANCE} == set(losses.ALGORITHMS)


@pytest.mark.parametrize("name, expects_reference", CONFORMANCE)
def test_algorithm_returns_a_finite_differentiable_scalar_and_float_stats(name, expects_reference):
    inputs = _inputs()
    out = losses.get_algorithm(name)(inputs, AlgorithmParams(clip_range=0.2, beta=0.1))
    assert isinstance(out, losses.LossOutput)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss) and out.loss.requires_grad
    out.loss.backward()
    assert inputs.log_prob.grad is not None and torch.isfinite(inputs.log_prob.grad).all()
    assert out.stats and all(type(value) is float and math.isfinite(value) for value in out.stats.values())
    assert all("/" in key for key in out.stats)
    assert out.stats["loss/policy"] == pytest.approx(out.loss.item() - out.stats.get("loss/kl", 0.0), abs=1e-6)
    assert losses.needs_reference(name) is expects_reference


@pytest.mark.parametrize("name, expects_reference", CONFORMANCE)
def test_algorithm_policy_loss_is_zero_on_policy_with_zero_advantages(name, expects_reference):
    out = losses.get_algorithm(name)(_inputs(ratio_one=True, zero_advantages=True), AlgorithmParams(clip_range=0.2, beta=0.1))
    assert out.stats["loss/policy"] == 0.0


@pytest.mark.parametrize("name, expects_reference", [row for row in CONFORMANCE if row[1]])
def test_algorithm_needing_a_reference_rejects_inputs_without_one(name, expects_reference):
    inputs = _inputs()
    bare = LossInputs(log_prob=inputs.log_prob, old_log_prob=inputs.old_log_prob, advantages=inputs.advantages)
    with pytest.raises(ValueError, match="missing mean, ref_mean, std"):
        losses.get_algorithm(name)(bare, AlgorithmParams())


# --------------------------------------------------------------------------------------
# Truncated importance weights (replay)
# --------------------------------------------------------------------------------------


def test_truncated_is_weights_hand_values():
    # ratios p_old / p_behaviour = exp([0, ln 0.5, ln 3]) = [1, 0.5, 3]; C = 2 truncates the 3.
    old = torch.tensor([-1.0, -1.0 + math.log(0.5), -2.0 + math.log(3.0)])
    behaviour = torch.tensor([-1.0, -1.0, -2.0])
    weights, stats = losses.truncated_is_weights(old_log_prob=old, behaviour_log_prob=behaviour, truncation=2.0)
    assert weights.tolist() == pytest.approx([1.0, 0.5, 2.0], rel=1e-6)
    assert weights.dtype == torch.float32
    assert stats["is/ratio_mean"] == pytest.approx(4.5 / 3, rel=1e-6)
    assert stats["is/ratio_max"] == pytest.approx(3.0, rel=1e-6)
    assert stats["is/truncated_frac"] == pytest.approx(1 / 3)
    # ESS: (1 + 0.5 + 2)^2 / (3 * (1 + 0.25 + 4)) = 12.25 / 15.75
    assert stats["is/ess_frac"] == pytest.approx(12.25 / 15.75, rel=1e-6)


def test_truncated_is_weights_on_policy_are_one_with_full_ess():
    log_prob = torch.tensor([-0.3, -1.7, -2.2])
    weights, stats = losses.truncated_is_weights(old_log_prob=log_prob, behaviour_log_prob=log_prob.clone(), truncation=1.0)
    assert weights.tolist() == [1.0, 1.0, 1.0]
    assert stats == {"is/ratio_mean": 1.0, "is/ratio_max": 1.0, "is/truncated_frac": 0.0, "is/ess_frac": 1.0}


@pytest.mark.parametrize("truncation", [0.0, -1.0, float("inf")])
def test_truncation_must_be_positive_and_finite(truncation):
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="truncation must be a finite number > 0"):
        losses.truncated_is_weights(old_log_prob=x, behaviour_log_prob=x, truncation=truncation)


def test_is_weights_scale_each_transitions_clipped_term():
    # ratio = exp([0.5, 0]) vs old; clip 0.2: A = [1, -2]
    # row 0: max(-1 * e^0.5, -1 * 1.2) = -1.2; row 1: max(2 * 1, 2 * 1) = 2
    # weights [0.5, 1]: loss = mean([-0.6, 2]) = 0.7
    log_prob, old = torch.tensor([0.5, 0.0]), torch.zeros(2)
    advantages = torch.tensor([1.0, -2.0])
    out = losses.ddpo_is_loss(
        log_prob=log_prob, old_log_prob=old, advantages=advantages, clip_range=0.2, is_weights=torch.tensor([0.5, 1.0])
    )
    assert out.loss.item() == pytest.approx(0.7)
    plain = losses.ddpo_is_loss(log_prob=log_prob, old_log_prob=old, advantages=advantages, clip_range=0.2)
    assert plain.loss.item() == pytest.approx(0.4)


def test_dpok_weights_the_policy_term_but_not_the_kl():
    log_prob = _leaf([0.0, 0.0])
    mean = torch.ones(2, 1, 1, 1) * 2.0
    ref_mean, std = torch.ones(2, 1, 1, 1), torch.ones(2, 1, 1, 1)
    args = dict(
        old_log_prob=torch.zeros(2), advantages=torch.tensor([1.0, 1.0]), mean=mean, ref_mean=ref_mean, std=std, beta=0.5, clip_range=0.2
    )
    weighted = losses.dpok_loss(log_prob=log_prob, is_weights=torch.tensor([0.25, 0.25]), **args)
    # policy term: mean(0.25 * -1) = -0.25; KL = (2 - 1)^2 / 2 = 0.5 per row, beta * 0.5 = 0.25
    assert weighted.loss.item() == pytest.approx(-0.25 + 0.25)
    assert weighted.stats["kl/mean"] == pytest.approx(0.5)


def test_is_weights_of_the_wrong_shape_are_rejected():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="is_weights has shape"):
        losses.ddpo_sf_loss(log_prob=x, advantages=x, is_weights=torch.ones(2))
