"""The variant table: every preset's held-out gold lift over the base, seeds paired per prompt, from
``grpo_pocket.py`` run folders named ``<arm>_s<seed>``.

    python benchmarks/grpo_pocket.py --config configs/pocket/dance_grpo.yaml --out runs/v12/dance_s0 run.seed=0   # each arm, seeds 0-2
    python benchmarks/pocket_variants.py runs/v12 --json docs/pocket_variants_12k.json

For each arm (the folder name before ``_s<seed>``): the base and tuned strict accuracy on the held-out
prompts, tuned − base with its standard error over prompts (``flowalign.experiments.paired_difference``,
seeds averaged per prompt first) overall and per category, the quick eval curve (``eval/pocket_gold/strict``
on the eval subset, mean over seeds), the training reward by thirds of the run, and the training wall time.
``--json`` also stores every run's per-prompt verdicts (as 0/1 strings), so later comparisons between arms
can be paired without the run folders.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

EVAL_KEY = "eval/pocket_gold/strict"


def _metrics(folder: Path) -> list[dict]:
    from flowalign.grpo.logging import read_metrics

    return read_metrics(folder) if (folder / "metrics.jsonl").is_file() else []


def _thirds(values: list[float]) -> list[float]:
    n = len(values)
    cuts = [0, n // 3, 2 * n // 3, n]
    return [sum(values[a:b]) / max(b - a, 1) for a, b in itertools.pairwise(cuts)]


def collect(root: Path) -> dict[str, list[Path]]:
    arms: dict[str, list[Path]] = defaultdict(list)
    for folder in sorted(root.iterdir()):
        m = re.fullmatch(r"(.+)_s(\d+)", folder.name)
        if m and (folder / "per_prompt_strict.json").is_file():
            arms[m.group(1)].append(folder)
    return dict(arms)


def summarize(arm: str, folders: list[Path]) -> dict:
    from flowalign.experiments import paired_difference

    per = [json.loads((f / "per_prompt_strict.json").read_text()) for f in folders]
    bench = [json.loads((f / "benchmark.json").read_text()) for f in folders]
    prompts, cats = per[0]["prompts"], per[0]["categories"]
    if any(p["prompts"] != prompts for p in per):
        raise SystemExit(f"{arm}: the seeds were evaluated on different prompts")
    tuned = [p["correct"]["tuned"] for p in per]
    base = [p["correct"]["base"] for p in per]
    overall = paired_difference(tuned, base)
    by_cat = {}
    for c in dict.fromkeys(cats):
        ids = [i for i, x in enumerate(cats) if x == c]
        r = paired_difference([[t[i] for i in ids] for t in tuned], [[b[i] for i in ids] for b in base])
        by_cat[c] = {"base": r["mean_b"], "tuned": r["mean_a"], "diff": r["diff"], "se": r["se"]}
    curves, rewards = [], []
    for f in folders:
        ms = _metrics(f)
        curves.append({int(m["iteration"]): m[EVAL_KEY] for m in ms if EVAL_KEY in m})
        rewards.append(_thirds([m["reward/total/mean"] for m in ms if "reward/total/mean" in m]))
    its = sorted(set.intersection(*(set(c) for c in curves))) if curves and all(curves) else []
    return {
        "arm": arm, "seeds": [int(re.search(r"_s(\d+)$", f.name).group(1)) for f in folders],
        "config": bench[0]["config"], "overrides": bench[0]["overrides"],
        "base": overall["mean_b"], "tuned_per_seed": [sum(t) / len(t) for t in tuned],
        "diff": overall["diff"], "se": overall["se"], "ci95": overall["ci95"],
        "wins": overall["wins"], "losses": overall["losses"], "per_category": by_cat,
        "quick_eval": {str(i): sum(c[i] for c in curves) / len(curves) for i in its},
        "train_reward_thirds": [sum(r[k] for r in rewards) / len(rewards) for k in range(3)] if all(rewards) else None,
        "train_wall_s": [b.get("train_wall_s") for b in bench],
        "verdicts": {f.name: "".join(str(int(x)) for x in t) for f, t in zip(folders, tuned)},
        "base_verdicts": "".join(str(int(x)) for x in base[0]),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("root", help="folder holding <arm>_s<seed> run folders of benchmarks/grpo_pocket.py")
    ap.add_argument("--json", default=None, help="write the table (and every run's per-prompt verdicts) here")
    ns = ap.parse_args(argv)
    root = Path(ns.root)
    if not root.is_dir():
        print(f"{root} is not a folder: pass the --out parent of benchmarks/grpo_pocket.py runs", file=sys.stderr)
        return 2
    arms = collect(root)
    if not arms:
        print(f"no <arm>_s<seed> folder with per_prompt_strict.json in {root}: run benchmarks/grpo_pocket.py first",
              file=sys.stderr)
        return 2
    rows = [summarize(arm, folders) for arm, folders in arms.items()]
    cats = list(rows[0]["per_category"])
    print(f"{'arm':<16} {'seeds':>5} {'base':>6} {'tuned per seed':>22} {'tuned - base':>16} {'train s':>8}  "
          + " ".join(f"{c[:10]:>10}" for c in cats))
    for r in rows:
        wall = [w for w in r["train_wall_s"] if w is not None]
        print(f"{r['arm']:<16} {len(r['seeds']):>5} {r['base']:6.3f} {' / '.join(f'{t:.3f}' for t in r['tuned_per_seed']):>22} "
              f"{r['diff']:+7.3f} ± {r['se']:.3f} {(sum(wall) / len(wall) if wall else float('nan')):8.0f}  "
              + " ".join(f"{r['per_category'][c]['diff']:+10.2f}" for c in cats))
        print(f"{'':<16} quick eval {r['quick_eval']}  train reward by thirds {r['train_reward_thirds']}")
    if ns.json:
        from flowalign.io import atomic_write_json

        atomic_write_json(Path(ns.json), {"root": str(root), "eval_key": EVAL_KEY, "arms": rows})
        print(f"wrote {ns.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
