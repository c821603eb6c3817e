"""The pocket world's exact evaluator — the gold reward.

Pipeline, batched in numpy over images [B,3,H,W] in [0,1]:

1. **Palette classification.** A pixel is foreground when its brightest channel is at least
   ``fg_threshold``. Its chromaticity (the pixel divided by that channel) goes to the nearest palette
   color when within ``color_threshold`` (Euclidean, in chromaticity space), otherwise to ``other``.
   Palette colors sit at RGB-cube corners, pairwise ≥ 1 apart in this space, and the renderer blends
   with black only, so anti-aliased edges keep their object's color (see :mod:`.render`).
2. **Connected components** per color label (8-connectivity), dependency-free: min-label propagation
   with pointer jumping. Components smaller than ``min_area_frac`` of the image are specks and ignored.
3. **Shape by template fit.** Each component is compared with the three pocket shapes drawn with
   its own area at its own centroid (a circle of radius √(A/π); a square of side √A; an upward
   triangle of base = height = √(2A), whose centroid sits a third of the height above the base):
   ``iou_k`` = |component ∩ template_k| / |component ∪ template_k|, counted over pixel centers.
   The best fit names the shape, except that a circle must lose to the square by
   ``square_margin`` to be called a square (a small rasterised circle fills most of its box), and a
   component that fits nothing to ``min_iou`` gets shape ``None`` (an object, but of no shape the
   grammar knows: merged blobs, streaks). Fitting whole templates, rather than measuring bounding
   boxes, keeps one stray pixel from changing a shape. Reliable from 32×32 up.
4. **Scoring** against the prompt spec (:func:`score_objects`):

   *strict* (GenEval rules, Ghosh et al. 2023): every phrase of count 1 needs at least one matching
   object (shape, and color when the phrase names one); counting phrases (count ≥ 2) need exactly
   ``count``; for ``position``, some matching pair must satisfy the relation (centroid offset along
   the axis > ``relation_margin`` × image side). Objects the prompt does not mention are ignored.

   *exact*: the detected scene is exactly the prompt — every phrase has exactly its count, nothing
   else is there (``other``-colored and shapeless objects count as something else), relation holds.

   *partial* in [0, 1]: each requested object slot earns 1 for a full match, ½ for an object of the
   right shape with the wrong color (or right color, wrong shape) when the phrase names a color;
   ``position`` adds one more slot for the relation (earned when both objects are present and it holds).
   ``partial = earned / (slots + unused objects)``: a blank image scores 0, and every detected object
   that earns nothing (extra junk, a fifth circle) lowers the score, so drawing nothing or drawing
   everything is never rewarded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import UserError
from .grammar import CATEGORIES, COLORS, PromptSpec, parse_prompt
from .render import PALETTE

OTHER = "other"  # color label of foreground pixels far from every palette color
_COLOR_NAMES: tuple[str, ...] = (*COLORS, OTHER)
_PALETTE_PC = np.array([PALETTE[c] for c in COLORS], dtype=np.float32)  # [P,3]
_DETECT_CHUNK = 1024  # images labelled at once (bounds the scratch memory)


@dataclass(frozen=True)
class GoldThresholds:
    """Thresholds of the evaluator (all relative to the image, so they hold at any size)."""

    fg_threshold: float = 0.4  # min brightest channel of a foreground pixel
    color_threshold: float = 0.5  # max chromaticity distance to a palette color
    min_area_frac: float = 0.01  # components smaller than this fraction of the image are specks
    relation_margin: float = 0.1  # min centroid offset along a relation's axis, fraction of the image side
    square_margin: float = 0.08  # a square must fit better than a circle by this much IoU
    min_iou: float = 0.6  # best template IoU below this → no known shape


@dataclass(frozen=True)
class DetectedObject:
    """One connected component; coordinates in pixels, (0, 0) the top-left corner."""

    shape: str | None
    color: str  # a palette color or "other"
    area: int
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)
    centroid: tuple[float, float]  # (x, y) of pixel centers
    iou: tuple[float, float, float]  # fit to the circle, square and triangle templates

    def to_dict(self) -> dict:
        return {
            "shape": self.shape,
            "color": self.color,
            "area": self.area,
            "bbox": list(self.bbox),
            "centroid": [round(v, 3) for v in self.centroid],
        }


def _to_numpy(images) -> np.ndarray:
    if isinstance(images, np.ndarray):
        arr = images
    else:  # a torch tensor, on any device
        arr = images.detach().float().cpu().numpy()
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[1] != 3:
        raise ValueError(f"images must be [B,3,H,W] (or [3,H,W]) in [0,1], got shape {tuple(arr.shape)}")
    return arr.astype(np.float32, copy=False)


def classify_pixels(images_BCHW: np.ndarray, cfg: GoldThresholds = GoldThresholds()) -> np.ndarray:
    """Per-pixel color label [B,H,W]: -1 background, i for ``_COLOR_NAMES[i]`` (last one is "other")."""
    bright_BHW = images_BCHW.max(axis=1)
    chroma_BCHW = images_BCHW / np.maximum(bright_BHW, 1e-6)[:, None]
    d2_BPHW = ((chroma_BCHW[:, None] - _PALETTE_PC[None, :, :, None, None]) ** 2).sum(axis=2)
    nearest_BHW = d2_BPHW.argmin(axis=1)
    close_BHW = np.take_along_axis(d2_BPHW, nearest_BHW[:, None], axis=1)[:, 0] <= cfg.color_threshold ** 2
    labels = np.where(close_BHW, nearest_BHW, len(COLORS)).astype(np.int8)
    labels[bright_BHW < cfg.fg_threshold] = -1
    return labels


_NEIGHBOURS_8 = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


def connected_components(labels_BHW: np.ndarray) -> np.ndarray:
    """8-connected components of equal non-negative labels → root index per pixel [B,H,W] (-1 background).

    The root is the smallest flat index (over the whole batch) of the component's pixels.
    """
    b, h, w = labels_BHW.shape
    fg = labels_BHW >= 0
    big = np.iinfo(np.int64).max
    root = np.where(fg, np.arange(b * h * w, dtype=np.int64).reshape(b, h, w), big)
    lab_pad = np.full((b, h + 2, w + 2), -1, dtype=np.int16)
    lab_pad[:, 1:-1, 1:-1] = labels_BHW
    # Same-label masks per neighbour direction are fixed; only the roots change.
    same = [(lab_pad[:, 1 + dy:h + 1 + dy, 1 + dx:w + 1 + dx] == labels_BHW) & fg for dy, dx in _NEIGHBOURS_8]
    root_pad = np.full((b, h + 2, w + 2), big, dtype=np.int64)
    flat_idx = np.flatnonzero(fg)
    while True:
        root_pad[:, 1:-1, 1:-1] = root
        new = root.copy()
        for (dy, dx), m in zip(_NEIGHBOURS_8, same):
            nb = root_pad[:, 1 + dy:h + 1 + dy, 1 + dx:w + 1 + dx]
            np.minimum(new, np.where(m, nb, big), out=new)
        flat = new.reshape(-1)
        for _ in range(3):  # pointer jumping: a pixel takes its root's root
            flat[flat_idx] = flat[flat[flat_idx]]
        if np.array_equal(new, root):
            break
        root = new
    return np.where(fg, root, -1)


def detect_objects(images, cfg: GoldThresholds = GoldThresholds()) -> list[list[DetectedObject]]:
    """Objects in each image of a batch [B,3,H,W] in [0,1] (numpy or torch), largest first."""
    arr = _to_numpy(images)
    found: list[list[DetectedObject]] = []
    for start in range(0, arr.shape[0], _DETECT_CHUNK):
        found += _detect_chunk(arr[start:start + _DETECT_CHUNK], cfg)
    return found


def _detect_chunk(arr: np.ndarray, cfg: GoldThresholds) -> list[list[DetectedObject]]:
    b, _, h, w = arr.shape
    labels = classify_pixels(arr, cfg)
    roots = connected_components(labels).reshape(-1)
    pix = np.flatnonzero(roots >= 0)
    found: list[list[DetectedObject]] = [[] for _ in range(b)]
    if pix.size == 0:
        return found
    uniq, inv = np.unique(roots[pix], return_inverse=True)
    area = np.bincount(inv)
    ys, xs = (pix // w) % h, pix % w
    order = np.argsort(inv, kind="stable")
    starts = np.concatenate([[0], np.cumsum(area)[:-1]])
    x0, x1 = np.minimum.reduceat(xs[order], starts), np.maximum.reduceat(xs[order], starts) + 1
    y0, y1 = np.minimum.reduceat(ys[order], starts), np.maximum.reduceat(ys[order], starts) + 1
    cx = np.bincount(inv, weights=xs) / area + 0.5
    cy = np.bincount(inv, weights=ys) / area + 0.5
    iou_KS = _template_iou(inv, area, xs + 0.5 - cx[inv], ys + 0.5 - cy[inv])
    color = labels.reshape(-1)[uniq]
    image = uniq // (h * w)
    keep = area >= cfg.min_area_frac * h * w
    for k in np.flatnonzero(keep)[np.argsort(-area[keep], kind="stable")]:
        found[image[k]].append(DetectedObject(
            shape=_shape_of(iou_KS[k], cfg),
            color=_COLOR_NAMES[color[k]],
            area=int(area[k]),
            bbox=(int(x0[k]), int(y0[k]), int(x1[k]), int(y1[k])),
            centroid=(float(cx[k]), float(cy[k])),
            iou=tuple(float(v) for v in iou_KS[k]),
        ))
    return found


def _template_iou(inv: np.ndarray, area: np.ndarray, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """IoU of each component with its circle, square and triangle templates → [K,3].

    ``inv`` maps each foreground pixel to its component, ``dx, dy`` are the pixel center's offsets
    from the component's centroid. Each template has the component's area, so |union| = 2A − |∩|.
    """
    a = area[inv].astype(np.float64)
    in_circle = dx * dx + dy * dy <= a / np.pi
    in_square = np.maximum(np.abs(dx), np.abs(dy)) <= np.sqrt(a) / 2
    side = np.sqrt(2 * a)
    depth = dy + 2 * side / 3  # below the apex; the centroid is 2/3 of the height down
    in_triangle = (depth >= 0) & (depth <= side) & (np.abs(dx) <= depth / 2)
    inter = np.stack([np.bincount(inv, weights=m, minlength=len(area)) for m in (in_circle, in_square, in_triangle)], 1)
    return inter / (2 * area[:, None] - inter)


def _shape_of(iou_S: np.ndarray, cfg: GoldThresholds) -> str | None:
    circle, square, triangle = iou_S
    if max(circle, square, triangle) < cfg.min_iou:
        return None
    if triangle >= max(circle, square):
        return "triangle"
    return "square" if square > circle + cfg.square_margin else "circle"


@dataclass(frozen=True)
class Score:
    """Verdict for one image: ``strict`` (GenEval rules), ``exact`` (nothing else there), ``partial``."""

    strict: bool
    exact: bool
    partial: float


def _relation_holds(rel: str, a: DetectedObject, b: DetectedObject, margin_x: float, margin_y: float) -> bool:
    """``a <rel> b`` by centroids; image y grows downwards."""
    dx, dy = b.centroid[0] - a.centroid[0], b.centroid[1] - a.centroid[1]
    return {
        "left of": dx > margin_x,
        "right of": -dx > margin_x,
        "above": dy > margin_y,
        "below": -dy > margin_y,
    }[rel]


def score_objects(
    spec: PromptSpec, objects: list[DetectedObject], image_hw: tuple[int, int], cfg: GoldThresholds = GoldThresholds()
) -> Score:
    """Score the objects found in one image against a prompt spec (rules in the module docstring)."""
    margin_x, margin_y = cfg.relation_margin * image_hw[1], cfg.relation_margin * image_hw[0]
    known = [o for o in objects if o.color != OTHER]

    def matching(p):
        return [o for o in known if p.matches(o.shape, o.color)]

    # strict: GenEval rules
    strict = True
    for p in spec.objects:
        n = len(matching(p))
        strict &= n >= 1 if p.count == 1 else n == p.count
    if spec.relation is not None and strict:
        a_objs, b_objs = matching(spec.objects[0]), matching(spec.objects[1])
        strict = any(a is not b and _relation_holds(spec.relation, a, b, margin_x, margin_y)
                     for a in a_objs for b in b_objs)

    # exact and partial: assign objects (largest first) to requested slots, most specific phrases first
    unused = list(objects)
    taken: list[list[DetectedObject]] = [[] for _ in spec.objects]
    earned = 0.0
    order = sorted(range(len(spec.objects)), key=lambda i: spec.objects[i].color is None)
    for i in order:
        p = spec.objects[i]
        for o in [o for o in unused if o.color != OTHER and p.matches(o.shape, o.color)][:p.count]:
            unused.remove(o)
            taken[i].append(o)
            earned += 1.0
    full = all(len(t) == p.count for t, p in zip(taken, spec.objects))
    for i in order:
        p = spec.objects[i]
        if p.color is None:
            continue
        for half in (lambda o: o.shape == p.shape, lambda o: o.color == p.color):
            for o in [o for o in unused if half(o)][:p.count - len(taken[i])]:
                unused.remove(o)
                taken[i].append(o)
                earned += 0.5
    slots = spec.total_objects
    relation_ok = True
    if spec.relation is not None:
        slots += 1
        relation_ok = bool(taken[0] and taken[1]) and _relation_holds(
            spec.relation, taken[0][0], taken[1][0], margin_x, margin_y)
        earned += relation_ok
    exact = full and not unused and relation_ok
    return Score(strict=bool(strict), exact=exact, partial=earned / (slots + len(unused)))


@dataclass
class EvalResult:
    """Per-image verdicts of a batch; arrays are [B]."""

    strict: np.ndarray  # bool
    exact: np.ndarray  # bool
    partial: np.ndarray  # float32 in [0, 1]
    categories: list[str]
    objects: list[list[DetectedObject]]

    def summary(self) -> dict[str, dict[str, float]]:
        """``{"strict": aggregate(...), "exact": ..., "partial": ...}``."""
        return {k: aggregate(self.categories, getattr(self, k)) for k in ("strict", "exact", "partial")}


def _as_spec(p: PromptSpec | str) -> PromptSpec:
    return p if isinstance(p, PromptSpec) else parse_prompt(p)


def evaluate(images, prompts: list[PromptSpec | str], cfg: GoldThresholds = GoldThresholds()) -> EvalResult:
    """Score images [B,3,H,W] in [0,1] (numpy or torch) against their prompts (text or specs)."""
    arr = _to_numpy(images)
    if len(prompts) != arr.shape[0]:
        raise ValueError(f"got {arr.shape[0]} images but {len(prompts)} prompts; pass one prompt per image")
    specs = [_as_spec(p) for p in prompts]
    found = detect_objects(arr, cfg)
    scores = [score_objects(s, objs, arr.shape[2:], cfg) for s, objs in zip(specs, found)]
    return EvalResult(
        strict=np.array([s.strict for s in scores], dtype=bool),
        exact=np.array([s.exact for s in scores], dtype=bool),
        partial=np.array([s.partial for s in scores], dtype=np.float32),
        categories=[s.category for s in specs],
        objects=found,
    )


def aggregate(categories: list[str], values) -> dict[str, float]:
    """Mean of ``values`` per category, plus ``overall`` = mean of the category means (as GenEval
    reports it) and ``overall_images`` = mean over all images. Categories in the grammar's order."""
    values = np.asarray(values, dtype=np.float64)
    cats = np.asarray(categories)
    present = [c for c in CATEGORIES if c in set(categories)] + sorted(set(categories) - set(CATEGORIES))
    out = {c: float(values[cats == c].mean()) for c in present}
    out["overall"] = float(np.mean([out[c] for c in present])) if present else float("nan")
    out["overall_images"] = float(values.mean()) if values.size else float("nan")
    return out


def format_report(summary: dict[str, dict[str, float]]) -> str:
    """A plain-text table of :meth:`EvalResult.summary` (rows: categories, columns: metrics)."""
    metrics = list(summary)
    rows = list(next(iter(summary.values())))
    width = max(len(r) for r in rows)
    lines = [f"{'category':<{width}}  " + "  ".join(f"{m:>7}" for m in metrics)]
    lines += [f"{r:<{width}}  " + "  ".join(f"{summary[m][r]:7.3f}" for m in metrics) for r in rows]
    return "\n".join(lines)


class PocketGold:
    """The gold reward as a flowalign reward callable.

    ``scores_B`` is the partial score (``score="partial"``, default), or 1/0 strict or exact
    correctness. ``metadata[i]["spec"]`` (a row of ``prompts/pocket/*.jsonl``), when given, is used
    instead of parsing ``prompts[i]``.
    """

    differentiable = False
    name = "pocket_gold"

    def __init__(self, score: str = "partial", cfg: GoldThresholds = GoldThresholds()):
        if score not in ("partial", "strict", "exact"):
            raise UserError(f"unknown pocket gold score {score!r}; use 'partial', 'strict' or 'exact'")
        self.score = score
        self.cfg = cfg

    def check_prompts(self, prompts: list[str], metadata: list[dict] | None = None) -> None:
        """ValueError naming the first prompt outside the pocket grammar (with no valid ``spec``)."""
        metas = metadata if metadata is not None else [{}] * len(prompts)
        for i, (p, m) in enumerate(zip(prompts, metas)):
            try:
                PromptSpec.from_dict(m["spec"]) if "spec" in m else parse_prompt(p)
            except ValueError as e:  # the parser's message names the prompt and the word that does not fit
                raise ValueError(f"prompt {i + 1}: {e}; the pocket prompt files are prompts/pocket/*") from None
            except (KeyError, TypeError, AttributeError) as e:
                raise ValueError(f"prompt {i + 1} {p!r}: its 'spec' is not a pocket scene spec ({e!r}); the pocket "
                                 "prompt files are prompts/pocket/*") from None

    def __call__(self, images_BCHW01, prompts: list[str], metadata: list[dict] | None = None):
        import torch

        if metadata is not None and len(metadata) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(metadata)} metadata entries")
        metas = metadata if metadata is not None else [{}] * len(prompts)
        specs = [PromptSpec.from_dict(m["spec"]) if "spec" in m else p for p, m in zip(prompts, metas)]
        res = evaluate(images_BCHW01, specs, self.cfg)
        device = images_BCHW01.device
        as_t = {k: torch.as_tensor(getattr(res, k), dtype=torch.float32, device=device)
                for k in ("strict", "exact", "partial")}
        info = {**as_t, "categories": res.categories, "per_category": aggregate(res.categories, res.strict)}
        return as_t[self.score], info
