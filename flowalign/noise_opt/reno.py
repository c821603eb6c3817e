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

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..seeding import sample_noise
from .config import GenerationConfig, OptimConfig, split_overrides
from .objective import chi_norm_regularizer, clip_rows, loss_ceiling, multi_clip_sum, row_norms

__all__ = [
    "Result", "RewardTerm", "reward_terms", "make_generator", "sample_noise", "reno", "reno_batch",
]


@dataclass
class Result:
    """The outcome of one prompt's noise search.

    ``history`` has one record per generator call: ``iteration``, ``rewards`` (raw score per reward
    key), ``reward_total`` (Σ w·r), and for optimized runs ``loss`` (Σ w·(c − r) + λ·R), ``reg``
    (R(ε), unweighted), ``noise_norm`` and ``grad_norm`` (of the clipped step; None after the last call).
    """

    prompt: str
    method: str
    best_image: torch.Tensor  # [3, H, W] in [0, 1], float32, cpu
    initial_image: torch.Tensor  # [3, H, W]: the image of the starting noise
    best_noise: torch.Tensor  # [C, h, w] float32, cpu
    initial_noise: torch.Tensor  # [C, h, w]
    best_reward: float  # reward total of best_image
    initial_reward: float
    best_iteration: int  # index into history
    generator_calls: int
    seconds: float
    history: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        """A JSON-ready summary (no tensors)."""
        return {
            "prompt": self.prompt, "method": self.method, "initial_reward": self.initial_reward,
            "best_reward": self.best_reward, "best_iteration": self.best_iteration,
            "best_rewards": self.history[self.best_iteration]["rewards"],
            "initial_rewards": self.history[0]["rewards"],
            "generator_calls": self.generator_calls, "seconds": round(self.seconds, 3),
        }


# --------------------------------------------------------------------------------------------------
# rewards and generator


@dataclass
class RewardTerm:
    key: str
    reward: Callable
    weight: float

    @property
    def ceiling(self) -> float:
        return loss_ceiling(self.key)


def reward_terms(rewards, views: int = 1, max_shift: int = 2) -> list[RewardTerm]:
    """A reward callable, a ``flowalign.rewards.MultiReward`` or a list of (reward, weight) pairs as
    weighted terms (keys as MultiReward names them). With ``views`` > 1 each reward is scored as the
    mean over that many shifted copies of the image (``flowalign.rewards.ShiftedViews``, a fresh
    seeded wrapper per call of this function, so a search is deterministic)."""
    from ..rewards.base import MultiReward, ShiftedViews

    if isinstance(rewards, (list, tuple)):
        rewards = MultiReward(list(rewards))
    if isinstance(rewards, MultiReward):
        terms = [RewardTerm(k, r, w) for k, r, w in zip(rewards.keys, rewards.rewards, rewards.weights)]
    elif not callable(rewards) or not hasattr(rewards, "name"):
        raise ValueError(f"rewards must be a reward callable with a name, a MultiReward or a list of "
                         f"(reward, weight) pairs; got {type(rewards).__name__}")
    else:
        terms = [RewardTerm(rewards.name, rewards, 1.0)]
    if views > 1:
        terms = [RewardTerm(t.key, ShiftedViews(t.reward, views, max_shift, seed=i), t.weight)
                 for i, t in enumerate(terms)]
    return terms


def _require_differentiable(terms: list[RewardTerm], method: str) -> None:
    bad = [t.key for t in terms if not getattr(t.reward, "differentiable", False)]
    if bad:
        raise ValueError(f"{method} optimizes the noise by gradient and needs differentiable rewards; {bad} "
                         f"{'is' if len(bad) == 1 else 'are'} not (use best_of_n for those, or rewards like "
                         f"clip, hpsv2.1, pickscore, imagereward, aesthetic, pocket_clip)")


def make_generator(policy, gen: GenerationConfig) -> Callable[[torch.Tensor, object], torch.Tensor]:
    """G(noise, cond) → images [B, 3, H, W] in [0, 1] for any flowalign policy: flow models
    (``FlowPolicy.generate``: ``num_steps`` Euler steps, CFG/guidance, optional per-step
    checkpointing) or the one-step turbo UNets (``TurboPolicy.generate``)."""
    from ..models.base import FlowPolicy

    if isinstance(policy, FlowPolicy):
        def generate(noise, cond):
            return policy.generate(noise, cond, num_steps=gen.num_steps, guidance_scale=gen.guidance_scale,
                                   shift=gen.shift, checkpoint=gen.checkpoint)
        return generate
    if gen.num_steps != 1:
        raise ValueError(f"{policy.family} is a one-step generator; set num_steps=1 (got {gen.num_steps})")
    if gen.guidance_scale > 1:
        raise ValueError(f"{policy.family} runs without CFG; set guidance_scale=0 (got {gen.guidance_scale})")
    return policy.generate


def _score(terms: list[RewardTerm], images, prompts, metadata, checkpoint: bool) -> dict[str, torch.Tensor]:
    """Raw scores [B] (float32) per reward key; gradients flow when enabled."""
    out = {}
    for t in terms:
        if checkpoint and torch.is_grad_enabled():
            scores = torch.utils.checkpoint.checkpoint(
                lambda x, r=t.reward: r(x, prompts, metadata)[0], images, use_reentrant=False)
        else:
            scores = t.reward(images, prompts, metadata)[0]
        assert scores.shape == (images.shape[0],), f"reward {t.key} returned shape {tuple(scores.shape)}"
        out[t.key] = scores.float()
    return out


def _total(terms, scores) -> torch.Tensor:
    return sum(t.weight * scores[t.key].detach() for t in terms)


def _resolve_options(optim, gen, overrides) -> tuple[OptimConfig, GenerationConfig]:
    o_kw, g_kw = split_overrides(overrides)
    optim = dataclasses.replace(optim or OptimConfig(), **o_kw)
    gen = dataclasses.replace(gen or GenerationConfig(), **g_kw)
    return optim, gen


def _start_noise(policy, gen: GenerationConfig, noise, n: int, seed: int, offset: int) -> torch.Tensor:
    shape = tuple(policy.latent_shape(gen.height, gen.width))
    if noise is None:
        return sample_noise(shape, seed, range(offset, offset + n))
    noise = torch.as_tensor(noise).float().cpu()
    if noise.ndim == len(shape):
        noise = noise[None]
    if tuple(noise.shape) != (n, *shape):
        raise ValueError(f"noise has shape {tuple(noise.shape)}; expected {(n, *shape)} for {n} prompt(s) at "
                         f"{gen.height}x{gen.width} (latent_shape {shape})")
    return noise


def _check_prompts(prompts) -> list[str]:
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a list of strings")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts given")
    empty = [i for i, p in enumerate(prompts) if not p.strip()]
    if empty:
        raise ValueError(f"prompt {empty[0]} is empty; give a non-empty prompt")
    return prompts


def _make_optimizer(param: torch.Tensor, o: OptimConfig) -> torch.optim.Optimizer:
    if o.optimizer == "sgd":
        return torch.optim.SGD([param], lr=o.lr, momentum=o.momentum, nesterov=o.nesterov and o.momentum > 0)
    return torch.optim.Adam([param], lr=o.lr, betas=tuple(o.adam_betas))


def _progress(enabled: bool, total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


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
    best_total = torch.full((B,), -float("inf"))
    best_iter = torch.zeros(B, dtype=torch.long)
    best_images = best_noise = initial_images = None
    bar = _progress(progress, optim.iterations, f"{method} ({B} prompt{'s' if B > 1 else ''})")
    for it in range(optim.iterations):
        last = it == optim.iterations - 1
        with torch.set_grad_enabled(not last):
            images = generate(noise, cond)
            scores = _score(terms, images, prompts, metadata, reward_checkpoint)
        total_B = _total(terms, scores).cpu()
        improved = total_B > best_total  # strict: ties keep the earlier iterate
        imgs_cpu = images.detach().float().cpu()
        if initial_images is None:
            initial_images, best_images, best_noise = imgs_cpu.clone(), imgs_cpu.clone(), noise.detach().cpu().clone()
        best_images[improved] = imgs_cpu[improved]
        best_noise[improved] = noise.detach().cpu()[improved]
        best_iter[improved] = it
        best_total = torch.where(improved, total_B, best_total)

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
        bar.set_postfix(reward=f"{float(total_B.mean()):.4f}", best=f"{float(best_total.mean()):.4f}")
        del images, scores, losses, loss_B, reg_B, reg_term_B
    bar.close()
    seconds = time.time() - t0
    return [
        Result(prompt=prompts[b], method=method, best_image=best_images[b], initial_image=initial_images[b],
               best_noise=best_noise[b], initial_noise=noise0_B[b].detach().cpu().float(),
               best_reward=float(best_total[b]), initial_reward=histories[b][0]["reward_total"],
               best_iteration=int(best_iter[b]), generator_calls=optim.iterations, seconds=seconds / B,
               history=histories[b])
        for b in range(B)
    ]


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
    optim, gen = _resolve_options(optim, gen, overrides)
    prompts = _check_prompts(prompts)
    terms = reward_terms(rewards, optim.reward_views, optim.view_shift)
    noise0 = _start_noise(policy, gen, noise, len(prompts), seed, offset)
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
