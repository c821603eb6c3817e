"""Sampling and gold evaluation of pocket (SD3-format) models through the SD3 adapter."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

DEFAULT_STEPS = 20  # the pocket model's default ODE step count
DEFAULT_GUIDANCE = 2.0  # and CFG scale: the base's best in the calibration sweep (weights/calibration.json)
IMAGE_SIZE = 32


def load_pocket_policy(path: str | os.PathLike | None = None, **options):
    """An ``SD3Policy`` on a pocket model folder (default: the shipped one), on CPU in float32 unless
    ``options`` say otherwise (see ``Policy.__init__``)."""
    from ..models.sd3 import SD3Policy
    from .assets import T2I_DIR, shipped

    folder = shipped(T2I_DIR, "text-to-image model") if path is None else path
    opts = {"device": "cpu", "dtype": "float32", "train_mode": "none", **options}
    return SD3Policy.from_pretrained(folder, **opts)


def initial_noise(policy, n: int, seed: int, size: int = IMAGE_SIZE, offset: int = 0) -> torch.Tensor:
    """Noise for samples ``offset .. offset+n-1``; sample i depends only on (seed, i), so any subset
    of a prompt file gets the same images as the whole file (``flowalign.seeding.sample_noise``)."""
    from ..seeding import sample_noise

    return sample_noise(policy.latent_shape(size, size), seed, range(offset, offset + n))


@torch.no_grad()
def sample_images(policy, prompts: list[str], *, seed: int = 0, num_steps: int = DEFAULT_STEPS,
                  guidance_scale: float = DEFAULT_GUIDANCE, size: int = IMAGE_SIZE, batch: int = 64) -> torch.Tensor:
    """ODE samples (Euler, CFG in one batched forward) → images [N,3,size,size] in [0,1]."""
    out = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        noise = initial_noise(policy, len(chunk), seed, size, offset=i).to(policy.device)
        cond = policy.encode(chunk)
        out.append(policy.generate(noise, cond, num_steps=num_steps, guidance_scale=guidance_scale, checkpoint=False))
    return torch.cat(out).cpu()


def evaluate_model(policy, prompts_file: str | os.PathLike, *, seed: int = 0, num_steps: int = DEFAULT_STEPS,
                   guidance_scale: float = DEFAULT_GUIDANCE, limit_per_category: int | None = None,
                   out_dir: str | os.PathLike | None = None) -> dict:
    """Gold accuracy of a pocket model on a prompt file (per category: strict, exact, partial).
    With ``out_dir``: writes ``report.json`` and ``grid.png`` (8 samples of each category, labelled with
    their prompts and strict verdicts)."""
    from ..io import atomic_write_json, save_labelled_grid
    from .evaluate import evaluate
    from .prompts import limit_per_category as limit_rows
    from .prompts import load_prompt_file

    rows = load_prompt_file(prompts_file)
    rows = limit_rows(rows, limit_per_category)
    prompts = [r["prompt"] for r in rows]
    t0 = time.time()
    images = sample_images(policy, prompts, seed=seed, num_steps=num_steps, guidance_scale=guidance_scale)
    sample_s = time.time() - t0
    result = evaluate(images, prompts)
    summary = result.summary()
    report = {"prompts_file": str(prompts_file), "images": len(prompts), "seed": seed, "num_steps": num_steps,
              "guidance_scale": guidance_scale, "sample_seconds": round(sample_s, 1), "gold": summary}
    if out_dir is not None:
        out = Path(out_dir)
        atomic_write_json(out / "report.json", report)
        save_labelled_grid(out / "grid.png", images, prompts, result.strict.tolist(), result.categories)
    return report
