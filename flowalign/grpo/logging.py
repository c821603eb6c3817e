"""Metrics of a run: ``metrics.jsonl`` (one JSON object per logged iteration, always), plus tensorboard or
wandb when configured. Only the main process writes.

Stable metric names (the docs list them): ``reward/<name>/mean|std``, ``reward/total/mean``,
``train/approx_kl`` (per latent element, like ``train/kl``), ``train/clipfrac``, ``train/kl``, ``train/policy_loss``, ``train/grad_norm``,
``train/zero_std_frac``, ``train/ratio_mean``, ``train/optimizer_steps``, ``judge/requests``,
``judge/failures``, ``judge/ties_from_failures`` (rewards that ask a judge), ``eval/<name>`` (and
``eval/<name>/<field>`` for rewards that report several scores, e.g. ``eval/pocket_gold/strict``),
``time/rollout_s``, ``time/reward_s``, ``time/train_s``, ``time/eval_s``, ``time/iteration_s``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


class MetricsLogger:
    def __init__(self, output_dir: str | os.PathLike, tracker: str = "none", config: dict | None = None,
                 resume_iteration: int | None = None):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_iteration is not None and self.path.exists():
            self._truncate_after(resume_iteration)
        self._tb = self._wandb = None
        if tracker == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print("flowalign: run.tracker=tensorboard but tensorboard is not installed "
                      "(pip install 'flowalign[track]'); logging to metrics.jsonl only", file=sys.stderr)
            else:
                self._tb = SummaryWriter(str(Path(output_dir) / "tensorboard"))
        elif tracker == "wandb":
            try:
                import wandb
            except ImportError as err:
                raise ValueError("run.tracker=wandb but wandb is not installed: pip install 'flowalign[track]', "
                                 "or set run.tracker=tensorboard/none") from err
            self._wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "flowalign"), config=config,
                                     dir=str(output_dir), resume="allow")

    def _truncate_after(self, iteration: int) -> None:
        """A resumed run rewrites the iterations after its checkpoint: drop their old lines."""
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("iteration", 0) <= iteration:
                    kept.append(line)
            except json.JSONDecodeError:  # a line cut by a kill
                continue
        from ..io import atomic_write_text

        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def log(self, iteration: int, metrics: dict[str, float]) -> None:
        row = {"iteration": iteration, **{k: _plain(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        numbers = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "iteration"}
        if self._tb is not None:
            for k, v in numbers.items():
                self._tb.add_scalar(k, v, iteration)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(numbers, step=iteration)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _plain(v):
    if hasattr(v, "item"):
        return v.item()
    return v


def read_metrics(output_dir: str | os.PathLike) -> list[dict]:
    """The rows of a run's ``metrics.jsonl``."""
    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
