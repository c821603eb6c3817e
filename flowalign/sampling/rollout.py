"""The denoising loop, kept visible: run a plan with a velocity callable and return plain tensors.

``velocity_fn(x_BCHW, sigma_B) -> v_BCHW`` closes over the conditioning and guidance
(e.g. ``functools.partial(policy.velocity, cond=cond, guidance_scale=4.5)``). Latents are carried in
float32; the callable casts to the model dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .plans import RolloutPlan
from .steps import STEP_KINDS, ode_step, sde_step

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Trajectory:
    """A rollout's recorded transitions (T = len(plan.record))."""

    latents: torch.Tensor  # [B, T, ...] state before each recorded step
    next_latents: torch.Tensor  # [B, T, ...] sampled state after it
    log_probs: torch.Tensor  # [B, T] element-averaged log-prob of each recorded transition
    sigmas: torch.Tensor  # [T] σ at each recorded step
    sigmas_next: torch.Tensor  # [T]
    step_indices: torch.Tensor  # [T] long, position in the schedule
    final: torch.Tensor  # [B, ...] the sample at σ = 0


@dataclass
class BranchedTrajectory:
    """TempFlow-GRPO rollout: J branch steps, K branches each (one reward per branch final)."""

    trunk_final: torch.Tensor  # [B, ...] the ODE trunk's own sample
    latents: torch.Tensor  # [B, J, ...] trunk state at each branch step
    next_latents: torch.Tensor  # [B, J, K, ...] state after each branch's SDE step
    log_probs: torch.Tensor  # [B, J, K]
    sigmas: torch.Tensor  # [J]
    sigmas_next: torch.Tensor  # [J]
    step_indices: torch.Tensor  # [J]
    finals: torch.Tensor  # [B, J, K, ...] each branch finished by ODE


def group_noise(
    num_groups: int,
    group_size: int,
    shape: tuple[int, ...],
    *,
    shared: bool = False,
    generator: torch.Generator | None = None,
    device=None,
) -> torch.Tensor:
    """Initial noise for ``num_groups`` groups of ``group_size`` samples, [num_groups·group_size, *shape],
    grouped contiguously. ``shared=True`` gives every member of a group the same noise (the group then
    differs only through SDE noise, as in DanceGRPO)."""
    if shared:
        base = torch.randn((num_groups, *shape), generator=generator, device=device)
        return base.repeat_interleave(group_size, dim=0)
    return torch.randn((num_groups * group_size, *shape), generator=generator, device=device)


def _check_sigmas(sigmas: torch.Tensor, plan: RolloutPlan) -> torch.Tensor:
    if sigmas.ndim != 1 or len(sigmas) != plan.num_steps + 1:
        raise ValueError(f"need {plan.num_steps + 1} sigmas for a {plan.num_steps}-step plan, got {tuple(sigmas.shape)}")
    if not bool((sigmas[1:] < sigmas[:-1]).all()):
        raise ValueError("sigmas must decrease strictly (from noise to data)")
    return sigmas.float()


def _check_kind(kind: str) -> None:
    if kind not in STEP_KINDS or kind == "ode":
        raise ValueError(f"unknown SDE kind {kind!r}; choose one of {STEP_KINDS[1:]}")


def _no_log_prob(kind: str, i: int) -> ValueError:
    return ValueError(
        f"step {i} of the plan is recorded but the {kind} step there is deterministic (std 0, e.g. CPS "
        "into sigma=0); build the plan without it (full_sde_plan(..., include_last=False))"
    )


@torch.no_grad()
def rollout(
    velocity_fn: VelocityFn,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    plan: RolloutPlan,
    *,
    kind: str = "flow_grpo",
    noise_level: float = 0.7,
    generator: torch.Generator | None = None,
    antithetic: bool = False,
) -> Trajectory:
    """Sample from ``noise`` (at σ = sigmas[0]) following ``plan``; record the planned transitions.

    ``antithetic``: rows 2j and 2j+1 draw opposite SDE noise (ε, −ε) at every SDE step (antithetic
    variates): a pair's policy gradient (A₁ − A₂)·∇μ·ε/σ keeps the reward's difference along ε and
    drops the common part the shared baseline would otherwise have to cancel."""
    _check_kind(kind)
    if antithetic and noise.shape[0] % 2:
        raise ValueError(f"antithetic noise pairs rows; got an odd batch of {noise.shape[0]}")
    if plan.is_branching:
        raise ValueError("this plan branches; call rollout_branched")
    sigmas = _check_sigmas(sigmas, plan).to(noise.device)
    x = noise.float()
    B = x.shape[0]
    lat, nxt, lps = [], [], []
    for i in range(plan.num_steps):
        s, s_next = sigmas[i], sigmas[i + 1]
        v = velocity_fn(x, s.expand(B))
        if plan.sde[i]:
            eps = None
            if antithetic:
                half = torch.randn((B // 2, *x.shape[1:]), generator=generator, device=x.device)
                eps = torch.stack([half, -half], 1).flatten(0, 1)  # rows 2j, 2j+1: ε_j, −ε_j
            res = sde_step(kind, x, v, s, s_next, noise_level, eps, generator=generator)
        else:
            res = ode_step(x, v, s, s_next)
        if i in plan.record:
            if res.log_prob is None:
                raise _no_log_prob(kind, i)
            lat.append(x)
            nxt.append(res.x_next)
            lps.append(res.log_prob)
        x = res.x_next
    rec = torch.tensor(plan.record, dtype=torch.long)
    empty = x.new_zeros((B, 0, *x.shape[1:]))
    return Trajectory(
        latents=torch.stack(lat, 1) if lat else empty,
        next_latents=torch.stack(nxt, 1) if nxt else empty,
        log_probs=torch.stack(lps, 1) if lps else x.new_zeros((B, 0)),
        sigmas=sigmas[rec].cpu(),
        sigmas_next=sigmas[rec + 1].cpu(),
        step_indices=rec,
        final=x,
    )


def _ode_from(velocity_fn: VelocityFn, x: torch.Tensor, sigmas: torch.Tensor, start: int) -> torch.Tensor:
    for i in range(start, len(sigmas) - 1):
        x = ode_step(x, velocity_fn(x, sigmas[i].expand(x.shape[0])), sigmas[i], sigmas[i + 1]).x_next
    return x


@torch.no_grad()
def rollout_branched(
    velocity_fn: VelocityFn,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    plan: RolloutPlan,
    *,
    kind: str = "flow_grpo",
    noise_level: float = 0.7,
    generator: torch.Generator | None = None,
) -> BranchedTrajectory:
    """TempFlow-GRPO rollout: ODE trunk; at each branch step j, K SDE branches from the trunk state,
    each finished by ODE. Branches of one step run as one batch of B·K: ``velocity_fn`` then gets B·K
    rows, the K branches of sample b contiguous (rows b·K … b·K+K−1), and must condition them as b."""
    _check_kind(kind)
    if not plan.is_branching:
        raise ValueError("this plan does not branch; call rollout")
    sigmas = _check_sigmas(sigmas, plan).to(noise.device)
    K = plan.num_branches
    x = noise.float()
    B = x.shape[0]
    lat, nxt, lps, fin = [], [], [], []
    for i in range(plan.num_steps):
        s, s_next = sigmas[i], sigmas[i + 1]
        v = velocity_fn(x, s.expand(B))
        if i in plan.branch_steps:
            xk = x.repeat_interleave(K, 0)  # [B·K, ...], branches of a sample are contiguous
            res = sde_step(kind, xk, v.repeat_interleave(K, 0), s, s_next, noise_level, generator=generator)
            if res.log_prob is None:
                raise _no_log_prob(kind, i)
            lat.append(x)
            nxt.append(res.x_next.reshape(B, K, *x.shape[1:]))
            lps.append(res.log_prob.reshape(B, K))
            fin.append(_ode_from(velocity_fn, res.x_next, sigmas, i + 1).reshape(B, K, *x.shape[1:]))
        x = ode_step(x, v, s, s_next).x_next
    idx = torch.tensor(plan.branch_steps, dtype=torch.long)
    return BranchedTrajectory(
        trunk_final=x,
        latents=torch.stack(lat, 1),
        next_latents=torch.stack(nxt, 1),
        log_probs=torch.stack(lps, 1),
        sigmas=sigmas[idx].cpu(),
        sigmas_next=sigmas[idx + 1].cpu(),
        step_indices=idx,
        finals=torch.stack(fin, 1),
    )
