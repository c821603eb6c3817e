"""A training run's state and its files: checkpoints, resume, the EMA of the weights, the final export.

    output_dir/
      checkpoints/iter_XXXXXX/   trainable.safetensors, ema.safetensors (with train.ema), optimizer.pt,
                                 rng.pt, state.json (iteration, processes, sampler position, the size
                                 and SHA-256 of every other file, the settings the weights' shapes and
                                 meaning depend on); written whole or not at all (flowalign.io.atomic_dir,
                                 fsynced); the last run.keep_checkpoints kept
      final/lora                 the trained (EMA when enabled) LoRA in diffusers format, loadable by the
                                 stock pipeline's load_lora_weights; final/<denoiser> after full fine-tuning

Only the main process writes; every method that writes waits for all processes. Nothing non-finite
is ever written: ``save`` and ``export`` refuse NaN/inf tensors. A resume takes the newest checkpoint
whose files match their recorded sizes and hashes, and refuses one written with other settings
(``TrainingStopped`` naming the key).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Iterable

import torch

from ..ema import EMA
from ..errors import UserError
from ..io import atomic_dir, atomic_write_json, remove_stale_partials

__all__ = ["TrainState", "TrainingStopped"]


class TrainingStopped(UserError):
    """The run stopped on an expected failure (non-finite numbers, a failing judge, no intact or an
    incompatible checkpoint); the one-line message names the iteration or file and the fix. ``metrics``:
    what the stopped iteration measured (logged before the stop)."""

    def __init__(self, message: str, metrics: dict | None = None):
        super().__init__(message)
        self.metrics = metrics or {}


class TrainState:
    """The trainable parameters (``names`` as in the denoiser's ``named_parameters``), their optimizer
    and EMA (``ema_decay`` None: no EMA), and the run's files under ``output_dir``."""

    def __init__(self, accelerator, output_dir: str | os.PathLike, params: list[torch.Tensor], names: list[str],
                 optimizer, *, device, ema_decay: float | None, ema_every: int = 1, ema_warmup: bool = False,
                 keep_checkpoints: int, prompts_per_iteration: int,
                 settings: dict | None = None):
        """``settings``: the config values (``{"model.lora_rank": 32, ...}``) a checkpoint's weights only fit
        with; recorded at save, compared at load."""
        self.acc, self.device = accelerator, device
        self.output_dir = Path(output_dir)
        self.params, self.names, self.optimizer = params, names, optimizer
        self.ema = EMA(params, ema_decay, every=ema_every, warmup=ema_warmup) if ema_decay is not None else None
        self.keep_checkpoints = keep_checkpoints
        self.prompts_per_iteration = prompts_per_iteration
        self.settings = dict(settings or {})

    # ------------------------------------------------------------------ EMA
    def ema_update(self) -> None:
        """After an optimizer step."""
        if self.ema is not None:
            self.ema.update()

    def ema_weights(self):
        """The EMA weights swapped into the model inside the context (no-op without EMA)."""
        return self.ema.applied() if self.ema is not None else contextlib.nullcontext()

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_dir(self) -> Path:
        return self.output_dir / "checkpoints"

    def save(self, iteration: int) -> Path:
        """Write ``checkpoints/iter_XXXXXX``: trainable weights, optimizer, EMA, RNG states, the iteration, and
        the size and hash of every file; refuses (``TrainingStopped``) when a tensor is not finite."""
        from safetensors.torch import save_file

        final = self.checkpoint_dir / f"iter_{iteration:06d}"
        self._refuse_nonfinite(self._named_state(), f"write checkpoint {final.name}")
        if self.acc.is_main_process:
            with atomic_dir(final, fsync=True) as tmp:
                save_file({n: p.detach().cpu().contiguous() for n, p in zip(self.names, self.params)},
                          str(tmp / "trainable.safetensors"))
                if self.ema is not None:
                    save_file({n: e.cpu().contiguous() for n, e in zip(self.names, self.ema.shadow)},
                              str(tmp / "ema.safetensors"))
                torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
                rng = {"torch": torch.get_rng_state()}
                if torch.cuda.is_available():
                    rng["cuda"] = torch.cuda.get_rng_state_all()
                torch.save(rng, tmp / "rng.pt")
                files = {f.name: _file_record(f) for f in sorted(tmp.iterdir())}
                atomic_write_json(tmp / "state.json", {"iteration": iteration, "processes": self.acc.num_processes,
                                                       "ema_steps": self.ema.steps if self.ema is not None else 0,
                                                       "sampler_position": iteration * self.prompts_per_iteration,
                                                       "settings": self.settings, "files": files})
            for old in self.checkpoints()[:-self.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        self.acc.wait_for_everyone()
        return final

    def _named_state(self) -> Iterable[tuple[str, torch.Tensor]]:
        """Every floating tensor a checkpoint holds, named for a message."""
        yield from zip(self.names, self.params)
        if self.ema is not None:
            yield from ((f"the EMA of {n}", e) for n, e in zip(self.names, self.ema.shadow))
        for i, state in enumerate(self.optimizer.state_dict()["state"].values()):
            yield from ((f"the optimizer's {k} of parameter {i}", v) for k, v in state.items() if torch.is_tensor(v))

    def checkpoints(self) -> list[Path]:
        """The checkpoint folders, oldest first."""
        return sorted(p for p in self.checkpoint_dir.glob("iter_*") if p.is_dir())

    def remove_partial_writes(self) -> list[Path]:
        """Main process, before a run writes: remove the temp folders of checkpoint and export writes that
        a killed run left behind."""
        if not self.acc.is_main_process:
            return []
        return [p for d in (self.checkpoint_dir, self.output_dir / "final") if d.is_dir()
                for p in remove_stale_partials(d)]

    def latest(self, warn: Callable[[str], None] | None = None) -> Path | None:
        """The newest intact checkpoint (``verify_checkpoint``), None when there is none; ``warn`` is told of every
        newer damaged one (naming it, why, and the one used instead). Damaged ones only:
        ``TrainingStopped``."""
        found = self.checkpoints()
        damaged = []
        for path in reversed(found):
            problem = verify_checkpoint(path)
            if problem is None:
                if warn is not None:
                    for bad, why in damaged:
                        warn(f"checkpoint {bad} is damaged ({why}); resuming from {path} instead")
                return path
            damaged.append((path, problem))
        if damaged:
            listed = "; ".join(f"{p.name}: {why}" for p, why in damaged)
            raise TrainingStopped(f"no intact checkpoint in {self.checkpoint_dir} ({listed}); remove the folder to "
                                  f"start over, or use a new run.output_dir")
        return None

    def load(self, path: str | os.PathLike) -> int:
        """Restore a checkpoint → the iteration to continue from. A checkpoint written with other settings
        (``settings``) or other trainable tensors is refused with ``TrainingStopped`` before anything
        changes."""
        from safetensors.torch import load_file

        path = Path(path)
        state = json.loads((path / "state.json").read_text())
        for key, value in state.get("settings", {}).items():  # checkpoints of older versions record none
            if key in self.settings and self.settings[key] != value:
                raise TrainingStopped(
                    f"checkpoint {path} was written with {key}={value!r}, this run has {key}={self.settings[key]!r}; "
                    f"resume with {key}={value!r}, or start a new run in another run.output_dir"
                )
        weights = load_file(str(path / "trainable.safetensors"))
        missing = set(self.names) - set(weights)
        if missing:
            raise TrainingStopped(
                f"checkpoint {path} does not match this model: {len(missing)} trainable tensors missing "
                f"(e.g. {sorted(missing)[0]}); was it written with another model or LoRA config?")
        for n, p in zip(self.names, self.params):
            if weights[n].shape != p.shape:
                raise TrainingStopped(
                    f"checkpoint {path} holds {n} of shape {tuple(weights[n].shape)}, this model's is "
                    f"{tuple(p.shape)}; resume with the model settings (model.lora_rank, model.lora_targets) "
                    f"it was written with, or start a new run in another run.output_dir")
        with torch.no_grad():
            for n, p in zip(self.names, self.params):
                p.copy_(weights[n].to(p.device, p.dtype))
        if self.ema is not None and (path / "ema.safetensors").is_file():
            ema = load_file(str(path / "ema.safetensors"))
            self.ema.load(ema[n] for n in self.names)
            self.ema.steps = int(state.get("ema_steps", 0))  # where the EMA schedule (ema_every, warm-up) stands
        self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location=self.device))
        rng = torch.load(path / "rng.pt", weights_only=True)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        return int(state["iteration"])

    # ------------------------------------------------------------------ export
    def export(self, policy) -> Path:
        """The trained weights (EMA when enabled): LoRA in diffusers format under ``final/lora``, or the
        full denoiser under ``final/<denoiser>``."""
        out = self.output_dir / "final"
        name = "lora" if policy.train_mode == "lora" else policy.denoiser_name
        with self.ema_weights():
            self._refuse_nonfinite(zip(self.names, self.params), f"export {out / name}")
            if self.acc.is_main_process:
                with atomic_dir(out / name, fsync=True) as tmp:
                    policy.save_adapter(tmp)
        self.acc.wait_for_everyone()
        return out

    def _refuse_nonfinite(self, named: Iterable[tuple[str, torch.Tensor]], what: str) -> None:
        """``TrainingStopped`` on every process when a tensor of ``named`` holds a NaN or inf on any process."""
        bad = _first_nonfinite(named)
        flag = torch.tensor([float(bad is not None)], device=self.device)
        if self.acc.num_processes > 1:
            flag = self.acc.gather(flag)
        if bool(flag.any()):
            raise TrainingStopped(f"refusing to {what}: {bad or 'a tensor of another process'} is not finite")


def verify_checkpoint(path: Path) -> str | None:
    """What is wrong with checkpoint folder ``path`` (an unreadable state.json, a missing file, a size or
    SHA-256 other than recorded at save), or None when it is intact. A checkpoint of an older version
    (no recorded files) is trusted as it is."""
    try:
        state = json.loads((path / "state.json").read_text())
        int(state["iteration"])
        files = state.get("files", {})
        assert isinstance(files, dict)
    except (OSError, ValueError, KeyError, TypeError, AssertionError) as err:
        return f"state.json is unreadable: {type(err).__name__}"
    for name, want in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        size = f.stat().st_size
        if size != want["bytes"]:
            return f"{name} is {size} bytes, {want['bytes']} were written"
        if _file_record(f)["sha256"] != want["sha256"]:
            return f"{name} does not match its recorded SHA-256"
    return None


def _file_record(path: Path) -> dict:
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return {"bytes": path.stat().st_size, "sha256": digest}


def _first_nonfinite(named: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first floating tensor holding a NaN or inf, or None."""
    for name, t in named:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None
