"""A training run's state and its files: checkpoints, resume, the EMA of the weights, the final export.

    output_dir/
      checkpoints/iter_XXXXXX/   trainable.safetensors, ema.safetensors (with train.ema), optimizer.pt
                                 (optimizer/ under FSDP), rng.pt, state.json (iteration, processes,
                                 sampler position, the size and SHA-256 of every other file, the settings
                                 the weights' shapes and meaning depend on); written whole or not at all
                                 (flowalign.io.atomic_dir, fsynced); the last run.keep_checkpoints kept
      final/lora                 the trained (EMA when enabled) LoRA in diffusers format, loadable by the
                                 stock pipeline's load_lora_weights; final/<denoiser> after full fine-tuning,
                                 a diffusers model folder (``<ModelClass>.from_pretrained``)

Only the main process writes files; every method that writes waits for all processes. Nothing
non-finite is ever written: ``save`` and ``export`` refuse NaN/inf tensors. A resume takes the newest
checkpoint whose files match their recorded sizes and hashes, and refuses one written with other
settings (``TrainingStopped`` naming the key).

Sharded training (FSDP2 through accelerate: the parameters, their EMA and the optimizer state are
``DTensor`` shards): weights and EMA are gathered into full tensors (every process takes part, the
main one writes), so ``trainable.safetensors``, ``ema.safetensors`` and the final export are the same
files as without sharding; the optimizer state is written sharded by every process with
``torch.distributed.checkpoint`` into ``optimizer/`` (on a file system all processes share) and read
back resharded: a resume on the same processes is exact, and one on another number of them loads.
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
from ..torch_utils import full_tensor, local_tensor

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
    and EMA (``ema_decay`` None: no EMA), and the run's files under ``output_dir``. ``params`` are the
    ones the optimizer steps, taken from the model ``accelerator.prepare`` returned (FSDP replaces them
    with shards); ``model``: that module (the sharded optimizer state is read and written through it)."""

    def __init__(self, accelerator, output_dir: str | os.PathLike, params: list[torch.Tensor], names: list[str],
                 optimizer, *, device, ema_decay: float | None, ema_every: int = 1, ema_warmup: bool = False,
                 keep_checkpoints: int, prompts_per_iteration: int,
                 settings: dict | None = None, model: torch.nn.Module | None = None):
        """``settings``: the config values (``{"model.lora_rank": 32, ...}``) a checkpoint's weights only fit
        with; recorded at save, compared at load."""
        from torch.distributed.tensor import DTensor

        self.acc, self.device = accelerator, device
        self.output_dir = Path(output_dir)
        self.params, self.names, self.optimizer = params, names, optimizer
        self.model = model
        self.sharded = any(isinstance(p, DTensor) for p in params)
        assert model is not None or not self.sharded, "sharded parameters need the model they belong to"
        self.ema = EMA(params, ema_decay, every=ema_every, warmup=ema_warmup) if ema_decay is not None else None
        self.keep_checkpoints = keep_checkpoints
        self.prompts_per_iteration = prompts_per_iteration
        self.settings = dict(settings or {})

    # ------------------------------------------------------------------ EMA
    def ema_update(self) -> None:
        """After an optimizer step."""
        if self.ema is not None:
            self.ema.update()

    @contextlib.contextmanager
    def ema_weights(self):
        """The EMA weights swapped into the model inside the context (no-op without EMA)."""
        if self.ema is None:
            yield
            return
        self.reshard()
        with self.ema.applied():
            yield
            self.reshard()  # the next forward gathers the trained weights again

    def reshard(self) -> None:
        """Sharded: drop the whole weights FSDP2 keeps gathered after a forward without backward (sampling; the
        root module keeps them), so that the next forward gathers the shards as they are now and state dicts
        see the shards. A no-op otherwise."""
        if self.sharded:
            from torch.distributed.fsdp import FSDPModule

            for m in self.model.modules():
                if isinstance(m, FSDPModule):
                    m.reshard()

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_dir(self) -> Path:
        return self.output_dir / "checkpoints"

    def save(self, iteration: int) -> Path:
        """Write ``checkpoints/iter_XXXXXX``: trainable weights, optimizer, EMA, RNG states, the iteration, and
        the size and hash of every file; refuses (``TrainingStopped``) when a tensor is not finite."""
        from safetensors.torch import save_file

        final = self.checkpoint_dir / f"iter_{iteration:06d}"
        self.reshard()
        self._refuse_nonfinite(self._named_state(), f"write checkpoint {final.name}")
        weights = self._gathered(self.params)  # every process takes part in gathering shards
        ema = self._gathered(self.ema.shadow) if self.ema is not None else None
        staged = self._save_sharded_optimizer(final) if self.sharded else None
        if self.acc.is_main_process:
            with atomic_dir(final, fsync=True) as tmp:
                save_file(dict(zip(self.names, weights)), str(tmp / "trainable.safetensors"))
                if ema is not None:
                    save_file(dict(zip(self.names, ema)), str(tmp / "ema.safetensors"))
                if staged is not None:
                    shutil.move(staged, tmp / "optimizer")
                else:
                    torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
                rng = {"torch": torch.get_rng_state()}
                if torch.cuda.is_available():
                    rng["cuda"] = torch.cuda.get_rng_state_all()
                torch.save(rng, tmp / "rng.pt")
                files = {f.relative_to(tmp).as_posix(): _file_record(f) for f in sorted(tmp.rglob("*")) if f.is_file()}
                atomic_write_json(tmp / "state.json", {"iteration": iteration, "processes": self.acc.num_processes,
                                                       "ema_steps": self.ema.steps if self.ema is not None else 0,
                                                       "sampler_position": iteration * self.prompts_per_iteration,
                                                       "settings": self.settings, "files": files})
            for old in self.checkpoints()[:-self.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        self.acc.wait_for_everyone()
        return final

    def _gathered(self, tensors: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """Full CPU copies of ``tensors`` (shards gathered: a collective, call it on every process) on the main
        process, None on the others."""
        out = [full_tensor(t.detach()) for t in tensors] if self.sharded else [t.detach() for t in tensors]
        return [t.cpu().contiguous() for t in out] if self.acc.is_main_process else None

    def _optimizer_state_dict(self) -> dict:
        """The sharded optimizer state keyed by parameter name (``torch.distributed.checkpoint``)."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(self.model, self.optimizer.optimizer)

    def _save_sharded_optimizer(self, final: Path) -> Path:
        """Every process writes its optimizer shards into a staging folder beside ``final`` (the main process
        moves it into the checkpoint) → the folder."""
        import torch.distributed.checkpoint as dcp

        staged = final.with_name(f".{final.name}.optimizer.partial")
        if self.acc.is_main_process:
            shutil.rmtree(staged, ignore_errors=True)
        self.acc.wait_for_everyone()
        dcp.save({"optimizer": self._optimizer_state_dict()}, checkpoint_id=str(staged))
        self.acc.wait_for_everyone()
        return staged

    def _named_state(self) -> Iterable[tuple[str, torch.Tensor]]:
        """Every floating tensor a checkpoint holds (this process's shards when sharded), named for a message."""
        yield from zip(self.names, map(local_tensor, self.params))
        if self.ema is not None:
            yield from ((f"the EMA of {n}", local_tensor(e)) for n, e in zip(self.names, self.ema.shadow))
        for i, state in enumerate(self.optimizer.state_dict()["state"].values()):
            yield from ((f"the optimizer's {k} of parameter {i}", local_tensor(v))
                        for k, v in state.items() if torch.is_tensor(v))

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
                _copy_full_into(p, weights[n])
        if self.ema is not None and (path / "ema.safetensors").is_file():
            ema = load_file(str(path / "ema.safetensors"))
            with torch.no_grad():
                for n, e in zip(self.names, self.ema.shadow):
                    _copy_full_into(e, ema[n])
            self.ema.steps = int(state.get("ema_steps", 0))  # where the EMA schedule (ema_every, warm-up) stands
        written_sharded = (path / "optimizer").is_dir()
        if self.sharded != written_sharded:
            raise TrainingStopped(
                f"checkpoint {path} was written {'with' if written_sharded else 'without'} sharded (FSDP) training and "
                f"this run is {'sharded' if self.sharded else 'not'}: resume it with the accelerate launch file it was "
                "written with")
        if self.sharded:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

            _init_optimizer_state(self.optimizer.optimizer)  # loading fills existing state entries
            optim = {"optimizer": self._optimizer_state_dict()}
            dcp.load(optim, checkpoint_id=str(path / "optimizer"))
            set_optimizer_state_dict(self.model, self.optimizer.optimizer, optim["optimizer"])
        else:
            self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True,
                                                      map_location=self.device))
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
        self.reshard()
        with self.ema_weights():
            self._refuse_nonfinite(zip(self.names, map(local_tensor, self.params)), f"export {out / name}")
            # sharded: the full weights gathered (the module holds shards); else the module's own
            weights = self._gathered(self.params) if self.sharded else None
            if self.acc.is_main_process:
                with atomic_dir(out / name, fsync=True) as tmp:
                    policy.save_adapter(tmp, state_dict=dict(zip(self.names, weights)) if self.sharded else None)
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


@torch.no_grad()
def _init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create the optimizer's per-parameter state (moments, step) without moving a weight: one step at lr 0 on
    zero gradients (a fresh optimizer has none, and a sharded load only fills entries that exist)."""
    if optimizer.state:
        return
    lrs = [g["lr"] for g in optimizer.param_groups]
    for g in optimizer.param_groups:
        g["lr"] = 0.0
        for p in g["params"]:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for g, lr in zip(optimizer.param_groups, lrs):
        g["lr"] = lr


def _copy_full_into(target: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full tensor into ``target``: a plain tensor, or a ``DTensor`` shard (its own slice of ``full``)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(target, DTensor):
        full = distribute_tensor(full.to(target.dtype), target.device_mesh, target.placements, src_data_rank=None)
    target.copy_(full.to(target.device, target.dtype))


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
