"""The GRPO policy objective, the KL to the reference and per-timestep weights (pure functions).

Log-probs are element-averaged (flowalign's convention, as in Flow-GRPO and DanceGRPO), which is why
the references' tiny PPO clip range (~1e-4) is the right scale for ``clip_range``.
"""

from __future__ import annotations

import torch


def ppo_clip_loss(
    log_prob_B: torch.Tensor, old_log_prob_B: torch.Tensor, advantages_B: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate, per sample (Schulman et al. 2017; Flow-GRPO eq. 6):

        ρ = exp(log π_θ − log π_old),   L = max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε))

    → (loss [B], ratio [B]); minimise the mean. Computed in float32.
    """
    ratio = torch.exp(log_prob_B.float() - old_log_prob_B.float())
    adv = advantages_B.float()
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped), ratio


KL_FORMS = ("exact", "flow_grpo")


def mean_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor, form: str = "exact",
            dt_B: torch.Tensor | None = None) -> torch.Tensor:
    """KL between the policy's and the reference's Gaussian transitions, which share the std s
    (mean-space KL), averaged over elements like the log-probs → [B]:

        exact:      KL = mean_elements((μ_θ − μ_ref)²) / (2·s²)          s = σ_t·√|Δt|, the transition std
        flow_grpo:  KL = mean_elements((μ_θ − μ_ref)²) / (2·σ_t²)  = exact·|Δt|

    ``flow_grpo`` is what Flow-GRPO's code computes (``train_sd3.py`` divides by 2·std_dev_t², the SDE's
    diffusion coefficient σ_t = a·√(t/(1−t)) without √|Δt|), so the same β weighs the KL |Δt| times less
    than the exact form (a shifted 10-step schedule: 4–25× on the first steps, ~100× on the last). It needs
    ``dt_B`` (σ − σ_next per sample). ``std`` broadcasts against the means ([B, 1, ...]).
    """
    diff = (mean.float() - ref_mean.float()) ** 2
    dims = tuple(range(1, diff.ndim))
    kl = diff.mean(dim=dims) / (2 * std.float().reshape(std.shape[0], -1)[:, 0] ** 2)
    if form == "exact":
        return kl
    if form == "flow_grpo":
        if dt_B is None:
            raise ValueError("mean_kl(form='flow_grpo') needs dt_B, the step sizes σ − σ_next")
        return kl * dt_B.float().abs()
    raise ValueError(f"unknown KL form {form!r}; use one of {KL_FORMS}")


def timestep_weights(kind: str, std_T: torch.Tensor) -> torch.Tensor:
    """Loss weight of each recorded step → [..., T] with mean 1 over the last dim.

    ``uniform``: 1. ``noise_aware`` (TempFlow-GRPO, He et al. 2025): proportional to the step's noise
    scale (its transition std σ_t·√|Δt|), so high-noise early steps, where exploration decides the
    layout, weigh more than the late refinement steps.
    """
    if kind == "uniform":
        return torch.ones_like(std_T, dtype=torch.float32)
    if kind == "noise_aware":
        s = std_T.float()
        return s / s.mean(dim=-1, keepdim=True)
    raise ValueError(f"unknown timestep weighting {kind!r}; use 'uniform' or 'noise_aware'")


def nft_optimality(advantages_B: torch.Tensor, adv_max: float) -> torch.Tensor:
    """DiffusionNFT's optimality probability of each sample: r = ½ + ½·clip(A / A_max, −1, 1) → [B]."""
    return 0.5 + 0.5 * torch.clamp(advantages_B.float() / adv_max, -1.0, 1.0)


def nft_loss(
    v_B: torch.Tensor, v_old_B: torch.Tensor, target_B: torch.Tensor, r_B: torch.Tensor, beta: float
) -> torch.Tensor:
    """DiffusionNFT's negative-aware flow-matching loss (Zheng et al. 2025, eq. 8), per sample:

        v⁺ = (1−β)·v_old + β·v_θ,   v⁻ = (1+β)·v_old − β·v_θ
        L  = r·mean‖v⁺ − v*‖² + (1−r)·mean‖v⁻ − v*‖²

    with v* = ε − x₀ the flow-matching target at the noised final image x_t = (1−σ)·x₀ + σ·ε. At
    v_θ = v_old its gradient is 2β·(2r−1)·(v_old − v*)·∂v_θ: positives (r > ½) are regressed towards,
    negatives away from, and r = ½ contributes nothing. → [B], element-averaged, float32.
    """
    v, v_old, tgt = v_B.float(), v_old_B.float(), target_B.float()
    dims = tuple(range(1, v.ndim))
    pos = (((1 - beta) * v_old + beta * v - tgt) ** 2).mean(dim=dims)
    neg = (((1 + beta) * v_old - beta * v - tgt) ** 2).mean(dim=dims)
    r = r_B.float()
    return r * pos + (1 - r) * neg


def approx_kl(log_prob_B: torch.Tensor, old_log_prob_B: torch.Tensor) -> torch.Tensor:
    """½·E[(log π_θ − log π_old)²], the usual cheap estimate of KL(π_old ‖ π_θ) → scalar."""
    return 0.5 * ((log_prob_B.float() - old_log_prob_B.float()) ** 2).mean()


def clip_fraction(ratio_B: torch.Tensor, clip_range: float) -> torch.Tensor:
    """Fraction of samples whose ratio left [1−ε, 1+ε] → scalar."""
    return ((ratio_B - 1.0).abs() > clip_range).float().mean()
