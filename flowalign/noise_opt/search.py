"""The pieces every noise search shares (ReNO in ``reno.py``, Best-of-N and CARINOX in ``explore.py``):
the ``Result`` of a prompt, weighted reward terms and their scoring, the generator G(ε), the start
noise, the best-so-far tracker, option handling and the progress bar.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import UserError
from ..seeding import sample_noise
from .config import GenerationConfig, OptimConfig, split_overrides
from .objective import loss_ceiling

__all__ = [
    "Result", "RewardTerm", "reward_terms", "make_generator", "score_terms", "reward_total", "BestSoFar",
    "resolve_options", "start_noise", "check_prompts", "progress_bar",
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
        raise UserError(f"{policy.family} is a one-step generator; set num_steps=1 (got {gen.num_steps})")
    if gen.guidance_scale > 1:
        raise UserError(f"{policy.family} runs without CFG; set guidance_scale=0 (got {gen.guidance_scale})")
    return policy.generate


def score_terms(terms: list[RewardTerm], images, prompts, metadata, checkpoint: bool) -> dict[str, torch.Tensor]:
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


def reward_total(terms: list[RewardTerm], scores: dict[str, torch.Tensor]) -> torch.Tensor:
    """Σ w·r per row [B] (no gradient): what a search keeps its best by."""
    return sum(t.weight * scores[t.key].detach() for t in terms)


class BestSoFar:
    """The best image (and noise) of each of B rows so far by reward total; ties keep the earlier call.
    ``update`` after every generator call; ``results`` turns the search into one ``Result`` per row."""

    def __init__(self, B: int):
        self.total = torch.full((B,), -float("inf"))  # [B]
        self.call = torch.zeros(B, dtype=torch.long)  # [B] call that gave the best
        self.images = self.noise = self.initial_images = None  # [B, 3, H, W], [B, C, h, w] (cpu)

    def update(self, call: int, total_B: torch.Tensor, images_B: torch.Tensor, noise_B: torch.Tensor | None = None):
        """Call ``call`` scored ``total_B`` [B] (cpu) for ``images_B`` (cpu float) from ``noise_B``."""
        noise_B = None if noise_B is None else noise_B.detach().cpu()
        if self.initial_images is None:
            self.initial_images, self.images = images_B.clone(), images_B.clone()
            self.noise = None if noise_B is None else noise_B.clone()
        improved = total_B > self.total  # strict: ties keep the earlier call
        self.images[improved] = images_B[improved]
        if noise_B is not None:
            self.noise[improved] = noise_B[improved]
        self.call[improved] = call
        self.total = torch.where(improved, total_B, self.total)
        return improved

    def results(self, prompts: list[str], method: str, noise0_B: torch.Tensor, histories: list[list[dict]],
                calls: int, seconds: float) -> list[Result]:
        B = len(prompts)
        return [
            Result(prompt=prompts[b], method=method, best_image=self.images[b], initial_image=self.initial_images[b],
                   best_noise=self.noise[b], initial_noise=noise0_B[b].detach().cpu().float(),
                   best_reward=float(self.total[b]), initial_reward=histories[b][0]["reward_total"],
                   best_iteration=int(self.call[b]), generator_calls=calls, seconds=seconds / B, history=histories[b])
            for b in range(B)
        ]


def resolve_options(optim, gen, overrides) -> tuple[OptimConfig, GenerationConfig]:
    """The configs of a call: ``optim``/``gen`` (defaults when None) with keyword ``overrides`` by field name."""
    o_kw, g_kw = split_overrides(overrides)
    optim = dataclasses.replace(optim or OptimConfig(), **o_kw)
    gen = dataclasses.replace(gen or GenerationConfig(), **g_kw)
    return optim, gen


def start_noise(policy, gen: GenerationConfig, noise, n: int, seed: int, offset: int) -> torch.Tensor:
    """The start noise [n, C, h, w] of rows ``offset``…: ``noise`` checked, or ``sample_noise`` with ``seed``."""
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


def check_prompts(prompts) -> list[str]:
    """A non-empty list of non-empty prompt strings (ValueError otherwise)."""
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a list of strings")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts given")
    empty = [i for i, p in enumerate(prompts) if not p.strip()]
    if empty:
        raise ValueError(f"prompt {empty[0]} is empty; give a non-empty prompt")
    return prompts


def progress_bar(enabled: bool, total: int, desc: str):
    """A tqdm bar over generator calls (disabled unless ``enabled``)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)
