"""The runner behind ``flowalign eval`` and ``flowalign sample``: load a model (+ LoRA), generate the
images a prompt set asks for, and (eval) score them with a benchmark.

Every image is a file named by its prompt and sample number, drawn from noise that depends only on
``(seed, image number)`` (``flowalign.seeding.sample_noise``), and written atomically. A rerun keeps
the files already there and generates only the missing ones, so a stopped evaluation resumes where
it stopped and gives the same images as an uninterrupted one. Scores are always computed from the
files on disk, so a resumed run and a fresh one score the same pixels.

Benchmarks (``BENCHMARKS``):

=============  ============================================  =========================================
name           prompt file                                   images, scored by
=============  ============================================  =========================================
pocket         pocket prompt file (.jsonl/.txt)              ``images/<i>_<k>.png``, the exact pocket
                                                             evaluator (strict, exact, partial)
geneval        GenEval metadata (.jsonl)                     ``images/<i>/samples/<k>.png`` (GenEval's
                                                             own layout), detector + CLIP + rules
unigenbench    UniGenBench CSV                               ``images/<index>_<k>.png`` (its layout),
                                                             a VLM judge per test point
=============  ============================================  =========================================
"""

from __future__ import annotations

import io
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..errors import UserError

# Sampler defaults per family: (steps, guidance); the pocket model's own for builtin:pocket.
SAMPLER_DEFAULTS = {"sd3": (40, 4.5), "flux": (28, 3.5), "sd_turbo": (1, 0.0), "sdxl_turbo": (1, 0.0)}


@dataclass(frozen=True)
class Job:
    """One image to have: its file, prompt, and noise number (its index in the whole run)."""

    path: Path
    prompt: str
    noise_index: int


# --------------------------------------------------------------------------------------------------
# models


def detect_family(path: str) -> str:
    """The family of a diffusers pipeline folder or hub id, from its ``model_index.json``."""
    from ..models import POCKET_PATH
    from ..models.base import read_model_index
    from ..models.families import FAMILIES

    if path == POCKET_PATH:
        return "sd3"
    index, _ = read_model_index(path)
    found = index.get("_class_name")
    for name, fam in FAMILIES.items():
        if fam.pipeline == found:
            return name
    raise UserError(f"model {path!r} is a diffusers {found}; flowalign generates with "
                     f"{', '.join(f.pipeline for f in FAMILIES.values())} (pass --family if it is one of them)")


def load_generator(model: str, lora: str | None = None, *, family: str | None = None, device: str = "auto",
                   dtype: str = "float32"):
    """A frozen policy (``train_mode='none'``) for ``model`` with the LoRA folder ``lora`` applied."""
    from ..config import ModelConfig
    from ..models import load_policy

    if lora is not None and not Path(lora).is_dir():
        raise UserError(f"--lora {lora!r} is not a folder; give a LoRA folder written by save_adapter() "
                         "(e.g. runs/pocket_flow_grpo/final/lora)")
    cfg = ModelConfig(family=family or detect_family(model), path=model, dtype=dtype, device=device,
                      train_mode="none", lora_init_path=lora)
    return load_policy(cfg)


def default_resolution(policy) -> tuple[int, int]:
    """(height, width) the model was made for: the denoiser's ``sample_size`` × the VAE scale factor."""
    # SD3, FLUX and SDXL pipelines hold it as default_sample_size (FLUX: 128); SD's UNet config has it
    size = getattr(policy.pipe, "default_sample_size", None) or policy.denoiser.config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return h * policy.vae_scale_factor, w * policy.vae_scale_factor


def sampler_defaults(model: str, family: str) -> tuple[int, float]:
    from ..models import POCKET_PATH

    if model == POCKET_PATH:
        from ..pocket.sample import DEFAULT_GUIDANCE, DEFAULT_STEPS

        return DEFAULT_STEPS, DEFAULT_GUIDANCE
    return SAMPLER_DEFAULTS[family]


# --------------------------------------------------------------------------------------------------
# images


def save_png(path: Path, image_CHW: torch.Tensor) -> None:
    """One image [3,H,W] in [0,1] as an 8-bit PNG at its own size, written atomically."""
    from PIL import Image

    from ..io import atomic_write_bytes

    arr = (image_CHW.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def load_pngs(paths: list[Path]) -> torch.Tensor:
    """PNG files (all one size) → images [B,3,H,W] in [0,1]."""
    import numpy as np
    from PIL import Image

    arrs = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float() / 255


@torch.no_grad()
def generate_missing(policy, jobs: list[Job], *, seed: int, steps: int, guidance: float, height: int, width: int,
                     batch: int = 8, progress: bool = True) -> int:
    """Generate the jobs whose file does not exist yet; returns how many were generated."""
    from tqdm import tqdm

    from ..noise_opt.config import GenerationConfig
    from ..noise_opt.search import make_generator
    from ..seeding import sample_noise

    todo = [j for j in jobs if not j.path.is_file()]
    if not todo:
        return 0
    gen = make_generator(policy, GenerationConfig(num_steps=steps, guidance_scale=guidance, height=height,
                                                  width=width, checkpoint=False))
    shape = policy.latent_shape(height, width)
    bar = tqdm(total=len(todo), desc="images", unit="img", disable=not progress, file=sys.stderr)
    for start in range(0, len(todo), batch):
        chunk = todo[start:start + batch]
        noise = sample_noise(shape, seed, [j.noise_index for j in chunk]).to(policy.device)
        images = gen(noise, policy.encode([j.prompt for j in chunk])).float().cpu()
        for j, img in zip(chunk, images):
            save_png(j.path, img)
        bar.update(len(chunk))
    bar.close()
    return len(todo)


def save_grid(out: Path, paths: list[Path], verdicts: list[dict] | None = None, limit: int = 64) -> Path | None:
    """``out/grid.png``: with ``verdicts`` (per image: ``prompt``, ``category``, ``strict``), a labelled
    grid of 8 images per category; without, the first ``limit`` images unlabelled."""
    from ..io import save_image_grid, save_labelled_grid

    if not paths:
        return None
    if verdicts is not None:
        return save_labelled_grid(out / "grid.png", load_pngs(paths), [v["prompt"] for v in verdicts],
                                  [v["strict"] for v in verdicts], [v["category"] for v in verdicts])
    images = load_pngs(paths[:limit])
    scale = max(1, 128 // images.shape[-1])  # 32-pixel pocket images are upscaled to be seen
    return save_image_grid(out / "grid.png", images, nrow=8, scale=scale)


# --------------------------------------------------------------------------------------------------
# benchmarks


class PocketBenchmark:
    name = "pocket"

    def __init__(self, prompts: str, images_per_prompt: int = 1, **_):
        from ..pocket.prompts import load_prompt_file

        self.rows = load_prompt_file(prompts)
        self.n = images_per_prompt

    def jobs(self, out: Path) -> list[Job]:
        return [Job(out / "images" / f"{i:05d}_{k}.png", r["prompt"], i * self.n + k)
                for i, r in enumerate(self.rows) for k in range(self.n)]

    def score(self, jobs: list[Job]) -> tuple[dict, list[dict], str]:
        from ..pocket.evaluate import evaluate, format_report

        specs = [r["spec"] for r in self.rows for _ in range(self.n)]
        from ..pocket.grammar import PromptSpec

        res = evaluate(load_pngs([j.path for j in jobs]), [PromptSpec.from_dict(s) for s in specs])
        per_image = [{"file": str(j.path), "prompt": j.prompt, "category": c, "strict": bool(s), "exact": bool(e),
                      "partial": float(p)}
                     for j, c, s, e, p in zip(jobs, res.categories, res.strict, res.exact, res.partial)]
        summary = res.summary()
        return summary, per_image, format_report(summary)


class GenEvalBenchmark:
    name = "geneval"

    def __init__(self, prompts: str, images_per_prompt: int = 4, detector: str | None = None,
                 clip: str | None = None, device: str = "auto", **_):
        from ..rewards.geneval import geneval
        from . import geneval as G

        self.rows = G.read_metadata(prompts)
        self.n = images_per_prompt
        args = {k: v for k, v in (("detector", detector), ("clip", clip)) if v is not None}
        self.reward = geneval(score="correct", device=None if device == "auto" else device, **args)
        for n, row in enumerate(self.rows, 1):  # every class known to the detector, before any generation
            try:
                self.reward.scorer.check([row])
            except ValueError as err:
                raise UserError(f"{prompts}:{n}: {err}") from None

    def jobs(self, out: Path) -> list[Job]:
        from ..io import atomic_write_text

        jobs = []
        for i, r in enumerate(self.rows):
            folder = out / "images" / f"{i:05d}"
            meta = folder / "metadata.jsonl"
            if not meta.is_file():
                atomic_write_text(meta, json.dumps(r) + "\n")
            jobs += [Job(folder / "samples" / f"{k:04d}.png", r["prompt"], i * self.n + k) for k in range(self.n)]
        return jobs

    def score(self, jobs: list[Job], batch: int = 16) -> tuple[dict, list[dict], str]:
        from . import geneval as G

        metas = [r for r in self.rows for _ in range(self.n)]
        verdicts = []
        for s in range(0, len(jobs), batch):
            v, _ = self.reward.scorer.score(load_pngs([j.path for j in jobs[s:s + batch]]), metas[s:s + batch])
            verdicts += v
        tags = [m["tag"] for m in metas]
        summary = {"correct": G.summarize(tags, [v.correct for v in verdicts]),
                   "strict": G.summarize(tags, [v.strict for v in verdicts]),
                   "partial": G.summarize(tags, [v.score for v in verdicts])}
        per_image = [{"file": str(j.path), "prompt": j.prompt, "tag": m["tag"], "correct": v.correct,
                      "strict": v.strict, "partial": v.score, "reason": "; ".join(v.reasons)}
                     for j, m, v in zip(jobs, metas, verdicts)]
        from ..pocket.evaluate import format_report

        return summary, per_image, format_report(summary)


class UniGenBenchBenchmark:
    name = "unigenbench"

    def __init__(self, prompts: str, images_per_prompt: int = 4, judge_endpoint: str = "http://127.0.0.1:8000/v1",
                 judge_model: str = "CodeGoat24/UniGenBench-EvalModel-qwen-72b-v1", judge_retries: int = 2,
                 judge_timeout: float = 300.0, judge_concurrency: int = 8, language: str = "en", **_):
        from ..rewards.vlm import ChatClient
        from .unigenbench import UniGenBenchJudge, read_items

        self.items = read_items(prompts, language)
        self.n = images_per_prompt
        self.client = ChatClient(judge_endpoint, judge_model, timeout=judge_timeout, retries=judge_retries,
                                 concurrency=judge_concurrency, backoff=0.2)
        self.judge = UniGenBenchJudge(self.client, parse_retries=judge_retries)

    def jobs(self, out: Path) -> list[Job]:
        return [Job(out / "images" / f"{it.index}_{k}.png", it.prompt, i * self.n + k)
                for i, it in enumerate(self.items) for k in range(self.n)]

    def score(self, jobs: list[Job]) -> tuple[dict, list[dict], str]:
        from .unigenbench import format_summary, summarize

        items = [it for it in self.items for _ in range(self.n)]
        try:
            results = self.judge.evaluate([(it, j.path) for it, j in zip(items, jobs)])
        finally:
            self.client.close()
        summary = summarize(results)
        summary["client"] = dict(self.client.stats)
        per_image = [{"file": r.image, "index": r.item.index, "prompt": r.item.prompt,
                      "testpoints": list(r.item.testpoints), "scores": r.scores, "attempts": r.attempts}
                     for r in results]
        return summary, per_image, format_summary(summary)


BENCHMARKS: dict[str, Callable] = {"pocket": PocketBenchmark, "geneval": GenEvalBenchmark,
                                   "unigenbench": UniGenBenchBenchmark}
DEFAULT_IMAGES_PER_PROMPT = {"pocket": 1, "geneval": 4, "unigenbench": 4}


# --------------------------------------------------------------------------------------------------
# the two commands


def run_eval(benchmark: str, prompts: str, out: str | os.PathLike, *, model: str, lora: str | None = None,
             family: str | None = None, images_per_prompt: int | None = None, seed: int = 0,
             steps: int | None = None, guidance: float | None = None, height: int | None = None,
             width: int | None = None, batch: int = 8, device: str = "auto", dtype: str = "float32",
             progress: bool = True, log: Callable[[str], None] = print, **bench_options) -> dict:
    """Generate what is missing, score everything, write ``report.json``, ``results.jsonl`` and
    ``grid.png`` under ``out``; returns the report."""
    from ..io import atomic_write_json, atomic_write_text

    if benchmark not in BENCHMARKS:
        raise UserError(f"unknown benchmark {benchmark!r}; choose one of {', '.join(BENCHMARKS)}")
    n = images_per_prompt or DEFAULT_IMAGES_PER_PROMPT[benchmark]
    if n < 1:
        raise UserError(f"--images-per-prompt must be >= 1, got {n}")
    out = Path(out)
    bench = BENCHMARKS[benchmark](prompts, images_per_prompt=n, device=device, **bench_options)  # bad input fails here
    fam = family or detect_family(model)
    d_steps, d_guidance = sampler_defaults(model, fam)
    steps, guidance = steps or d_steps, d_guidance if guidance is None else guidance
    jobs = bench.jobs(out)
    t0 = time.time()
    missing = sum(not j.path.is_file() for j in jobs)
    generated, res = 0, None
    if missing:
        policy = load_generator(model, lora, family=fam, device=device, dtype=dtype)
        res = (height, width) if height and width else default_resolution(policy)
        log(f"flowalign eval: {benchmark}, {len(jobs)} images ({len(jobs) - missing} kept from an earlier run), "
            f"{res[0]}x{res[1]}, {steps} steps, guidance {guidance}, seed {seed}")
        generated = generate_missing(policy, jobs, seed=seed, steps=steps, guidance=guidance, height=res[0],
                                     width=res[1], batch=batch, progress=progress)
    else:
        log(f"flowalign eval: {benchmark}, all {len(jobs)} images already in {out}/images; scoring them")
    sample_s = time.time() - t0
    summary, per_image, table = bench.score(jobs)
    report = {"benchmark": benchmark, "prompts": str(prompts), "model": model, "lora": lora, "family": fam,
              "images": len(jobs), "images_per_prompt": n, "generated_this_run": generated,
              "kept": len(jobs) - generated, "seed": seed, "steps": steps, "guidance": guidance,
              "resolution": list(res) if res else None, "sample_seconds": round(sample_s, 1), "summary": summary}
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "results.jsonl", "".join(json.dumps(r) + "\n" for r in per_image))
    save_grid(out, [j.path for j in jobs], per_image if benchmark == "pocket" else None)  # pocket: labelled
    log(table)
    log(f"wrote {out}/report.json, {out}/results.jsonl and {out}/grid.png")
    return report


def sample_jobs(prompts: list[str], out: Path, n: int) -> list[Job]:
    """``<i>_<prompt slug>[_<k>].png``: the index makes names unique, the slug keeps them readable and safe."""
    from ..noise_opt.cli import slugify

    return [Job(out / (f"{i:04d}_{slugify(p)}" + (f"_{k}" if n > 1 else "") + ".png"), p, i * n + k)
            for i, p in enumerate(prompts) for k in range(n)]


def run_sample(prompts: list[str], out: str | os.PathLike, *, model: str, lora: str | None = None,
               family: str | None = None, images_per_prompt: int = 1, seed: int = 0, steps: int | None = None,
               guidance: float | None = None, height: int | None = None, width: int | None = None, batch: int = 8,
               device: str = "auto", dtype: str = "float32", progress: bool = True,
               log: Callable[[str], None] = print) -> list[Path]:
    """Images for ``prompts`` at the model's resolution (or ``height`` × ``width``), missing ones only;
    ``out/prompts.jsonl`` maps each file to its prompt."""
    from ..io import atomic_write_text

    if not prompts:
        raise UserError("no prompts given; pass --prompt TEXT or --prompts FILE")
    if images_per_prompt < 1:
        raise UserError(f"--images-per-prompt must be >= 1, got {images_per_prompt}")
    out = Path(out)
    fam = family or detect_family(model)
    d_steps, d_guidance = sampler_defaults(model, fam)
    steps, guidance = steps or d_steps, d_guidance if guidance is None else guidance
    jobs = sample_jobs(prompts, out, images_per_prompt)
    if any(not j.path.is_file() for j in jobs):
        policy = load_generator(model, lora, family=fam, device=device, dtype=dtype)
        h, w = (height, width) if height and width else default_resolution(policy)
        log(f"flowalign sample: {len(jobs)} images at {h}x{w}, {steps} steps, guidance {guidance}, seed {seed}")
        generate_missing(policy, jobs, seed=seed, steps=steps, guidance=guidance, height=h, width=w, batch=batch,
                         progress=progress)
    atomic_write_text(out / "prompts.jsonl", "".join(json.dumps({"file": j.path.name, "prompt": j.prompt}) + "\n"
                                                     for j in jobs))
    log(f"wrote {len(jobs)} images to {out}")
    return [j.path for j in jobs]
