"""The main job's proof: GRPO on the pocket world, gold accuracy before and after, wall time.

    python benchmarks/grpo_pocket.py                                   # configs/pocket/flow_grpo.yaml
    python benchmarks/grpo_pocket.py --config configs/pocket/pref_grpo.yaml --out runs/bench_pref
    python benchmarks/grpo_pocket.py --skip-train --out runs/pocket_flow_grpo   # only re-evaluate

Trains with ``flowalign train`` (fresh output folder), then samples the shipped base model and the
trained LoRA on the 384 held-out prompts (``prompts/pocket/test.jsonl``; the pocket default sampler:
20 ODE steps, CFG 1.5, seed 0) and scores both with the exact evaluator. Prints and writes
``<out>/benchmark.json`` and a before/after grid ``<out>/before_after.png`` (rows alternate base, tuned).
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
    ap.add_argument("--config", default=str(ROOT / "configs/pocket/flow_grpo.yaml"))
    ap.add_argument("--out", default=str(ROOT / "runs/bench_pocket_flow_grpo"))
    ap.add_argument("--prompts", default=str(ROOT / "prompts/pocket/test.jsonl"))
    ap.add_argument("--skip-train", action="store_true", help="evaluate an existing run folder")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    ns = ap.parse_args(argv)
    out = Path(ns.out)

    from flowalign.io import atomic_write_json, save_image_grid
    from flowalign.pocket.evaluate import evaluate, format_report
    from flowalign.pocket.prompts import load_prompt_file
    from flowalign.pocket.sample import load_pocket_policy, sample_images

    train_s = None
    if not ns.skip_train:
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.time()
        cmd = [sys.executable, "-m", "flowalign", "train", ns.config, f"run.output_dir={out}", *ns.overrides]
        subprocess.run(cmd, check=True, cwd=ROOT)
        train_s = time.time() - t0

    prompts = [r["prompt"] for r in load_prompt_file(ns.prompts)]
    results, grids = {}, {}
    for name, opts in (("base", {}), ("tuned", {"lora_init_path": str(out / "final/lora")})):
        policy = load_pocket_policy(**opts)
        images = sample_images(policy, prompts, seed=0)
        results[name] = evaluate(images, prompts).summary()
        grids[name] = images
        print(f"== {name}\n{format_report(results[name])}")
    report = {"config": ns.config, "overrides": ns.overrides, "train_wall_s": train_s, "threads": torch.get_num_threads(),
              "prompts": ns.prompts, "images": len(prompts), "base": results["base"], "tuned": results["tuned"],
              "gain_strict": results["tuned"]["strict"]["overall"] - results["base"]["strict"]["overall"]}
    atomic_write_json(out / "benchmark.json", report)
    # 8 prompts per category (every 8th of each 64-prompt category), base row then tuned row
    pick = list(range(0, len(prompts), 8))[:48]
    rows = []
    for i in range(0, len(pick), 8):
        rows += [grids["base"][pick[i:i + 8]], grids["tuned"][pick[i:i + 8]]]
    save_image_grid(out / "before_after.png", torch.cat(rows), nrow=8, scale=4)
    print(json.dumps({"train_wall_s": train_s, "base_strict": results["base"]["strict"]["overall"],
                      "tuned_strict": results["tuned"]["strict"]["overall"], "gain": report["gain_strict"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
