"""What the shipped pocket model can already draw: per-prompt success rates over K seeds.

For every held-out prompt, K images (the default sampler: 20 ODE steps, CFG 2.0; seeds 100 … 100+K−1)
are scored strict by the exact evaluator. Per category: ``acc`` the mean success rate (the usual
accuracy, averaged over seeds), ``pass@K`` the fraction of prompts drawn correctly at least once,
``p0`` never, ``p>=0.5`` in at least half the seeds, ``majority`` in more than half, and ``plurality`` — whether
the prompt's most frequent *outcome* (the scene the evaluator sees: which shapes in which colors,
and for two objects their left/right and above/below order) is a correct one: the accuracy a policy
would reach by only sharpening each prompt towards what it already draws most often. A fine-tuning
target above ``plurality`` needs the model to make minority outcomes the common ones. Prints JSON.

``majority`` is a weak test of "the skill is there" at K = 12: a prompt drawn right with probability
p counts as a majority with probability P(Binomial(12, p) ≥ 7), so majority − acc is at most +0.20
(p ≈ 0.75) per prompt and, for a model whose mean accuracy is at most 0.60, at most +0.16 overall
(prompts at p = 0 and p ≈ 0.72 mixed); ``plurality`` counts a prompt whose errors are spread over
several wrong scenes (a count off by one either way, three wrong colors) as drawn right by its mode.

    python benchmarks/pocket_pass_at_k.py --seeds 12

Measured on the world shipped 2026-11-30 night (384 held-out prompts, K = 12, CFG 2.0, 2 cores, 7 min): overall
acc 0.533, pass@12 0.987, majority 0.438, plurality 0.639; counting 0.378 / 0.953 / 0.203, position 0.357 /
0.969 / 0.141, color_attr 0.473 / 1.0 / 0.375 (acc / pass@12 / majority); the gates in calibration.json.

On the first world (2026-11-27, 384 held-out prompts, K = 12, one core, 25 min): overall acc 0.660, pass@12
0.984, p>=0.5 0.734, majority 0.661; position acc 0.264, pass@12 0.938, majority 0.047; counting 0.564 /
0.969 / 0.656; two_object 0.592 / 1.0 / 0.625; color_attr 0.629 / 1.0 / 0.641.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch


def outcome_key(objects, margin: float = 3.2) -> tuple:
    """The scene an image shows, coarsely: the sorted (shape, color) of its objects and, with exactly
    two, which one is left of / above the other by more than ``margin`` pixels (the evaluator's
    relation margin at 32 px)."""
    objs = [o for o in objects if o.color != "other"]
    key: tuple = tuple(sorted((str(o.shape), o.color) for o in objs))
    if len(objs) == 2:
        a, b = objs
        (ax, ay), (bx, by) = a.centroid, b.centroid
        label = lambda o: (str(o.shape), o.color)  # noqa: E731
        left = label(a) if bx - ax > margin else label(b) if ax - bx > margin else None
        top = label(a) if by - ay > margin else label(b) if ay - by > margin else None
        key += (("left", left), ("top", top))
    return key


def plurality_correct(keys: list[tuple], wins: list[float]) -> float:
    """Is the most frequent outcome over seeds a correct one? (the fraction of tied modes that are)"""
    counts: dict[tuple, int] = {}
    for k in keys:
        counts[k] = counts.get(k, 0) + 1
    top = max(counts.values())
    modes = [k for k, c in counts.items() if c == top]
    verdict = {k: np.mean([w for kk, w in zip(keys, wins) if kk == k]) > 0.5 for k in modes}
    return float(np.mean([verdict[k] for k in modes]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", default="prompts/pocket/test.jsonl")
    ap.add_argument("--seeds", type=int, default=12, help="images per prompt (K)")
    ap.add_argument("--model", default=None, help="pocket model folder (default: the shipped one)")
    ap.add_argument("--threads", type=int, default=2)
    ns = ap.parse_args(argv)
    torch.set_num_threads(ns.threads)

    from flowalign.pocket.evaluate import evaluate
    from flowalign.pocket.prompts import load_prompt_file
    from flowalign.pocket.sample import load_pocket_policy, sample_images

    rows = load_prompt_file(ns.prompts)
    prompts, cats = [r["prompt"] for r in rows], np.array([r["category"] for r in rows])
    policy = load_pocket_policy(ns.model)
    wins, keys = [], []
    for k in range(ns.seeds):
        result = evaluate(sample_images(policy, prompts, seed=100 + k), prompts)
        wins.append(result.strict.astype(float))
        keys.append([outcome_key(objs) for objs in result.objects])
        print(f"seed {100 + k}: strict {wins[-1].mean():.4f}", file=sys.stderr, flush=True)
    p = np.mean(wins, axis=0)
    plural = np.array([plurality_correct([keys[k][i] for k in range(ns.seeds)], [wins[k][i] for k in range(ns.seeds)])
                       for i in range(len(prompts))])
    out = {}
    for c in [*sorted(set(cats)), "overall"]:
        m = cats == c if c != "overall" else np.ones(len(p), bool)
        out[c] = {"acc": p[m].mean(), "pass@K": (p[m] > 0).mean(), "p0": (p[m] == 0).mean(),
                  "p>=0.5": (p[m] >= 0.5).mean(), "majority": (p[m] > 0.5).mean(), "plurality": plural[m].mean()}
        out[c] = {k: round(float(v), 3) for k, v in out[c].items()}
    print(json.dumps({"prompts": ns.prompts, "K": ns.seeds, "strict": out}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
