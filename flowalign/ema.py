"""An exponential moving average of parameters (the GRPO trainer's ``train.ema``; model building)."""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch

__all__ = ["EMA"]


class EMA:
    """shadow ← d_k·shadow + (1 − d_k)·param for each parameter, at the k-th ``update()`` (k = 1, 2, ...)
    when (k + 1) is a multiple of ``every``; d_k = ``decay``, or with ``warmup`` min((1 + k)/(10 + k), decay).

    ``every=1, warmup=False`` (the default) updates every call at the constant decay. Flow-GRPO's
    ``EMAModuleWrapper(decay=0.9, update_step_interval=8)`` is ``every=8, warmup=True`` with k its
    optimizer-step counter (``train_sd3.py``: the first update at step 7 with d = 8/17, reaching 0.9 from
    step 80). ``steps`` counts the calls (a checkpoint keeps it, so a resumed run continues the schedule).

    ``shadow`` holds detached copies (same device and dtype as the parameters); ``applied()``
    swaps them into the parameters inside a ``with`` block (sampling or saving with the averaged
    weights) and restores the trained values after; ``copy_to()`` writes them in for good.
    """

    def __init__(self, params: Iterable[torch.Tensor], decay: float, every: int = 1, warmup: bool = False):
        if not 0 <= decay <= 1:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        if every < 1:
            raise ValueError(f"EMA update interval must be >= 1, got {every}")
        self.params = list(params)
        self.decay = float(decay)
        self.every, self.warmup = int(every), bool(warmup)
        self.steps = 0
        self.shadow = [p.detach().clone() for p in self.params]

    def current_decay(self, k: int) -> float:
        """d_k of the k-th update (class docstring)."""
        return min((1 + k) / (10 + k), self.decay) if self.warmup else self.decay

    @torch.no_grad()
    def update(self) -> None:
        self.steps += 1
        k = self.steps
        if (k + 1) % self.every:
            return
        d = self.current_decay(k)
        for e, p in zip(self.shadow, self.params):
            e.mul_(d).add_(p.detach(), alpha=1 - d)

    @torch.no_grad()
    def copy_to(self) -> None:
        """Overwrite the parameters with the averages."""
        for p, e in zip(self.params, self.shadow):
            p.copy_(e)

    @torch.no_grad()
    def load(self, tensors: Iterable[torch.Tensor]) -> None:
        """Set the averages (e.g. from a checkpoint), in parameter order."""
        for e, v in zip(self.shadow, tensors):
            e.copy_(v.to(e.device, e.dtype))

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The averages swapped into the parameters inside the block; the trained values after."""
        saved = [p.detach().clone() for p in self.params]
        self.copy_to()
        try:
            yield
        finally:
            with torch.no_grad():
                for p, v in zip(self.params, saved):
                    p.copy_(v)
