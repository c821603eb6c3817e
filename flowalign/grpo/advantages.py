"""Group-relative advantages (GRPO): each image's reward compared with the other images of its prompt.

All functions take the *whole* iteration's rewards (gathered over processes), so a group's
statistics never depend on how its images were spread over processes.

    A_i = (r_i − mean_g(r)) / (std + eps)          Flow-GRPO / DanceGRPO (Shao et al. 2024, GRPO)

``std`` is the group's own standard deviation (``per_prompt``) or the standard deviation of the whole
batch (``global``; Flow-GRPO's ``global_std`` option, which keeps tiny within-group gaps small —
Pref-GRPO's "illusory advantage"), estimated with the population formula (÷n, numpy's default: Flow-GRPO)
or the unbiased one (÷(n−1), torch's default: DanceGRPO, Pref-GRPO); ``eps`` is 1e-4 in Flow-GRPO, 1e-8
in DanceGRPO and Pref-GRPO. A group whose rewards are all equal carries no signal: its
advantages are 0 and it is *masked* (its samples are left out of the update and counted).
"""

from __future__ import annotations

import torch

STD_EPS = 1e-4  # added to the std (Flow-GRPO's value; train.adv_eps)
ZERO_SPREAD = 1e-6  # a group whose reward std is below this has no signal


def group_stats(values_N: torch.Tensor, group_ids_N: torch.Tensor,
                unbiased: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample mean and std of its group → ([N], [N]); the std divides the squared deviations by n
    (population) or, with ``unbiased``, by n − 1 (0 for a group of one)."""
    _, inverse, counts = torch.unique(group_ids_N, return_inverse=True, return_counts=True)
    v = values_N.double()
    sums = torch.zeros(len(counts), dtype=torch.float64, device=v.device).index_add_(0, inverse, v)
    means = sums / counts
    sq = torch.zeros_like(sums).index_add_(0, inverse, (v - means[inverse]) ** 2)
    stds = (sq / (counts - 1).clamp(min=1)).sqrt() if unbiased else (sq / counts).sqrt()
    return means[inverse].float(), stds[inverse].float()


def group_advantages(
    rewards_N: torch.Tensor,
    group_ids_N: torch.Tensor,
    *,
    std_mode: str = "per_prompt",
    clip_max: float | None = None,
    unbiased: bool = False,
    eps: float = STD_EPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages [N], zero_spread mask [N]) for one reward: A = (r − mean_group) / (std + eps).

    ``std_mode``: ``per_prompt`` divides by the group's std, ``global`` by the std of all N rewards;
    ``unbiased`` estimates it with ÷(n−1) instead of ÷n. Samples of zero-spread groups get advantage 0 and
    ``mask=True``. ``clip_max`` clips to ±clip_max.
    """
    if rewards_N.shape != group_ids_N.shape or rewards_N.ndim != 1:
        raise ValueError(f"rewards {tuple(rewards_N.shape)} and group ids {tuple(group_ids_N.shape)} must be [N]")
    mean, std = group_stats(rewards_N, group_ids_N, unbiased=unbiased)
    zero = std < ZERO_SPREAD
    if std_mode == "per_prompt":
        scale = std
    elif std_mode == "global":
        scale = rewards_N.double().std(unbiased=unbiased).float().expand_as(std)
    else:
        raise ValueError(f"unknown std_mode {std_mode!r}; use 'per_prompt' or 'global'")
    adv = (rewards_N.float() - mean) / (scale + eps)
    adv = torch.where(zero, torch.zeros_like(adv), adv)
    if clip_max is not None:
        adv = adv.clamp(-clip_max, clip_max)
    return adv, zero


def multi_reward_advantages(
    per_reward: dict[str, torch.Tensor],
    weights: dict[str, float],
    group_ids_N: torch.Tensor,
    *,
    mode: str = "sum_then_normalize",
    std_mode: str = "per_prompt",
    clip_max: float | None = None,
    unbiased: bool = False,
    eps: float = STD_EPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages from several rewards → ([N], zero-spread mask [N]); ``std_mode``, ``unbiased`` and ``eps``
    as in ``group_advantages``.

    ``sum_then_normalize``: A = norm(Σ_k w_k r_k) (Flow-GRPO's multi-reward setting).
    ``per_reward``: A = Σ_k w_k norm(r_k) (GDPO-style decoupled normalisation: a reward with a large
    scale cannot drown the others; Pref-GRPO's A = 0.7·A_win + 1.4·A_CLIP is this with weights 0.7 and 1.4),
    clipped after the sum. A group is masked only when every reward is flat in it.
    """
    if mode == "sum_then_normalize":
        total = sum(weights[k] * r.float() for k, r in per_reward.items())
        return group_advantages(total, group_ids_N, std_mode=std_mode, clip_max=clip_max, unbiased=unbiased, eps=eps)
    if mode != "per_reward":
        raise ValueError(f"unknown reward normalization {mode!r}; use 'sum_then_normalize' or 'per_reward'")
    adv, zero = None, None
    for k, r in per_reward.items():
        a, z = group_advantages(r, group_ids_N, std_mode=std_mode, unbiased=unbiased, eps=eps)
        adv = weights[k] * a if adv is None else adv + weights[k] * a
        zero = z if zero is None else zero & z
    if clip_max is not None:
        adv = adv.clamp(-clip_max, clip_max)
    return adv, zero
