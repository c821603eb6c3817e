"""The pieces of the ReNO objective: the χ-norm regularizer, per-reward losses, per-sample clipping.

ReNO (Eyring et al. 2024, "ReNO: Enhancing One-step Text-to-Image Models through Reward-based Noise
Optimization") minimises over the initial noise ε ∈ R^d

    L(ε) = Σ_i w_i · ℓ_i(G(ε), prompt) + λ · (½‖ε‖² − (d − 1)·log‖ε‖)

where G is the (few-step) generator and ℓ_i = c_i − r_i is reward i's distance to a ceiling c_i
(ReNO's reward files: HPS 1 − cos, PickScore 30 − logit_scale·cos, CLIP 100 − logit_scale·cos,
ImageReward 2 − score). The ceilings are constants: they shift the logged losses, never the
gradients or which iterate is best.

Every function here works on a batch of independent samples (rows); the math of each row is the
single-sample formula, so optimizing B prompts at once equals B separate runs.
"""

from __future__ import annotations

import torch

# ℓ = ceiling − score, by registered reward name (ReNO's bounds); rewards not listed use 0 (ℓ = −score).
# flowalign's `clip` scores scale·cos with scale 1 by default: ReNO's 0.01·(100 − 100·cos) is the
# same term as 1.0·(1 − cos), which is how the recipes in configs/reno/ weight it.
LOSS_CEILINGS = {"hpsv2": 1.0, "hpsv2.1": 1.0, "pickscore": 30.0, "imagereward": 2.0, "clip": 1.0}


def loss_ceiling(name: str) -> float:
    """ReNO's ceiling c of reward ``name`` (a MultiReward key like ``clip#2`` uses its base name)."""
    return LOSS_CEILINGS.get(name.split("#")[0], 0.0)


def chi_norm_regularizer(noise_BD: torch.Tensor) -> torch.Tensor:
    """R(ε) = ½‖ε‖² − (d − 1)·log‖ε‖ per row → [B] (float32).

    The negative log-density of ‖ε‖ under ε ~ N(0, I_d) (a χ distribution with d degrees of
    freedom), up to a constant: it keeps the optimized noise on the Gaussian shell. Its gradient is
    ε·(1 − (d − 1)/‖ε‖²), zero at ‖ε‖ = √(d − 1). ``noise_BD`` may have any trailing shape; d is
    the number of elements per row.
    """
    flat = noise_BD.flatten(1).float()
    d = flat.shape[1]
    norm = torch.linalg.vector_norm(flat, dim=1)
    return 0.5 * norm**2 - (d - 1) * torch.log(norm)


def clip_rows(grad_BD: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Each row's gradient scaled to norm at most ``max_norm`` (``torch.nn.utils.clip_grad_norm_``'s
    rule, max_norm / (norm + 1e-6), per sample). ``max_norm`` 0 leaves the gradient as it is."""
    if max_norm <= 0:
        return grad_BD
    norm_B = torch.linalg.vector_norm(grad_BD.flatten(1).float(), dim=1)
    factor_B = (max_norm / (norm_B + 1e-6)).clamp(max=1.0)
    return grad_BD * factor_B.view(-1, *([1] * (grad_BD.ndim - 1))).to(grad_BD.dtype)


def multi_clip_sum(grads_BD: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """CARINOX's multi-clip: Σ_i clip(g_i, max_norm), each term's gradient clipped per sample before
    summing, so no reward moves the noise by more than ``max_norm`` (times lr), whatever its scale."""
    return sum(clip_rows(g, max_norm) for g in grads_BD)


def row_norms(x_BD: torch.Tensor) -> torch.Tensor:
    """‖x_b‖ per row → [B] float32."""
    return torch.linalg.vector_norm(x_BD.detach().flatten(1).float(), dim=1)
