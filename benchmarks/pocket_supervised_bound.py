"""How far can the shipped pocket model move in the main job's budget with *perfect* supervision?

An upper-bound check for the GRPO target (issue: +0.25 held-out strict in 20 minutes on 2 cores).
Instead of rewards, the model gets the ground truth: the pocket world's own renders of the RL
training prompts (``prompts/pocket/train.jsonl``, ``--copies`` renders each), encoded by the model's
VAE, and is trained with the flow-matching loss it was built with (logit-normal t, 10% CFG dropout),
through the same LoRA as the GRPO preset (or the full transformer) for a wall-clock budget. Held-out
strict gold accuracy (384 test prompts, the default sampler: 20 ODE steps, CFG 2.0, seed 0 — the
numbers of ``benchmarks/grpo_pocket.py``) is measured before and at ``--evals`` points (eval time
not counted). Prints JSON.

    python benchmarks/pocket_supervised_bound.py --minutes 10 --threads 2      # gate 5 of the pocket world

Measured on the 12 000-step oracle misaligned by 300 steps (2 uncontended cores, LoRA r32, lr 1e-3, batch 64):
the shipped base (misaligned at 5e-4; ``calibration.json`` gate 5) 0.552 → 0.771 / 0.802 / 0.773 after 5 / 10 / 15
minutes; the candidates misaligned at 7e-4 and 1e-3 0.516 → 0.771 / 0.805 and 0.451 → 0.786 / 0.799 after 5 / 10
minutes (the 1e-3 run: 983 / 1 973 steps) — clean renders of the training
prompts carry these bases to ~0.80 held-out in 10 minutes whatever they start from. lr 1e-3 is the default
since then: at 3e-4 the 5e-4 candidate reached 0.789 at 10 minutes (1 480 steps, a contended machine).

Measured on the first world (2026-11-27, one core shared with another job, LoRA r32, lr 3e-4, batch 64): base 0.659;
0.677 / 0.672 / 0.693 / 0.656 after 5 / 10 / 15 / 20 minutes (320 / 628 / 896 / 1179 steps); full
transformer, lr 1e-4 (``--train-mode full --lr 1e-4``): 0.667 / 0.667 / 0.688 / 0.643 (278 / 570 / 838 /
1094 steps) — ground-truth images of the training prompts do not lift held-out accuracy by more than
the eval's ±0.02 in the budget either.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="training wall-clock budget (evals excluded)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--train-mode", default="lora", choices=("lora", "full"))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--copies", type=int, default=4, help="renders per training prompt line")
    ap.add_argument("--evals", type=int, default=4, help="held-out evaluations spread over the budget")
    ap.add_argument("--prompts", default="prompts/pocket/test.jsonl", help="held-out prompts")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--guidance", type=float, default=None,
                    help="CFG of the held-out evaluation (default: the pocket default sampler's)")
    ap.add_argument("--model", default=None, help="pocket model folder (default: the shipped one)")
    ns = ap.parse_args(argv)
    torch.set_num_threads(ns.threads)

    from flowalign.pocket.prompts import load_prompt_file
    from flowalign.pocket.sample import evaluate_model, load_pocket_policy

    guidance = {} if ns.guidance is None else {"guidance_scale": ns.guidance}

    policy = load_pocket_policy(ns.model, train_mode=ns.train_mode, lora_rank=32, lora_alpha=64)
    prompts = [r["prompt"] for r in load_prompt_file("prompts/pocket/train.jsonl")] * ns.copies
    latents, cond = encode_renders(policy, prompts, prompts, seed=ns.seed + 7)
    opt = torch.optim.AdamW(policy.trainable_parameters(), lr=ns.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(ns.seed)

    def held_out() -> float:
        with torch.no_grad():
            return round(evaluate_model(policy, ns.prompts, seed=0, **guidance)["gold"]["strict"]["overall"], 4)

    curve = [{"minutes": 0.0, "steps": 0, "strict": held_out()}]
    print(json.dumps(curve[-1]), file=sys.stderr, flush=True)
    budget = ns.minutes * 60
    trained, step, B = 0.0, 0, ns.batch
    for k in range(1, ns.evals + 1):
        t0 = time.perf_counter()
        while trained + (time.perf_counter() - t0) < budget * k / ns.evals:
            loss = flow_matching_step(policy, opt, latents, cond, B, g)
            step += 1
        trained += time.perf_counter() - t0
        curve.append({"minutes": round(trained / 60, 2), "steps": step, "loss": round(loss.item(), 4),
                      "strict": held_out()})
        print(json.dumps(curve[-1]), file=sys.stderr, flush=True)
    print(json.dumps({"model": ns.model, "guidance": ns.guidance, "train_mode": ns.train_mode, "lr": ns.lr, "batch": B, "threads": ns.threads,
                      "training_images": len(prompts), "curve": curve}, indent=1))
    return 0


def encode_renders(policy, captions: list[str], scenes: list[str], seed: int):
    """Render ``scenes[i]`` (prompt text), encode it with the model's VAE, and condition it on
    ``captions[i]`` → (latents [N, C, h, w], Cond with N rows)."""
    from flowalign.pocket.render import render_batch

    images, _ = render_batch(scenes, seed=seed)
    vae = policy.vae
    with torch.no_grad():
        x = torch.from_numpy(images) * 2 - 1
        latents = torch.cat([
            (vae.encode(x[i:i + 512]).latent_dist.mean - vae.config.shift_factor) * vae.config.scaling_factor
            for i in range(0, len(x), 512)])
        cond = policy.encode(captions)
    return latents, cond


def flow_matching_step(policy, opt, latents, cond, batch: int, g: torch.Generator) -> torch.Tensor:
    """One optimizer step of the loss the pocket model was built with (logit-normal t, 10% CFG
    dropout) on ``batch`` random rows of (latents, cond) → the loss."""
    from flowalign.models.base import Cond

    idx = torch.randint(len(latents), (batch,), generator=g)
    x0, c = latents[idx], cond[idx]
    drop = torch.rand(batch, generator=g) < 0.1
    c = Cond(torch.where(drop[:, None, None], c.neg_embeds, c.embeds),
             torch.where(drop[:, None], c.neg_pooled, c.pooled))
    t = torch.sigmoid(torch.randn(batch, generator=g))
    eps = torch.randn(x0.shape, generator=g)
    tb = t[:, None, None, None]
    v = policy.velocity((1 - tb) * x0 + tb * eps, t, c, 1.0)
    loss = ((v - (eps - x0)) ** 2).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss


if __name__ == "__main__":
    sys.exit(main())
