"""Each step kind against its formula, its log-prob against torch.distributions, and the ratio."""

import math

import pytest
import torch

from flowalign.sampling import (
    cps_mean_std,
    dance_mean_std,
    flow_grpo_mean_std,
    gaussian_log_prob,
    ode_step,
    sde_step,
    transition_log_prob,
)

B, SHAPE = 4, (3, 5, 5)


@pytest.fixture
def xv():
    g = torch.Generator().manual_seed(0)
    return torch.randn(B, *SHAPE, generator=g), torch.randn(B, *SHAPE, generator=g)


def test_ode_is_euler(xv):
    x, v = xv
    res = ode_step(x, v, 0.8, 0.6)
    torch.testing.assert_close(res.x_next, x + (0.6 - 0.8) * v)
    assert res.log_prob is None and float(res.std.abs().max()) == 0


def test_flow_grpo_formula(xv):
    x, v = xv
    t, tn, a = 0.8, 0.6, 0.7
    mean, std = flow_grpo_mean_std(x, v, t, tn, a)
    sig = a * math.sqrt(t / (1 - t))
    expect = x + (v + sig**2 / (2 * t) * (x + (1 - t) * v)) * (tn - t)
    torch.testing.assert_close(mean, expect)
    torch.testing.assert_close(std.flatten(), torch.full((B,), sig * math.sqrt(t - tn)))


def test_flow_grpo_first_step_guard(xv):
    """At t = 1 the denominator uses 1 - t_next (the reference's guard), so the std is finite."""
    x, v = xv
    mean, std = flow_grpo_mean_std(x, v, 1.0, 0.9, 0.7)
    sig = 0.7 * math.sqrt(1.0 / (1 - 0.9))
    torch.testing.assert_close(std.flatten(), torch.full((B,), sig * math.sqrt(0.1)))
    assert torch.isfinite(mean).all()


def test_dance_formula(xv):
    x, v = xv
    t, tn, eta = 0.5, 0.4, 0.3
    mean, std = dance_mean_std(x, v, t, tn, eta)
    torch.testing.assert_close(mean, x + (v + eta**2 / (2 * t) * (x + (1 - t) * v)) * (tn - t))
    torch.testing.assert_close(std.flatten(), torch.full((B,), eta * math.sqrt(t - tn)))


def test_cps_formula_and_ode_limit(xv):
    x, v = xv
    t, tn, a = 0.7, 0.5, 0.6
    mean, std = cps_mean_std(x, v, t, tn, a)
    s = tn * math.sin(a * math.pi / 2)
    torch.testing.assert_close(mean, (1 - tn) * (x - t * v) + math.sqrt(tn**2 - s**2) * (x + (1 - t) * v))
    torch.testing.assert_close(std.flatten(), torch.full((B,), s))
    # noise level 0: exactly the Euler step
    mean0, std0 = cps_mean_std(x, v, t, tn, 0.0)
    torch.testing.assert_close(mean0, ode_step(x, v, t, tn).x_next)
    assert float(std0.max()) == 0


def test_cps_single_point_distribution_is_exact():
    """For single-point data x0 (exact v = (x - x0)/t), x_t ~ N((1-t)x0, t^2) maps to exactly
    N((1-t_next)x0, t_next^2)."""
    g = torch.Generator().manual_seed(1)
    n, x0 = 200_000, torch.tensor([1.5, -0.5])
    for t, tn, a in [(0.9, 0.7, 0.5), (0.5, 0.2, 0.9), (1.0, 0.95, 0.3)]:
        x = (1 - t) * x0 + t * torch.randn(n, 2, generator=g)
        v = (x - x0) / t if t < 1 else x - x0
        out = sde_step("cps", x, v, t, tn, a, generator=g).x_next
        torch.testing.assert_close(out.mean(0), (1 - tn) * x0, atol=4 * tn / math.sqrt(n) * 2, rtol=0)
        torch.testing.assert_close(out.std(0), torch.full((2,), tn), atol=0.01 * tn, rtol=0)


@pytest.mark.parametrize("kind,level", [("flow_grpo", 0.7), ("dance", 0.4), ("cps", 0.6)])
def test_log_prob_matches_torch_normal(xv, kind, level):
    x, v = xv
    t = torch.tensor([1.0, 0.8, 0.5, 0.3])  # per-sample sigmas, including the t = 1 guard
    tn = torch.tensor([0.9, 0.7, 0.35, 0.1])
    res = sde_step(kind, x, v, t, tn, level, generator=torch.Generator().manual_seed(3))
    ref = torch.distributions.Normal(res.mean, res.std.expand_as(res.mean)).log_prob(res.x_next)
    torch.testing.assert_close(res.log_prob, ref.mean(dim=(1, 2, 3)))
    # recomputing the recorded transition with the same velocity gives ratio exactly 1
    again = transition_log_prob(kind, x, res.x_next, v, t, tn, level)
    torch.testing.assert_close(torch.exp(again.log_prob - res.log_prob), torch.ones(B), rtol=0, atol=1e-6)
    # a different velocity changes the log-prob (the ratio is informative) and carries gradients
    v2 = (v + 0.1).requires_grad_()
    other = transition_log_prob(kind, x, res.x_next, v2, t, tn, level)
    assert not torch.allclose(other.log_prob, res.log_prob)
    other.log_prob.sum().backward()
    assert v2.grad is not None and v2.grad.abs().sum() > 0


def test_explicit_noise_and_float32(xv):
    x, v = xv
    noise = torch.randn(B, *SHAPE)
    res = sde_step("flow_grpo", x.bfloat16(), v.bfloat16(), 0.6, 0.5, 0.7, noise)
    assert res.x_next.dtype == torch.float32 and res.log_prob.dtype == torch.float32
    torch.testing.assert_close(res.x_next, res.mean + res.std * noise)


def test_gaussian_log_prob_reduction_is_mean():
    x, m = torch.randn(2, 10), torch.zeros(2, 10)
    std = torch.full((2, 1), 0.5)
    total = torch.distributions.Normal(0.0, 0.5).log_prob(x).sum(1)
    torch.testing.assert_close(gaussian_log_prob(x, m, std) * 10, total)


def test_deterministic_step_has_no_log_prob(xv):
    x, v = xv
    res = sde_step("cps", x, v, 0.2, 0.0, 0.7)
    assert res.log_prob is None
    torch.testing.assert_close(res.x_next, ode_step(x, v, 0.2, 0.0).x_next)
    with pytest.raises(ValueError, match="deterministic"):
        transition_log_prob("cps", x, res.x_next, v, 0.2, 0.0, 0.7)
    with pytest.raises(ValueError, match="unknown SDE kind"):
        sde_step("ddim", x, v, 0.2, 0.1, 0.7)
