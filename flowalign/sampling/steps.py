"""One denoising step of a flow-matching sampler, deterministic (ODE) or stochastic (SDE).

Notation: t = σ ∈ [0, 1], t = 1 is noise, t = 0 is data; x_t = (1−t)·x0 + t·ε; the model's velocity
v ≈ ε − x0; Δt = t_next − t < 0.

Every stochastic step is a Gaussian policy x_next ~ N(mean, std²·I). Each step function returns
``StepResult(x_next, mean, std, log_prob)``; the math runs in float32 whatever the input dtype.

**Log-prob convention (used everywhere in flowalign):** the Gaussian log-density of ``x_next``
*averaged over the non-batch elements* (shape [B]). The references (Flow-GRPO, DanceGRPO) average,
and their PPO clip ranges (~1e-4) and KL coefficients are tuned for averaged log-probs, so recipes
carry over unchanged. The sum over elements (the true log-density) equals this value times the
number of elements; ratios exp(Δ) of averaged log-probs are the geometric-mean per-element ratios.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

SDE_KINDS = ("flow_grpo", "dance", "cps")
STEP_KINDS = ("ode",) + SDE_KINDS

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


class StepResult(NamedTuple):
    x_next: torch.Tensor  # [B, ...] float32
    mean: torch.Tensor  # [B, ...] float32
    std: torch.Tensor  # broadcastable to x: [B, 1, ...] float32 (0 for the ODE)
    log_prob: torch.Tensor | None  # [B] float32, element-averaged; None for the ODE


def _per_sample(s, x: torch.Tensor) -> torch.Tensor:
    """A scalar or [B] sigma as a float32 tensor of shape [B, 1, ..., 1] (broadcasts against x)."""
    s = torch.as_tensor(s, dtype=torch.float32, device=x.device)
    if s.ndim == 0:
        s = s.expand(x.shape[0])
    assert s.shape == (x.shape[0],), f"sigma must be a scalar or [B]={x.shape[0]}, got {tuple(s.shape)}"
    return s.reshape(-1, *([1] * (x.ndim - 1)))


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, std²) averaged over the non-batch dims → [B] (the flowalign convention)."""
    x, mean, std = x.float(), mean.float(), std.float()
    lp = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - _LOG_SQRT_2PI
    return lp.mean(dim=tuple(range(1, lp.ndim)))


def ode_step(x: torch.Tensor, v: torch.Tensor, sigma, sigma_next) -> StepResult:
    """Euler step of the probability-flow ODE dx/dt = v: x_next = x + Δt·v."""
    x32, v32 = x.float(), v.float()
    t, t_next = _per_sample(sigma, x32), _per_sample(sigma_next, x32)
    mean = x32 + (t_next - t) * v32
    return StepResult(mean, mean, torch.zeros_like(t), None)


def _flow_grpo_diffusion(t: torch.Tensor, t_next: torch.Tensor, noise_level: float) -> torch.Tensor:
    """Flow-GRPO's σ_t = a·√(t / (1−t)); at t = 1 the denominator uses 1 − t_next (the reference code's)."""
    denom = 1 - torch.where(t == 1, t_next, t)
    return noise_level * torch.sqrt(t / denom)


def _flow_grpo_std(t: torch.Tensor, t_next: torch.Tensor, noise_level: float) -> torch.Tensor:
    return _flow_grpo_diffusion(t, t_next, noise_level) * torch.sqrt(-(t_next - t))


def flow_grpo_mean_std(x, v, sigma, sigma_next, noise_level: float):
    """Flow-GRPO's SDE step (Liu et al. 2025, "Flow-GRPO", eq. 9–10), the reverse SDE whose
    marginals equal the ODE's:

        σ_t  = a·√(t / (1−t))                     (a = noise_level; at t = 1 the denominator uses
                                                   1 − t_next, as the reference code does)
        mean = x + [v + σ_t²/(2t) · (x + (1−t)·v)]·Δt
        std  = σ_t·√(−Δt)
    """
    x32, v32 = x.float(), v.float()
    t, t_next = _per_sample(sigma, x32), _per_sample(sigma_next, x32)
    dt = t_next - t
    sigma_t = _flow_grpo_diffusion(t, t_next, noise_level)
    mean = x32 + (v32 + sigma_t**2 / (2 * t) * (x32 + (1 - t) * v32)) * dt
    return mean, _flow_grpo_std(t, t_next, noise_level)


def dance_mean_std(x, v, sigma, sigma_next, noise_level: float):
    """DanceGRPO's SDE step (Xue et al. 2025, "DanceGRPO", flux_step with sde_solver): the
    Flow-GRPO drift with a constant diffusion η = noise_level:

        mean = x + [v + η²/(2t) · (x + (1−t)·v)]·Δt,   std = η·√(−Δt)
    """
    x32, v32 = x.float(), v.float()
    t, t_next = _per_sample(sigma, x32), _per_sample(sigma_next, x32)
    dt = t_next - t
    mean = x32 + (v32 + noise_level**2 / (2 * t) * (x32 + (1 - t) * v32)) * dt
    return mean, _dance_std(t, t_next, noise_level)


def _dance_std(t: torch.Tensor, t_next: torch.Tensor, noise_level: float) -> torch.Tensor:
    return noise_level * torch.sqrt(-(t_next - t))


def cps_mean_std(x, v, sigma, sigma_next, noise_level: float):
    """Coefficients-preserving sampling (Wang & Yu 2025, "CPS", as in Flow-GRPO's ``sde_type=cps``):

        x̂0 = x − t·v,  x̂1 = x + (1−t)·v,  s = t_next·sin(a·π/2)
        mean = (1−t_next)·x̂0 + √(t_next² − s²)·x̂1,  std = s

    It keeps the noise coefficient of x_next exactly t_next, so images are not over-noised. It does
    **not** preserve the ODE's marginals for a multi-modal data distribution: each step re-noises a
    fixed fraction of x around the posterior-mean estimate x̂0, which shrinks spread and mixes mode
    mass. What it guarantees: at a = 0 it is the Euler step, and for single-point data (exact v) each
    step's output is exactly N((1−t_next)·x0, t_next²). At t_next = 0 the step is deterministic.
    """
    x32, v32 = x.float(), v.float()
    t, t_next = _per_sample(sigma, x32), _per_sample(sigma_next, x32)
    x0_hat = x32 - t * v32
    x1_hat = x32 + (1 - t) * v32
    s = _cps_std(t, t_next, noise_level)
    mean = (1 - t_next) * x0_hat + torch.sqrt((t_next**2 - s**2).clamp_min(0)) * x1_hat
    return mean, s


def _cps_std(t: torch.Tensor, t_next: torch.Tensor, noise_level: float) -> torch.Tensor:
    return t_next * math.sin(noise_level * math.pi / 2)


_MEAN_STD = {"flow_grpo": flow_grpo_mean_std, "dance": dance_mean_std, "cps": cps_mean_std}
_STD = {"flow_grpo": _flow_grpo_std, "dance": _dance_std, "cps": _cps_std}


def step_mean_std(kind: str, x, v, sigma, sigma_next, noise_level: float):
    """(mean, std) of the Gaussian transition of an SDE step of ``kind`` (see ``SDE_KINDS``)."""
    if kind not in _MEAN_STD:
        raise ValueError(f"unknown SDE kind {kind!r}; choose one of {SDE_KINDS}")
    return _MEAN_STD[kind](x, v, sigma, sigma_next, noise_level)


def step_std(kind: str, sigma, sigma_next, noise_level: float) -> torch.Tensor:
    """The std of an SDE step of ``kind`` from σ to σ_next (scalars or [B] → float32 of that shape):
    it depends on the schedule only, not on x or v (e.g. for noise-aware step weights)."""
    if kind not in _MEAN_STD:
        raise ValueError(f"unknown SDE kind {kind!r}; choose one of {SDE_KINDS}")
    t = torch.as_tensor(sigma, dtype=torch.float32)
    return _STD[kind](t, torch.as_tensor(sigma_next, dtype=torch.float32, device=t.device), noise_level)


def sde_step(
    kind: str,
    x: torch.Tensor,
    v: torch.Tensor,
    sigma,
    sigma_next,
    noise_level: float,
    noise: torch.Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
) -> StepResult:
    """Sample x_next ~ N(mean, std²) for an SDE step of ``kind`` and return its log-prob.

    ``noise`` (standard normal, shape of x) makes the step reproducible; otherwise it is drawn
    from ``generator``. A step with std = 0 (CPS into t = 0) is deterministic: x_next = mean and its
    log-prob is None, like the ODE's.
    """
    mean, std = step_mean_std(kind, x, v, sigma, sigma_next, noise_level)
    if bool((std == 0).all()):
        return StepResult(mean, mean, std, None)
    if noise is None:
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=torch.float32)
    x_next = mean + std * noise.float()
    return StepResult(x_next, mean, std, gaussian_log_prob(x_next, mean, std))


def transition_log_prob(
    kind: str,
    x: torch.Tensor,
    x_next: torch.Tensor,
    v: torch.Tensor,
    sigma,
    sigma_next,
    noise_level: float,
) -> StepResult:
    """Log-prob of a *recorded* transition x → x_next under (possibly new) model outputs v.

    This is what the policy ratio and the KL term use: x and x_next come from the rollout, v from
    the current (or reference) model, and gradients flow through v into ``mean`` and ``log_prob``.
    """
    mean, std = step_mean_std(kind, x, v, sigma, sigma_next, noise_level)
    if bool((std == 0).any()):
        raise ValueError(
            f"the {kind} step from sigma={sigma} to {sigma_next} is deterministic (std 0) and has no "
            "log-prob; do not record it for training (use a plan that excludes it)"
        )
    x_next = x_next.detach().float()
    return StepResult(x_next, mean, std, gaussian_log_prob(x_next, mean, std))
