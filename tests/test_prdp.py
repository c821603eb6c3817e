"""PRDP (Deng et al. 2024): the loss against hand-computed values, the pairs, and online optimisation of a
Gaussian policy whose KL-regularised optimum is known in closed form."""

import pytest
import torch

from flowalign.grpo.prdp import predicted_reward, prdp_loss, prdp_pairs, prdp_surrogate_weights
from flowalign.sampling.steps import gaussian_log_prob

# one group of two samples (a, b), two recorded steps each
LOGP = torch.tensor([[-1.0, -2.0], [-1.5, -1.0]])
OLD = torch.tensor([[-1.05, -2.3], [-1.5, -1.2]])  # log π_θ − log π_old = [[.05, .3], [0, .2]]
REF = torch.tensor([[-1.0, -2.0], [-1.6, -1.1]])  # log π_θ − log π_ref = [[0, 0], [.1, .1]]
REWARDS = torch.tensor([1.0, 0.5])
PAIR = torch.tensor([[0, 1]])


def test_loss_without_clipping_is_the_rdp_regression_by_hand():
    # reference = snapshot: r̂_a = .05 + .3 = .35, r̂_b = 0 + .2 = .2, Δr̂ = .15; Δr/β = .5/2 = .25
    loss, info = prdp_loss(LOGP, OLD, REWARDS, PAIR, beta=2.0, clip_range=None)
    torch.testing.assert_close(loss, torch.tensor([0.01]))  # (.15 − .25)²
    torch.testing.assert_close(info["residual"], torch.tensor([-0.1]))


def test_proximal_clipping_by_hand():
    # ε = .1 clips a's second step (.3 → .1) and b's second step (.2 → .1): Δr̂_clip = .15 − .1 = .05,
    # clipped loss (.05 − .25)² = .04 > unclipped .01, so the max is the clipped one (eq. 18)
    loss, info = prdp_loss(LOGP, OLD, REWARDS, PAIR, beta=2.0, clip_range=0.1)
    torch.testing.assert_close(loss, torch.tensor([0.04]))
    assert info["clipped"].tolist() == [True]
    torch.testing.assert_close(info["clip_frac"], torch.tensor(0.5))


def test_fixed_reference_by_hand():
    # r̂ = Σ(log π_θ − log π_ref): a 0, b .2 → Δr̂ = −.2; unclipped (−.2 − .25)² = .2025.
    # clipped per step (eq. 20): log π_old/π_ref + clip(log π_θ/π_old): a [−.05+.05, −.3+.1] = −.2,
    # b [.1+0, −.1+.1] = .1 → Δ = −.3, (−.3 − .25)² = .3025 = the max
    loss, _ = prdp_loss(LOGP, OLD, REWARDS, PAIR, beta=2.0, clip_range=0.1, ref_log_prob_NT=REF)
    torch.testing.assert_close(loss, torch.tensor([0.3025]))
    unclipped, _ = prdp_loss(LOGP, OLD, REWARDS, PAIR, beta=2.0, clip_range=None, ref_log_prob_NT=REF)
    torch.testing.assert_close(unclipped, torch.tensor([0.2025]))
    torch.testing.assert_close(predicted_reward(LOGP, REF), torch.tensor([0.0, 0.2]))


def test_surrogate_weights_by_hand():
    # the clipped branch is active: d/dlogπ = 2·(−.55)·(±1) on the two unclipped steps, 0 on the clipped
    w = prdp_surrogate_weights(LOGP, OLD, REWARDS, PAIR, beta=2.0, clip_range=0.1, ref_log_prob_NT=REF)
    torch.testing.assert_close(w, torch.tensor([[-1.1, 0.0], [1.1, 0.0]]))


def test_pairs_on_a_known_layout():
    ids = torch.tensor([0, 0, 0, 1, 1, 2])
    assert prdp_pairs(ids).tolist() == [[0, 1], [0, 2], [1, 2], [3, 4]]  # group 2 alone: no pair
    assert prdp_pairs(torch.tensor([5, 7, 5, 7])).tolist() == [[0, 2], [1, 3]]  # groups need not be contiguous
    assert prdp_pairs(torch.tensor([3])).shape == (0, 2)
    some = prdp_pairs(ids, pairs_per_group=2, generator=torch.Generator().manual_seed(1))
    again = prdp_pairs(ids, pairs_per_group=2, generator=torch.Generator().manual_seed(1))
    assert some.tolist() == again.tolist()
    assert len(some) == 3  # 2 of group 0's 3 pairs, group 1's single pair
    assert all(p in [[0, 1], [0, 2], [1, 2]] for p in some[:2].tolist()) and some[2].tolist() == [3, 4]
    with pytest.raises(ValueError, match="pairs_per_group"):
        prdp_pairs(ids, pairs_per_group=0)


# --------------------------------------------------------------------------------------------------
# A T-step Gaussian random-walk policy with known optimum.
#
# Each step draws an increment inc_k ~ N(θ_k, s²·I_D); the reward is r = a·mean_d(Σ_k inc_k). With
# π_ref at θ = 0 and flowalign's element-averaged log-probs, Δr̂ = (1/(D s²))·Σ_k θ_k·Σ_d Δinc_kd and
# Δr/β = (a/(Dβ))·Σ_k Σ_d Δinc_kd, so the RDP residual vanishes for every pair iff θ_k = a·s²/β: the
# KL-regularised optimum π_ref·exp(r/β) (eq. 7), where E[r] = a·T·s²/β.

T_STEPS, D, S, A, BETA = 4, 4, 0.5, 1.0, 0.25
THETA_STAR = A * S**2 / BETA  # 1.0


def _rollout(theta_T, n, gen):
    inc = theta_T.detach()[None, :, None] + S * torch.randn(n, T_STEPS, D, generator=gen)  # [n, T, D]
    rewards = A * inc.sum(1).mean(-1)  # [n]
    return inc, rewards


def _log_probs(theta_T, inc):
    """Element-averaged log-probs [n, T] of the increments (flowalign's convention)."""
    n = inc.shape[0]
    mean = theta_T[None, :, None].expand(n, T_STEPS, D).reshape(n * T_STEPS, D)
    return gaussian_log_prob(inc.reshape(n * T_STEPS, D), mean, torch.tensor(S)).reshape(n, T_STEPS)


def _rms_residual(theta_T, inc, rewards, pairs):
    with torch.no_grad():
        ref = _log_probs(torch.zeros(T_STEPS), inc)
        _, info = prdp_loss(_log_probs(theta_T, inc), ref, rewards, pairs, beta=BETA, clip_range=None,
                            ref_log_prob_NT=ref)
    return float(info["residual"].pow(2).mean().sqrt())


def test_online_prdp_reaches_the_kl_regularised_optimum():
    gen = torch.Generator().manual_seed(0)
    theta = torch.zeros(T_STEPS, requires_grad=True)
    opt = torch.optim.Adam([theta], lr=0.05)
    held_inc, held_r = _rollout(torch.zeros(T_STEPS), 64, torch.Generator().manual_seed(123))
    held_pairs = prdp_pairs(torch.arange(64) // 8)
    held_noise = torch.randn(256, T_STEPS, D, generator=torch.Generator().manual_seed(7))

    def eval_reward():  # the policy's reward on fixed held-out noise
        return float((A * (theta.detach()[None, :, None] + S * held_noise).sum(1).mean(-1)).mean())

    r0, res0 = eval_reward(), _rms_residual(theta.detach(), held_inc, held_r, held_pairs)
    group_ids = torch.arange(32) // 8  # 4 prompts × 8 images
    pairs = prdp_pairs(group_ids)
    clip_fracs = []
    for _ in range(25):  # iterations: snapshot, sample, K gradient steps (Algorithm 1)
        inc, rewards = _rollout(theta, 32, gen)
        with torch.no_grad():
            old = _log_probs(theta.detach(), inc)
            ref = _log_probs(torch.zeros(T_STEPS), inc)
        for _ in range(8):
            loss, info = prdp_loss(_log_probs(theta, inc), old, rewards, pairs, beta=BETA, clip_range=0.05,
                                   ref_log_prob_NT=ref)
            opt.zero_grad()
            loss.mean().backward()
            opt.step()
            clip_fracs.append(float(info["clip_frac"]))
    r1, res1 = eval_reward(), _rms_residual(theta.detach(), held_inc, held_r, held_pairs)
    # θ reaches the closed-form optimum, the reward rises to its value there, the residual vanishes
    torch.testing.assert_close(theta.detach(), torch.full((T_STEPS,), THETA_STAR), atol=0.02, rtol=0)
    assert r0 < 0.2 and abs(r1 - A * T_STEPS * THETA_STAR) < 0.15
    assert res1 < 0.01 * res0
    assert max(clip_fracs) > 0  # the proximal clip was active at some point


def test_snapshot_reference_gives_one_mirror_descent_step():
    # with π_old as the reference, one iteration's optimum is log π_θ/π_old = r/β + const, i.e. here
    # θ − θ_old = a·s²/β exactly (a least-squares problem with a unique solution on any sample)
    gen = torch.Generator().manual_seed(3)
    theta_old = torch.tensor([0.3, -0.2, 0.0, 0.5])
    inc, rewards = _rollout(theta_old, 48, gen)
    old = _log_probs(theta_old, inc)
    pairs = prdp_pairs(torch.arange(48) // 6)
    theta = theta_old.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=100, tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss, _ = prdp_loss(_log_probs(theta, inc), old, rewards, pairs, beta=BETA, clip_range=None)
        loss.mean().backward()
        return loss.mean()

    opt.step(closure)
    torch.testing.assert_close(theta.detach() - theta_old, torch.full((T_STEPS,), THETA_STAR), atol=1e-3, rtol=0)


def test_surrogate_weights_give_the_loss_gradient():
    gen = torch.Generator().manual_seed(5)
    theta_old = torch.zeros(T_STEPS)
    inc, rewards = _rollout(theta_old, 16, gen)
    old = _log_probs(theta_old, inc)
    ref = _log_probs(torch.full((T_STEPS,), -0.1), inc)
    pairs = prdp_pairs(torch.arange(16) // 4)
    theta = torch.tensor([0.2, -0.1, 0.05, 0.3], requires_grad=True)  # moved: some steps clip
    kw = dict(beta=BETA, clip_range=0.05, ref_log_prob_NT=ref)
    loss, info = prdp_loss(_log_probs(theta, inc), old, rewards, pairs, **kw)
    (direct,) = torch.autograd.grad(loss.mean(), theta)
    with torch.no_grad():
        w = prdp_surrogate_weights(_log_probs(theta, inc), old, rewards, pairs, **kw)
    per_step = sum((w[:, t] * _log_probs(theta, inc)[:, t]).sum() for t in range(T_STEPS))  # one step at a time
    (surrogate,) = torch.autograd.grad(per_step, theta)
    assert info["clipped"].any() and float(info["clip_frac"]) > 0
    torch.testing.assert_close(surrogate, direct, atol=1e-5, rtol=1e-4)
