"""Noise schedules of flow-matching samplers: σ from 1 (noise) to 0 (data).

Both schedules reproduce diffusers' ``FlowMatchEulerDiscreteScheduler.set_timesteps`` exactly, as
driven by the stock pipelines:

* SD3/SD3.5 (``StableDiffusion3Pipeline``): σ = shift(linspace(σ_max, σ_min, N)) where σ_max = 1 and
  σ_min = shift(1/num_train_timesteps) — the scheduler shifts its training grid once at init and the
  inference grid again in ``set_timesteps``, so the last sigma is shifted twice.
* FLUX.1 (``FluxPipeline``): σ = linspace(1, 1/N, N), then the resolution-dependent ("dynamic")
  exponential shift with μ from the packed image sequence length (FLUX.1-dev), or the plain shift
  (FLUX.1-schnell's scheduler has dynamic shifting off and shift 1).

Every schedule returns N+1 float32 sigmas ending with a terminal 0.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def shift_sigmas(sigmas, shift: float):
    """SD3's time shift (Esser et al. 2024, eq. 23): σ' = s·σ / (1 + (s−1)·σ)."""
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def exponential_time_shift(sigmas, mu: float):
    """FLUX's dynamic shift: σ' = e^μ / (e^μ + (1/σ − 1)), i.e. the SD3 shift with s = e^μ."""
    return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))


def flux_mu(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """μ of the dynamic shift, linear in the packed latent sequence length (diffusers
    ``calculate_shift``): μ = base_shift at ``base_seq_len`` tokens, ``max_shift`` at ``max_seq_len``."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + base_shift - slope * base_seq_len


def _finish(sigmas: np.ndarray) -> torch.Tensor:
    out = torch.from_numpy(np.asarray(sigmas)).to(torch.float32)
    return torch.cat([out, torch.zeros(1)])


def sd3_sigmas(num_steps: int, shift: float = 3.0, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The sigmas ``StableDiffusion3Pipeline`` samples with (N+1 values, last 0).

    Shift 3.0 is SD3/SD3.5's default; shift 1 gives the plain linear grid down to 1/T.
    """
    _check_steps(num_steps)
    # The scheduler keeps sigma_min as a float32 value of its shifted training grid.
    sigma_min = float(torch.tensor(shift_sigmas(1.0 / num_train_timesteps, shift), dtype=torch.float32))
    sigma_max = 1.0
    base = np.linspace(sigma_max * num_train_timesteps, sigma_min * num_train_timesteps, num_steps)
    return _finish(shift_sigmas(base / num_train_timesteps, shift))


def flux_sigmas(
    num_steps: int,
    image_seq_len: int | None = None,
    *,
    dynamic: bool = True,
    shift: float = 1.0,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> torch.Tensor:
    """The sigmas ``FluxPipeline`` samples with (N+1 values, last 0).

    ``dynamic=True`` (FLUX.1-dev) needs ``image_seq_len`` = (H/16)·(W/16) packed tokens;
    ``dynamic=False`` (FLUX.1-schnell) applies the plain ``shift`` (1.0 = no shift).
    """
    _check_steps(num_steps)
    base = np.linspace(1.0, 1.0 / num_steps, num_steps)
    if dynamic:
        if image_seq_len is None:
            raise ValueError("flux_sigmas(dynamic=True) needs image_seq_len = (height/16)*(width/16)")
        mu = flux_mu(image_seq_len, base_seq_len, max_seq_len, base_shift, max_shift)
        return _finish(exponential_time_shift(base, mu))
    return _finish(shift_sigmas(base, shift))


def _check_steps(num_steps: int) -> None:
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
