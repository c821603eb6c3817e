"""``flowalign eval``, ``flowalign sample`` and ``flowalign geneval-prompts``.

    flowalign eval pocket --model builtin:pocket --prompts prompts/pocket/test_96.jsonl --out runs/eval_pocket
    flowalign eval geneval --model stabilityai/stable-diffusion-3.5-medium --lora runs/sd35m_geneval/final/lora \\
        --prompts evaluation_metadata.jsonl --out runs/eval_geneval
    flowalign eval unigenbench --model ... --prompts test_prompts_en.csv --judge-endpoint http://127.0.0.1:8000/v1
    flowalign sample --model builtin:pocket --prompt "two red circles" --images-per-prompt 4 --out runs/samples
    flowalign geneval-prompts --test prompts/geneval/test.jsonl --out prompts/geneval/train.jsonl --per-tag 1000

``eval`` writes ``<out>/images/...`` (kept and reused by a rerun: it resumes), ``report.json``
(settings and per-category scores), ``results.jsonl`` (one line per image) and ``grid.png``.
``register(subparsers)`` adds the commands to the ``flowalign`` parser.
"""

from __future__ import annotations

import argparse

from ..errors import UserError, check_output_dir
from ..models.families import FAMILIES


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="builtin:pocket",
                   help="diffusers pipeline folder, hub id, or builtin:pocket (default)")
    p.add_argument("--lora", default=None, help="LoRA folder to apply (written by save_adapter / flowalign train)")
    p.add_argument("--family", default=None, choices=tuple(FAMILIES),
                   help="model family (default: read from the model's model_index.json)")
    p.add_argument("--images-per-prompt", type=int, default=None, help="images per prompt")
    p.add_argument("--seed", type=int, default=0, help="noise seed; image i uses noise (seed, i)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the family's; pocket 20)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the family's; pocket: its calibrated default)")
    p.add_argument("--height", type=int, default=None, help="image height (default: the model's resolution)")
    p.add_argument("--width", type=int, default=None, help="image width (default: the model's resolution)")
    p.add_argument("--batch", type=int, default=8, help="images generated at once")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _size(ns) -> tuple[int | None, int | None]:
    if (ns.height is None) != (ns.width is None):
        raise UserError("give both --height and --width, or neither (the model's resolution)")
    return ns.height, ns.width


def _cmd_eval(ns) -> int:
    from .runner import run_eval

    height, width = _size(ns)
    prompts = ns.prompts or {"pocket": "prompts/pocket/test.jsonl", "geneval": "prompts/geneval/test.jsonl"}.get(
        ns.benchmark)
    if prompts is None:
        raise UserError("--prompts is required for unigenbench (the benchmark's test_prompts_en.csv)")
    options = {}
    if ns.benchmark == "geneval":
        options = {"detector": ns.detector, "clip": ns.clip}
    elif ns.benchmark == "unigenbench":
        options = {"judge_endpoint": ns.judge_endpoint, "judge_model": ns.judge_model,
                   "judge_retries": ns.judge_retries, "judge_timeout": ns.judge_timeout}
    check_output_dir(ns.out or f"runs/eval_{ns.benchmark}", "--out")  # before the model loads
    run_eval(ns.benchmark, prompts, ns.out or f"runs/eval_{ns.benchmark}", model=ns.model, lora=ns.lora,
             family=ns.family, images_per_prompt=ns.images_per_prompt, seed=ns.seed, steps=ns.steps,
             guidance=ns.guidance, height=height, width=width, batch=ns.batch, device=ns.device, dtype=ns.dtype,
             progress=not ns.no_progress, **options)
    return 0


def _cmd_sample(ns) -> int:
    from .runner import run_sample

    height, width = _size(ns)
    if ns.prompt is not None:
        prompts = [ns.prompt.strip()] if ns.prompt.strip() else []
    else:
        from ..prompts import read_prompts

        prompts = [r["prompt"].strip() for r in read_prompts(ns.prompts)]
    check_output_dir(ns.out, "--out")  # before the model loads
    run_sample(prompts, ns.out, model=ns.model, lora=ns.lora, family=ns.family,
               images_per_prompt=ns.images_per_prompt or 1, seed=ns.seed, steps=ns.steps, guidance=ns.guidance,
               height=height, width=width, batch=ns.batch, device=ns.device, dtype=ns.dtype,
               progress=not ns.no_progress)
    return 0


def _cmd_geneval_prompts(ns) -> int:
    from . import geneval as G

    if ns.test:
        test = G.read_metadata(ns.test)
        rows = G.training_set(test, ns.seed, ns.per_tag)
    else:
        rows = G.generate_suite(ns.seed, ns.per_tag)
    G.write_metadata(ns.out, rows)
    counts = {t: sum(r["tag"] == t for r in rows) for t in G.TAGS}
    print(f"wrote {len(rows)} GenEval-format prompts to {ns.out} ({', '.join(f'{t} {n}' for t, n in counts.items())})"
          + (f", none of them in {ns.test}" if ns.test else ""))
    return 0


def register(subparsers) -> None:
    """Add ``eval``, ``sample`` and ``geneval-prompts`` to an argparse subparsers object."""
    fmt = argparse.RawDescriptionHelpFormatter
    p = subparsers.add_parser("eval", help="generate a benchmark's images with a model (+ LoRA) and score them "
                                           "(pocket, geneval, unigenbench); resumable",
                              description="Generate a benchmark's images with a model (+ LoRA), resuming what "
                                          "an earlier run left, and score them.",
                              epilog="examples:\n" + __doc__.split("\n\n")[1],
                              formatter_class=fmt)
    p.add_argument("benchmark", choices=("pocket", "geneval", "unigenbench"))
    p.add_argument("--prompts", default=None, help="the benchmark's prompt file (pocket .jsonl, GenEval metadata "
                                                   ".jsonl, UniGenBench .csv)")
    p.add_argument("--out", default=None, help="output folder (default runs/eval_<benchmark>); a rerun resumes")
    _model_args(p)
    p.add_argument("--detector", default=None, help="geneval: transformers detector id or folder "
                                                    "(default facebook/mask2former-swin-small-coco-instance)")
    p.add_argument("--clip", default=None, help="geneval: CLIPModel id or folder for colors "
                                                "(default openai/clip-vit-large-patch14)")
    p.add_argument("--judge-endpoint", default="http://127.0.0.1:8000/v1", help="unigenbench: the judge's /v1 URL")
    p.add_argument("--judge-model", default="CodeGoat24/UniGenBench-EvalModel-qwen-72b-v1",
                   help="unigenbench: the judge's model name")
    p.add_argument("--judge-retries", type=int, default=2,
                   help="unigenbench: retries of a failed request, and again of an unparsable answer")
    p.add_argument("--judge-timeout", type=float, default=300.0, help="unigenbench: seconds per request")
    p.set_defaults(func=_cmd_eval)

    s = subparsers.add_parser("sample", help="images from a model (+ LoRA) for prompts, at the model's resolution")
    what = s.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="one prompt")
    what.add_argument("--prompts", help="a prompt file (.txt or .jsonl)")
    s.add_argument("--out", default="runs/samples", help="output folder (default runs/samples)")
    _model_args(s)
    s.set_defaults(func=_cmd_sample)

    g = subparsers.add_parser("geneval-prompts", help="write GenEval-format prompt metadata from GenEval's templates "
                                                      "(with --test: a training set sharing no prompt with it)")
    g.add_argument("--out", required=True, help=".jsonl file to write")
    g.add_argument("--test", default=None, help="test metadata whose prompts the set must not contain")
    g.add_argument("--per-tag", type=int, default=100, help="prompts per tag (single_object has 80 at most)")
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(func=_cmd_geneval_prompts)
