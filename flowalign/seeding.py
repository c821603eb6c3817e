"""Seeds: the one home of flowalign's rules for turning integers into random streams.

* ``derive_seed(*parts)`` — a 63-bit seed from integers (run seed, iteration, purpose, rank, ...),
  stable across runs, processes and machines; ``seeded_generator(*parts)`` is a generator seeded
  with it. The GRPO trainer draws every random number of an iteration from such generators, so a
  resumed run repeats an uninterrupted one.
* ``sample_noise(shape, seed, indices)`` — the seed → noise rule: row i depends only on
  (seed, indices[i]), so sample i of a prompt file gets the same noise alone, in any batch, or in
  any subset of the file (pocket sampling and evaluation, ReNO / Best-of-N / CARINOX start noise,
  the GRPO trainer's evaluation images with ``stream``).
* ``seed_everything(seed)`` — seed torch's global generator and return a CPU generator seeded
  the same (for code that also draws from the global generator, e.g. model initialisation).
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["derive_seed", "seeded_generator", "sample_noise", "seed_everything"]

_NOISE_ROW_STRIDE = 1_000_003  # sample_noise without a stream: row i of seed s uses seed s·stride + i


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (an FNV-1a-style hash over the parts' low 48 bits)."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFF)) * 1099511628211) % (1 << 63)
    return h


def seeded_generator(*parts: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``derive_seed(*parts)``."""
    return torch.Generator(device=device).manual_seed(derive_seed(*parts))


def sample_noise(shape: Sequence[int], seed: int, indices: Sequence[int], *, stream: int | None = None) -> torch.Tensor:
    """Standard normal noise [len(indices), *shape] (float32, CPU); row i depends only on
    (seed, indices[i]): by default drawn with seed ``seed·1 000 003 + indices[i]``; with ``stream``
    (a purpose number, e.g. the GRPO trainer's evaluation) from ``seeded_generator(seed, indices[i], stream)``."""
    def gen(i: int) -> torch.Generator:
        if stream is None:
            return torch.Generator().manual_seed(seed * _NOISE_ROW_STRIDE + int(i))
        return seeded_generator(seed, i, stream)

    return torch.stack([torch.randn(tuple(shape), generator=gen(i)) for i in indices])


def seed_everything(seed: int) -> torch.Generator:
    """Seed torch's global generator with ``seed`` and return a CPU generator seeded the same."""
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)
