"""The KL reference of full fine-tuning: a frozen copy of the initial denoiser.

LoRA's reference costs nothing (the base with adapters off); full fine-tuning changes the base weights,
so the trainer keeps a copy of them as they were before the first update (``train.kl_beta > 0``), on
``train.reference_device`` in ``train.reference_dtype``, one per process, and ``policy.reference()``
runs it (``Policy.attach_reference``).
"""

from __future__ import annotations

import copy

import torch

__all__ = ["FrozenReference"]


class FrozenReference(torch.nn.Module):
    """A frozen copy of ``denoiser`` on ``device`` in ``dtype``, called like the denoiser: floating inputs
    in ``model_dtype`` (latents, text embeddings) are cast to ``dtype`` (others, e.g. float32 timesteps, are
    only moved), every input goes to ``device``, the outputs come back on ``out_device``."""

    def __init__(self, denoiser: torch.nn.Module, *, device, dtype: torch.dtype, model_dtype: torch.dtype, out_device):
        super().__init__()
        self.module = copy.deepcopy(denoiser).to(device).requires_grad_(False).eval()
        if dtype != model_dtype:
            self.module.to(dtype)
        self.device, self.dtype, self.model_dtype = torch.device(device), dtype, model_dtype
        self.out_device = torch.device(out_device)

    def _in(self, x):
        if not torch.is_tensor(x):
            return x
        x = x.to(self.device)
        return x.to(self.dtype) if x.dtype == self.model_dtype else x

    @torch.no_grad()
    def forward(self, *args, **kwargs):
        out = self.module(*(self._in(a) for a in args), **{k: self._in(v) for k, v in kwargs.items()})
        return tuple(o.to(self.out_device) if torch.is_tensor(o) else o for o in out)
