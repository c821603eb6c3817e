"""The pocket world's renderer: prompt spec + seed → anti-aliased image and scene spec.

Drawing rules (stated so that the evaluator can rely on them):

* Background black; objects in four fully saturated colors at the corners of the RGB cube
  (``PALETTE``). Anti-aliasing blends an object's color with black only, so an edge pixel is
  ``coverage · color``: its chromaticity (the pixel divided by its largest channel) is exactly the
  object's, and its brightness is its coverage. The evaluator classifies colors that way, so edges
  never turn into a different color.
* Shapes are axis-aligned: a circle of diameter ``s``, a square of side ``s``, an upward isosceles
  triangle of base and height ``s`` (its bounding box is ``s × s``).
* Sizes are fractions of the canvas (at 32×32: 9–13 px for one object, down to 8–10 px for four),
  objects lie at least ``max(2 px, size/16)`` apart (bounding box to bounding box) and 1 px inside the
  border, so they never touch, even diagonally, after anti-aliasing.
* Relations hold by a clear margin, measured between area centroids: for ``A left of B``, B's centroid
  is at least ``0.3 · size`` to the right of A's and their vertical offset is at most half the
  horizontal one (likewise for the other relations).
* Objects of a phrase without a color get colors drawn uniformly from the palette.

Rendering is deterministic: scene ``i`` of ``render_batch(specs, seed)`` uses
``numpy.random.default_rng([seed, i])``, so ``render_scene(spec, seed)`` equals scene 0 of
``render_batch([spec], seed)``. Images are supersampled ``supersample``× per axis and box-filtered.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import UserError
from .grammar import COLORS, MAX_OBJECTS, SHAPES, PromptSpec, parse_prompt

PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
}
BACKGROUND: tuple[float, float, float] = (0.0, 0.0, 0.0)
assert tuple(PALETTE) == COLORS

# Object size range (fraction of the canvas side) by number of objects in the scene.
SIZE_RANGE: dict[int, tuple[float, float]] = {1: (0.28, 0.41), 2: (0.28, 0.375), 3: (0.25, 0.34), 4: (0.25, 0.31)}
assert set(SIZE_RANGE) == set(range(1, MAX_OBJECTS + 1))
RELATION_MARGIN = 0.3  # min centroid offset along the relation's axis, fraction of the canvas side
_CANDIDATES = 48  # positions tried at once per object
_RESTARTS = 200
_DRAW_CHUNK = 2048  # scenes drawn at once (bounds the scratch memory)


@dataclass(frozen=True)
class SceneObject:
    """One drawn object; coordinates in output pixels, (0, 0) the top-left corner of the image."""

    shape: str
    color: str
    size: float  # side of the bounding box
    center: tuple[float, float]  # bounding-box center (x, y)

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        (cx, cy), h = self.center, self.size / 2
        return (cx - h, cy - h, cx + h, cy + h)

    @property
    def centroid(self) -> tuple[float, float]:
        """Area centroid (x, y); a triangle's lies a sixth of its height below its box center."""
        cx, cy = self.center
        return (cx, cy + self.size / 6) if self.shape == "triangle" else (cx, cy)

    def to_dict(self) -> dict:
        return {
            "shape": self.shape,
            "color": self.color,
            "bbox": [round(v, 3) for v in self.bbox],
            "centroid": [round(v, 3) for v in self.centroid],
        }


@dataclass(frozen=True)
class Scene:
    """What was drawn for a prompt: objects in phrase order (all of phrase 0, then phrase 1)."""

    spec: PromptSpec
    objects: tuple[SceneObject, ...]
    size: int
    seed: int
    index: int = 0

    def to_dict(self) -> dict:
        return {
            "spec": self.spec.to_dict(),
            "size": self.size,
            "seed": self.seed,
            "index": self.index,
            "objects": [o.to_dict() for o in self.objects],
        }


def _relation_ok(rel: str, a: tuple[float, float], b_x: np.ndarray, b_y: np.ndarray, margin: float) -> np.ndarray:
    """Does ``A <rel> B`` hold clearly for each candidate centroid of B?"""
    dx, dy = b_x - a[0], b_y - a[1]  # B relative to A; y grows downwards
    if rel in ("left of", "right of"):
        along = dx if rel == "left of" else -dx
        return (along >= margin) & (np.abs(dy) <= 0.5 * along)
    along = dy if rel == "above" else -dy
    return (along >= margin) & (np.abs(dx) <= 0.5 * along)


def sample_layout(spec: PromptSpec, rng: np.random.Generator, size: int = 32) -> tuple[SceneObject, ...]:
    """Place the objects ``spec`` asks for: sizes, colors and non-overlapping positions."""
    wanted = [(o.shape, o.color) for o in spec.objects for _ in range(o.count)]
    n = len(wanted)
    lo, hi = SIZE_RANGE[n]
    gap = max(2.0, size / 16)
    border = max(1.0, size / 32)
    margin = RELATION_MARGIN * size
    colors = [c if c is not None else COLORS[rng.integers(len(COLORS))] for _, c in wanted]
    for _ in range(_RESTARTS):
        sizes = rng.uniform(lo, hi, n) * size
        placed: list[SceneObject] = []
        for k, ((shape, _), color, s) in enumerate(zip(wanted, colors, sizes)):
            cx = rng.uniform(border + s / 2, size - border - s / 2, _CANDIDATES)
            cy = rng.uniform(border + s / 2, size - border - s / 2, _CANDIDATES)
            ok = np.ones(_CANDIDATES, dtype=bool)
            for p in placed:
                reach = (s + p.size) / 2 + gap
                ok &= (np.abs(cx - p.center[0]) >= reach) | (np.abs(cy - p.center[1]) >= reach)
            if spec.relation is not None and k == 1:
                cy_centroid = cy + s / 6 if shape == "triangle" else cy
                ok &= _relation_ok(spec.relation, placed[0].centroid, cx, cy_centroid, margin)
            hits = np.flatnonzero(ok)
            if hits.size == 0:
                break
            j = hits[0]
            placed.append(SceneObject(shape, color, float(s), (float(cx[j]), float(cy[j]))))
        else:
            return tuple(placed)
    raise AssertionError(f"no layout found for {spec} at size {size} after {_RESTARTS} restarts")


def _coverage(objects: list[SceneObject], patch: int, supersample: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-object coverage of a ``patch × patch`` pixel window → (cov [K,patch,patch], origins [K,2] (x0, y0))."""
    k = len(objects)
    ss = supersample
    centers = np.array([o.center for o in objects], dtype=np.float64).reshape(k, 2)
    sizes = np.array([o.size for o in objects], dtype=np.float64)
    origins = np.floor(centers - sizes[:, None] / 2).astype(np.int64) - 1  # one empty pixel of slack
    sub = (np.arange(patch * ss) + 0.5) / ss  # sample offsets inside the window
    dx = (origins[:, 0, None] + sub[None, :] - centers[:, 0, None])[:, None, :]  # [K,1,S]
    dy = (origins[:, 1, None] + sub[None, :] - centers[:, 1, None])[:, :, None]  # [K,S,1]
    half = (sizes / 2)[:, None, None]
    inside = np.zeros((k, patch * ss, patch * ss), dtype=bool)
    shape_of = np.array([SHAPES.index(o.shape) for o in objects])
    for code, shape in enumerate(SHAPES):
        idx = np.flatnonzero(shape_of == code)
        if idx.size == 0:
            continue
        x, y, h = dx[idx], dy[idx], half[idx]
        if shape == "circle":
            inside[idx] = x * x + y * y <= h * h
        elif shape == "square":
            inside[idx] = (np.abs(x) <= h) & (np.abs(y) <= h)
        else:  # triangle: apex at the top center, base at the bottom; half-width grows linearly with depth
            depth = y + h  # 0 at the apex, 2h at the base
            inside[idx] = (depth >= 0) & (depth <= 2 * h) & (np.abs(x) <= depth / 2)
    cov = inside.reshape(k, patch, ss, patch, ss).sum(axis=(2, 4), dtype=np.uint16).astype(np.float32) / (ss * ss)
    return cov, origins


def draw_scenes(scenes: list[tuple[SceneObject, ...]], size: int, supersample: int = 4) -> np.ndarray:
    """Draw laid-out scenes → float32 images [N,3,size,size] in [0,1]."""
    objs_flat = [o for objs in scenes for o in objs]
    owner = np.repeat(np.arange(len(scenes)), [len(objs) for objs in scenes])
    patch = int(np.ceil(max(o.size for o in objs_flat))) + 3
    cov, origins = _coverage(objs_flat, patch, supersample)
    assert origins.min() >= 0  # objects keep ≥ 1 px from the border
    # Paste every patch at once: objects lie ≥ 2 px apart, so no pixel gets coverage from two objects.
    # The canvas is padded right and below so that windows never fall off it.
    side = size + patch
    ys = origins[:, 1, None] + np.arange(patch)  # [K,P] rows
    xs = origins[:, 0, None] + np.arange(patch)  # [K,P] columns
    flat = (owner[:, None, None] * side + ys[:, :, None]) * side + xs[:, None, :]  # [K,P,P]
    colors = np.array([PALETTE[o.color] for o in objs_flat], dtype=np.float32)  # [K,3]
    images = np.empty((len(scenes), 3, size, size), dtype=np.float32)
    for c in range(3):
        plane = np.bincount(flat.ravel(), weights=(cov * colors[:, c, None, None]).ravel(),
                            minlength=len(scenes) * side * side).reshape(len(scenes), side, side)
        images[:, c] = plane[:, :size, :size]  # black background: nothing to add
    return images


def _as_spec(p: PromptSpec | str) -> PromptSpec:
    return p if isinstance(p, PromptSpec) else parse_prompt(p)


def render_batch(
    prompts: list[PromptSpec | str], seed: int = 0, size: int = 32, supersample: int = 4
) -> tuple[np.ndarray, list[Scene]]:
    """Render one scene per prompt (text or spec) → (images float32 [N,3,size,size] in [0,1], scenes).

    Scene ``i`` depends only on (prompt ``i``, ``seed``, ``i``, ``size``), never on the rest of the batch.
    """
    if size < 24:
        raise UserError(f"size {size} is too small for the pocket world: shapes stop being recognisable; "
                         "use 24 or more (default 32)")
    specs = [_as_spec(p) for p in prompts]
    layouts = [sample_layout(spec, np.random.default_rng([seed, i]), size) for i, spec in enumerate(specs)]
    images = np.empty((len(specs), 3, size, size), dtype=np.float32)
    for start in range(0, len(specs), _DRAW_CHUNK):
        images[start:start + _DRAW_CHUNK] = draw_scenes(layouts[start:start + _DRAW_CHUNK], size, supersample)
    scenes = [Scene(spec, objs, size, seed, i) for i, (spec, objs) in enumerate(zip(specs, layouts))]
    return images, scenes


def render_scene(
    prompt: PromptSpec | str, seed: int = 0, size: int = 32, supersample: int = 4
) -> tuple[np.ndarray, Scene]:
    """Render one prompt → (image float32 [3,size,size] in [0,1], scene)."""
    images, scenes = render_batch([prompt], seed, size, supersample)
    return images[0], scenes[0]


def to_pil(image_3hw: np.ndarray, scale: int = 1):
    """A [3,H,W] image in [0,1] as a PIL image, upscaled ``scale``× with nearest neighbour."""
    from PIL import Image

    arr = (np.clip(image_3hw, 0, 1).transpose(1, 2, 0) * 255 + 0.5).astype(np.uint8)
    img = Image.fromarray(arr, mode="RGB")
    if scale != 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    return img
