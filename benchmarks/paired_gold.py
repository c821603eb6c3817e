"""Paired comparison of two methods over seeds, from ``noise_opt_pocket.py`` or ``grpo_pocket.py`` ``--out`` folders.

Each folder's ``per_prompt_strict.json`` holds every prompt's strict gold verdict per method (and per
call budget with ``--curve``: keys ``method@calls``). All folders must use the same prompts (one
folder per noise seed). For the final images and every budget both methods have, prints
``flowalign.experiments.paired_difference``: mean gold of each, the difference with its standard
error over prompts (seeds averaged per prompt first), the 95% interval and the wins / losses.

    python benchmarks/paired_gold.py runs/nopt_s2 runs/nopt_s3 --a reno --b best_of_n
    python benchmarks/paired_gold.py runs/bench_s0 runs/bench_s1 runs/bench_s2 --a tuned --b base   # training seeds
    python benchmarks/paired_gold.py runs/nft_s0 runs/nft_s1 --a tuned --b tuned --against runs/grpo_s0 runs/grpo_s1

``--against``: method b is read from these folders instead (one per folder of a, same prompts), so two
training runs' tuned models are compared on the same prompts, seed i of a with seed i of b.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="+", help="noise_opt_pocket.py / grpo_pocket.py --out folders, one per seed")
    p.add_argument("--a", default="reno", help="method a (difference is a − b)")
    p.add_argument("--b", default="best_of_n", help="method b")
    p.add_argument("--against", nargs="+", default=None,
                   help="read method b from these folders (as many as the folders of a)")
    ns = p.parse_args(argv)
    if ns.against is not None and len(ns.against) != len(ns.folders):
        print(f"--against names {len(ns.against)} folder(s) for {len(ns.folders)} of a; give one per seed", file=sys.stderr)
        return 2

    from flowalign.experiments import paired_difference

    def read(folders):
        out = []
        for folder in folders:
            path = Path(folder) / "per_prompt_strict.json"
            if not path.is_file():
                print(f"{path} not found: run benchmarks/noise_opt_pocket.py or benchmarks/grpo_pocket.py with --out {folder}", file=sys.stderr)
                return None
            out.append(json.loads(path.read_text()))
        return out

    runs = read(ns.folders)
    others = runs if ns.against is None else read(ns.against)
    if runs is None or others is None:
        return 2
    if any(r["prompts"] != runs[0]["prompts"] for r in [*runs, *others]):
        print("the folders were run on different prompts; pair only runs of the same prompt file", file=sys.stderr)
        return 2

    def budget(key: str) -> str:
        return key.partition("@")[2] or "final"

    keys_a = [k for k in runs[0]["correct"] if k.split("@")[0] == ns.a]
    rows = []
    for ka in keys_a:
        kb = ns.b + ka[len(ns.a):]
        if not all(ka in r["correct"] for r in runs) or not all(kb in r["correct"] for r in others):
            continue
        r = paired_difference([x["correct"][ka] for x in runs], [x["correct"][kb] for x in others])
        rows.append({"calls": budget(ka), **r})
    if not rows:
        print(f"no budget has {ns.a!r} and {ns.b!r} in every folder", file=sys.stderr)
        return 2
    print(f"{ns.a} − {ns.b}: {len(runs)} seed(s) × {rows[0]['prompts']} prompts (strict gold, mean over images)")
    print(f"{'calls':>6} {ns.a:>10} {ns.b:>10} {'diff':>7} {'se':>6} {'95% interval':>17} {'wins':>5} {'losses':>6}")
    for r in rows:
        lo, hi = r["ci95"]
        print(f"{r['calls']:>6} {r['mean_a']:>10.3f} {r['mean_b']:>10.3f} {r['diff']:>+7.3f} {r['se']:>6.3f} "
              f"[{lo:+.3f}, {hi:+.3f}] {r['wins']:>5} {r['losses']:>6}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
