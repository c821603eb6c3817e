"""ReNO: reward-based noise optimization (Eyring et al. 2024), batched over independent prompts.

One iteration (``iterations`` of them; the paper code's loop, ``training/trainer.py``):

    images = G(ε)                                   one generator call (differentiable)
    r_i    = reward_i(images, prompt)               per reward, per sample
    total  = Σ_i w_i·r_i                            the best iterate is the one with the largest total
    L      = Σ_i w_i·(c_i − r_i) + λ·R(ε)           R: χ-norm regularizer (objective.py)
    ε     ← optimizer step on clip(∇_ε L)           not after the last call

so ``iterations`` generator calls are made per noise and the best image among them is kept (by the
reward total, regularizer excluded). With ``multi_clip`` (CARINOX) each weighted reward's gradient
and the regularizer's are clipped separately and then summed.

Batching: B prompts' noises are optimized together, each with its own loss; gradients are taken of
Σ_b L_b, which equals each L_b's own gradient because the generator and rewards treat samples
independently; clipping is per sample and SGD/Adam act elementwise, so every sample follows exactly
the single-prompt trajectory (up to float summation order in batched kernels).
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from ..errors import UserError
from ..seeding import sample_noise
from .config import GenerationConfig, OptimConfig
from .objective import chi_norm_regularizer, clip_rows, multi_clip_sum, row_norms
from .search import (
    BestSoFar, Result, RewardTerm, check_prompts, make_generator, progress_bar, resolve_options, reward_terms,
    reward_total, score_terms, start_noise,
)

__all__ = [
    "Result", "RewardTerm", "reward_terms", "make_generator", "sample_noise", "optimize_noise", "reno", "reno_batch",
]


def _require_differentiable(terms: list[RewardTerm], method: str) -> None:
    bad = [t.key for t in terms if not getattr(t.reward, "differentiable", False)]
    if bad:
        raise UserError(f"{method} optimizes the noise by gradient and needs differentiable rewards; {bad} "
                         f"{'is' if len(bad) == 1 else 'are'} not (use best_of_n for those, or rewards like "
                         f"clip, hpsv2.1, pickscore, imagereward, aesthetic, pocket_clip)")


def _make_optimizer(param: torch.Tensor, o: OptimConfig) -> torch.optim.Optimizer:
    if o.optimizer == "sgd":
        return torch.optim.SGD([param], lr=o.lr, momentum=o.momentum, nesterov=o.nesterov and o.momentum > 0)
    return torch.optim.Adam([param], lr=o.lr, betas=tuple(o.adam_betas))


# --------------------------------------------------------------------------------------------------
# ReNO


def optimize_noise(
    generate: Callable,
    cond,
    terms: list[RewardTerm],
    prompts: list[str],
    noise0_B: torch.Tensor,
    optim: OptimConfig,
    *,
    metadata: list[dict] | None = None,
    reward_checkpoint: bool = False,
    device=None,
    progress: bool = False,
    on_iteration: Callable | None = None,
    method: str = "reno",
) -> list[Result]:
    """The ReNO loop on a batch of noises [B, ...] (module docstring); one ``Result`` per row.

    ``generate(noise, cond)`` is the differentiable generator (``make_generator``), ``cond`` its
    conditioning for the B rows. ``on_iteration(iteration, images_B, records_B)`` is called after
    each generator call (e.g. to save every image).
    """
    _require_differentiable(terms, method)
    multi_clip = optim.multi_clip if optim.multi_clip is not None else method == "carinox"
    t0 = time.time()
    B = noise0_B.shape[0]
    device = device if device is not None else noise0_B.device
    noise = noise0_B.detach().to(device, torch.float32).clone().requires_grad_(True)
    opt = _make_optimizer(noise, optim)
    histories: list[list[dict]] = [[] for _ in range(B)]
    best = BestSoFar(B)
    bar = progress_bar(progress, optim.iterations, f"{method} ({B} prompt{'s' if B > 1 else ''})")
    for it in range(optim.iterations):
        last = it == optim.iterations - 1
        with torch.set_grad_enabled(not last):
            images = generate(noise, cond)
            scores = score_terms(terms, images, prompts, metadata, reward_checkpoint)
        total_B = reward_total(terms, scores).cpu()
        imgs_cpu = images.detach().float().cpu()
        best.update(it, total_B, imgs_cpu, noise)

        norm_B = row_norms(noise).cpu()
        reg_B = chi_norm_regularizer(noise)
        losses = {t.key: t.weight * (t.ceiling - scores[t.key]) for t in terms}
        reg_term_B = optim.reg_weight * reg_B if optim.reg_weight > 0 else torch.zeros_like(reg_B)
        loss_B = sum(losses.values()) + reg_term_B
        grad_norm_B = None
        if not last:
            if multi_clip:
                parts = [losses[t.key] for t in terms] + ([reg_term_B] if optim.reg_weight > 0 else [])
                grads = [torch.autograd.grad(part.sum(), noise, retain_graph=j < len(parts) - 1)[0]
                         for j, part in enumerate(parts)]
                grad = multi_clip_sum(grads, optim.grad_clip)
            else:
                (grad,) = torch.autograd.grad(loss_B.sum(), noise)
                grad = clip_rows(grad, optim.grad_clip)
            grad_norm_B = row_norms(grad).cpu()
            noise.grad = grad
            opt.step()
            opt.zero_grad(set_to_none=True)

        scores_d = {k: v.detach().cpu() for k, v in scores.items()}
        loss_d, reg_d = loss_B.detach().cpu(), reg_B.detach().cpu()
        records = []
        for b in range(B):
            rec = {
                "iteration": it,
                "rewards": {k: float(v[b]) for k, v in scores_d.items()},
                "reward_total": float(total_B[b]),
                "loss": float(loss_d[b]),
                "reg": float(reg_d[b]),
                "noise_norm": float(norm_B[b]),
                "grad_norm": None if grad_norm_B is None else float(grad_norm_B[b]),
            }
            histories[b].append(rec)
            records.append(rec)
        if on_iteration is not None:
            on_iteration(it, imgs_cpu, records)
        bar.update(1)
        bar.set_postfix(reward=f"{float(total_B.mean()):.4f}", best=f"{float(best.total.mean()):.4f}")
        del images, scores, losses, loss_B, reg_B, reg_term_B
    bar.close()
    return best.results(prompts, method, noise0_B, histories, optim.iterations, time.time() - t0)


def reno_batch(
    policy,
    rewards,
    prompts: list[str],
    optim: OptimConfig | None = None,
    gen: GenerationConfig | None = None,
    *,
    noise: torch.Tensor | None = None,
    seed: int = 0,
    offset: int = 0,
    metadata: list[dict] | None = None,
    progress: bool = False,
    on_iteration: Callable | None = None,
    **overrides,
) -> list[Result]:
    """ReNO for B prompts in one batch (identical per-sample math, see the module docstring).

    ``policy``: any loaded flowalign Policy; ``rewards``: a reward, a MultiReward or (reward, weight)
    pairs, all differentiable. ``noise`` [B, C, h, w] starts the search (default: ``sample_noise``
    with ``seed`` for rows ``offset ..``). ``overrides`` set fields of ``OptimConfig``/
    ``GenerationConfig`` by name (``iterations=20, lr=2, num_steps=4``).
    """
    optim, gen = resolve_options(optim, gen, overrides)
    prompts = check_prompts(prompts)
    terms = reward_terms(rewards, optim.reward_views, optim.view_shift)
    noise0 = start_noise(policy, gen, noise, len(prompts), seed, offset)
    cond = policy.encode(prompts)
    return optimize_noise(make_generator(policy, gen), cond, terms, prompts, noise0, optim, metadata=metadata,
                          reward_checkpoint=gen.reward_checkpoint, device=policy.device, progress=progress,
                          on_iteration=on_iteration)


def reno(policy, rewards, prompt: str, optim: OptimConfig | None = None, gen: GenerationConfig | None = None,
         **kwargs) -> Result:
    """ReNO for one prompt: ``reno(policy, reward, "a cat", iterations=50, lr=5)`` → ``Result``
    (keyword arguments as in ``reno_batch``; ``noise`` may be [C, h, w])."""
    if not isinstance(prompt, str):
        raise ValueError(f"reno() takes one prompt string; use reno_batch() for a list (got {type(prompt).__name__})")
    return reno_batch(policy, rewards, [prompt], optim, gen, **kwargs)[0]
