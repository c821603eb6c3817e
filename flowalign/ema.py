"""An exponential moving average of parameters (the GRPO trainer's ``train.ema``; model building)."""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch

__all__ = ["EMA"]


class EMA:
    """shadow ← decay·shadow + (1 − decay)·param for each parameter, after every ``update()``.

    ``shadow`` holds detached copies (same device and dtype as the parameters); ``applied()``
    swaps them into the parameters inside a ``with`` block (sampling or saving with the averaged
    weights) and restores the trained values after; ``copy_to()`` writes them in for good.
    """

    def __init__(self, params: Iterable[torch.Tensor], decay: float):
        if not 0 <= decay <= 1:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.params = list(params)
        self.decay = float(decay)
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        d = self.decay
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
