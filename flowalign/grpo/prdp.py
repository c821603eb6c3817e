"""PRDP: Proximal Reward Difference Prediction (Deng et al., CVPR 2024, arXiv 2402.08714), pure functions.

PRDP turns KL-regularised reward maximisation (eq. 5/6) into a regression. Its optimum
π* ∝ π_ref·exp(r/β) (eq. 7) satisfies, for two trajectories x̄ᵃ, x̄ᵇ of the same prompt (eq. 9, 13),

    Δr̂_θ*(x̄ᵃ, x̄ᵇ) = Δr(x₀ᵃ, x₀ᵇ) / β,    r̂_θ(x̄) = log π_θ(x̄|c)/π_ref(x̄|c) = Σ_t r̂_θ,t    (eq. 10, 19)

so the model learns by regressing its *predicted* reward difference onto the observed one (eq. 14):
``l = (Δr̂_θ − Δr/β)²``, averaged over all pairs of a prompt's images (Algorithm 1, line 10). The
loss is zero exactly at the KL-regularised optimum (eq. 15). Samples come from a snapshot π_old
refreshed every K gradient steps (Sec. 3.2, online optimisation); the *proximal update* (Sec. 3.3)
clips each step's prediction to within ε of the snapshot's (eq. 20), which is the same as clipping the
per-step log-ratio log π_θ/π_old to [−ε, ε], sums the clipped steps (eq. 21), and minimises the larger
of the clipped and unclipped losses (eq. 17, 18), PPO-style.

**Log-prob convention and the scale of β and ε.** The paper's log-probs are true Gaussian
log-densities, summed over latent elements (its eq. 3). flowalign's are *averaged* over the D latent
elements (``sampling.steps``). Every log-ratio here is therefore 1/D of the paper's, and so

    β_flowalign = D · β_paper,        ε_flowalign = ε_paper / D

give the same optimum and the same trust region (SD3 at 512 px: 16×64×64 latents, D = 65 536; the
paper's β = 10 on SD 1.4's 4×64×64 latents is β_flowalign ≈ 1.6e5). The loss itself is then 1/D² of
the paper's, a constant factor Adam does not see. The functions below take flowalign's averaged
[N, T] log-probs; nothing in them depends on D.

Choices the paper leaves open are parameters (each becomes a config field):

* ``pairs_per_group`` (``prdp_pairs``): None = every pair of a group, as Algorithm 1 does; an integer
  samples that many pairs per group (seeded) when G(G−1)/2 is too many to afford.
* ``clip_range`` ε: the paper gives no value. None disables clipping (plain RDP, eq. 14).
* ``ref_log_prob``: the paper's π_ref is the frozen pretrained model (the KL anchor of eq. 5); its
  log-probs of the recorded transitions are one extra no-grad pass per iteration. Passing None uses the
  snapshot π_old as the reference instead: then r̂ measures the change since the snapshot and each
  iteration solves a KL-to-previous-policy problem (mirror descent, no anchor to the pretrained
  model; the optimum of one iteration is log π_θ/π_old = r/β + const).
* Which steps enter r̂: the recorded SDE steps of the plan (T of them). The plan's ODE steps are
  deterministic and carry no log-probability, so, as for Flow-GRPO's ratios, the trajectory's density
  ratio is taken over its stochastic steps only.
"""

from __future__ import annotations

import itertools

import torch

__all__ = ["prdp_pairs", "predicted_reward", "prdp_loss", "prdp_surrogate_weights"]


def prdp_pairs(
    group_ids_N: torch.Tensor,
    pairs_per_group: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pairs (a, b) of samples of the same group → LongTensor [P, 2] (a < b in batch order).

    Every unordered pair within each group (PRDP Algorithm 1 uses all C(B, 2) pairs of a prompt's B
    images), groups in order of first appearance; a group of one sample gives none. With
    ``pairs_per_group`` = k, each group keeps k of its pairs drawn without replacement from
    ``generator`` (all of them when it has at most k).
    """
    if group_ids_N.ndim != 1:
        raise ValueError(f"group ids must be [N], got {tuple(group_ids_N.shape)}")
    if pairs_per_group is not None and pairs_per_group < 1:
        raise ValueError(f"pairs_per_group must be >= 1 (or None for all pairs), got {pairs_per_group}")
    members: dict[int, list[int]] = {}
    for i, g in enumerate(group_ids_N.tolist()):
        members.setdefault(g, []).append(i)
    pairs: list[tuple[int, int]] = []
    for idx in members.values():
        group = list(itertools.combinations(idx, 2))
        if pairs_per_group is not None and len(group) > pairs_per_group:
            keep = torch.randperm(len(group), generator=generator)[:pairs_per_group].sort().values
            group = [group[k] for k in keep.tolist()]
        pairs.extend(group)
    return torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)


def predicted_reward(log_prob_NT: torch.Tensor, ref_log_prob_NT: torch.Tensor) -> torch.Tensor:
    """r̂_θ(x̄) = Σ_t [log π_θ(x_{t−1}|x_t) − log π_ref(x_{t−1}|x_t)] over the recorded steps (eq. 10, 19)
    → [N], in flowalign's element-averaged units (1/D of the paper's)."""
    return (log_prob_NT.float() - ref_log_prob_NT.float()).sum(dim=-1)


def prdp_loss(
    log_prob_NT: torch.Tensor,
    old_log_prob_NT: torch.Tensor,
    rewards_N: torch.Tensor,
    pairs_P2: torch.Tensor,
    *,
    beta: float,
    clip_range: float | None,
    ref_log_prob_NT: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PRDP's per-pair loss (eq. 14, 16–21) → (loss [P], info); minimise the mean over pairs.

    With ℓ_t = log π_θ − log π_ref, ℓ_t^old = log π_old − log π_ref, per recorded step t:

        r̂      = Σ_t ℓ_t                                              (eq. 10, 19)
        r̂^clip = Σ_t clip(ℓ_t, ℓ_t^old − ε, ℓ_t^old + ε)                (eq. 20, 21)
               = Σ_t [ℓ_t^old + clip(log π_θ − log π_old, −ε, ε)]
        l      = max((Δr̂ − Δr/β)², (Δr̂^clip − Δr/β)²)                 (eq. 14, 17, 18)

    where Δ is (sample a) − (sample b) of each pair. Args:
        log_prob_NT: log π_θ of each sample's recorded transitions (with gradient), [N, T].
        old_log_prob_NT: log π_old of the same transitions, recorded at sampling time, [N, T].
        rewards_N: each sample's reward r(x₀), [N]. pairs_P2: rows (a, b), e.g. from ``prdp_pairs``.
        beta: KL strength in flowalign units (β_paper · D, module docstring). clip_range: ε per step,
            flowalign units (ε_paper / D); None = no proximal clipping.
        ref_log_prob_NT: log π_ref (frozen pretrained model); None = use π_old as the reference.

    ``info`` (detached): ``residual`` [P] = Δr̂ − Δr/β (0 at the optimum), ``clipped`` [P] whether
    the clipped loss was the larger one, ``clip_frac`` (scalar) the fraction of (sample, step) log-ratios
    outside [−ε, ε]. All math in float32.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    lp, old = log_prob_NT.float(), old_log_prob_NT.float()
    ref = old if ref_log_prob_NT is None else ref_log_prob_NT.float()
    assert lp.shape == old.shape == ref.shape and lp.ndim == 2, "log-probs must all be [N, T]"
    assert rewards_N.shape == lp.shape[:1], "one reward per sample"
    a, b = pairs_P2[:, 0], pairs_P2[:, 1]
    target = (rewards_N.float()[a] - rewards_N.float()[b]) / beta  # Δr/β [P]
    r_hat = predicted_reward(lp, ref)  # [N]
    residual = r_hat[a] - r_hat[b] - target
    loss = residual**2
    ratio = lp - old  # log π_θ/π_old per step [N, T]
    clipped = torch.zeros_like(loss, dtype=torch.bool)
    clip_frac = torch.zeros(())
    if clip_range is not None:
        r_hat_clip = (old - ref + ratio.clamp(-clip_range, clip_range)).sum(dim=-1)  # [N]
        loss_clip = (r_hat_clip[a] - r_hat_clip[b] - target) ** 2
        clipped = loss_clip > loss
        loss = torch.maximum(loss, loss_clip)
        clip_frac = (ratio.detach().abs() > clip_range).float().mean()
    return loss, {"residual": residual.detach(), "clipped": clipped, "clip_frac": clip_frac}


def prdp_surrogate_weights(
    log_prob_NT: torch.Tensor,
    old_log_prob_NT: torch.Tensor,
    rewards_N: torch.Tensor,
    pairs_P2: torch.Tensor,
    *,
    beta: float,
    clip_range: float | None,
    ref_log_prob_NT: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-(sample, step) weights W [N, T] with ∇_θ Σ W·log π_θ = ∇_θ mean_P ``prdp_loss``.

    The PRDP loss couples all T steps of both samples of a pair, but it depends on θ only through the
    [N, T] log-probs, so W = ∂ mean_P l / ∂ log π_θ (evaluated at the current log-probs, passed here
    without gradient) lets a trainer back-propagate one step at a time: a no-grad pass over all recorded
    steps gives ``log_prob_NT`` and W; then each step's loss is W[:, t]·log π_θ(step t) with gradient.
    The weights are exact as long as θ has not moved between the two passes (same optimizer step).
    No pairs → zero weights.
    """
    if len(pairs_P2) == 0:
        return torch.zeros_like(log_prob_NT, dtype=torch.float32)
    with torch.enable_grad():  # callable from a no-grad pass
        lp = log_prob_NT.detach().float().requires_grad_(True)
        loss, _ = prdp_loss(lp, old_log_prob_NT.detach(), rewards_N.detach(), pairs_P2, beta=beta,
                            clip_range=clip_range,
                            ref_log_prob_NT=None if ref_log_prob_NT is None else ref_log_prob_NT.detach())
        (w,) = torch.autograd.grad(loss.mean(), lp)
    return w
