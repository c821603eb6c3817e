"""A training run's state and its files: checkpoints, resume, the EMA of the weights, the final export.

    output_dir/
      checkpoints/iter_XXXXXX/   trainable.safetensors, ema.safetensors (with train.ema), optimizer.pt,
                                 rng.pt, state.json (iteration, processes, sampler position); written
                                 whole or not at all (flowalign.io.atomic_dir); the last
                                 run.keep_checkpoints kept
      final/lora                 the trained (EMA when enabled) LoRA in diffusers format, loadable by the
                                 stock pipeline's load_lora_weights; final/<denoiser> after full fine-tuning

Only the main process writes; every method that writes waits for all processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import torch

from ..ema import EMA
from ..io import atomic_dir, atomic_write_json

__all__ = ["TrainState"]


class TrainState:
    """The trainable parameters (``names`` as in the denoiser's ``named_parameters``), their optimizer
    and EMA (``ema_decay`` None: no EMA), and the run's files under ``output_dir``."""

    def __init__(self, accelerator, output_dir: str | os.PathLike, params: list[torch.Tensor], names: list[str],
                 optimizer, *, device, ema_decay: float | None, ema_every: int = 1, ema_warmup: bool = False,
                 keep_checkpoints: int, prompts_per_iteration: int):
        self.acc, self.device = accelerator, device
        self.output_dir = Path(output_dir)
        self.params, self.names, self.optimizer = params, names, optimizer
        self.ema = EMA(params, ema_decay, every=ema_every, warmup=ema_warmup) if ema_decay is not None else None
        self.keep_checkpoints = keep_checkpoints
        self.prompts_per_iteration = prompts_per_iteration

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
        """Write ``checkpoints/iter_XXXXXX``: trainable weights, optimizer, EMA, RNG states and the iteration."""
        from safetensors.torch import save_file

        final = self.checkpoint_dir / f"iter_{iteration:06d}"
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
                atomic_write_json(tmp / "state.json", {"iteration": iteration, "processes": self.acc.num_processes,
                                                       "ema_steps": self.ema.steps if self.ema is not None else 0,
                                                       "sampler_position": iteration * self.prompts_per_iteration})
            for old in sorted(self.checkpoint_dir.glob("iter_*"))[:-self.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        self.acc.wait_for_everyone()
        return final

    def latest(self) -> Path | None:
        found = sorted(p for p in self.checkpoint_dir.glob("iter_*") if (p / "state.json").is_file())
        return found[-1] if found else None

    def load(self, path: str | os.PathLike) -> int:
        """Restore a checkpoint → the iteration to continue from."""
        from safetensors.torch import load_file

        path = Path(path)
        state = json.loads((path / "state.json").read_text())
        weights = load_file(str(path / "trainable.safetensors"))
        missing = set(self.names) - set(weights)
        if missing:
            raise ValueError(f"checkpoint {path} does not match this model: {len(missing)} trainable tensors missing "
                             f"(e.g. {sorted(missing)[0]}); was it written with another model or LoRA config?")
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
        if self.acc.is_main_process:
            name = "lora" if policy.train_mode == "lora" else policy.denoiser_name
            with self.ema_weights(), atomic_dir(out / name) as tmp:
                policy.save_adapter(tmp)
        self.acc.wait_for_everyone()
        return out
