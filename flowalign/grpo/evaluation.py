"""Held-out evaluation during training: ODE samples of the eval prompts from fixed noise, scored by the
eval rewards.

Metrics (main process): ``eval/reward`` (the eval reward's total), ``eval/<reward>`` (each reward's
mean score) and whatever each reward reports in its info: a per-image tensor as
``eval/<reward>/<field>`` (its mean), a dict of numbers (a breakdown, e.g. per category) entry by
entry as ``eval/<reward>/<entry>``; plus ``time/eval_s``. A grid goes to
``<output_dir>/eval/iter_XXXXXX.png``: with the pocket gold reward among the eval rewards, 8 images of
each category labelled with their prompts and strict verdicts; otherwise the first 64 images.
"""

from __future__ import annotations

import numbers
import time
from pathlib import Path

import torch

from ..io import save_image_grid, save_labelled_grid
from ..seeding import sample_noise

__all__ = ["Evaluator", "eval_metrics"]


class Evaluator:
    """``num_images`` images per prompt of ``rows`` (prompt rows with their metadata); image i of the
    set starts from ``sample_noise(latent_shape, seed, [i], stream=noise_stream)``, so every evaluation
    of a run (and of a resumed run) sees the same noise."""

    def __init__(self, rows: list[dict], reward, eval_cfg, sampling, latent_shape, *, noise_stream: int,
                 output_dir: str | Path):
        self.rows, self.reward, self.cfg, self.sampling = rows, reward, eval_cfg, sampling
        self.latent_shape, self.noise_stream = latent_shape, noise_stream
        self.output_dir = Path(output_dir)

    @torch.no_grad()
    def sample(self, policy) -> tuple[torch.Tensor, list[str]]:
        """The eval images [N, 3, H, W] in [0, 1] (on the CPU) and their prompts."""
        e, s = self.cfg, self.sampling
        prompts = [r["prompt"] for r in self.rows for _ in range(e.num_images)]
        out = []
        for a in range(0, len(prompts), e.batch_size):
            chunk = prompts[a:a + e.batch_size]
            noise = sample_noise(self.latent_shape, e.seed, range(a, a + len(chunk)), stream=self.noise_stream)
            out.append(policy.generate(noise.to(policy.device), policy.encode(chunk), num_steps=s.eval_num_steps,
                                       guidance_scale=s.guidance_scale, shift=s.shift, checkpoint=False).cpu())
        return torch.cat(out), prompts

    @torch.no_grad()
    def __call__(self, policy, iteration: int) -> dict:
        """Sample, score and save the grid of ``iteration`` → metrics."""
        t0 = time.time()
        images, prompts = self.sample(policy)
        metas = [{k: v for k, v in r.items() if k != "prompt"} for r in self.rows for _ in range(self.cfg.num_images)]
        total, info = self.reward(images, prompts, metas)
        metrics = eval_metrics(total, info, len(images))
        self.save_grid(self.output_dir / "eval" / f"iter_{iteration:06d}.png", images, prompts, info)
        metrics["time/eval_s"] = time.time() - t0
        return metrics

    @staticmethod
    def save_grid(path: Path, images: torch.Tensor, prompts: list[str], info) -> None:
        """Labelled by the pocket gold reward's verdicts when a ``MultiReward`` holding it scored the set."""
        from ..pocket.evaluate import PocketGold

        gold = info.get("info", {}).get(PocketGold.name) if isinstance(info, dict) else None
        if gold is None:
            save_image_grid(path, images[:64], nrow=8, scale=max(1, 128 // images.shape[-1]))
            return
        save_labelled_grid(path, images, prompts, gold["strict"].bool().tolist(), gold["categories"])


def eval_metrics(total: torch.Tensor, info, n: int) -> dict[str, float]:
    """The metrics of one scored eval set of ``n`` images (module docstring); ``info`` as a
    ``MultiReward`` returns it (``per_reward``, ``info``)."""
    metrics = {"eval/reward": float(total.mean())}
    per = info.get("per_reward", {}) if isinstance(info, dict) else {}
    for key, scores in per.items():
        metrics[f"eval/{key}"] = float(scores.float().mean())
        for field, val in info["info"].get(key, {}).items():
            if torch.is_tensor(val) and val.ndim == 1 and len(val) == n:
                metrics[f"eval/{key}/{field}"] = float(val.float().mean())
            elif isinstance(val, dict) and val and all(isinstance(v, numbers.Number) for v in val.values()):
                for entry, v in val.items():
                    metrics[f"eval/{key}/{entry}"] = float(v)
    return metrics
