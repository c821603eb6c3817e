"""Seed exploration: Best-of-N, and CARINOX (explore seeds, then optimize the noise).

*Best-of-N* samples N noises per prompt (candidate 0 is the starting noise, candidate j ≥ 1 uses
seed + j), scores each image with the same rewards and keeps the best by reward total: N generator
calls, no gradients — ReNO's baseline at an equal number of generator calls.

*CARINOX* (Kasaei et al. 2025, "CARINOX: Inference-time Scaling with Category-Aware Reward-based
Initial Noise Optimization and Exploration") combines both: explore k seeds (Best-of-k), then run
ReNO from the best one (``optimize="best"``: k + iterations calls) or from each of them
(``optimize="each"``: k·iterations calls) and keep the best final image. Its optimization clips each
reward's gradient separately before summing ("multi-clip"), so no single reward dominates the step.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from ..errors import UserError
from ..seeding import sample_noise
from .config import GenerationConfig, OptimConfig, split_overrides
from .reno import optimize_noise
from .search import (
    BestSoFar, Result, check_prompts, make_generator, progress_bar, resolve_options, reward_terms, reward_total,
    score_terms, start_noise,
)

__all__ = ["best_of_n", "best_of_n_batch", "carinox", "carinox_batch", "explore_noises"]


@torch.no_grad()
def explore_noises(
    generate: Callable,
    cond,
    terms,
    prompts: list[str],
    noise0_B: torch.Tensor,
    num: int,
    seed: int,
    indices: list[int],
    *,
    metadata=None,
    device=None,
    progress: bool = False,
    on_iteration: Callable | None = None,
    method: str = "best_of_n",
) -> list[Result]:
    """Best-of-``num`` for a batch: candidate 0 is ``noise0_B``, candidate j ≥ 1 is
    ``sample_noise(shape, seed + j, indices)``. History records: ``iteration`` (= candidate), ``seed``,
    ``rewards``, ``reward_total``."""
    t0 = time.time()
    B = noise0_B.shape[0]
    device = device if device is not None else noise0_B.device
    shape = tuple(noise0_B.shape[1:])
    histories: list[list[dict]] = [[] for _ in range(B)]
    best = BestSoFar(B)
    bar = progress_bar(progress, num, f"{method} ({B} prompt{'s' if B > 1 else ''})")
    for j in range(num):
        noise = noise0_B.float() if j == 0 else sample_noise(shape, seed + j, indices)
        images = generate(noise.to(device), cond).float().cpu()
        scores = score_terms(terms, images.to(device), prompts, metadata, checkpoint=False)
        total_B = reward_total(terms, scores).cpu()
        best.update(j, total_B, images, noise)
        records = []
        for b in range(B):
            rec = {"iteration": j, "seed": seed + j, "rewards": {k: float(v[b]) for k, v in scores.items()},
                   "reward_total": float(total_B[b])}
            histories[b].append(rec)
            records.append(rec)
        if on_iteration is not None:
            on_iteration(j, images, records)
        bar.update(1)
        bar.set_postfix(reward=f"{float(total_B.mean()):.4f}", best=f"{float(best.total.mean()):.4f}")
    bar.close()
    return best.results(prompts, method, noise0_B, histories, num, time.time() - t0)


def best_of_n_batch(
    policy,
    rewards,
    prompts: list[str],
    num: int = 50,
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
    """Best-of-``num`` for B prompts under the reward ensemble (any rewards, differentiable or not).
    Candidate 0 is the noise ReNO would start from (``noise`` or seed ``seed``), so the result is
    never worse than the un-optimized image by reward."""
    if num < 1:
        raise UserError(f"best_of_n needs num >= 1, got {num}")
    scoring = {"reward_views", "view_shift"}
    ignored = sorted(k for k in split_overrides(overrides)[0] if k not in scoring)
    if ignored:
        raise UserError(f"best_of_n takes no optimizer options ({', '.join(ignored)}): it only samples and "
                         f"scores; of OptimConfig's fields only {sorted(scoring)} apply")
    optim, gen = resolve_options(None, gen, overrides)
    prompts = check_prompts(prompts)
    terms = reward_terms(rewards, optim.reward_views, optim.view_shift)
    noise0 = start_noise(policy, gen, noise, len(prompts), seed, offset)
    generate = make_generator(policy, gen)
    return explore_noises(generate, policy.encode(prompts), terms, prompts, noise0, num, seed,
                          list(range(offset, offset + len(prompts))), metadata=metadata, device=policy.device,
                          progress=progress, on_iteration=on_iteration)


def best_of_n(policy, rewards, prompt: str, num: int = 50, gen: GenerationConfig | None = None, **kwargs) -> Result:
    """Best-of-N for one prompt (see ``best_of_n_batch``)."""
    return best_of_n_batch(policy, rewards, [prompt], num, gen, **kwargs)[0]


def carinox_batch(
    policy,
    rewards,
    prompts: list[str],
    num_seeds: int = 10,
    optim: OptimConfig | None = None,
    gen: GenerationConfig | None = None,
    *,
    optimize: str = "best",
    noise: torch.Tensor | None = None,
    seed: int = 0,
    offset: int = 0,
    metadata: list[dict] | None = None,
    progress: bool = False,
    on_iteration: Callable | None = None,
    **overrides,
) -> list[Result]:
    """CARINOX for B prompts: explore ``num_seeds`` noises, optimize the best (or each) with ReNO and
    multi-clip (unless ``multi_clip=False``), keep the best final image.

    ``Result.history`` holds the exploration records, then the optimization records (their
    ``iteration`` continues the count); ``initial_image`` is candidate 0's image (the un-optimized,
    un-explored start), ``generator_calls`` counts both phases. ``on_iteration(iteration, images_B,
    records_B)`` sees every generator call of both phases with B rows, numbered as in the history.
    """
    if optimize not in ("best", "each"):
        raise UserError(f"carinox optimize must be 'best' or 'each', got {optimize!r}")
    if num_seeds < 1:
        raise UserError(f"carinox needs num_seeds >= 1, got {num_seeds}")
    optim, gen = resolve_options(optim, gen, overrides)
    prompts = check_prompts(prompts)
    terms = reward_terms(rewards, optim.reward_views, optim.view_shift)
    B = len(prompts)
    indices = list(range(offset, offset + B))
    noise0 = start_noise(policy, gen, noise, B, seed, offset)
    generate = make_generator(policy, gen)
    cond = policy.encode(prompts)
    t0 = time.time()
    if optimize == "best":
        explored = explore_noises(generate, cond, terms, prompts, noise0, num_seeds, seed, indices,
                                  metadata=metadata, device=policy.device, progress=progress,
                                  on_iteration=on_iteration, method="carinox")
        start = torch.stack([r.best_noise for r in explored])
        report = None
        if on_iteration is not None:
            def report(it, images, records):  # optimization calls follow the explored ones
                on_iteration(num_seeds + it, images, [_renumber(r, num_seeds + it) for r in records])
        optimized = optimize_noise(generate, cond, terms, prompts, start, optim, metadata=metadata,
                                   reward_checkpoint=gen.reward_checkpoint, device=policy.device,
                                   progress=progress, on_iteration=report, method="carinox")
        out = []
        for e, o in zip(explored, optimized):
            history = e.history + [_renumber(rec, num_seeds + rec["iteration"]) for rec in o.history]
            better = o.best_reward > e.best_reward
            out.append(Result(
                prompt=e.prompt, method="carinox", best_image=o.best_image if better else e.best_image,
                initial_image=e.initial_image, best_noise=o.best_noise if better else e.best_noise,
                initial_noise=e.initial_noise, best_reward=max(o.best_reward, e.best_reward),
                initial_reward=e.initial_reward,
                best_iteration=num_seeds + o.best_iteration if better else e.best_iteration,
                generator_calls=num_seeds + optim.iterations, seconds=(time.time() - t0) / B, history=history))
        return out
    # each: k noises per prompt, rows ordered prompt-major [b0 s0, b0 s1, ..., b1 s0, ...]
    shape = tuple(noise0.shape[1:])
    cands = [noise0] + [sample_noise(shape, seed + j, indices) for j in range(1, num_seeds)]
    noise_all = torch.stack(cands, 1).reshape(B * num_seeds, *shape)
    rows = [p for p in prompts for _ in range(num_seeds)]
    meta_rows = None if metadata is None else [m for m in metadata for _ in range(num_seeds)]

    def call(s: int, it: int) -> int:  # seed s's iteration it, as a call of the whole search
        return s * optim.iterations + it

    report = None
    if on_iteration is not None:
        def report(it, images, records):  # each seed's B rows separately, as that seed's call
            for s in range(num_seeds):
                on_iteration(call(s, it), images[s::num_seeds],
                             [_renumber(r, call(s, it), seed + s) for r in records[s::num_seeds]])
    optimized = optimize_noise(generate, cond.repeat_interleave(num_seeds), terms, rows, noise_all, optim,
                               metadata=meta_rows, reward_checkpoint=gen.reward_checkpoint, device=policy.device,
                               progress=progress, on_iteration=report, method="carinox")
    out = []
    for b in range(B):
        group = optimized[b * num_seeds:(b + 1) * num_seeds]
        j = max(range(num_seeds), key=lambda i: (group[i].best_reward, -i))
        history = [_renumber(rec, call(s, rec["iteration"]), seed + s)
                   for s, r in enumerate(group) for rec in r.history]
        out.append(Result(
            prompt=prompts[b], method="carinox", best_image=group[j].best_image, initial_image=group[0].initial_image,
            best_noise=group[j].best_noise, initial_noise=group[0].initial_noise, best_reward=group[j].best_reward,
            initial_reward=group[0].initial_reward, best_iteration=call(j, group[j].best_iteration),
            generator_calls=num_seeds * optim.iterations, seconds=(time.time() - t0) / B, history=history))
    return out


def _renumber(rec: dict, n: int, seed: int | None = None) -> dict:
    """A phase's (or seed's) record as call ``n`` of the whole search (of seed ``seed``): how CARINOX
    numbers both its history and what it reports to ``on_iteration``."""
    return {**rec, "iteration": n} if seed is None else {**rec, "iteration": n, "seed": seed}


def carinox(policy, rewards, prompt: str, num_seeds: int = 10, optim: OptimConfig | None = None,
            gen: GenerationConfig | None = None, **kwargs) -> Result:
    """CARINOX for one prompt (see ``carinox_batch``)."""
    return carinox_batch(policy, rewards, [prompt], num_seeds, optim, gen, **kwargs)[0]
