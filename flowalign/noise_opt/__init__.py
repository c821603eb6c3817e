"""Inference-time noise optimization: ReNO, Best-of-N and CARINOX on any flowalign generator.

    from flowalign.noise_opt import reno, best_of_n, carinox
    result = reno(policy, reward, "two red circles", iterations=50, lr=5, num_steps=4)
    result.best_image, result.initial_image, result.history

``policy`` is a loaded ``flowalign.models`` Policy (frozen), ``reward`` a reward callable, a
``flowalign.rewards.MultiReward`` or (reward, weight) pairs. The ``*_batch`` forms optimize many
prompts in one batch with per-sample math identical to the single-prompt calls. ``search_batch`` runs
the method a ``NoiseOptConfig`` names on a batch, as ``flowalign reno`` (``flowalign.noise_opt.cli``)
does for every batch of a prompt file.
"""

from .config import GenerationConfig, NoiseOptConfig, OptimConfig, load_noise_opt_config
from .explore import best_of_n, best_of_n_batch, carinox, carinox_batch
from .objective import chi_norm_regularizer, clip_rows, loss_ceiling
from ..seeding import sample_noise
from .reno import optimize_noise, reno, reno_batch
from .runner import generator_calls, search_batch
from .search import Result, make_generator, reward_terms

__all__ = [
    "reno", "reno_batch", "best_of_n", "best_of_n_batch", "carinox", "carinox_batch", "Result",
    "OptimConfig", "GenerationConfig", "NoiseOptConfig", "load_noise_opt_config", "chi_norm_regularizer",
    "clip_rows", "loss_ceiling", "make_generator", "optimize_noise", "reward_terms", "sample_noise",
    "search_batch", "generator_calls",
]
