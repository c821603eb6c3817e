"""Small output helpers: every file flowalign writes goes through a temp file and an atomic rename,
so a killed run never leaves a half-written config, report or image behind; ``atomic_dir`` does the
same for a whole folder (checkpoints, saved models)."""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def _finite_json(obj, where: str, bad: list[str]):
    """``obj`` with every non-finite float (NaN, ±inf; Python or numpy) replaced by ``None``; the places
    replaced are appended to ``bad`` as ``key/index`` paths. Integers (bools among them) are left alone."""
    if isinstance(obj, dict):
        return {k: _finite_json(v, f"{where}/{k}", bad) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_json(v, f"{where}/{i}", bad) for i, v in enumerate(obj)]
    if isinstance(obj, numbers.Real) and not isinstance(obj, numbers.Integral) and not math.isfinite(obj):
        bad.append(where or "/")
        return None
    return obj


def atomic_write_json(path: str | os.PathLike, obj) -> Path:
    """Strict JSON (no ``NaN``/``Infinity`` tokens, which other readers reject): a non-finite number is
    written as ``null`` with a warning naming where it was, so a diverged metric never reaches a file."""
    bad: list[str] = []
    clean = _finite_json(obj, "", bad)
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        warnings.warn(f"{path}: non-finite values written as null at {', '.join(bad[:5])}{more}", stacklevel=2)
    return atomic_write_text(path, json.dumps(clean, indent=2, allow_nan=False) + "\n")


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


def _as_numpy(images_BCHW):
    """Images as a float numpy array (torch tensors from any device, or anything numpy takes)."""
    import numpy as np

    if hasattr(images_BCHW, "detach"):
        return images_BCHW.detach().cpu().float().numpy()
    return np.asarray(images_BCHW, dtype=np.float32)


def image_grid(images_BCHW, nrow: int = 8, pad: int = 1, scale: int = 1):
    """Images [B,3,H,W] in [0,1] (torch or numpy) as one PIL image, ``nrow`` per row, upscaled
    ``scale``× with nearest neighbour."""
    import numpy as np
    from PIL import Image

    arr = _as_numpy(images_BCHW)
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
    return _save_png(path, image_grid(images_BCHW, nrow=nrow, scale=scale))


def _save_png(path: str | os.PathLike, img) -> Path:
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())


# --------------------------------------------------------------------------------------------------
# labelled grids: what a person looks at


MARK_COLORS = {True: (20, 150, 50), False: (200, 30, 30)}  # the frame and badge of a ✓ and of a ✗ image
GRID_PAD = 6  # pixels between cells and around the grid
FRAME = 3  # width of the verdict-coloured frame around each image
BADGE = 13  # side of the ✓/✗ badge that starts each caption
CAPTION_LINES = 3  # caption lines under each image; a longer prompt is abbreviated with "..."
HEADER_H = 18  # height of the band that names a group
GRID_PER_GROUP = 8  # images of each category (group) an evaluation grid shows


def _wrap(text: str, font, widths: list[int]) -> list[str]:
    """Greedy word wrap of ``text`` into ``len(widths)`` lines, line i at most ``widths[i]`` pixels;
    an overlong word is cut, and text that does not fit ends in "..."."""
    lines, words = [], text.split()
    for w in widths:
        line = ""
        while words and font.getlength((line + " " + words[0]).strip()) <= w:
            line = (line + " " + words.pop(0)).strip()
        if not line and words:  # a word wider than the line: cut it
            word, n = words.pop(0), 1
            while n < len(word) and font.getlength(word[:n + 1]) <= w:
                n += 1
            line = word[:n]
            if word[n:]:
                words.insert(0, word[n:])
        lines.append(line)
    if words:
        last = lines[-1]
        while last and font.getlength(last + "...") > widths[-1]:
            last = last[:-1]
        lines[-1] = last.rstrip() + "..."
    return [line for line in lines if line]


def _draw_mark(draw, x: int, y: int, ok: bool) -> None:
    """A ``BADGE``-sided badge at (x, y): a white ✓ on green or a white ✗ on red (drawn as lines, so
    no font needs the glyphs)."""
    b = BADGE
    draw.rectangle([x, y, x + b - 1, y + b - 1], fill=MARK_COLORS[ok])
    if ok:
        draw.line([(x + 3, y + b // 2), (x + b // 2 - 1, y + b - 4), (x + b - 3, y + 3)], fill="white", width=2)
    else:
        draw.line([(x + 3, y + 3), (x + b - 4, y + b - 4)], fill="white", width=2)
        draw.line([(x + 3, y + b - 4), (x + b - 4, y + 3)], fill="white", width=2)


def labelled_grid_layout(group_sizes: list[int], image_hw: tuple[int, int], *, ncol: int = 8, scale: int = 3) -> dict:
    """The geometry of :func:`labelled_image_grid` in pixels: ``cell`` (w, h of a framed image and its
    caption), ``ncol`` (images a row), ``line_h`` (of a caption line), ``group_y`` (top of each group's
    band) and ``size`` (w, h of the whole grid)."""
    from PIL import ImageFont

    font = ImageFont.load_default()
    line_h = font.getbbox("Ag")[3] + 2
    h, w = image_hw[0] * scale, image_hw[1] * scale
    cell = (w + 2 * FRAME, h + 2 * FRAME + 3 + max(BADGE, line_h) + (CAPTION_LINES - 1) * line_h)
    ncol = min(ncol, max(group_sizes))
    group_y, y = [], GRID_PAD
    for n in group_sizes:
        group_y.append(y)
        y += HEADER_H + -(-n // ncol) * (cell[1] + GRID_PAD)
    return {"cell": cell, "ncol": ncol, "line_h": line_h, "group_y": group_y,
            "size": (GRID_PAD + ncol * (cell[0] + GRID_PAD), y)}


def labelled_image_grid(images_BCHW, prompts: list[str], verdicts: list[bool], groups: list[str], *,
                        per_group: int | None = GRID_PER_GROUP, ncol: int = 8, scale: int = 3):
    """Images [B,3,H,W] in [0,1] as one PIL image a person can read without the JSON: each image
    upscaled ``scale``× (nearest neighbour) in a frame coloured by its verdict, under it a ✓/✗ badge
    and its prompt (wrapped, abbreviated past ``CAPTION_LINES`` lines). The images of one group (a
    category, "color_attr (tuned)"; groups in order of first appearance) form a block that starts a new
    row under a band naming the group and counting its ✓s; of a group larger than ``per_group`` (None: no
    limit), ``per_group`` images evenly spread over it are shown; at most ``ncol`` images a row."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    arr = _as_numpy(images_BCHW)
    B, _, H, W = arr.shape
    if not (len(prompts) == len(verdicts) == len(groups) == B):
        raise ValueError(f"{B} images need as many prompts, verdicts and groups; got {len(prompts)}, "
                         f"{len(verdicts)} and {len(groups)}")
    members: dict[str, list[int]] = {}  # group -> its images, groups in order of first appearance
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    blocks = [(g, [idx[j * len(idx) // per_group] for j in range(per_group)]
               if per_group is not None and len(idx) > per_group else idx) for g, idx in members.items()]
    lay = labelled_grid_layout([len(idx) for _, idx in blocks], (H, W), ncol=ncol, scale=scale)
    (cw, _), ncol, line_h = lay["cell"], lay["ncol"], lay["line_h"]
    font = ImageFont.load_default()
    canvas = Image.new("RGB", lay["size"], "white")
    draw = ImageDraw.Draw(canvas)
    tiles = (np.clip(arr, 0, 1).transpose(0, 2, 3, 1) * 255 + 0.5).astype(np.uint8)
    for (g, idx), y0 in zip(blocks, lay["group_y"]):
        right = sum(bool(verdicts[i]) for i in idx)
        draw.rectangle([0, y0, canvas.width - 1, y0 + HEADER_H - 4], fill=(225, 225, 225))
        draw.text((GRID_PAD, y0 + 2), f"{g}: {right}/{len(idx)} right", fill="black", font=font)
        for j, i in enumerate(idx):
            r, c = divmod(j, ncol)
            x = GRID_PAD + c * (cw + GRID_PAD)
            y = y0 + HEADER_H + r * (lay["cell"][1] + GRID_PAD)
            ok = bool(verdicts[i])
            draw.rectangle([x, y, x + cw - 1, y + H * scale + 2 * FRAME - 1], fill=MARK_COLORS[ok])
            tile = Image.fromarray(tiles[i]).resize((W * scale, H * scale), Image.NEAREST)
            canvas.paste(tile, (x + FRAME, y + FRAME))
            ty = y + H * scale + 2 * FRAME + 3
            _draw_mark(draw, x, ty, ok)
            lines = _wrap(prompts[i], font, [cw - BADGE - 3] + [cw] * (CAPTION_LINES - 1))
            for k, line in enumerate(lines):  # the first line beside the badge, the others under it
                ly = ty if k == 0 else ty + max(BADGE, line_h) + (k - 1) * line_h
                draw.text((x + BADGE + 3 if k == 0 else x, ly), line, fill="black", font=font)
    return canvas


def save_labelled_grid(path: str | os.PathLike, images_BCHW, prompts: list[str], verdicts: list[bool],
                       groups: list[str], *, per_group: int | None = GRID_PER_GROUP, ncol: int = 8,
                       scale: int = 3) -> Path:
    """:func:`labelled_image_grid` written atomically as a PNG."""
    grid = labelled_image_grid(images_BCHW, prompts, verdicts, groups, per_group=per_group, ncol=ncol, scale=scale)
    return _save_png(path, grid)
