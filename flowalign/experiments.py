"""Experiment helpers for notebooks and scripts: train a config and read its curves, compare variants
over seeds, look at the advantages of real groups, snapshot a noise search.

    cfg = scale_budget(load_config("configs/pocket/flow_grpo.yaml", ["run.output_dir=runs/a"]),
                       num_iterations=10, prompts_per_iteration=4, group_divisor=2)
    run = run_grpo(cfg)                                  # a fresh run; RunResult
    run.curve("eval/pocket_gold/strict")                 # (iterations, values)
    run.curve("eval/pocket_gold/strict", x="train_s")    # against cumulative training seconds
    band = seed_band([r.curve(key) for r in runs])       # mean ± std over seeds

Everything here drives the public pieces (``GRPOTrainer``, ``read_metrics``, the advantage rules,
the noise-search callbacks) and returns plain numbers, so a notebook only plots.
"""

from __future__ import annotations

import copy
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .config import Config, validate_config

__all__ = [
    "scale_budget", "RunResult", "run_grpo", "Band", "seed_band", "arm_summary", "arm_difference",
    "paired_difference", "GroupScores", "collect_groups",
    "group_advantage_stats", "pair_agreement", "SearchSnapshots",
]


# --------------------------------------------------------------------------------------------------
# GRPO runs


def scale_budget(cfg: Config, *, num_iterations: int, prompts_per_iteration: int, group_divisor: int = 1) -> Config:
    """A copy of a recipe shrunk to a smaller budget with its per-iteration behaviour kept.

    ``train.group_size`` becomes ``group_size // group_divisor`` (at least 2; for TempFlow-GRPO the
    number of ODE trunks), ``train.prompts_per_iteration`` and ``train.num_iterations`` the given
    values. ``train.micro_batch_size`` shrinks with the images per iteration, so each iteration
    still makes the recipe's number of optimizer steps (Adam's step count, not the batch, sets how
    far LoRA weights move); ``sampling.window_shift_interval`` shrinks with the iterations, so a
    MixGRPO window still travels its whole path.
    """
    if num_iterations < 1 or prompts_per_iteration < 1 or group_divisor < 1:
        raise ValueError("num_iterations, prompts_per_iteration and group_divisor must be >= 1, got "
                         f"{num_iterations}, {prompts_per_iteration}, {group_divisor}")
    out = copy.deepcopy(cfg)
    t, s = out.train, out.sampling
    images_before = t.group_size * t.prompts_per_iteration
    t.group_size = max(2, t.group_size // group_divisor)
    t.prompts_per_iteration = prompts_per_iteration
    images = t.group_size * t.prompts_per_iteration
    t.micro_batch_size = max(1, min(images, round(t.micro_batch_size * images / images_before)))
    s.window_shift_interval = max(1, round(s.window_shift_interval * num_iterations / t.num_iterations))
    t.num_iterations = num_iterations
    validate_config(out)
    return out


@dataclass
class RunResult:
    """A finished GRPO run: its config, folder, ``metrics.jsonl`` rows and wall time."""

    config: Config
    output_dir: Path
    metrics: list[dict]
    wall_s: float  # the whole train() call: rollouts, updates, evaluations, checkpoints

    def train_seconds(self) -> dict[int, float]:
        """Cumulative training seconds (``time/iteration_s``: rollout + reward + update, no eval) at the
        end of each logged iteration; iteration 0 (before training) is 0."""
        total, out = 0.0, {0: 0.0}
        for row in sorted(self.metrics, key=lambda r: r["iteration"]):
            if "time/iteration_s" in row:
                total += row["time/iteration_s"]
                out[row["iteration"]] = total
        return out

    def curve(self, key: str, x: str = "iteration") -> tuple[list[float], list[float]]:
        """(x, values) of every logged row holding ``key``; ``x`` is ``iteration`` or ``train_s``
        (cumulative training seconds, see ``train_seconds``)."""
        if x not in ("iteration", "train_s"):
            raise ValueError(f"x must be 'iteration' or 'train_s', got {x!r}")
        rows = sorted((r for r in self.metrics if key in r), key=lambda r: r["iteration"])
        if not rows:
            keys = sorted({k for r in self.metrics for k in r})
            raise ValueError(f"no logged row has {key!r}; logged keys: {keys}")
        secs = self.train_seconds() if x == "train_s" else None
        xs = [float(r["iteration"]) if secs is None else secs[r["iteration"]] for r in rows]
        return xs, [float(r[key]) for r in rows]

    def last(self, key: str) -> float:
        return self.curve(key)[1][-1]


def run_grpo(cfg: Config, *, fresh: bool = True, quiet: bool = True, **trainer_kwargs) -> RunResult:
    """Train ``cfg`` with ``GRPOTrainer`` and return its metrics.

    ``fresh`` deletes a previous run in ``run.output_dir`` first (only a folder that holds a
    flowalign run, i.e. a ``config.yaml``, or nothing), so re-running a notebook repeats the run
    instead of resuming it. ``quiet`` drops the trainer's start-up summary line.
    """
    from .grpo.logging import read_metrics
    from .grpo.trainer import GRPOTrainer

    out = Path(cfg.run.output_dir)
    if fresh and out.exists() and any(out.iterdir()):
        if not (out / "config.yaml").is_file():
            raise ValueError(f"run.output_dir={out} is not empty and holds no flowalign run (no config.yaml); "
                             "refusing to delete it: choose another run.output_dir")
        shutil.rmtree(out)
    if quiet:
        trainer_kwargs.setdefault("log", lambda *_: None)
    t0 = time.time()
    GRPOTrainer(cfg, **trainer_kwargs).train()
    wall = time.time() - t0
    return RunResult(cfg, out, read_metrics(out), wall)


@dataclass
class Band:
    """A curve over seeds: x (mean over seeds), mean, sample std (0 for one seed), min, max of y."""

    x: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    min: np.ndarray
    max: np.ndarray
    n: int


def seed_band(curves: list[tuple[list[float], list[float]]]) -> Band:
    """Mean ± spread of curves from several seeds, point by point; every curve must have the same
    number of points (x may differ, e.g. seconds: its mean is returned)."""
    if not curves:
        raise ValueError("seed_band needs at least one curve")
    lengths = {len(c[1]) for c in curves}
    if len(lengths) != 1:
        raise ValueError(f"curves have different numbers of points {sorted(lengths)}; evaluate every seed at the "
                         "same iterations")
    xs = np.array([c[0] for c in curves], dtype=np.float64)
    ys = np.array([c[1] for c in curves], dtype=np.float64)
    n = len(curves)
    return Band(xs.mean(0), ys.mean(0), ys.std(0, ddof=1) if n > 1 else np.zeros(ys.shape[1]),
                ys.min(0), ys.max(0), n)


def arm_summary(runs: dict[str, list[RunResult]], key: str) -> list[dict]:
    """One row per arm (variant) with ``key`` over its seeds: ``start`` (first eval), ``final`` and
    ``gain`` (final − start) as mean and sample std, ``mean_curve`` (mean of the curve over its eval
    points after the start: an area under the curve, rewarding early gains), ``train_s`` (mean
    training seconds) and ``s_per_iter``."""
    rows = []
    for name, rs in runs.items():
        ys = np.array([r.curve(key)[1] for r in rs], dtype=np.float64)  # [seeds, points]
        secs = np.array([max(r.train_seconds().values()) for r in rs])
        iters = np.array([r.config.train.num_iterations for r in rs])
        gain = ys[:, -1] - ys[:, 0]
        after = ys[:, 1:] if ys.shape[1] > 1 else ys

        def sd(v):
            return float(v.std(ddof=1)) if len(v) > 1 else 0.0

        rows.append({"arm": name, "seeds": len(rs), "start": float(ys[:, 0].mean()),
                     "final": float(ys[:, -1].mean()), "final_std": sd(ys[:, -1]),
                     "gain": float(gain.mean()), "gain_std": sd(gain),
                     "mean_curve": float(after.mean()), "mean_curve_std": sd(after.mean(1)),
                     "train_s": float(secs.mean()), "s_per_iter": float((secs / iters).mean())})
    return rows


def arm_difference(rows: list[dict], a: str, b: str, field: str = "mean_curve") -> tuple[float, float]:
    """(difference, standard error) of ``field`` between arms ``a`` and ``b`` of ``arm_summary`` rows:
    d = mean_a − mean_b, se = sqrt(s_a²/n_a + s_b²/n_b) from the seeds' sample stds (``field`` is
    ``final``, ``gain`` or ``mean_curve``). |d| < 2·se: the seeds cannot tell the arms apart."""
    by = {r["arm"]: r for r in rows}
    missing = [k for k in (a, b) if k not in by]
    if missing:
        raise ValueError(f"no arm {missing[0]!r}; arms: {sorted(by)}")
    ra, rb = by[a], by[b]
    d = ra[field] - rb[field]
    se = math.sqrt(ra[f"{field}_std"] ** 2 / ra["seeds"] + rb[f"{field}_std"] ** 2 / rb["seeds"])
    return d, se


def paired_difference(a, b) -> dict:
    """Method ``a`` vs ``b`` scored on the same prompts (e.g. 0/1 gold verdicts): ``a`` and ``b`` are
    [prompts] or [seeds, prompts] with the same prompt in the same column. Per prompt the difference
    is averaged over seeds first (the seeds of one prompt are not independent samples); then
    ``diff`` = mean over prompts (= mean_a − mean_b), ``se`` = its standard error over prompts
    (sample std / √prompts), ``ci95`` = diff ± 1.96·se, and ``wins`` / ``losses`` / ``ties`` count the
    (seed, prompt) cells where a is above / below / equal to b. 0 outside ``ci95``: the prompts tell
    the methods apart."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim not in (1, 2) or a.size == 0:
        raise ValueError(f"a and b must have the same shape [prompts] or [seeds, prompts]; got {a.shape} and {b.shape}")
    a2, b2 = np.atleast_2d(a), np.atleast_2d(b)
    d = (a2 - b2).mean(0)  # [prompts]
    n = d.size
    se = float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    diff = float(d.mean())
    return {"mean_a": float(a2.mean()), "mean_b": float(b2.mean()), "diff": diff, "se": se,
            "ci95": (diff - 1.96 * se, diff + 1.96 * se), "wins": int((a2 > b2).sum()),
            "losses": int((a2 < b2).sum()), "ties": int((a2 == b2).sum()), "prompts": n, "seeds": a2.shape[0]}


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
    from .grpo.advantages import group_advantages, group_stats

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
        self._best = self._best_total = None

    def __call__(self, iteration: int, images_B: torch.Tensor, records_B: list[dict]) -> None:
        total_B = torch.tensor([r["reward_total"] for r in records_B])
        images_B = images_B.detach().float().cpu()
        if self._best is None:
            self._best, self._best_total = images_B.clone(), total_B.clone()
        better = total_B > self._best_total  # strict, as the searches themselves keep the best
        self._best[better] = images_B[better]
        self._best_total = torch.where(better, total_B, self._best_total)
        calls = iteration + 1
        if calls in self.at:
            self.iterate[calls] = images_B.clone()
            self.best[calls] = self._best.clone()
            self.best_reward[calls] = self._best_total.clone()
