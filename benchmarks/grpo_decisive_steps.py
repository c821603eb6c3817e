"""Which denoising steps decide an outcome: reward spread when the SDE acts at one step only.

    python benchmarks/grpo_decisive_steps.py --model DIR [--categories colors color_attr] [--prompts-per-category 12]

For each step k of the preset's schedule, every chosen training prompt is rolled out ``--draws`` times
from one shared initial noise with the SDE at step k only (ODE elsewhere; ``sampling.plan=window``,
``window_size=1``, ``window_start=k``) and scored with the preset's reward. The within-group reward
variance at step k is what a policy trained at step k can act on (its group-relative advantages are
zero where the step's noise changes nothing); the fraction of groups with any spread says how often
the step decides. Also the full-SDE plan (every step) for reference. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs/pocket/flow_grpo.yaml"))
    ap.add_argument("--model", default="builtin:pocket", help="model.path")
    ap.add_argument("--categories", nargs="+", default=["colors", "color_attr"])
    ap.add_argument("--prompts-per-category", type=int, default=12)
    ap.add_argument("--draws", type=int, default=8, help="SDE draws per prompt (group size)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    ns = ap.parse_args(argv)
    torch.set_num_threads(ns.threads)

    from flowalign.grpo.config import load_config
    from flowalign.grpo.trainer import GRPOTrainer
    from flowalign.prompts import read_prompts

    base = load_config(ns.config, validate=False)
    rows = read_prompts(base.train.prompts)
    ids = [i for c in ns.categories for i in [j for j, r in enumerate(rows) if r["category"] == c][:ns.prompts_per_category]]
    cats = [rows[i]["category"] for i in ids]
    steps = base.sampling.num_steps
    policy, out = None, {"model": ns.model, "draws": ns.draws, "prompts": len(ids), "per_plan": {}}
    for k in [*range(steps), "full"]:
        plan = ["sampling.plan=full"] if k == "full" else ["sampling.plan=window", "sampling.window_size=1",
                                                           f"sampling.window_start={k}"]
        cfg = load_config(ns.config, [f"model.path={ns.model}", "eval.prompts=null", "run.output_dir=runs/decisive",
                                      "sampling.share_group_noise=true", f"train.group_size={ns.draws}",
                                      f"train.prompts_per_iteration={len(ids)}", "train.micro_batch_size=8",
                                      "train.kl_beta=0", *plan, *ns.overrides])
        trainer = GRPOTrainer(cfg, policy=policy, log=lambda *a: None)
        policy = trainer.policy
        batch = trainer.rollout(0, prompt_ids=ids)
        trainer.score(batch)
        r = batch.rewards.reshape(len(ids), ns.draws)
        var = r.var(dim=1, unbiased=False)
        res = {}
        for c in ns.categories:
            m = torch.tensor([x == c for x in cats])
            res[c] = {"reward_mean": round(float(r[m].mean()), 4), "within_var": round(float(var[m].mean()), 4),
                      "groups_with_spread": round(float((var[m] > 1e-6).float().mean()), 3)}
        out["per_plan"][str(k)] = res
        print(f"step {k}: {json.dumps(res)}", file=sys.stderr, flush=True)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
