"""Statistics over seeds and prompts: curve bands, per-arm summaries, paired differences.

    band = seed_band([r.curve(key) for r in runs])       # mean ± std over seeds
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .runs import RunResult

__all__ = ["Band", "seed_band", "arm_summary", "arm_difference", "paired_difference"]


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
