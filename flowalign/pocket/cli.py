"""``flowalign pocket ...``: the pocket world from the command line.

    flowalign pocket render "two red circles" --out file.png [--size 32] [--seed 0] [--scale 8]
    flowalign pocket eval [--model DIR] [--lora DIR] [--prompts FILE] [--steps 20] [--guidance 2] [--out DIR]
    flowalign pocket build [--out DIR] [--preset base|oracle|legacy] [--captions clean|noisy] [--set K=V] [--quick]
    flowalign pocket gates --models DIR [--oracle DIR] [--pass-at-k FILE] [--bound FILE]

``register(subparsers)`` adds the ``pocket`` command to the ``flowalign`` parser. ``python -m flowalign.pocket.cli ...``
runs the same command without the rest of the CLI.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys

from ..errors import UserError, check_output_dir, run_command
from ..io import atomic_write_bytes


def _cmd_render(ns) -> int:
    from .render import render_scene, to_pil

    if ns.scale < 1:
        raise UserError(f"--scale must be 1 or more, got {ns.scale}")
    check_output_dir(os.path.dirname(ns.out) or ".", "--out")
    image, scene = render_scene(ns.prompt, seed=ns.seed, size=ns.size)
    buf = io.BytesIO()
    to_pil(image, ns.scale).save(buf, format="PNG")
    atomic_write_bytes(ns.out, buf.getvalue())
    print(json.dumps({"out": ns.out, "prompt": ns.prompt, **scene.to_dict()}))
    return 0


def _cmd_eval(ns) -> int:
    from ..io import check_safetensors
    from .evaluate import format_report
    from .prompts import load_prompt_file
    from .sample import evaluate_model, load_pocket_policy

    # everything that can fail without the model, before loading it
    for flag, value, low in (("--steps", ns.steps, 1), ("--limit-per-category", ns.limit_per_category, 1)):
        if value is not None and value < low:
            raise UserError(f"{flag} must be {low} or more, got {value}")
    if not ns.guidance >= 0:
        raise UserError(f"--guidance must be a number >= 0, got {ns.guidance}")
    check_output_dir(ns.out, "--out")
    load_prompt_file(ns.prompts)
    if ns.lora:
        if not os.path.isdir(ns.lora):
            raise UserError(f"--lora {ns.lora!r} is not a folder; give a LoRA folder such as "
                            "runs/pocket_flow_grpo/final/lora")
        check_safetensors(ns.lora, "--lora")
    policy = load_pocket_policy(ns.model, **({"lora_init_path": ns.lora} if ns.lora else {}))
    report = evaluate_model(policy, ns.prompts, seed=ns.seed, num_steps=ns.steps, guidance_scale=ns.guidance,
                            limit_per_category=ns.limit_per_category, out_dir=ns.out)
    print(f"{report['images']} images from {ns.prompts} ({ns.steps} ODE steps, CFG {ns.guidance}, seed {ns.seed}, "
          f"{report['sample_seconds']} s sampling)")
    print(format_report(report["gold"]))
    print(f"wrote {ns.out}/report.json and {ns.out}/grid.png")
    return 0


def _cmd_build(ns) -> int:
    from .build import BuildConfig, BuildStopped, build
    from .evaluate import format_report
    from .prompts import load_prompt_file

    try:
        cfg = BuildConfig.preset(ns.preset, quick=ns.quick)
        overrides = [f"seed={ns.seed}"] + ([f"captions={ns.captions}"] if ns.captions else []) + list(ns.set)
        cfg = cfg.with_overrides(overrides)
    except ValueError as e:  # the build settings' own checks (flowalign/pocket/build.py)
        raise UserError(f"{e}") from None
    check_output_dir(ns.out, "--out")
    if ns.work is not None:
        check_output_dir(ns.work, "--work")
    load_prompt_file(ns.prompts)
    if ns.snapshot:
        return _snapshot(ns, cfg)
    try:
        report = build(ns.out, cfg, work_dir=ns.work, test_prompts=ns.prompts,
                       max_seconds=None if ns.max_minutes is None else 60 * ns.max_minutes, sweep=ns.sweep,
                       threads=ns.threads or os.cpu_count() or 1)
    except BuildStopped as e:
        print(f"flowalign pocket build: {e}; its state is saved, run the same command again to resume")
        return 3
    print(f"built into {ns.out} ({report['seconds_this_run']} s per stage in this run)")
    print("pocket CLIP zero-shot pick among hard negatives:",
          ", ".join(f"{k} {v:.3f}" for k, v in report["clip_zero_shot"].items()))
    if "default_sampler" in report:
        print(format_report(report["default_sampler"]["gold"]))
    return 0


def _snapshot(ns, cfg) -> int:
    from .build import snapshot, snapshot_stage
    from .evaluate import format_report
    from .sample import evaluate_model, load_pocket_policy

    step = snapshot(ns.out, cfg, work_dir=ns.work)
    stage = snapshot_stage(cfg, ns.work)
    total = cfg.misalign_steps if stage.name == "misalign" else cfg.t2i_steps
    report = evaluate_model(load_pocket_policy(f"{ns.out}/t2i"), ns.prompts, limit_per_category=16,
                            out_dir=f"{ns.out}/snapshot_eval")
    print(f"T2I snapshot ({stage.dir.name}) at step {step} of {total} in {ns.out}/t2i; "
          "16 held-out prompts per category:")
    print(format_report(report["gold"]))
    return 0


def _read_json(path: str, flag: str, keys: tuple[str, ...],
               fix: str = "give the JSON file its benchmark wrote") -> dict:
    """A JSON file named on the command line, checked for the keys the gates read; ``fix`` ends each error."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{flag}: {path!r} does not exist; {fix}") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{flag}: {path!r} is not readable JSON ({e}); {fix}") from None
    missing = [k for k in keys if not isinstance(data, dict) or k not in data]
    if missing:
        raise UserError(f"{flag}: {path!r} has no {missing[0]!r}; {fix}")
    return data


def _cmd_gates(ns) -> int:
    from ..io import atomic_write_json
    from .gates import gate_report, oracle_at, split_leaks
    from .prompts import load_prompt_file
    from .sample import evaluate_model, load_pocket_policy

    path = os.path.join(ns.models, "calibration.json")
    cal = _read_json(path, "--models", ("default_sampler",),
                     fix="give a `flowalign pocket build` output folder (its calibration.json)")
    if ns.pass_at_k:
        cal["pass_at_k"] = _read_json(ns.pass_at_k, "--pass-at-k", ("K", "strict"))
    if ns.bound:
        cal["supervised_bound"] = _read_json(ns.bound, "--bound", ("curve",))
    test_rows = load_prompt_file(ns.prompts)
    train_rows = load_prompt_file(ns.train_prompts)
    if ns.oracle:
        if not os.path.isfile(os.path.join(ns.oracle, "model_index.json")):
            raise UserError(f"--oracle {ns.oracle!r} is not a pocket pipeline folder (no model_index.json); give "
                            "the t2i/ folder of a `flowalign pocket build --captions clean` output")
        ds = cal["default_sampler"]
        report = evaluate_model(load_pocket_policy(ns.oracle), ns.prompts, seed=ds.get("seed", 0),
                                num_steps=ds["num_steps"], guidance_scale=ds["guidance_scale"])
        # the paths as given: a shipped calibration.json names no build machine's folders
        cal.setdefault("oracle", {}).update({"model": ns.oracle, "prompts": ns.prompts,
                                             "strict_default": report["gold"]["strict"]})
    pass_at_k = cal.get("pass_at_k")
    if pass_at_k is None and "pass_at_12" in cal:  # files assembled before this command: the per-category table
        pass_at_k = {"K": 12, "strict": cal["pass_at_12"]}
    cal["gates"] = gate_report(cal, oracle=oracle_at(cal), pass_at_k=pass_at_k, bound=cal.get("supervised_bound"),
                               leaks=split_leaks([r["prompt"] for r in train_rows], [r["prompt"] for r in test_rows]),
                               prompts=len(test_rows))
    atomic_write_json(path, cal)
    for name, g in cal["gates"].items():
        verdict = {True: "holds", False: "FAILS", None: "not measured"}[g["pass"]]
        shown = {k: v for k, v in g.items() if k not in ("target", "pass", "curve", "command", "test")}
        print(f"gate {name:<17} {verdict:<12} {g['target']}")
        print(f"    {json.dumps(shown)}" + (f"\n    measure: {g['command']}" if g["pass"] is None and "command" in g else ""))
    print(f"wrote the gates into {path}")
    return 0


def register(subparsers) -> None:
    """Add ``pocket`` (with its subcommands) to an argparse subparsers object."""
    p_pocket = subparsers.add_parser("pocket", help="the pocket world: a text-to-image world small enough for a CPU")
    sub = p_pocket.add_subparsers(dest="pocket_command", required=True)

    p_render = sub.add_parser(
        "render",
        help="draw a scene for a prompt of the pocket grammar and save it as a PNG "
        "(prints the scene spec as JSON)",
    )
    p_render.add_argument("prompt", help="e.g. 'two red circles' or 'a blue square to the left of a yellow triangle'")
    p_render.add_argument("--out", required=True, help="PNG file to write")
    p_render.add_argument("--size", type=int, default=32, help="image side in pixels (default 32, at least 24)")
    p_render.add_argument("--seed", type=int, default=0, help="layout and color seed (default 0)")
    p_render.add_argument("--scale", type=int, default=1,
                          help="upscale the saved PNG this many times, nearest neighbour, for viewing (default 1)")
    p_render.set_defaults(func=_cmd_render)

    from .sample import DEFAULT_GUIDANCE, DEFAULT_STEPS

    p_eval = sub.add_parser("eval", help="sample a pocket (SD3-format) model on a prompt file and print its "
                                         "gold accuracy per category; writes report.json and grid.png")
    p_eval.add_argument("--model", default=None, help="SD3 pipeline folder (default: the shipped pocket model)")
    p_eval.add_argument("--lora", default=None, help="LoRA folder to apply (e.g. runs/pocket_flow_grpo/final/lora)")
    p_eval.add_argument("--prompts", default="prompts/pocket/test.jsonl", help="prompt file (.txt or .jsonl)")
    p_eval.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"ODE steps (default {DEFAULT_STEPS})")
    p_eval.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE,
                        help=f"CFG scale (default {DEFAULT_GUIDANCE})")
    p_eval.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p_eval.add_argument("--limit-per-category", type=int, default=None, help="evaluate at most N prompts per category")
    p_eval.add_argument("--out", default="runs/pocket_eval", help="output folder (default runs/pocket_eval)")
    p_eval.set_defaults(func=_cmd_eval)

    p_build = sub.add_parser("build", help="train the pocket models from scratch (deterministic for a seed) "
                                           "and print their calibration")
    from .build import BASE_MISALIGN, CAPTION_REGIMES, PRESETS

    p_build.add_argument("--out", default="pocket_models", help="output folder (clip/, t2i/, calibration.json)")
    p_build.add_argument("--preset", default="base", choices=PRESETS,
                         help="base (alt-text-like captions, shipped), oracle (clean captions), legacy (the first "
                              "world: frozen CLIP text conditioning)")
    p_build.add_argument("--captions", default=None, choices=CAPTION_REGIMES,
                         help="caption regime, overriding the preset's (clean = the oracle)")
    p_build.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="override a build setting, e.g. t2i_steps=3000 or noise.wrong_relation=0.3 (repeatable); "
                              "misalign_steps=N (noisy captions): the base's T2I model is the oracle's fine-tuned N "
                              "steps on the noisy captions at misalign_lr, the oracle's T2I stage shared with "
                              f"--captions clean (the base preset: {BASE_MISALIGN[0]} steps at {BASE_MISALIGN[1]:g}); 0: trained from "
                              "scratch on them")
    p_build.add_argument("--work", default=None,
                         help="stage cache (default ~/.cache/flowalign/pocket-build); a stopped build resumes from it")
    p_build.add_argument("--seed", type=int, default=0)
    p_build.add_argument("--prompts", default="prompts/pocket/test.jsonl", help="held-out prompts for calibration")
    p_build.add_argument("--quick", action="store_true", help="a minutes-long smoke build (poor models)")
    p_build.add_argument("--max-minutes", type=float, default=None,
                         help="stop (saving a resumable checkpoint) after this many minutes; exit code 3")
    p_build.add_argument("--sweep", action="store_true", help="also measure the model over steps x CFG")
    p_build.add_argument("--threads", type=int, default=None, help="torch threads (default: every core)")
    p_build.add_argument("--snapshot", action="store_true",
                         help="train nothing: export the T2I stage as it stands (last checkpoint, EMA weights; the "
                              "misalign stage's last weights once it has begun) to OUT/t2i and score it on 16 "
                              "prompts per category")
    p_build.set_defaults(func=_cmd_build)

    p_gates = sub.add_parser("gates", help="compute the six gates of a pocket build (README: Building the pocket "
                                           "models) from its measurements and write them into its calibration.json")
    p_gates.add_argument("--models", required=True,
                         help="a `flowalign pocket build` output folder (its calibration.json is read and rewritten)")
    p_gates.add_argument("--oracle", default=None,
                         help="the oracle's t2i/ folder (`flowalign pocket build --captions clean`): scored at the "
                              "base's default sampler on --prompts and recorded (else a recorded score is used)")
    p_gates.add_argument("--pass-at-k", default=None, help="JSON written by benchmarks/pocket_pass_at_k.py --seeds 12")
    p_gates.add_argument("--bound", default=None, help="JSON written by benchmarks/pocket_supervised_bound.py")
    p_gates.add_argument("--prompts", default="prompts/pocket/test.jsonl", help="held-out prompts")
    p_gates.add_argument("--train-prompts", default="prompts/pocket/train.jsonl", help="the RL training prompts")
    p_gates.set_defaults(func=_cmd_gates)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flowalign")
    register(parser.add_subparsers(dest="command", required=True))
    ns = parser.parse_args(argv)
    return run_command(f"flowalign pocket {ns.pocket_command}", ns.func, ns)


if __name__ == "__main__":
    sys.exit(main())
