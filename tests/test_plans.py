import pytest
import torch

from flowalign.config import SamplingConfig
from flowalign.sampling import (
    branching_plan,
    full_sde_plan,
    group_noise,
    plan_from_config,
    progressive_window_plan,
    random_window_plan,
    rollout,
    rollout_branched,
    window_plan,
)


def test_full_plan():
    p = full_sde_plan(10)
    assert p.num_sde_steps == 10 and p.record == tuple(range(10))
    q = full_sde_plan(10, include_last=False)
    assert q.num_sde_steps == 9 and not q.sde[-1] and q.record == tuple(range(9))


def test_window_plan_positions():
    p = window_plan(10, 3, 4)
    assert p.sde == tuple(i in (4, 5, 6) for i in range(10)) and p.record == (4, 5, 6)
    with pytest.raises(ValueError, match="window start"):
        window_plan(10, 3, 8)
    with pytest.raises(ValueError, match="window_size"):
        window_plan(10, 11, 0)


def test_random_window_reproducible_and_in_range():
    starts = [random_window_plan(10, 2, 1, 5, torch.Generator().manual_seed(s)).record[0] for s in range(200)]
    assert set(starts) == {1, 2, 3, 4, 5}
    again = [random_window_plan(10, 2, 1, 5, torch.Generator().manual_seed(s)).record[0] for s in range(200)]
    assert starts == again


def test_progressive_window_moves_and_caps():
    pos = [progressive_window_plan(10, 4, it, shift_interval=5, stride=2).record[0] for it in range(0, 40, 5)]
    assert pos == [0, 2, 4, 6, 6, 6, 6, 6]


def test_branching_plan_validation():
    p = branching_plan(8, [1, 4], 3)
    assert p.is_branching and p.num_sde_steps == 0 and p.branch_steps == (1, 4)
    with pytest.raises(ValueError, match="sorted unique"):
        branching_plan(8, [4, 1], 3)
    with pytest.raises(ValueError, match="num_branches"):
        branching_plan(8, [1], 0)


def _linear_velocity(x, sigma):
    # exact velocity for single-point data x0 = 0.5: v = (x - x0)/t
    return (x - 0.5) / sigma.reshape(-1, *([1] * (x.ndim - 1)))


def test_rollout_records_what_the_plan_says():
    sig = torch.linspace(1, 0, 9)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 2, 3, 3, generator=g)
    traj = rollout(_linear_velocity, x, sig, window_plan(8, 3, 2), kind="dance", noise_level=0.3, generator=g)
    assert traj.latents.shape == traj.next_latents.shape == (6, 3, 2, 3, 3)
    assert traj.log_probs.shape == (6, 3)
    assert traj.step_indices.tolist() == [2, 3, 4]
    torch.testing.assert_close(traj.sigmas, sig[2:5])
    torch.testing.assert_close(traj.sigmas_next, sig[3:6])
    # consecutive recorded steps chain: the next step starts where the last one landed
    torch.testing.assert_close(traj.latents[:, 1:], traj.next_latents[:, :-1])
    # same seed, same trajectory; another seed, another one
    def run(seed):
        return rollout(_linear_velocity, x, sig, window_plan(8, 3, 2), kind="dance", noise_level=0.3,
                       generator=torch.Generator().manual_seed(seed))

    torch.testing.assert_close(run(5).next_latents, run(5).next_latents, rtol=0, atol=0)
    assert not torch.allclose(run(5).next_latents, run(6).next_latents)


def test_rollout_branched_structure():
    sig = torch.linspace(1, 0, 7)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, generator=g)
    bt = rollout_branched(_linear_velocity, x, sig, branching_plan(6, [0, 3], 5), kind="flow_grpo",
                          noise_level=0.8, generator=g)
    assert bt.latents.shape == (2, 2, 4)
    assert bt.next_latents.shape == bt.finals.shape == (2, 2, 5, 4)
    assert bt.log_probs.shape == (2, 2, 5)
    assert bt.step_indices.tolist() == [0, 3]
    # branches from one trunk state differ from each other
    assert bt.next_latents[0, 1].std(0).abs().sum() > 0
    # the trunk is the pure ODE path
    y = x.clone()
    for i in range(6):
        y = y + (sig[i + 1] - sig[i]) * _linear_velocity(y, sig[i].expand(2))
    torch.testing.assert_close(bt.trunk_final, y)
    with pytest.raises(ValueError, match="deterministic"):
        rollout_branched(_linear_velocity, x, sig, branching_plan(6, [5], 2), kind="cps", noise_level=0.5)
    with pytest.raises(ValueError, match="rollout_branched"):
        rollout(_linear_velocity, x, sig, branching_plan(6, [1], 2))


def test_cps_last_recorded_step_is_refused():
    sig = torch.linspace(1, 0, 5)
    with pytest.raises(ValueError, match="include_last=False"):
        rollout(_linear_velocity, torch.randn(2, 3), sig, full_sde_plan(4), kind="cps", noise_level=0.5)


def test_group_noise_sharing():
    g = torch.Generator().manual_seed(0)
    shared = group_noise(3, 4, (2, 2), shared=True, generator=g)
    assert shared.shape == (12, 2, 2)
    assert torch.equal(shared[0], shared[3]) and not torch.equal(shared[0], shared[4])
    indep = group_noise(3, 4, (2, 2), generator=g)
    assert not torch.equal(indep[0], indep[1])


def test_antithetic_rollout_pairs_opposite_sde_noise():
    # v = -x keeps the dynamics linear: from a shared start of 0, a pair's paths are exact mirror images,
    # so their finals cancel and their (symmetric) log-probs agree; different pairs draw different noise
    sig = torch.linspace(1, 0, 9)
    plan = window_plan(8, 3, 0)
    traj = rollout(lambda x, s: -x, torch.zeros(4, 2, 2), sig, plan, antithetic=True,
                   generator=torch.Generator().manual_seed(0))
    assert torch.allclose(traj.final[0], -traj.final[1]) and torch.allclose(traj.final[2], -traj.final[3])
    assert torch.allclose(traj.log_probs[0], traj.log_probs[1])
    assert not torch.allclose(traj.final[0].abs(), traj.final[2].abs())
    with pytest.raises(ValueError, match="odd batch"):
        rollout(lambda x, s: -x, torch.zeros(3, 2, 2), sig, plan, antithetic=True)


def test_plan_from_config():
    s = SamplingConfig(num_steps=10, plan="progressive_window", window_size=3, window_shift_interval=2, window_stride=1)
    assert plan_from_config(s, iteration=5).record == (2, 3, 4)
    s = SamplingConfig(num_steps=10, plan="branching", branch_steps=[2, 6], num_branches=3)
    p = plan_from_config(s)
    assert p.branch_steps == (2, 6) and p.num_branches == 3
    s = SamplingConfig(num_steps=10, plan="random_window", window_size=2, window_range=[3, 3])
    assert plan_from_config(s, generator=torch.Generator().manual_seed(0)).record == (3, 4)
