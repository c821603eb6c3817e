"""Rewards and judges.

Pointwise rewards: ``reward(images [B,3,H,W] in [0,1], prompts, metadata) -> (scores [B], info)``
with ``name`` and ``differentiable``; chosen by name from ``REWARDS`` (or a dotted path) with
``build_reward`` / ``build_rewards``. Pairwise judges: ``judge.prefer(prompts, images_a, images_b)
-> P(a better) [P]`` from ``JUDGES`` with ``build_judge``; ``win_rates`` scores images within their
prompt groups. Model libraries are imported only when a reward is built.
"""

from .base import LinearMLPHead, MultiReward, Reward, ShiftedViews, needs_groups
from .pairwise import FromPointwiseJudge, PairwiseJudge, WinRateReward, group_pairs, win_rates
from .registry import JUDGES, REWARDS, build_judge, build_reward, build_rewards

__all__ = [
    "Reward", "MultiReward", "ShiftedViews", "needs_groups", "LinearMLPHead", "PairwiseJudge", "FromPointwiseJudge", "WinRateReward",
    "win_rates", "group_pairs", "REWARDS", "JUDGES", "build_reward", "build_rewards", "build_judge",
]
