"""Realigning a deliberately misaligned pocket model: does GRPO give back a skill noisy data took away?

    python benchmarks/pocket_realign.py                                   # build (cached) + base accuracy
    python benchmarks/pocket_realign.py --bound-minutes 5                 # + the supervised bound on it
    python benchmarks/pocket_realign.py --config configs/pocket/flow_grpo.yaml --seeds 0 1 2 [key=value ...]

The bed (issue 18): the shipped pocket model, fully fine-tuned (AdamW lr 1e-4, batch 64,
``--build-steps`` steps, the flow-matching loss it was built with) on renders of
``prompts/pocket/train.jsonl`` ×4 where in 40% of the images the color words were swapped
red↔blue and green↔yellow *before rendering* while the captions stayed as they were — the way noisy
alt-text would teach a model wrong colors. Built once, deterministically (seeded), and cached as a
full SD3 pipeline folder under ``~/.cache/flowalign/realign/<hash of the settings and the shipped
transformer>`` (written whole or not at all; ``--rebuild`` writes it again).

Reported (JSON on stdout and in ``--out``/realign.json, per seed as it finishes):

* the misaligned base's strict gold accuracy per category on the 384 held-out prompts
  (``prompts/pocket/test.jsonl``, the default sampler: 20 ODE steps, CFG 2.0, seed 0);
* with ``--bound-minutes``: the supervised bound on it (clean renders, LoRA r32, lr 3e-4;
  ``benchmarks/pocket_supervised_bound.py --model <base>``);
* with ``--config``: the preset trained on the base (``model.path`` = the base folder) for each of
  ``--seeds`` (``run.seed``): the trainer's quick-eval curve (96 prompts), the training reward by thirds,
  wall time per iteration, and the final weights (EMA when enabled) evaluated on the 384 prompts per
  category; mean ± SE over seeds.

Run it with one thread (``--threads 1``, the default) beside other jobs; the 20-minute target of the
issue is for 2 uncontended cores.

Measured (2026-11-30, on the first world's shipped model and its default CFG 3.0, one CPU thread shared with
other jobs; README "Realigning a misaligned model"):
build 400 steps in 265 s; misaligned base 0.510 overall (single 0.922, two_object 0.563, counting 0.313,
colors 0.844, position 0.125, color_attr 0.297; shipped base 0.659, colors 0.938). Main preset, seed 0,
30 iterations (15–24 s each): with shared group noise only 0.526 (colors 0.828); with shared + antithetic
SDE noise (the preset now) 0.547 (colors 0.891). The issue's target (0.58 overall, 0.90 colors, 3 seeds)
is not reached.

Measured (2026-12-01, the rebuilt world's shipped model, CFG 2.0): build 584 s; bed 0.5625 overall (colors
0.688, two_object 0.844; shipped base 0.552, colors 0.797); supervised bound 0.703 / 0.740 after 2.5 / 5
minutes; the main job (``configs/pocket/nft.yaml``, DiffusionNFT), seeds 0 / 1 / 2: 0.711 / 0.742 / 0.727
(colors 0.938 / 1.000 / 0.891; mean 0.727 ± 0.009, colors 0.943 ± 0.032) in 901–1 124 s of training
(``docs/pocket_realign_v12.json``).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import re
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

_SWAP = {"red": "blue", "blue": "red", "green": "yellow", "yellow": "green"}


@dataclasses.dataclass(frozen=True)
class BedSettings:
    """What the misaligned base is built from (its cache key, with the shipped transformer's hash)."""

    swap_fraction: float = 0.4  # images whose color words are swapped before rendering
    copies: int = 4  # renders per training prompt line
    steps: int = 400  # optimizer steps of full fine-tuning
    batch: int = 64
    lr: float = 1e-4
    seed: int = 0


def swap_colors(prompt: str) -> str:
    """red↔blue, green↔yellow in a prompt's text."""
    return re.sub(r"\b(red|blue|green|yellow)\b", lambda m: _SWAP[m.group(1)], prompt)


def _shipped_transformer_hash() -> str:
    from flowalign.pocket.assets import T2I_DIR, shipped

    f = Path(shipped(T2I_DIR, "text-to-image model")) / "transformer" / "diffusion_pytorch_model.safetensors"
    return hashlib.sha256(f.read_bytes()).hexdigest()[:16]


def bed_dir(bed: BedSettings) -> Path:
    key = json.dumps({**dataclasses.asdict(bed), "shipped": _shipped_transformer_hash()}, sort_keys=True)
    return Path.home() / ".cache/flowalign/realign" / hashlib.sha256(key.encode()).hexdigest()[:16]


def build_bed(bed: BedSettings, rebuild: bool = False, log=print) -> Path:
    """The misaligned base's pipeline folder (cached; built when missing or with ``rebuild``)."""
    from flowalign.io import atomic_dir, atomic_write_json
    from flowalign.pocket.assets import T2I_DIR, shipped
    from flowalign.pocket.prompts import load_prompt_file
    from flowalign.pocket.sample import load_pocket_policy
    from pocket_supervised_bound import encode_renders, flow_matching_step

    out = bed_dir(bed)
    if (out / "bed.json").is_file() and not rebuild:
        return out
    t0 = time.time()
    torch.manual_seed(bed.seed)
    policy = load_pocket_policy(train_mode="full")
    captions = [r["prompt"] for r in load_prompt_file(ROOT / "prompts/pocket/train.jsonl")] * bed.copies
    swapped = torch.rand(len(captions), generator=torch.Generator().manual_seed(bed.seed + 1)) < bed.swap_fraction
    scenes = [swap_colors(c) if s else c for c, s in zip(captions, swapped.tolist())]
    latents, cond = encode_renders(policy, captions, scenes, seed=bed.seed + 7)
    opt = torch.optim.AdamW(policy.trainable_parameters(), lr=bed.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(bed.seed)
    for step in range(bed.steps):
        loss = flow_matching_step(policy, opt, latents, cond, bed.batch, g)
        if (step + 1) % 50 == 0:
            log(f"build: step {step + 1}/{bed.steps}, loss {loss.item():.4f}, {time.time() - t0:.0f} s")
    with atomic_dir(out) as tmp:
        shutil.copytree(shipped(T2I_DIR, "text-to-image model"), tmp, dirs_exist_ok=True)
        shutil.rmtree(tmp / "transformer")
        policy.denoiser.save_pretrained(tmp / "transformer")
        atomic_write_json(tmp / "bed.json", {**dataclasses.asdict(bed), "images_swapped": int(swapped.sum()),
                                             "images": len(captions), "build_s": round(time.time() - t0, 1),
                                             "threads": torch.get_num_threads()})
    return out


def held_out(policy, prompts: str) -> dict:
    """Strict gold accuracy per category (and overall) of ``policy`` on ``prompts`` (default sampler, seed 0)."""
    from flowalign.pocket.sample import evaluate_model

    with torch.no_grad():
        return {k: round(v, 4) for k, v in evaluate_model(policy, prompts, seed=0)["gold"]["strict"].items()}


def run_preset(config: str, overrides: list[str], base: Path, seed: int, out: Path, prompts: str, log=print) -> dict:
    """Train ``config`` on the base with ``run.seed=seed``; its curve and the final held-out accuracy."""
    from flowalign.grpo.config import load_config
    from flowalign.grpo.logging import read_metrics
    from flowalign.grpo.trainer import GRPOTrainer

    run_dir = out / f"seed{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = load_config(config, [f"model.path={base}", f"run.output_dir={run_dir}", f"run.seed={seed}",
                               "run.progress=false", "run.tracker=none", *overrides])
    t0 = time.time()
    trainer = GRPOTrainer(cfg, log=log)
    trainer.train()
    train_s = time.time() - t0
    rows = read_metrics(run_dir)
    curve = [{"iteration": r["iteration"], "strict": round(r["eval/pocket_gold"], 4),
              **{k.split("/")[-1]: round(v, 4) for k, v in r.items()
                 if k.startswith("eval/pocket_gold/") and k.split("/")[-1] not in ("strict", "overall", "overall_images")}}
             for r in rows if "eval/pocket_gold" in r]
    rewards = [r["reward/total/mean"] for r in rows if "reward/total/mean" in r]
    thirds = [rewards[i * len(rewards) // 3:(i + 1) * len(rewards) // 3] for i in range(3)]
    iter_s = [r["time/iteration_s"] for r in rows if "time/iteration_s" in r]
    diag = {k: float(f"{_mean(values):.3g}")
            for k in ("train/approx_kl", "train/clipfrac", "train/ratio_mean", "train/adv_abs_mean",
                      "train/zero_std_frac", "train/grad_norm")
            if (values := [r[k] for r in rows if k in r])}  # an objective without ratios logs none
    with trainer.local_denoiser() as policy, trainer.state.ema_weights():
        final = held_out(policy, prompts)
    return {"seed": seed, "train_wall_s": round(train_s, 1),
            "iteration_s_mean": round(_mean(iter_s), 2) if iter_s else None,
            "quick_eval_curve": curve, "train_reward_by_thirds": [round(_mean(t), 4) if t else None for t in thirds],
            "train_diagnostics_mean": diag, "final": final}


def _mean(v) -> float:
    return sum(v) / len(v)


def mean_se(values: list[float]) -> dict:
    """Mean and standard error over seeds (``se`` None for one seed: the JSON holds no NaN)."""
    n = len(values)
    m = _mean(values)
    se = round(math.sqrt(sum((x - m) ** 2 for x in values) / (n - 1) / n), 4) if n > 1 else None
    return {"mean": round(m, 4), "se": se, "n": n}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=None, help="preset to run on the misaligned base (none: base only)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="run.seed of each preset run")
    ap.add_argument("--bound-minutes", type=float, default=0.0, help="supervised bound budget (0: skip)")
    ap.add_argument("--build-steps", type=int, default=BedSettings.steps)
    ap.add_argument("--rebuild", action="store_true", help="build the base again even if cached")
    ap.add_argument("--skip-base-eval", action="store_true")
    ap.add_argument("--prompts", default=str(ROOT / "prompts/pocket/test.jsonl"), help="held-out prompts")
    ap.add_argument("--out", default=str(ROOT / "runs/realign"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides of the preset")
    ns = ap.parse_args(argv)
    torch.set_num_threads(ns.threads)
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731

    from flowalign.io import atomic_write_json
    from flowalign.pocket.sample import load_pocket_policy

    out = Path(ns.out)
    bed = BedSettings(steps=ns.build_steps)
    base = build_bed(bed, rebuild=ns.rebuild, log=log)
    report: dict = {"bed": json.loads((base / "bed.json").read_text()), "base_dir": str(base),
                    "threads": ns.threads, "prompts": ns.prompts}
    cached = base / "held_out.json"
    if not ns.skip_base_eval:
        if not cached.is_file() or Path(ns.prompts) != ROOT / "prompts/pocket/test.jsonl":
            atomic_write_json(cached, held_out(load_pocket_policy(base), ns.prompts))
        report["base"] = json.loads(cached.read_text())
        log("base: " + json.dumps(report["base"]))
    if ns.bound_minutes > 0:
        import pocket_supervised_bound

        import contextlib
        import io

        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            pocket_supervised_bound.main(["--model", str(base), "--minutes", str(ns.bound_minutes), "--lr", "3e-4",
                                          "--threads", str(ns.threads), "--evals", "2", "--prompts", ns.prompts])
        report["supervised_bound"] = json.loads(buf.getvalue())
    if ns.config:
        report.update(config=ns.config, overrides=ns.overrides, runs=[])
        for seed in ns.seeds:
            report["runs"].append(run_preset(ns.config, ns.overrides, base, seed, out, ns.prompts, log=log))
            finals = [r["final"] for r in report["runs"]]
            report["final_mean_se"] = {k: mean_se([f[k] for f in finals]) for k in finals[0]}
            atomic_write_json(out / "realign.json", report)
            log(f"seed {seed}: " + json.dumps(report["runs"][-1]["final"]))
    atomic_write_json(out / "realign.json", report)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
