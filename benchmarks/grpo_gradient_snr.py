"""How much of a GRPO update is signal: cosine between policy gradients of independent batches.

    python benchmarks/grpo_gradient_snr.py [--config configs/pocket/flow_grpo.yaml] [--pairs 2] [key=value ...]
    python benchmarks/grpo_gradient_snr.py --config configs/pocket/nft.yaml     # the DiffusionNFT objective

For each pair, the same prompts are rolled out twice with independent noise (iterations 100+2k and
101+2k of the run's seeding), scored, and the gradient of the configured objective (GRPO, or nft) is taken at the base policy
(``GRPOTrainer.policy_gradient``). If a gradient is signal s plus noise n, the expected cosine of two
independent ones is |s|²/(|s|²+|n|²): near 0, an optimizer step is mostly noise and Adam, which moves
every weight by ~lr per step whatever the gradient's size, random-walks the model. Also reported: the
cosine between gradients of different prompts (the part of the signal shared across prompts, which is
what a held-out evaluation can see) and the images per gradient needed for a cosine of 0.5 if the
noise averages out as 1/N.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs/pocket/flow_grpo.yaml"))
    ap.add_argument("--pairs", type=int, default=2, help="prompt sets, each rolled out twice")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    ns = ap.parse_args(argv)
    torch.set_num_threads(ns.threads)

    from flowalign.config import load_config
    from flowalign.grpo.trainer import GRPOTrainer

    cfg = load_config(ns.config, ["run.output_dir=runs/gradient_snr", "run.progress=false", "eval.prompts=null",
                                  *ns.overrides])
    trainer = GRPOTrainer(cfg, log=lambda *a: None)
    t0 = time.time()
    grads, images = [], 0
    for k in range(ns.pairs):
        fixed = trainer.sample_prompts(k)
        pair = []
        for it in (100 + 2 * k, 101 + 2 * k):
            batch = trainer.rollout(it, prompt_ids=fixed)
            trainer.score(batch)
            images = len(batch.prompts)
            pair.append(trainer.policy_gradient(batch, iteration=it))
        grads.append(pair)
        print(f"pair {k}: {time.time() - t0:.0f} s", file=sys.stderr, flush=True)

    def cos(a, b):
        return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-30))

    same = [cos(a, b) for a, b in grads]
    cross = [cos(grads[i][x], grads[j][y]) for i in range(ns.pairs) for j in range(i + 1, ns.pairs)
             for x in (0, 1) for y in (0, 1)]
    mean = lambda v: sum(v) / len(v) if v else float("nan")  # noqa: E731
    c = mean(same)
    need = images * (1 / c - 1) if 0 < c < 1 else float("inf")  # cos(N)=1/(1+(1/c-1)·n/N) = 0.5
    out = {"config": ns.config, "overrides": ns.overrides, "images_per_gradient": images,
           "trainable_params": int(sum(p.numel() for p in trainer.params)),
           "cos_same_prompts": [round(x, 4) for x in same], "cos_same_prompts_mean": round(c, 4),
           "cos_different_prompts_mean": round(mean(cross), 4),
           # None: the mean cosine is <= 0, no signal measurable with these pairs
           "images_per_gradient_for_cos_0.5": round(need) if need != float("inf") else None,
           "seconds": round(time.time() - t0, 1)}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
