"""The runner behind ``flowalign reno``: the search a ``NoiseOptConfig`` names, on one batch of prompts.

    for start in range(0, len(prompts), cfg.run.batch_size):
        results = search_batch(policy, rewards, prompts[start:start + cfg.run.batch_size], cfg, seed=0, offset=start)

The CLI (``noise_opt/cli.py``) adds loading and the output folders; benchmarks call it directly with
their own callbacks (``benchmarks/noise_opt_pocket.py``).
"""

from __future__ import annotations

from typing import Callable

from .config import NoiseOptConfig
from .explore import best_of_n_batch, carinox_batch
from .reno import reno_batch
from .search import Result

__all__ = ["search_batch", "generator_calls"]


def generator_calls(cfg: NoiseOptConfig) -> int:
    """Generator calls per prompt and seed of ``cfg.search.method``."""
    o, s = cfg.optim, cfg.search
    if s.method == "reno":
        return o.iterations
    if s.method == "best_of_n":
        return s.num_seeds
    return s.num_seeds + o.iterations if s.optimize == "best" else s.num_seeds * o.iterations


def search_batch(policy, rewards, prompts: list[str], cfg: NoiseOptConfig, *, seed: int, offset: int = 0,
                 metadata: list[dict] | None = None, on_iteration: Callable | None = None) -> list[Result]:
    """``cfg.search.method`` (reno, best_of_n, carinox) for ``prompts``, rows ``offset``… of their prompt
    file (which fixes their start noise with ``seed``), with ``cfg``'s generation and optimizer settings;
    Best-of-N scores with the same reward views as the optimizers."""
    g, o, s = cfg.generation, cfg.optim, cfg.search
    common = dict(seed=seed, offset=offset, metadata=metadata, progress=cfg.run.progress, on_iteration=on_iteration)
    if s.method == "reno":
        return reno_batch(policy, rewards, prompts, o, g, **common)
    if s.method == "best_of_n":
        return best_of_n_batch(policy, rewards, prompts, s.num_seeds, g, reward_views=o.reward_views,
                               view_shift=o.view_shift, **common)
    return carinox_batch(policy, rewards, prompts, s.num_seeds, o, g, optimize=s.optimize, **common)
