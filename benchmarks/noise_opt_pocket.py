"""Noise optimization on the pocket world: un-optimized vs Best-of-N vs ReNO (vs CARINOX).

The few-step pocket generator (``--steps`` Euler steps, CFG ``--guidance``) draws one image per
held-out prompt from fixed seeds; ReNO optimizes each prompt's noise against the differentiable
pocket CLIP (``pocket_clip``), Best-of-N spends the same number of generator calls on fresh seeds
scored by the same reward, and the pocket world's exact evaluator gives the gold accuracy
(``strict`` = GenEval-style correctness, overall = mean over categories). Prints a JSON summary.

    .venv/bin/python benchmarks/noise_opt_pocket.py --limit-per-category 16 [--seed 1]

Measured (2 CPU cores shared with other jobs, one torch thread; first 16 prompts per category of
test.jsonl = 96 prompts; 4 Euler steps, CFG 1.5; 50 generator calls per prompt; strict overall):

    seed  initial  Best-of-50  ReNO Adam 0.1  ReNO SGD lr 5 (paper)  CARINOX k=10 + 40
    0     0.656    0.719       0.750          0.625                  0.760
    1     0.573    0.719       0.729          -                      -

All 384 prompts, --reward-views 4 (every method scores the mean over 4 shifted copies):

    where        seed  initial  Best-of-50  ReNO lr 0.1  ReNO lr 0.05  CARINOX k=10 + 40 (lr 0.1 / 0.05)
    CPU          0     0.557    0.771       0.755        0.766         0.789 / -
    H100 (fp32)  0     0.555    0.771       0.766        0.779         0.787 / 0.784
    H100 (fp32)  1     0.529    0.766       0.747        0.768         - / 0.807

(H100: ``--device cuda``, benchmarks/device_pocket.sh; docs/device_h100_pocket.json.)

``--curve`` adds each method's gold accuracy of the best-so-far image after 1, 5, 10, 20, ... calls
(one run gives the equal-calls comparison at every budget). Paired over 56 seeds (all 384 prompts, 4 views,
lr 0.05, H200, ``bash benchmarks/device_reno_vs_bon.sh``; data in docs/device_h200_reno_vs_bon.tar.gz):
Best-of-N 0.567 / 0.747 / 0.764 / 0.759 / 0.757 / 0.751 / 0.749 and ReNO 0.567 / 0.724 / 0.754 / 0.768 /
0.773 / 0.773 / 0.770 after 1 / 5 / 10 / 20 / 30 / 40 / 50 calls; ReNO − Best-of-N at 50 calls +0.021,
standard error over prompts 0.009 (95% interval +0.004 to +0.039). Single seeds scatter by ±0.03 (CPU
seed 3: ReNO 2 474 CPU-s, 0.129 per call per prompt; Best-of-N 1 457, 0.076).

``--out DIR`` also writes ``DIR/per_prompt_strict.json``: every prompt's strict verdict per method, per
budget (``method@calls``: best so far) and of the call's own image (``method-iterate@calls``), so runs
of several seeds can be compared prompt by prompt with ``benchmarks/paired_gold.py``.

ReNO: ~0.12 CPU s per generator call (forward + backward) per prompt, Best-of-N ~0.06.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def _gold(images, prompts) -> dict:
    """Strict gold per category, partial overall, and ``correct``: each prompt's strict verdict as 0/1
    (for paired comparisons of methods and seeds, e.g. ``benchmarks/paired_gold.py``)."""
    from flowalign.pocket.evaluate import evaluate

    r = evaluate(images, prompts)
    s = r.summary()
    return {"strict": {k: round(v, 4) for k, v in s["strict"].items()},
            "partial_overall": round(s["partial"]["overall"], 4), "correct": r.strict.astype(int).tolist()}


def _curve(snapshots, prompts) -> tuple[dict, dict]:
    """Strict gold (overall) of the best image so far, by reward, after each snapshot's call count,
    and each prompt's verdicts at those counts: of that best image (key ``"c"``) and of the image
    of call c itself (``"iterate@c"``: an optimizer's current iterate)."""
    golds = {str(c): _gold(torch.cat([s.best[c] for s in snapshots]), prompts) for c in snapshots[0].at}
    correct = {c: g["correct"] for c, g in golds.items()}
    for c in snapshots[0].at:
        correct[f"iterate@{c}"] = _gold(torch.cat([s.iterate[c] for s in snapshots]), prompts)["correct"]
    return {c: g["strict"]["overall"] for c, g in golds.items()}, correct


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", default="prompts/pocket/test.jsonl")
    p.add_argument("--limit-per-category", type=int, default=None, help="at most N prompts per category")
    p.add_argument("--steps", type=int, default=4, help="Euler steps of the few-step generator")
    p.add_argument("--guidance", type=float, default=1.5, help="CFG scale")
    p.add_argument("--iterations", type=int, default=50, help="ReNO generator calls (= Best-of-N's N)")
    p.add_argument("--lr", type=float, default=0.05, help="(configs/reno/pocket.yaml's; the paper's SGD setting: "
                   "--optimizer sgd --lr 5)")
    p.add_argument("--optimizer", default="adam", choices=("sgd", "adam"))
    p.add_argument("--grad-clip", type=float, default=0.1)
    p.add_argument("--reg-weight", type=float, default=0.01)
    p.add_argument("--reward-views", type=int, default=1, help="score the mean over this many shifted copies "
                   "(ShiftedViews; every method, Best-of-N included)")
    p.add_argument("--view-shift", type=int, default=2, help="largest shift of --reward-views in pixels")
    p.add_argument("--carinox-seeds", type=int, default=10, help="CARINOX explored seeds k (0 = skip CARINOX); "
                   "it then optimizes for iterations - k calls, the same budget")
    p.add_argument("--methods", default="reno,best_of_n,carinox", help="comma-separated subset")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=96, help="prompts optimized in one batch")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--device", default="cpu", help="torch device of generator and reward (e.g. cuda)")
    p.add_argument("--curve", action="store_true", help="also report the gold accuracy of each method's best "
                   "image so far (by reward) after 1, 5, 10, 20, ... calls: the equal-calls comparison at every "
                   "budget up to --iterations")
    p.add_argument("--out", default=None, help="also write the summary JSON, per-prompt verdicts and image grids "
                   "here (rewritten after each method)")
    ns = p.parse_args(argv)
    torch.set_num_threads(ns.threads)

    from flowalign.experiments import SearchSnapshots
    from flowalign.noise_opt import GenerationConfig, NoiseOptConfig, OptimConfig, search_batch
    from flowalign.noise_opt.config import NoiseOptRunConfig, SearchConfig
    from flowalign.pocket.prompts import limit_per_category, load_prompt_file
    from flowalign.pocket.sample import load_pocket_policy
    from flowalign.rewards import build_reward

    rows = limit_per_category(load_prompt_file(ns.prompts), ns.limit_per_category)
    prompts = [r["prompt"] for r in rows]
    policy = load_pocket_policy(device=ns.device)
    reward = build_reward("pocket_clip", device=ns.device)
    gen = GenerationConfig(num_steps=ns.steps, guidance_scale=ns.guidance, height=32, width=32, checkpoint=False)
    optim = OptimConfig(iterations=ns.iterations, optimizer=ns.optimizer, lr=ns.lr, grad_clip=ns.grad_clip,
                        reg_weight=ns.reg_weight, reward_views=ns.reward_views, view_shift=ns.view_shift)
    methods = [m for m in ns.methods.split(",") if m]

    def run(search: SearchConfig, optim: OptimConfig = optim):
        """→ (results, CPU seconds, wall seconds, curve or None) of ``search`` over the prompts, in batches
        through the library's runner (``flowalign reno``'s)."""
        cfg = NoiseOptConfig(generation=gen, optim=optim, search=search,
                             run=NoiseOptRunConfig(batch_size=ns.batch_size, progress=False))
        results, snaps = [], []
        at = sorted(c for c in {1, 5, 10, *range(20, ns.iterations, 10), ns.iterations} if c <= ns.iterations)
        t0, w0 = time.process_time(), time.perf_counter()
        for i in range(0, len(prompts), ns.batch_size):
            snaps.append(SearchSnapshots(at) if ns.curve else None)
            results += search_batch(policy, reward, prompts[i:i + ns.batch_size], cfg, seed=ns.seed, offset=i,
                                    on_iteration=snaps[-1])
        cpu_s, wall_s = time.process_time() - t0, time.perf_counter() - w0
        return results, cpu_s, wall_s, _curve(snaps, prompts) if ns.curve else (None, None)

    summary: dict = {"prompts": f"{ns.prompts} ({len(prompts)})", "steps": ns.steps, "guidance": ns.guidance,
                     "device": str(policy.device),
                     "seed": ns.seed, "reward": "pocket_clip", "optim": vars(optim) | {}, "methods": {}}
    images: dict[str, torch.Tensor] = {}
    correct: dict[str, list[int]] = {}  # per-prompt verdicts, written with --out (not printed)
    for method in methods:
        if method == "reno":
            res, cpu_s, wall_s, (curve, curve_correct) = run(SearchConfig(method="reno"))
        elif method == "best_of_n":
            res, cpu_s, wall_s, (curve, curve_correct) = run(SearchConfig(method="best_of_n", num_seeds=ns.iterations))
        elif method == "carinox":
            if ns.carinox_seeds <= 0:
                continue
            k = ns.carinox_seeds
            assert ns.iterations > k, "carinox needs iterations > carinox-seeds"
            res, cpu_s, wall_s, (curve, curve_correct) = run(
                SearchConfig(method="carinox", num_seeds=k, optimize="best"),
                OptimConfig(**{**vars(optim), "iterations": ns.iterations - k}))
        else:
            print(f"unknown method {method!r}", file=sys.stderr)
            return 2
        per_iter = cpu_s / ns.iterations
        best = torch.stack([r.best_image for r in res])
        images[method] = best
        if "initial" not in images:
            images["initial"] = torch.stack([r.initial_image for r in res])
            g0 = _gold(images["initial"], prompts)
            correct["initial"] = g0.pop("correct")
            summary["methods"]["initial"] = {**g0, "generator_calls": 1,
                                             "mean_reward": round(sum(r.initial_reward for r in res) / len(res), 4)}
        g = _gold(best, prompts)
        correct[method] = g.pop("correct")
        summary["methods"][method] = {
            **g,
            "generator_calls": res[0].generator_calls,
            "mean_reward": round(sum(r.best_reward for r in res) / len(res), 4),
            "cpu_seconds": round(cpu_s, 1),
            "wall_seconds": round(wall_s, 1),
            "cpu_seconds_per_call_per_prompt": round(per_iter / len(prompts), 4),
        }
        if curve is not None:
            summary["methods"][method]["running_best_strict"] = curve
            correct |= {f"{method}-{c}" if c.startswith("iterate") else f"{method}@{c}": v
                        for c, v in curve_correct.items()}
        print(json.dumps({method: summary["methods"][method]}), file=sys.stderr, flush=True)
        base = summary["methods"]["initial"]["strict"]["overall"]
        summary["gain_over_initial"] = {m: round(v["strict"]["overall"] - base, 4)
                                        for m, v in summary["methods"].items() if m != "initial"}
        if ns.out:  # after every method: a run killed later (e.g. out of memory) keeps what it finished
            _write(Path(ns.out), summary, prompts, [r["category"] for r in rows], correct, images)
    print(json.dumps(summary, indent=1))
    return 0


def _write(out: Path, summary: dict, prompts, categories, correct: dict, images: dict) -> None:
    from flowalign.io import atomic_write_json, save_image_grid

    atomic_write_json(out / "summary.json", summary)
    atomic_write_json(out / "per_prompt_strict.json",
                      {"prompts": prompts, "categories": categories, "correct": correct})
    for name, imgs in images.items():
        save_image_grid(out / f"{name}.png", imgs[:64], nrow=8, scale=4)


if __name__ == "__main__":
    sys.exit(main())
