"""Small output helpers: every file flowalign writes goes through a temp file and an atomic rename,
so a killed run never leaves a half-written config, report or image behind; ``atomic_dir`` does the
same for a whole folder (checkpoints, saved models)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | os.PathLike, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, *, fsync: bool = False) -> Iterator[Path]:
    """A folder written in full or not at all: yields an empty temp folder beside ``final``
    (``.<name>.partial``; a leftover of a killed write is cleared first), which replaces ``final``
    when the block ends without error (and is removed when it raises). ``fsync`` flushes every file
    to disk before the rename (checkpoints a resume must trust)."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if fsync:
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    if fsync:  # the rename itself is an entry of the parent folder
        _fsync_dir(final.parent)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_partials(folder: str | os.PathLike) -> list[Path]:
    """Remove the temp folders ``atomic_dir`` left in ``folder`` when a write was killed
    (``.<name>.partial``) → the removed paths. Call it only where no write is in progress."""
    removed = []
    for tmp in sorted(Path(folder).glob(".*.partial")):
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


def check_safetensors(path: str | os.PathLike, key: str = "model") -> None:
    """Every ``.safetensors`` file at ``path`` (a file, or a folder searched recursively) is whole:
    its header parses and the file is exactly as long as the header says. Reads headers only (cheap),
    so a truncated download or copy fails here, naming the file, rather than deep inside a loader.
    ``key`` names the setting that pointed at it (``model.path``, ``--lora``)."""
    import struct

    from .errors import UserError

    path = Path(path).expanduser()
    files = sorted(path.rglob("*.safetensors")) if path.is_dir() else [path]
    for f in files:
        size = f.stat().st_size
        problem = None
        with open(f, "rb") as fh:
            head = fh.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
            if n is None or n > size - 8:
                problem = f"is {size} bytes, shorter than its header"
            else:
                try:
                    header = json.loads(fh.read(n))
                    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
                except (ValueError, KeyError, TypeError, IndexError):
                    problem = "has no valid safetensors header"
                else:
                    if 8 + n + end != size:
                        problem = f"is {size} bytes but its header describes {8 + n + end} (truncated or padded)"
        if problem:
            raise UserError(f"{key}: weight file {f} {problem}; the copy is damaged, download, copy or rebuild it again")


def image_grid(images_BCHW, nrow: int = 8, pad: int = 1, scale: int = 1):
    """Images [B,3,H,W] in [0,1] (torch or numpy) as one PIL image, ``nrow`` per row, upscaled
    ``scale``× with nearest neighbour."""
    import numpy as np
    from PIL import Image

    arr = images_BCHW.detach().cpu().float().numpy() if hasattr(images_BCHW, "detach") else np.asarray(images_BCHW)
    B, _, H, W = arr.shape
    ncol = min(nrow, B)
    nrows = (B + ncol - 1) // ncol
    canvas = np.ones((3, nrows * (H + pad) + pad, ncol * (W + pad) + pad), dtype=np.float32)
    for i in range(B):
        r, c = divmod(i, ncol)
        y, x = pad + r * (H + pad), pad + c * (W + pad)
        canvas[:, y:y + H, x:x + W] = arr[i]
    img = Image.fromarray((np.clip(canvas, 0, 1).transpose(1, 2, 0) * 255 + 0.5).astype(np.uint8))
    if scale != 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    return img


def save_image_grid(path: str | os.PathLike, images_BCHW, nrow: int = 8, scale: int = 1) -> Path:
    import io

    buf = io.BytesIO()
    image_grid(images_BCHW, nrow=nrow, scale=scale).save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())
