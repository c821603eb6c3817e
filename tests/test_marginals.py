"""Distribution-level checks on a Gaussian mixture whose exact velocity is known in closed form:
the ODE and the Flow-GRPO / Dance SDEs reproduce the data distribution; a wrong drift and CPS do not."""

import pytest
import torch

from flowalign.sampling import full_sde_plan, ode_step, rollout, window_plan, branching_plan, rollout_branched
from flowalign.sampling.analytic import GaussianMixture
from flowalign.sampling.steps import flow_grpo_mean_std

N, STEPS = 10_000, 200
TOL = {"mass": 0.02, "mean": 0.05, "cov": 0.04}
GM = GaussianMixture.default()
SIGMAS = torch.linspace(1, 0, STEPS + 1)


@pytest.fixture(scope="module")
def truth():
    return GM.component_stats(GM.sample(200_000, torch.Generator().manual_seed(123))[0])


def errors(samples, truth):
    got = GM.component_stats(samples)
    return {
        "mass": float((got["mass"] - truth["mass"]).abs().max()),
        "mean": float((got["means"] - truth["means"]).abs().max()),
        "cov": float((got["covs"] - truth["covs"]).abs().max()),
    }


def matches(samples, truth):
    err = errors(samples, truth)
    return all(err[k] <= TOL[k] for k in TOL), err


def velocity(x, sigma):
    return GM.velocity(x, sigma)


def noise(seed):
    return torch.randn(N, GM.dim, generator=torch.Generator().manual_seed(seed))


def test_exact_velocity_at_the_ends():
    x = torch.randn(5, 2, dtype=torch.float64)
    # t = 1: x_1 = eps exactly, so v = x - E[x0]
    prior_mean = (GM.weights[:, None] * GM.means).sum(0)
    torch.testing.assert_close(GM.velocity(x, torch.tensor(1.0)), x - prior_mean)


def test_ode_converges(truth):
    x = noise(0)
    for i in range(STEPS):
        x = ode_step(x, velocity(x, SIGMAS[i].expand(N)), SIGMAS[i], SIGMAS[i + 1]).x_next
    ok, err = matches(x, truth)
    assert ok, err


@pytest.mark.parametrize("kind,level", [("flow_grpo", 0.5), ("flow_grpo", 1.0), ("dance", 0.3), ("dance", 1.0)])
def test_sde_preserves_marginals(truth, kind, level):
    traj = rollout(velocity, noise(1), SIGMAS, full_sde_plan(STEPS), kind=kind, noise_level=level,
                   generator=torch.Generator().manual_seed(2))
    ok, err = matches(traj.final, truth)
    assert ok, (kind, level, err)
    assert traj.log_probs.shape == (N, STEPS) and torch.isfinite(traj.log_probs).all()


def test_wrong_drift_fails_the_same_test(truth):
    """Flow-GRPO's noise without its score correction in the drift over-disperses the samples."""
    g = torch.Generator().manual_seed(4)
    x = noise(3)
    for i in range(STEPS):
        t, tn = SIGMAS[i], SIGMAS[i + 1]
        v = velocity(x, t.expand(N))
        _, std = flow_grpo_mean_std(x, v, t, tn, 0.7)
        x = x + v * (tn - t) + std * torch.randn(x.shape, generator=g)
    ok, err = matches(x, truth)
    assert not ok, err


def test_cps_does_not_preserve_multimodal_marginals(truth):
    traj = rollout(velocity, noise(5), SIGMAS, full_sde_plan(STEPS, include_last=False), kind="cps",
                   noise_level=0.7, generator=torch.Generator().manual_seed(6))
    ok, err = matches(traj.final, truth)
    assert not ok and err["cov"] > 2 * TOL["cov"], err


def test_window_and_branch_samples_keep_marginals(truth):
    """A partial-SDE window and TempFlow branches are still samples of the data distribution."""
    g = torch.Generator().manual_seed(7)
    traj = rollout(velocity, noise(8), SIGMAS, window_plan(STEPS, 40, 20), kind="flow_grpo", noise_level=0.9, generator=g)
    ok, err = matches(traj.final, truth)
    assert ok, err
    bt = rollout_branched(velocity, noise(9)[:2500], SIGMAS, branching_plan(STEPS, [30], 4), kind="flow_grpo",
                          noise_level=0.9, generator=g)
    ok, err = matches(bt.finals.reshape(-1, 2), truth)
    assert ok, err
