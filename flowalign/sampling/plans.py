"""Rollout plans: which of N denoising steps are stochastic (SDE), which are recorded for training,
and where TempFlow-GRPO branches.

A plan is plain data. Builders cover the published variants:

* ``full_sde_plan``        – every step SDE and recorded (Flow-GRPO, DanceGRPO).
* ``window_plan``          – k consecutive SDE steps at a fixed start, the rest ODE
                             (Flow-GRPO-Fast, MixGRPO's window).
* ``random_window_plan``   – the window's start drawn uniformly from a range each iteration.
* ``progressive_window_plan`` – MixGRPO's sliding window: the start moves ``stride`` steps every
                             ``shift_interval`` iterations, capped at the last valid position, or
                             (``rollback``) rolled back to the start as MixGRPO's code does.
* ``branching_plan``       – TempFlow-GRPO: an ODE trunk; at each branch step one SDE step spawns K
                             branches that finish by ODE, so each branch step gets its own reward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class RolloutPlan:
    num_steps: int
    sde: tuple[bool, ...]  # per step: stochastic (True) or Euler ODE (False)
    record: tuple[int, ...]  # steps whose transitions are recorded for the policy update
    branch_steps: tuple[int, ...] = field(default=())  # TempFlow-GRPO branch points (trunk is ODE)
    num_branches: int = 0  # K branches per branch step

    def __post_init__(self):
        n = self.num_steps
        if len(self.sde) != n:
            raise ValueError(f"plan.sde has {len(self.sde)} entries for {n} steps")
        if list(self.record) != sorted(set(self.record)) or any(not 0 <= i < n for i in self.record):
            raise ValueError(f"plan.record must be sorted unique step indices in [0, {n}), got {self.record}")
        if any(not self.sde[i] for i in self.record):
            raise ValueError("only SDE steps can be recorded: an ODE step has no log-prob")
        if self.branch_steps:
            if self.num_branches < 1:
                raise ValueError("a branching plan needs num_branches >= 1")
            if any(self.sde):
                raise ValueError("a branching plan keeps an ODE trunk: sde must be all False")
            if list(self.branch_steps) != sorted(set(self.branch_steps)) or any(
                not 0 <= i < n for i in self.branch_steps
            ):
                raise ValueError(f"branch_steps must be sorted unique indices in [0, {n}), got {self.branch_steps}")

    @property
    def is_branching(self) -> bool:
        return bool(self.branch_steps)

    @property
    def num_sde_steps(self) -> int:
        return sum(self.sde)


def _check(num_steps: int, window_size: int | None = None) -> None:
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if window_size is not None and not 1 <= window_size <= num_steps:
        raise ValueError(f"window_size must be in [1, num_steps={num_steps}], got {window_size}")


def full_sde_plan(num_steps: int, include_last: bool = True, record_last: bool = True) -> RolloutPlan:
    """Every step is SDE and recorded (Flow-GRPO, DanceGRPO). ``include_last=False`` makes the last
    step (into σ = 0) an unrecorded ODE step — required for CPS, whose last step is deterministic.
    ``record_last=False`` keeps the last step stochastic but does not record it (DanceGRPO's and
    Pref-GRPO's ``--ignore_last``: all N steps sample with noise, the first N − 1 are trainable)."""
    _check(num_steps)
    n_sde = num_steps if include_last else num_steps - 1
    sde = tuple(i < n_sde for i in range(num_steps))
    n_rec = n_sde if record_last else min(n_sde, num_steps - 1)
    return RolloutPlan(num_steps, sde, tuple(range(n_rec)))


def window_plan(num_steps: int, window_size: int, start: int) -> RolloutPlan:
    """Steps ``[start, start + window_size)`` are SDE and recorded; all others are ODE."""
    _check(num_steps, window_size)
    if not 0 <= start <= num_steps - window_size:
        raise ValueError(f"window start must be in [0, {num_steps - window_size}], got {start}")
    idx = tuple(range(start, start + window_size))
    return RolloutPlan(num_steps, tuple(i in idx for i in range(num_steps)), idx)


def random_window_plan(
    num_steps: int, window_size: int, low: int, high: int, generator: torch.Generator | None = None
) -> RolloutPlan:
    """A window whose start is drawn uniformly from ``[low, high]`` (inclusive)."""
    _check(num_steps, window_size)
    if not 0 <= low <= high <= num_steps - window_size:
        raise ValueError(f"need 0 <= low <= high <= {num_steps - window_size}, got low={low}, high={high}")
    start = int(torch.randint(low, high + 1, (1,), generator=generator).item())
    return window_plan(num_steps, window_size, start)


def progressive_window_plan(
    num_steps: int, window_size: int, iteration: int, shift_interval: int, stride: int = 1, start: int = 0,
    rollback: bool = False,
) -> RolloutPlan:
    """MixGRPO's sliding window (Li et al. 2025): the window's j-th position (j = ⌊iteration/interval⌋)
    is p_j = start₀ + stride·j, so training moves from high to low noise over time.

    Without ``rollback`` p_j is capped at num_steps − window_size (the window stays at the last full
    position). With ``rollback`` it follows MixGRPO's code (``fastvideo/utils/grpo_states.py``,
    ``roll_back=True`` with ``max_timesteps = N − 2``): the window covers steps [p_j, min(p_j + w, N − 2)),
    cut at N − 2, and once p_j reaches N − 2 the position starts again from start₀, so
    p_j = start₀ + stride·(j mod K), K the number of positions below N − 2. (The reference also spends one
    interval at p = N − 2, whose window is empty and trains nothing; here that position is skipped.)
    """
    _check(num_steps, window_size)
    if shift_interval < 1 or stride < 0 or iteration < 0:
        raise ValueError("need shift_interval >= 1, stride >= 0 and iteration >= 0")
    j = iteration // shift_interval
    if not rollback:
        pos = min(start + stride * j, num_steps - window_size)
        return window_plan(num_steps, window_size, pos)
    limit = num_steps - 2  # MixGRPO's max_timesteps: windows end before it
    if not 0 <= start < limit:
        raise ValueError(f"a rolling-back window needs 0 <= start < num_steps - 2 = {limit}, got start={start}")
    positions = (limit - start + stride - 1) // stride if stride else 1  # K: starts below the limit
    pos = start + stride * (j % positions)
    idx = tuple(range(pos, min(pos + window_size, limit)))
    return RolloutPlan(num_steps, tuple(i in idx for i in range(num_steps)), idx)


def branching_plan(num_steps: int, branch_steps, num_branches: int) -> RolloutPlan:
    """TempFlow-GRPO's trajectory branching (He et al. 2025): an ODE trunk; at each step in
    ``branch_steps`` the trunk state takes one SDE step K times, and each branch finishes by ODE."""
    _check(num_steps)
    return RolloutPlan(
        num_steps,
        tuple(False for _ in range(num_steps)),
        (),
        branch_steps=tuple(int(i) for i in branch_steps),
        num_branches=int(num_branches),
    )


def plan_from_config(sampling, iteration: int = 0, generator: torch.Generator | None = None) -> RolloutPlan:
    """The plan a ``SamplingConfig`` describes, for training iteration ``iteration``."""
    n, kind = sampling.num_steps, sampling.plan
    if kind == "full":
        return full_sde_plan(n, include_last=sampling.include_last_step, record_last=sampling.record_last_step)
    if kind == "window":
        return window_plan(n, sampling.window_size, sampling.window_start)
    if kind == "random_window":
        low, high = sampling.window_range
        return random_window_plan(n, sampling.window_size, low, high, generator)
    if kind == "progressive_window":
        return progressive_window_plan(
            n, sampling.window_size, iteration, sampling.window_shift_interval, sampling.window_stride,
            sampling.window_start, rollback=sampling.window_rollback,
        )
    if kind == "branching":
        return branching_plan(n, sampling.branch_steps, sampling.num_branches)
    raise ValueError(f"unknown plan {kind!r}")
