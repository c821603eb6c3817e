"""GRPO's pure functions against hand-computed values and their formulas."""

import math

import pytest
import torch

from flowalign.grpo import (
    approx_kl,
    clip_fraction,
    group_advantages,
    mean_kl,
    multi_reward_advantages,
    nft_loss,
    nft_optimality,
    ppo_clip_loss,
    timestep_weights,
)
from flowalign.grpo.advantages import STD_EPS
from flowalign.sampling.steps import flow_grpo_mean_std, transition_log_prob


def test_group_advantages_hand_computed_with_a_flat_group_masked():
    r = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0, 0.0, 4.0])
    g = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])
    adv, masked = group_advantages(r, g)
    s0 = math.sqrt(2 / 3)  # population std of 1, 2, 3
    expected = [-1 / (s0 + STD_EPS), 0.0, 1 / (s0 + STD_EPS), 0, 0, 0, -2 / (2 + STD_EPS), 2 / (2 + STD_EPS)]
    assert adv.tolist() == pytest.approx(expected, abs=1e-5)
    assert masked.tolist() == [False] * 3 + [True] * 3 + [False] * 2


def test_global_std_divides_by_the_batch_std():
    r = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    g = torch.tensor([0, 0, 0, 1, 1, 1])
    adv, masked = group_advantages(r, g, std_mode="global")
    s = r.std(unbiased=False).item()
    assert adv.tolist() == pytest.approx([-1 / (s + STD_EPS), 0, 1 / (s + STD_EPS), 0, 0, 0], abs=1e-5)
    assert masked.sum() == 3


def test_advantages_do_not_depend_on_the_order_of_samples():
    gen = torch.Generator().manual_seed(0)
    r = torch.rand(24, generator=gen)
    g = torch.arange(24) // 4
    perm = torch.randperm(24, generator=gen)
    a, _ = group_advantages(r, g)
    b, _ = group_advantages(r[perm], g[perm])
    torch.testing.assert_close(a[perm], b)


def test_advantage_clipping():
    r = torch.tensor([0.0] * 9 + [1.0])  # one outlier: (1 - 0.1) / 0.3 = 3
    adv, _ = group_advantages(r, torch.zeros(10, dtype=torch.long), clip_max=2.0)
    assert adv.max().item() == pytest.approx(2.0)
    assert adv.min().item() == pytest.approx(-0.1 / 0.3, rel=1e-3)


def test_per_reward_normalization_vs_sum_then_normalize():
    g = torch.tensor([0, 0, 1, 1])
    big = torch.tensor([100.0, 0.0, 50.0, 50.0])  # flat in group 1
    small = torch.tensor([0.0, 1.0, 0.0, 1.0])
    w = {"big": 1.0, "small": 2.0}
    per, masked = multi_reward_advantages({"big": big, "small": small}, w, g, mode="per_reward")
    # each reward normalised in its group, then weighted: group 0 big → (+1, −1), small → (−1, +1)
    one = 1 / (1 + STD_EPS)
    e50 = 1 / (0.5 + STD_EPS) * 0.5
    assert per.tolist() == pytest.approx([one - 2 * e50, -one + 2 * e50, -2 * e50, 2 * e50], abs=1e-4)
    assert not masked.any()  # group 1 is flat in "big" only
    summed, _ = multi_reward_advantages({"big": big, "small": small}, w, g, mode="sum_then_normalize")
    # the sum is dominated by "big" in group 0: the first sample stays ahead
    assert summed[0] > 0 > summed[1]
    assert per[0] < 0 < per[1]


def test_multi_reward_masks_only_when_every_reward_is_flat():
    g = torch.tensor([0, 0, 1, 1])
    a = torch.tensor([1.0, 1.0, 2.0, 2.0])
    b = torch.tensor([3.0, 3.0, 0.0, 1.0])
    _, masked = multi_reward_advantages({"a": a, "b": b}, {"a": 1.0, "b": 1.0}, g, mode="per_reward")
    assert masked.tolist() == [True, True, False, False]


def test_ppo_clip_loss_equals_its_formula():
    old = torch.zeros(4)
    new = torch.log(torch.tensor([1.0, 1.5, 0.5, 1.1]))
    adv = torch.tensor([1.0, 1.0, -1.0, -2.0])
    loss, ratio = ppo_clip_loss(new, old, adv, clip_range=0.2)
    # max(−A·ρ, −A·clip(ρ, 0.8, 1.2))
    assert ratio.tolist() == pytest.approx([1.0, 1.5, 0.5, 1.1])
    assert loss.tolist() == pytest.approx([-1.0, -1.2, 0.8, 2.2], abs=1e-6)
    assert clip_fraction(ratio, 0.2).item() == pytest.approx(0.5)
    assert approx_kl(new, old).item() == pytest.approx(0.5 * (new**2).mean().item())


def _transition(weight: torch.Tensor, seed=0):
    """A one-parameter 'policy' v = weight·x on a recorded flow_grpo transition."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 4, 2, 2, generator=gen)
    x_next = torch.randn(3, 4, 2, 2, generator=gen)
    return transition_log_prob("flow_grpo", x, x_next, weight * x, 0.6, 0.5, 0.7)


def test_ratio_is_one_and_policy_gradient_zero_when_advantages_are_zero():
    w = torch.tensor(0.3, requires_grad=True)
    res = _transition(w)
    old = res.log_prob.detach()
    loss, ratio = ppo_clip_loss(res.log_prob, old, torch.zeros(3), 1e-4)
    torch.testing.assert_close(ratio, torch.ones(3))
    loss.mean().backward()
    assert w.grad.item() == 0.0
    # and with non-zero advantages the same objective has a gradient
    w2 = torch.tensor(0.3, requires_grad=True)
    res2 = _transition(w2)
    ppo_clip_loss(res2.log_prob, res2.log_prob.detach(), torch.tensor([1.0, -0.5, 2.0]), 1e-4)[0].mean().backward()
    assert w2.grad.abs().item() > 0


def test_mean_kl_is_the_gaussian_kl_and_zero_for_identical_policies():
    gen = torch.Generator().manual_seed(1)
    m1 = torch.randn(2, 4, 3, 3, generator=gen)
    m2 = m1 + 0.1 * torch.randn(2, 4, 3, 3, generator=gen)
    std = torch.tensor([0.3, 0.5]).reshape(2, 1, 1, 1)
    assert mean_kl(m1, m1, std).abs().max().item() == 0.0
    p = torch.distributions.Normal(m1, std.expand_as(m1))
    q = torch.distributions.Normal(m2, std.expand_as(m2))
    exact = torch.distributions.kl_divergence(p, q).mean(dim=(1, 2, 3))
    torch.testing.assert_close(mean_kl(m1, m2, std), exact, rtol=1e-5, atol=1e-7)


def test_noise_aware_weights_follow_the_step_std():
    sig = torch.tensor([1.0, 0.9, 0.7, 0.4, 0.1])
    stds = torch.stack([
        flow_grpo_mean_std(torch.zeros(1, 1), torch.zeros(1, 1), sig[i], sig[i + 1], 0.7)[1].reshape(())
        for i in range(4)
    ])
    # σ_t·√(−Δt) with σ_t = a·√(t/(1−t)) (t = 1 uses 1 − t_next)
    t, tn = sig[:-1], sig[1:]
    denom = torch.where(t == 1, 1 - tn, 1 - t)
    formula = 0.7 * torch.sqrt(t / denom) * torch.sqrt(t - tn)
    torch.testing.assert_close(stds, formula)
    w = timestep_weights("noise_aware", stds)
    torch.testing.assert_close(w, formula / formula.mean())
    assert w.mean().item() == pytest.approx(1.0)
    assert timestep_weights("uniform", stds).tolist() == [1.0] * 4
    with pytest.raises(ValueError, match="noise_aware"):
        timestep_weights("linear", stds)


def test_nft_optimality_maps_advantages_to_probabilities():
    r = nft_optimality(torch.tensor([-10.0, -2.5, 0.0, 1.0, 5.0, 7.0]), adv_max=5.0)
    assert r.tolist() == pytest.approx([0.0, 0.25, 0.5, 0.6, 1.0, 1.0])


def test_nft_loss_equals_its_formula_and_its_gradient_at_the_old_policy():
    gen = torch.Generator().manual_seed(0)
    v_old, target = torch.randn(3, 2, 2, 2, generator=gen), torch.randn(3, 2, 2, 2, generator=gen)
    delta = torch.randn(3, 2, 2, 2, generator=gen)
    r, beta = torch.tensor([1.0, 0.0, 0.3]), 0.5
    v = v_old + 0.1 * delta
    pos = ((1 - beta) * v_old + beta * v - target) ** 2
    neg = ((1 + beta) * v_old - beta * v - target) ** 2
    want = r * pos.mean(dim=(1, 2, 3)) + (1 - r) * neg.mean(dim=(1, 2, 3))
    torch.testing.assert_close(nft_loss(v, v_old, target, r, beta), want)
    # at v = v_old: dL/dv = 2·beta·(2r − 1)·(v_old − target) / elements, so r = 1/2 gives no gradient
    v0 = v_old.clone().requires_grad_(True)
    nft_loss(v0, v_old, target, r, beta).sum().backward()
    expect = 2 * beta * (2 * r - 1).reshape(3, 1, 1, 1) * (v_old - target) / 8
    torch.testing.assert_close(v0.grad, expect)
    v1 = v_old.clone().requires_grad_(True)
    nft_loss(v1, v_old, target, torch.full((3,), 0.5), beta).sum().backward()
    assert v1.grad.abs().max().item() < 1e-7
