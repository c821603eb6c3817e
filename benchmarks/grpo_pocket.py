"""The main job's proof: fine-tuning on the pocket world (DiffusionNFT by default, any preset with --config),
gold accuracy before and after, wall time.

    python benchmarks/grpo_pocket.py                                   # configs/pocket/nft.yaml (the main job)
    python benchmarks/grpo_pocket.py --config configs/pocket/flow_grpo.yaml --out runs/bench_flow_grpo
    python benchmarks/grpo_pocket.py --skip-train --out runs/pocket_flow_grpo   # only re-evaluate
    python benchmarks/paired_gold.py runs/bench_s0 runs/bench_s1 runs/bench_s2 --a tuned --b base   # seeds paired

Trains with ``flowalign train`` (fresh output folder), then samples the shipped base model and the
trained LoRA on the 384 held-out prompts (``prompts/pocket/test.jsonl``; the pocket default sampler:
20 ODE steps, CFG 2.0, seed 0) and scores both with the exact evaluator. Prints and writes
``<out>/benchmark.json``, every prompt's verdict ``<out>/per_prompt_strict.json`` and a before/after grid
``<out>/before_after.png``: 8 prompts of each category,
a base row then a tuned row, each image labelled with its prompt and strict gold verdict (✓/✗).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs/pocket/nft.yaml"))
    ap.add_argument("--out", default=str(ROOT / "runs/bench_pocket_nft"))
    ap.add_argument("--prompts", default=str(ROOT / "prompts/pocket/test.jsonl"))
    ap.add_argument("--skip-train", action="store_true", help="evaluate an existing run folder")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    ns = ap.parse_args(argv)
    out = Path(ns.out)

    from flowalign.io import atomic_write_json, save_labelled_grid
    from flowalign.pocket.evaluate import evaluate, format_report
    from flowalign.pocket.prompts import load_prompt_file
    from flowalign.pocket.sample import load_pocket_policy, sample_images

    train_s = None
    if ns.skip_train:
        if (out / "benchmark.json").is_file():  # re-evaluating keeps the training's wall time
            train_s = json.loads((out / "benchmark.json").read_text()).get("train_wall_s")
    else:
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.time()
        cmd = [sys.executable, "-m", "flowalign", "train", ns.config, f"run.output_dir={out}", *ns.overrides]
        subprocess.run(cmd, check=True, cwd=ROOT)
        train_s = time.time() - t0

    prompts = [r["prompt"] for r in load_prompt_file(ns.prompts)]
    results, grids, strict = {}, {}, {}
    for name, opts in (("base", {}), ("tuned", {"lora_init_path": str(out / "final/lora")})):
        policy = load_pocket_policy(**opts)
        images = sample_images(policy, prompts, seed=0)
        res = evaluate(images, prompts)
        results[name], grids[name], strict[name] = res.summary(), images, res.strict.tolist()
        categories = res.categories
        print(f"== {name}\n{format_report(results[name])}")
    report = {"config": ns.config, "overrides": ns.overrides, "train_wall_s": train_s, "threads": torch.get_num_threads(),
              "prompts": ns.prompts, "images": len(prompts), "base": results["base"], "tuned": results["tuned"],
              "gain_strict": results["tuned"]["strict"]["overall"] - results["base"]["strict"]["overall"]}
    atomic_write_json(out / "benchmark.json", report)
    # every prompt's verdict, for a paired comparison over training seeds (benchmarks/paired_gold.py --a tuned --b base)
    atomic_write_json(out / "per_prompt_strict.json", {"prompts": prompts, "categories": list(categories),
                                                       "correct": {k: [float(x) for x in v] for k, v in strict.items()}})
    # per category the base model's images, then the tuned model's; the grid shows the same 8 prompts of both
    images, shown, verdicts, groups = [], [], [], []
    for c in dict.fromkeys(categories):
        ids = [i for i, cat in enumerate(categories) if cat == c]
        for name in ("base", "tuned"):
            images.append(grids[name][ids])
            shown += [prompts[i] for i in ids]
            verdicts += [strict[name][i] for i in ids]
            groups += [f"{c} ({name})"] * len(ids)
    save_labelled_grid(out / "before_after.png", torch.cat(images), shown, verdicts, groups)
    print(json.dumps({"train_wall_s": train_s, "base_strict": results["base"]["strict"]["overall"],
                      "tuned_strict": results["tuned"]["strict"]["overall"], "gain": report["gain_strict"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
