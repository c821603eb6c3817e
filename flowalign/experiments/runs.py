"""GRPO runs for notebooks and scripts: shrink a recipe to a budget, train it, read its curves.

    cfg = scale_budget(load_config("configs/pocket/flow_grpo.yaml", ["run.output_dir=runs/a"]),
                       num_iterations=10, prompts_per_iteration=4, group_divisor=2)
    run = run_grpo(cfg)                                  # a fresh run; RunResult
    run.curve("eval/pocket_gold/strict")                 # (iterations, values)
    run.curve("eval/pocket_gold/strict", x="train_s")    # against cumulative training seconds
"""

from __future__ import annotations

import copy
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from ..grpo.config import Config, validate_config
from ..grpo.objectives import OBJECTIVES

__all__ = ["RunResult", "run_grpo", "scale_budget"]


def scale_budget(cfg: Config, *, num_iterations: int, prompts_per_iteration: int, group_divisor: int = 1) -> Config:
    """A copy of a recipe shrunk to a smaller budget with its per-iteration behaviour kept.

    ``train.group_size`` becomes ``group_size // group_divisor`` (at least 2; for TempFlow-GRPO the
    number of ODE trunks), ``train.prompts_per_iteration`` and ``train.num_iterations`` the given
    values. ``train.micro_batch_size`` shrinks with the images per iteration, so each iteration
    still makes the recipe's number of optimizer steps (Adam's step count, not the batch, sets how
    far LoRA weights move), rounded up to whole prompt groups for objectives that train groups
    (PRDP, DRAGON); ``sampling.window_shift_interval`` shrinks with the iterations, so a MixGRPO
    window still travels its whole path.
    """
    if num_iterations < 1 or prompts_per_iteration < 1 or group_divisor < 1:
        raise ValueError("num_iterations, prompts_per_iteration and group_divisor must be >= 1, got "
                         f"{num_iterations}, {prompts_per_iteration}, {group_divisor}")
    out = copy.deepcopy(cfg)
    t, s = out.train, out.sampling
    images_before = t.group_size * t.prompts_per_iteration
    t.group_size = max(2, t.group_size // group_divisor)
    t.prompts_per_iteration = prompts_per_iteration
    images = t.group_size * t.prompts_per_iteration
    t.micro_batch_size = max(1, min(images, round(t.micro_batch_size * images / images_before)))
    if OBJECTIVES[t.objective].batch_unit == "group":  # whole groups per micro-batch (validate_config)
        t.micro_batch_size = t.group_size * math.ceil(t.micro_batch_size / t.group_size)
    s.window_shift_interval = max(1, round(s.window_shift_interval * num_iterations / t.num_iterations))
    t.num_iterations = num_iterations
    validate_config(out)
    return out


@dataclass
class RunResult:
    """A finished GRPO run: its config, folder, ``metrics.jsonl`` rows and wall time."""

    config: Config
    output_dir: Path
    metrics: list[dict]
    wall_s: float  # the whole train() call: rollouts, updates, evaluations, checkpoints

    def train_seconds(self) -> dict[int, float]:
        """Cumulative training seconds (``time/iteration_s``: rollout + reward + update, no eval) at the
        end of each logged iteration; iteration 0 (before training) is 0."""
        total, out = 0.0, {0: 0.0}
        for row in sorted(self.metrics, key=lambda r: r["iteration"]):
            if "time/iteration_s" in row:
                total += row["time/iteration_s"]
                out[row["iteration"]] = total
        return out

    def curve(self, key: str, x: str = "iteration") -> tuple[list[float], list[float]]:
        """(x, values) of every logged row holding ``key``; ``x`` is ``iteration`` or ``train_s``
        (cumulative training seconds, see ``train_seconds``)."""
        if x not in ("iteration", "train_s"):
            raise ValueError(f"x must be 'iteration' or 'train_s', got {x!r}")
        rows = sorted((r for r in self.metrics if key in r), key=lambda r: r["iteration"])
        if not rows:
            keys = sorted({k for r in self.metrics for k in r})
            raise ValueError(f"no logged row has {key!r}; logged keys: {keys}")
        secs = self.train_seconds() if x == "train_s" else None
        xs = [float(r["iteration"]) if secs is None else secs[r["iteration"]] for r in rows]
        return xs, [float(r[key]) for r in rows]

    def last(self, key: str) -> float:
        return self.curve(key)[1][-1]


def run_grpo(cfg: Config, *, fresh: bool = True, quiet: bool = True, **trainer_kwargs) -> RunResult:
    """Train ``cfg`` with ``GRPOTrainer`` and return its metrics.

    ``fresh`` deletes a previous run in ``run.output_dir`` first (only a folder that holds a
    flowalign run, i.e. a ``config.yaml``, or nothing), so re-running a notebook repeats the run
    instead of resuming it. ``quiet`` drops the trainer's start-up summary line.
    """
    from ..grpo.logging import read_metrics
    from ..grpo.trainer import GRPOTrainer

    out = Path(cfg.run.output_dir)
    if fresh and out.exists() and any(out.iterdir()):
        if not (out / "config.yaml").is_file():
            raise ValueError(f"run.output_dir={out} is not empty and holds no flowalign run (no config.yaml); "
                             "refusing to delete it: choose another run.output_dir")
        shutil.rmtree(out)
    if quiet:
        trainer_kwargs.setdefault("log", lambda *_: None)
    t0 = time.time()
    with GRPOTrainer(cfg, **trainer_kwargs) as trainer:
        trainer.train()
    wall = time.time() - t0
    return RunResult(cfg, out, read_metrics(out), wall)
