"""The SDE sampler as a policy: the one owner of the SDE kind, its noise level, the sigma schedule and
the rollout plan of each iteration.

``SDEPolicy.from_config(cfg.sampling, sigmas)`` is built once; it plans an iteration
(``plan(iteration, generator)``), rolls it out into *training units* (``rollout``) and gives a
recorded transition's log-prob and its steps' stds. Plain and branching plans give the same type,
``Units``, so nothing downstream tells them apart:

* a plain plan (full, window, random / progressive window) gives one unit per image, holding the T
  transitions the plan records;
* a branching plan (TempFlow-GRPO) gives one unit per (image, branch step j, branch k), holding its
  single SDE transition; the branch is finished by ODE and its final latent is the unit's own.

A unit's *group* is (its image's prompt group, its ``subgroup``): the branch step for branching
plans (each branch step gets its own group-relative advantage), 0 otherwise.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch

from .plans import RolloutPlan, plan_from_config
from .rollout import VelocityFn, rollout, rollout_branched
from .steps import StepResult, step_mean_std, step_std, transition_log_prob

__all__ = ["SDEPolicy", "Units"]


@dataclass
class Units:
    """A rollout as n training units of T transitions each (see the module docstring)."""

    latents: torch.Tensor  # [n, T, C, H, W] state before each transition
    next_latents: torch.Tensor  # [n, T, C, H, W] sampled state after it
    log_probs: torch.Tensor  # [n, T] element-averaged log-prob at sampling time
    sigmas: torch.Tensor  # [n, T]
    sigmas_next: torch.Tensor  # [n, T]
    steps: torch.Tensor  # [n, T] long: position of each transition among the plan's trained steps
    finals: torch.Tensor  # [n, C, H, W] the unit's sample at σ = 0
    subgroup: torch.Tensor  # [n] long: the branch step j (0 for a plain plan)
    per_image: int  # units per rolled-out image: 1, or J·K; image i's units are rows i·per_image … (i+1)·per_image − 1
    subgroups: int  # subgroups per image: J branch steps, or 1

    def __len__(self) -> int:
        return self.latents.shape[0]

    @staticmethod
    def cat(parts: list["Units"]) -> "Units":
        """Units of consecutive image chunks, in order."""
        first = parts[0]
        tensors = {name: torch.cat([getattr(p, name) for p in parts])
                   for name in ("latents", "next_latents", "log_probs", "sigmas", "sigmas_next", "steps", "finals",
                                "subgroup")}
        return Units(**tensors, per_image=first.per_image, subgroups=first.subgroups)


class SDEPolicy:
    """The stochastic sampler of training rollouts: ``kind`` (``flow_grpo``, ``dance``, ``cps``) at
    ``noise_level`` on ``sigmas`` (N+1, last 0), following the plan ``plan_fn(iteration, generator)``."""

    def __init__(self, kind: str, noise_level: float, sigmas: torch.Tensor,
                 plan_fn: Callable[[int, torch.Generator | None], RolloutPlan], antithetic: bool = False):
        self.kind = kind
        self.noise_level = noise_level
        self.antithetic = antithetic  # rows 2j, 2j+1 draw opposite SDE noise (plain plans)
        self.sigmas = sigmas.float()
        self._plan_fn = plan_fn

    @classmethod
    def from_config(cls, sampling, sigmas: torch.Tensor) -> "SDEPolicy":
        """From a ``SamplingConfig`` and the model's schedule for it (``policy.sigmas(...)``)."""
        return cls(sampling.sde_kind, sampling.noise_level, sigmas, functools.partial(plan_from_config, sampling),
                   antithetic=sampling.antithetic_noise)

    # ------------------------------------------------------------------ plans
    def plan(self, iteration: int, generator: torch.Generator | None = None) -> RolloutPlan:
        """The plan of ``iteration`` (a random window is drawn from ``generator``)."""
        return self._plan_fn(iteration, generator)

    @staticmethod
    def trained_steps(plan: RolloutPlan) -> tuple[int, ...]:
        """Schedule positions of the plan's trained transitions: its recorded steps, or branch steps."""
        return plan.branch_steps if plan.is_branching else plan.record

    @staticmethod
    def units_per_image(plan: RolloutPlan) -> int:
        return len(plan.branch_steps) * plan.num_branches if plan.is_branching else 1

    @staticmethod
    def steps_per_unit(plan: RolloutPlan) -> int:
        return 1 if plan.is_branching else len(plan.record)

    def step_stds(self, plan: RolloutPlan) -> torch.Tensor:
        """Transition std of each trained step of ``plan`` → [T_plan] (noise-aware step weights)."""
        stds = [step_std(self.kind, self.sigmas[i], self.sigmas[i + 1], self.noise_level)
                for i in self.trained_steps(plan)]
        return torch.stack(stds) if stds else torch.zeros(0)

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def rollout(self, velocity_fn: VelocityFn, noise: torch.Tensor, plan: RolloutPlan,
                generator: torch.Generator | None = None) -> Units:
        """Sample ``noise`` [B, C, H, W] along ``plan`` → its training units. A branching plan calls
        ``velocity_fn`` with B·K rows during branch steps, the K branches of sample b contiguous
        (``sampling.rollout_branched``)."""
        sigmas = self.sigmas.to(noise.device)
        kw = dict(kind=self.kind, noise_level=self.noise_level, generator=generator)
        if not plan.is_branching:
            traj = rollout(velocity_fn, noise, sigmas, plan, antithetic=self.antithetic, **kw)
            n, T = traj.log_probs.shape
            return Units(latents=traj.latents, next_latents=traj.next_latents, log_probs=traj.log_probs,
                         sigmas=traj.sigmas[None].expand(n, T), sigmas_next=traj.sigmas_next[None].expand(n, T),
                         steps=torch.arange(T)[None].expand(n, T), finals=traj.final,
                         subgroup=torch.zeros(n, dtype=torch.long), per_image=1, subgroups=1)
        traj = rollout_branched(velocity_fn, noise, sigmas, plan, **kw)
        B, J, K = traj.log_probs.shape
        shape = traj.latents.shape[2:]
        step_j = torch.arange(J).repeat_interleave(K).repeat(B)  # [B·J·K] branch step of each unit
        return Units(latents=traj.latents.unsqueeze(2).expand(-1, -1, K, *shape).reshape(B * J * K, 1, *shape),
                     next_latents=traj.next_latents.reshape(B * J * K, 1, *shape),
                     log_probs=traj.log_probs.reshape(B * J * K, 1),
                     sigmas=traj.sigmas[step_j][:, None], sigmas_next=traj.sigmas_next[step_j][:, None],
                     steps=step_j[:, None], finals=traj.finals.reshape(B * J * K, *shape), subgroup=step_j,
                     per_image=J * K, subgroups=J)

    # ------------------------------------------------------------------ the policy's density
    def log_prob(self, x, x_next, v, sigma, sigma_next) -> StepResult:
        """A recorded transition x → x_next under velocity v (``sampling.transition_log_prob``):
        its element-averaged log-prob [B], mean and std; gradients flow through v."""
        return transition_log_prob(self.kind, x, x_next, v, sigma, sigma_next, self.noise_level)

    def mean_std(self, x, v, sigma, sigma_next):
        """(mean, std) of the step's Gaussian transition from x under velocity v."""
        return step_mean_std(self.kind, x, v, sigma, sigma_next, self.noise_level)
