"""Pairwise judges and group win rates (Pref-GRPO, Wang et al. 2025).

A ``PairwiseJudge`` says, for a batch of pairs of images of the same prompt, the probability that
the first image is better: ``prefer(prompts, images_a, images_b) -> p [P]`` in [0, 1], NaN where the
comparison failed. ``win_rates`` turns a judge into a pointwise reward within groups: every
unordered pair of a group is compared (optionally in both orders, cancelling a judge's position
bias), a tie or a failure gives 0.5 to each side, and ``reward_i = wins_i / (G - 1)`` (wins are
soft: the judge's probability; a verdict judge gives 0 or 1).
"""

from __future__ import annotations

import itertools
from typing import Any, Hashable, Protocol, Sequence, runtime_checkable

import torch

from .base import Reward


@runtime_checkable
class PairwiseJudge(Protocol):
    name: str

    def prefer(self, prompts: list[str], images_a: torch.Tensor, images_b: torch.Tensor) -> torch.Tensor:
        """P(image a is better than image b) per pair [P] in [0, 1]; NaN marks a failed comparison."""
        ...


def group_pairs(group_ids: Sequence[Hashable], both_orders: bool = False) -> list[tuple[int, int]]:
    """Index pairs (a, b) to compare: every unordered pair within each group (a < b in batch
    order), and also (b, a) when ``both_orders``. Groups are defined by equal ids only."""
    groups: dict[Hashable, list[int]] = {}
    for i, gid in enumerate(group_ids):
        groups.setdefault(gid, []).append(i)
    pairs = [p for members in groups.values() for p in itertools.combinations(members, 2)]
    if both_orders:
        pairs += [(b, a) for a, b in pairs]
    return pairs


def win_rates(
    judge: PairwiseJudge,
    images: torch.Tensor,
    prompts: list[str],
    group_ids: Sequence[Hashable] | None = None,
    both_orders: bool = False,
    max_pairs_per_call: int | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Win rate of each image against the other images of its group.

    Args:
        images: [B,3,H,W] in [0, 1]; prompts: B strings.
        group_ids: the group of each image (default: its prompt). Images form a group only when
            their ids are equal, wherever they sit in the batch.
        both_orders: compare (a, b) and (b, a); each image then has 2(G-1) comparisons.
        max_pairs_per_call: split the judge calls into chunks of this many pairs.

    Returns:
        rates [B] float32 in [0, 1] (0.5 for an image alone in its group) and info with
        ``comparisons``, ``failures`` (NaN verdicts, counted as ties), ``failure_rate``,
        ``groups``, ``singletons``, and the judge counts ``judge_counts`` reads.
    """
    B = images.shape[0]
    if len(prompts) != B:
        raise ValueError(f"{len(prompts)} prompts for {B} images")
    ids = list(prompts) if group_ids is None else list(group_ids)
    if len(ids) != B:
        raise ValueError(f"{len(ids)} group ids for {B} images")
    pairs = group_pairs(ids, both_orders)

    p_P = torch.empty(0)
    if pairs:
        a_P = torch.tensor([a for a, _ in pairs])
        b_P = torch.tensor([b for _, b in pairs])
        step = max_pairs_per_call or len(pairs)
        chunks = []
        for s in range(0, len(pairs), step):
            a, b = a_P[s : s + step], b_P[s : s + step]
            p = judge.prefer([prompts[i] for i in a.tolist()], images[a.to(images.device)],
                             images[b.to(images.device)])
            assert p.shape == (len(a),), f"judge {judge.name} returned shape {tuple(p.shape)} for {len(a)} pairs"
            chunks.append(p.detach().float().cpu())
        p_P = torch.cat(chunks)
        valid = p_P[~torch.isnan(p_P)]
        if ((valid < 0) | (valid > 1)).any():
            raise ValueError(f"judge {judge.name} returned probabilities outside [0, 1]: {valid.tolist()}")

    failed_P = torch.isnan(p_P)
    p_P = torch.where(failed_P, torch.full_like(p_P, 0.5), p_P)
    wins_B, n_B = torch.zeros(B), torch.zeros(B)
    if pairs:
        wins_B.index_add_(0, a_P, p_P)
        wins_B.index_add_(0, b_P, 1.0 - p_P)
        n_B.index_add_(0, a_P, torch.ones_like(p_P))
        n_B.index_add_(0, b_P, torch.ones_like(p_P))
    rates_B = torch.where(n_B > 0, wins_B / n_B.clamp(min=1), torch.full_like(wins_B, 0.5))

    sizes = {gid: ids.count(gid) for gid in dict.fromkeys(ids)}
    info = {
        "comparisons": len(pairs),
        "requests": len(pairs),
        "failures": int(failed_P.sum()),
        "ties_from_failures": int(failed_P.sum()),
        "failure_rate": int(failed_P.sum()) / len(pairs) if pairs else 0.0,
        "groups": len(sizes),
        "singletons": sum(1 for n in sizes.values() if n == 1),
    }
    return rates_B.to(images.device), info


JUDGE_COUNTS = ("requests", "failures", "ties_from_failures")


def judge_counts(info) -> dict[str, int] | None:
    """How often a reward asked a judge this call, summed over the parts of a ``MultiReward``'s info:
    ``requests`` (comparisons of ``win_rates``, images of a ``VLMScore``), ``failures`` (no verdict:
    the request failed after its retries, or the answer could not be parsed) and
    ``ties_from_failures`` (failed comparisons ``win_rates`` scored as ties); None when no part
    reports ``requests`` (no judge)."""
    if not isinstance(info, dict):
        return None
    parts = list(info["info"].values()) if isinstance(info.get("info"), dict) else [info]
    reported = [p for p in parts if isinstance(p, dict) and "requests" in p]
    if not reported:
        return None
    return {k: sum(int(p.get(k, 0)) for p in reported) for k in JUDGE_COUNTS}


class FromPointwiseJudge:
    """Bradley–Terry preference from a pointwise reward: P(a ≻ b) = sigmoid((r_a − r_b) / temperature).

    Lets Pref-GRPO (win rates) and pointwise GRPO be compared on the same reward model."""

    def __init__(self, reward: Reward, temperature: float = 1.0):
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.reward, self.temperature = reward, temperature
        self.name = f"from_pointwise({reward.name})"

    def prefer(self, prompts, images_a, images_b):
        n = images_a.shape[0]
        scores, _ = self.reward(torch.cat([images_a, images_b]), list(prompts) * 2, None)
        return torch.sigmoid((scores[:n] - scores[n:]).float() / self.temperature)

    def __repr__(self) -> str:
        return f"FromPointwiseJudge({self.reward!r}, temperature={self.temperature})"


class WinRateReward:
    """A pairwise judge used as a pointwise reward: each image's win rate within its group.

    Groups come from ``metadata[i][group_key]`` when the metadata carries it, else from the prompts.
    ``info`` has the counts of ``win_rates`` (failures among them)."""

    differentiable = False
    needs_groups = True  # scores depend on the other images of the group

    def __init__(self, judge: PairwiseJudge, both_orders: bool = False, group_key: str = "group_id",
                 max_pairs_per_call: int | None = None):
        self.judge, self.both_orders, self.group_key = judge, both_orders, group_key
        self.max_pairs_per_call = max_pairs_per_call
        self.name = "win_rate"

    def __call__(self, images, prompts, metadata=None):
        group_ids = None
        if metadata is not None:
            has = [self.group_key in m for m in metadata]
            if any(has) and not all(has):
                raise ValueError(f"metadata['{self.group_key}'] is set for some images and not others; "
                                 f"give it for all images of the batch or for none")
            if all(has):
                group_ids = [m[self.group_key] for m in metadata]
        return win_rates(self.judge, images, prompts, group_ids, self.both_orders, self.max_pairs_per_call)

    def __repr__(self) -> str:
        return f"WinRateReward({self.judge!r}, both_orders={self.both_orders})"
