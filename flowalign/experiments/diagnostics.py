"""Diagnostics: the advantages of a trainer's real groups (what a reward's gaps are worth), and
snapshots of a noise search after each number of generator calls (anytime curves)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..noise_opt.search import BestSoFar

__all__ = ["GroupScores", "collect_groups", "group_advantage_stats", "pair_agreement", "SearchSnapshots"]


# --------------------------------------------------------------------------------------------------
# advantages of real groups


@dataclass
class GroupScores:
    """Rollouts of a trainer's real groups scored by several rewards: ``scores[name]`` [N],
    ``group_ids`` [N] (global, over all collected iterations), ``prompts`` [N], ``images`` [N,3,H,W]."""

    scores: dict[str, torch.Tensor]
    group_ids: torch.Tensor
    prompts: list[str]
    images: torch.Tensor = field(repr=False)


@torch.no_grad()
def collect_groups(trainer, iterations, rewards: dict) -> GroupScores:
    """Roll out ``trainer``'s groups of the given iterations (its prompts, plan, SDE and seeds; the
    current weights) and score every image with each reward in ``rewards`` (name → reward callable;
    a pairwise reward sees the group ids in the metadata, as in training). Nothing is trained."""
    scores: dict[str, list] = {k: [] for k in rewards}
    gids, prompts, images = [], [], []
    offset = 0
    for it in iterations:
        batch = trainer.rollout(it)
        g = batch.group_ids
        metas = [{**m, "group_id": int(i) + offset} for m, i in zip(batch.metadata, g.tolist())]
        for name, reward in rewards.items():
            s, _ = reward(batch.images, batch.prompts, metas)
            scores[name].append(s.detach().float().cpu())
        gids.append(g + offset)
        offset += int(g.max()) + 1
        prompts += batch.prompts
        images.append(batch.images.cpu())
    return GroupScores({k: torch.cat(v) for k, v in scores.items()}, torch.cat(gids), prompts, torch.cat(images))


def group_advantage_stats(rewards_N: torch.Tensor, group_ids_N: torch.Tensor) -> dict[str, np.ndarray]:
    """Per group (sorted by id): the raw spread of its rewards and the size of its advantages.

    ``reward_std`` (population std in the group), ``reward_range`` (max − min), ``adv_per_prompt``
    and ``adv_global``: mean |A| with A = (r − mean_g) / (std + eps) where std is the group's own
    (``per_prompt``) or the whole batch's (``global``). Per-prompt normalization gives every group
    with any spread the same advantage size (mean |A| ≈ 0.8 for a Gaussian group) however tiny its
    gaps — Pref-GRPO's "illusory advantage"; global std keeps tiny gaps small.
    """
    from ..grpo.advantages import group_advantages, group_stats

    _, std = group_stats(rewards_N, group_ids_N)
    ids, inverse = torch.unique(group_ids_N, return_inverse=True)
    out: dict[str, np.ndarray] = {"group_id": ids.numpy()}
    G = len(ids)

    def per_group(values, reduce):
        return np.array([reduce(values[inverse == g]) for g in range(G)])

    out["reward_std"] = per_group(std, lambda v: float(v[0]))
    out["reward_range"] = per_group(rewards_N.float(), lambda v: float(v.max() - v.min()))
    for mode in ("per_prompt", "global"):
        adv, _ = group_advantages(rewards_N, group_ids_N, std_mode=mode)
        out[f"adv_{mode}"] = per_group(adv.abs(), lambda v: float(v.mean()))
    return out


def pair_agreement(proxy_N: torch.Tensor, gold_N: torch.Tensor, group_ids_N: torch.Tensor,
                   edges: list[float]) -> list[dict]:
    """How often a proxy orders two images of the same group as the gold score does, by the size of
    the proxy's gap.

    Every pair within a group whose gold scores differ is put in the bin of its proxy gap
    |Δproxy| / std(proxy over the batch) (bins ``[edges[i], edges[i+1])``, the last one open); a row per
    bin: ``lo``, ``hi``, ``pairs``, ``agree`` (fraction where sign(Δproxy) = sign(Δgold); NaN for no
    pairs). Near 0.5 in a bin means the proxy's gaps of that size carry no gold signal.
    """
    if not (len(proxy_N) == len(gold_N) == len(group_ids_N)):
        raise ValueError(f"proxy, gold and group ids must have one entry per image, got {len(proxy_N)}, "
                         f"{len(gold_N)}, {len(group_ids_N)}")
    p, g, ids = proxy_N.double(), gold_N.double(), group_ids_N
    scale = float(p.std(unbiased=False)) or 1.0
    same = ids[:, None] == ids[None, :]
    upper = torch.triu(torch.ones_like(same), diagonal=1)
    dg = g[:, None] - g[None, :]
    dp = p[:, None] - p[None, :]
    pick = same & upper & (dg != 0)
    gap = (dp.abs() / scale)[pick]
    agree = (torch.sign(dp) == torch.sign(dg))[pick]
    rows = []
    bounds = list(edges) + [math.inf]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        m = (gap >= lo) & (gap < hi)
        n = int(m.sum())
        rows.append({"lo": lo, "hi": hi, "pairs": n, "agree": float(agree[m].double().mean()) if n else math.nan})
    return rows


# --------------------------------------------------------------------------------------------------
# noise search


class SearchSnapshots:
    """An ``on_iteration`` callback for ``reno_batch`` / ``best_of_n_batch`` that keeps, after each
    generator-call count in ``at`` (1 = the first call): ``iterate[c]`` the images of that call,
    ``best[c]`` the best images so far by reward total and ``best_reward[c]`` their totals [B].
    Gives anytime curves (quality after c calls) from one run."""

    def __init__(self, at):
        self.at = sorted(set(int(c) for c in at))
        if not self.at or self.at[0] < 1:
            raise ValueError(f"snapshot call counts must be >= 1, got {at}")
        self.iterate: dict[int, torch.Tensor] = {}
        self.best: dict[int, torch.Tensor] = {}
        self.best_reward: dict[int, torch.Tensor] = {}
        self._best: BestSoFar | None = None  # by reward total, as the searches themselves keep it

    def __call__(self, iteration: int, images_B: torch.Tensor, records_B: list[dict]) -> None:
        total_B = torch.tensor([r["reward_total"] for r in records_B])
        images_B = images_B.detach().float().cpu()
        if self._best is None:
            self._best = BestSoFar(len(records_B))
        self._best.update(iteration, total_B, images_B)
        calls = iteration + 1
        if calls in self.at:
            self.iterate[calls] = images_B.clone()
            self.best[calls] = self._best.images.clone()
            self.best_reward[calls] = self._best.total.clone()
