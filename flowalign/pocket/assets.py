"""Where the shipped pocket models live inside the installed package."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError

WEIGHTS_DIR = Path(__file__).parent / "weights"
T2I_DIR = WEIGHTS_DIR / "t2i"  # diffusers StableDiffusion3Pipeline folder (no T5)
CLIP_DIR = WEIGHTS_DIR / "clip"  # transformers CLIPModel folder with tokenizer and image processor


def shipped(path: Path, what: str) -> Path:
    """``path`` if it holds a model, else a clear error saying how to get one."""
    if not (path / "config.json").exists() and not (path / "model_index.json").exists():
        raise UserError(
            f"the pocket {what} is not at {path}; this install has no shipped pocket weights. Build them with "
            f"`flowalign pocket build --out DIR` and pass that folder explicitly"
        )
    return path
