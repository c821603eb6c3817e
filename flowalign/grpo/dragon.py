"""DRAGON: Distributional Rewards Optimize Diffusion Generative Models (Bai et al. 2025, arXiv 2504.15217),
pure functions for a flow model.

DRAGON optimises a reward of any kind (instance-wise, instance-to-distribution, distribution-to-
distribution; ``rewards.distributional``) without differentiating it: it draws on-policy generations,
splits them by the reward into a *positive* demonstration set D⁺ and a *negative* set D⁻, and trains
the model towards D⁺ and away from D⁻ (minimising KL(D⁺‖p_θ) while maximising KL(D⁻‖p_θ)) through a
Diffusion-DPO (paired) or Diffusion-KTO (unpaired) surrogate loss against a frozen reference model.

Here the surrogates are written for a flow model in velocity space. A demonstration x₀ (a final latent)
is noised to x_σ = (1−σ)·x₀ + σ·ε with target u = ε − x₀ (``flow_noising``); the per-sample flow
matching error e(v) = mean_elements ‖v − u‖² of the policy (v_θ) and of the reference (v_ref) stand in
for −log-likelihoods, so −(e_θ − e_ref) is the implicit log-ratio log p_θ/p_ref (up to a positive,
σ-dependent weight that β absorbs: with ε-prediction, ε̂ − ε = (1−σ)(v̂ − u), so velocity errors are
ε errors weighted by 1/(1−σ)²). Errors are averaged over elements like flowalign's log-probs, so β is
per element; the Diffusion-DPO reference code scales the same (element-averaged, ε-space) difference
by −½·beta_dpo, so its beta_dpo corresponds to β = beta_dpo/2 here, before the 1/(1−σ)² reweighting.

Demonstration sets. DRAGON builds D⁺/D⁻ from scored on-policy generations, paired (for DPO) or
unpaired (for KTO); how the split is made is a choice, and each is a parameter here:

* instance-wise or instance-to-distribution scores: ``paired_demonstrations`` (within each prompt
  group, best vs worst, or every pair with distinct scores) for DPO; ``unpaired_demonstrations``
  (top / bottom ``fraction`` of each group or of the batch) for KTO;
* a distribution-to-distribution reward (Fréchet distance to exemplars) scores sets, not images, so
  the split asks which generations make the set better. Our construction, ``distributional_pairs``:
  two generations per prompt, and a greedy swap test that keeps, for each prompt, the one whose
  membership lowers the set's FD (the set size stays fixed, so FD's sample-size bias cancels).
  Unpaired: rank ``rewards.distributional.fd_leave_one_out_gains`` with ``unpaired_demonstrations``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..rewards.distributional import feature_stats, frechet_distance

__all__ = [
    "flow_noising", "velocity_errors", "diffusion_dpo_loss", "diffusion_kto_loss",
    "paired_demonstrations", "unpaired_demonstrations", "distributional_pairs",
]


def flow_noising(x0: torch.Tensor, sigma_B: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_σ, u): x_σ = (1−σ)·x₀ + σ·ε and the flow-matching target u = ε − x₀ (flowalign's convention:
    t = σ, σ = 1 is noise, the model's velocity ≈ ε − x₀). ``sigma_B`` is [B] (or a scalar); float32."""
    x0f, eps = x0.float(), noise.float()
    s = torch.as_tensor(sigma_B, dtype=torch.float32, device=x0.device)
    s = s.expand(x0.shape[0]).reshape(-1, *([1] * (x0.ndim - 1)))
    return (1 - s) * x0f + s * eps, eps - x0f


def velocity_errors(v: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """e = mean over elements of ‖v − u‖² → [B], float32."""
    d = (v.float() - target.float()) ** 2
    return d.mean(dim=tuple(range(1, d.ndim)))


def diffusion_dpo_loss(
    v_pos: torch.Tensor, v_ref_pos: torch.Tensor, target_pos: torch.Tensor,
    v_neg: torch.Tensor, v_ref_neg: torch.Tensor, target_neg: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Diffusion-DPO (Wallace et al., CVPR 2024) in velocity space, per pair → (loss [P], info):

        z = −β·[(‖v_θ⁺ − u⁺‖² − ‖v_ref⁺ − u⁺‖²) − (‖v_θ⁻ − u⁻‖² − ‖v_ref⁻ − u⁻‖²)]
        L = −log σ(z)

    (‖·‖² element-averaged). Pair p's positive and negative should be noised with the same σ and ε,
    as Diffusion-DPO does. ∂L/∂e_θ⁺ = β·σ(−z) > 0: the policy's error on the positive falls, on the
    negative rises. ``info`` (detached): ``margin`` z [P] and ``accuracy`` (fraction z > 0).
    """
    e_pos = velocity_errors(v_pos, target_pos) - velocity_errors(v_ref_pos, target_pos)
    e_neg = velocity_errors(v_neg, target_neg) - velocity_errors(v_ref_neg, target_neg)
    z = -beta * (e_pos - e_neg)
    return -F.logsigmoid(z), {"margin": z.detach(), "accuracy": (z.detach() > 0).float().mean()}


def diffusion_kto_loss(
    v: torch.Tensor, v_ref: torch.Tensor, target: torch.Tensor, desirable_B: torch.Tensor,
    beta: float,
    reference_point: float | str = "batch",
    lambda_desirable: float = 1.0,
    lambda_undesirable: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Diffusion-KTO (Li et al. 2024; KTO, Ethayarajh et al. 2024) in velocity space, per sample →
    (loss [B], info). With the implicit reward h = −β·(‖v_θ − u‖² − ‖v_ref − u‖²) and reference
    point z₀:

        desirable:    L = λ_D · (1 − σ(h − z₀))
        undesirable:  L = λ_U · (1 − σ(z₀ − h))

    ``reference_point``: ``"batch"`` = KTO's estimate, max(0, mean of h over the batch), detached
    (a KL estimate of the policy from the reference); or a fixed number (0 makes KTO a pure
    sign-of-h objective). ``desirable_B`` [B] bool marks D⁺.
    """
    h = -beta * (velocity_errors(v, target) - velocity_errors(v_ref, target))
    if reference_point == "batch":
        z0 = h.detach().mean().clamp_min(0)
    elif isinstance(reference_point, (int, float)):
        z0 = torch.as_tensor(float(reference_point), device=h.device)
    else:
        raise ValueError(f"reference_point must be 'batch' or a number, got {reference_point!r}")
    d = desirable_B.to(h.device).bool()
    loss = torch.where(d, lambda_desirable * (1 - torch.sigmoid(h - z0)),
                       lambda_undesirable * (1 - torch.sigmoid(z0 - h)))
    return loss, {"implicit_reward": h.detach(), "reference_point": z0.detach()}


def _groups(group_ids_N: torch.Tensor) -> list[torch.Tensor]:
    """Index tensors of each group, in order of first appearance."""
    members: dict[int, list[int]] = {}
    for i, g in enumerate(group_ids_N.tolist()):
        members.setdefault(g, []).append(i)
    return [torch.tensor(m, dtype=torch.long) for m in members.values()]


def paired_demonstrations(
    scores_N: torch.Tensor, group_ids_N: torch.Tensor, pairs: str = "best_worst", min_gap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(positive indices [P], negative indices [P]): pairs of the same group with the positive scoring
    higher by more than ``min_gap`` (ties give no pair).

    ``pairs``: ``best_worst`` — one pair per group, its highest against its lowest score (the only
    pair when a prompt has two generations); ``all`` — every pair of the group whose scores differ,
    ordered by score.
    """
    if pairs not in ("best_worst", "all"):
        raise ValueError(f"unknown pairs {pairs!r}; use 'best_worst' or 'all'")
    s = scores_N.detach().double().cpu()
    pos, neg = [], []
    for idx in _groups(group_ids_N.cpu()):
        if len(idx) < 2:
            continue
        if pairs == "best_worst":
            hi, lo = idx[s[idx].argmax()], idx[s[idx].argmin()]
            if s[hi] - s[lo] > min_gap:
                pos.append(int(hi))
                neg.append(int(lo))
            continue
        for a in range(len(idx)):
            for b in range(a + 1, len(idx)):
                i, j = int(idx[a]), int(idx[b])
                if abs(s[i] - s[j]) > min_gap:
                    hi, lo = (i, j) if s[i] > s[j] else (j, i)
                    pos.append(hi)
                    neg.append(lo)
    return torch.tensor(pos, dtype=torch.long), torch.tensor(neg, dtype=torch.long)


def unpaired_demonstrations(
    scores_N: torch.Tensor, group_ids_N: torch.Tensor | None = None, fraction: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(positive indices, negative indices): the top and bottom ``round(fraction·n)`` scores of each
    group (or of the whole batch when ``group_ids_N`` is None), for KTO. ``fraction`` ≤ ½ keeps the
    two sets disjoint; a group whose scores are all equal gives neither."""
    if not 0 < fraction <= 0.5:
        raise ValueError(f"fraction must be in (0, 0.5], got {fraction}")
    s = scores_N.detach().double().cpu()
    groups = [torch.arange(len(s))] if group_ids_N is None else _groups(group_ids_N.cpu())
    pos, neg = [], []
    for idx in groups:
        k = int(round(fraction * len(idx)))
        if k == 0 or bool((s[idx] == s[idx][0]).all()):
            continue
        order = idx[torch.argsort(s[idx], descending=True, stable=True)]
        pos += order[:k].tolist()
        neg += order[-k:].tolist()
    return torch.tensor(pos, dtype=torch.long), torch.tensor(neg, dtype=torch.long)


def distributional_pairs(
    features_a_PD: torch.Tensor, features_b_PD: torch.Tensor, ref_mu: torch.Tensor, ref_cov: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DRAGON demonstrations for a distribution-to-distribution reward (Fréchet distance to an exemplar
    set), from two generations a_p, b_p per prompt p → (b_positive [P] bool, fd_trace [P + 1]).

    Greedy swap: start from S = {a_1 … a_P}; for p = 1 … P, replace a_p by b_p in S when that lowers
    FD(S, ref), keeping the swap. The member in the final S is the positive of prompt p, the other its
    negative, so D⁺ = final S has FD ≤ FD({a}) (``fd_trace`` holds FD(S) before the first and after
    every decision, non-increasing). S always has P members, so FD's sample-size bias cancels in every
    comparison. Cost: P Fréchet distances (D×D eigendecompositions).
    """
    if features_a_PD.shape != features_b_PD.shape or features_a_PD.ndim != 2:
        raise ValueError(f"features must be two [P, D] tensors, got {tuple(features_a_PD.shape)} and "
                         f"{tuple(features_b_PD.shape)}")
    current = features_a_PD.detach().double().clone()
    b = features_b_PD.detach().double()
    fd = frechet_distance(*feature_stats(current), ref_mu, ref_cov)
    trace = [fd]
    b_positive = torch.zeros(len(current), dtype=torch.bool)
    for p in range(len(current)):
        trial = current.clone()
        trial[p] = b[p]
        fd_trial = frechet_distance(*feature_stats(trial), ref_mu, ref_cov)
        if fd_trial < fd:
            current, fd, b_positive[p] = trial, fd_trial, True
        trace.append(fd)
    return b_positive, torch.stack(trace)
