"""GenEval (Ghosh et al. 2023, "GenEval: An Object-Focused Framework for Evaluating Text-to-Image
Alignment"): prompt metadata, its generator, and the rule engine that scores detections.

**Metadata** (one JSON object per line, the format of GenEval's ``evaluation_metadata.jsonl``)::

    {"tag": "position", "prompt": "a photo of a dog right of a teddy bear",
     "include": [{"class": "teddy bear", "count": 1}, {"class": "dog", "count": 1, "position": ["right of", 0]}]}

``include`` clauses are ANDed: at least ``count`` objects of ``class`` (the ``count`` most confident
ones must have ``color`` when given; with ``position: [relation, j]`` each of them must stand in
``relation`` to every object matched by clause ``j``). ``exclude`` clauses fail the image when
``count`` or more objects of ``class`` are found (counting prompts exclude ``count + 1``).

**Generator.** Prompts come from GenEval's six templates over the 80 COCO class names
(``CLASS_NAMES``, GenEval's ``object_names.txt``: COCO's names with ``mouse``, ``remote`` and
``keyboard`` spelled ``computer mouse``, ``tv remote``, ``computer keyboard``) and GenEval's ten
colors; ``generate_suite`` draws a seeded set, ``training_set`` a seeded set disjoint from a test
file, as Flow-GRPO trains on GenEval-style prompts that the test set does not contain.

**Rules** (``evaluate``), GenEval's ``evaluate_images.py``:

- a detection counts when its confidence is above ``threshold`` (0.3), or ``counting_threshold``
  (0.9) for ``counting`` prompts; at most ``max_objects`` (16) per class, most confident first;
  ``max_overlap`` 1.0 turns the per-class overlap suppression off (GenEval's default);
- color: the object's crop classified zero-shot by CLIP among ``COLORS`` (done by the caller,
  ``flowalign.rewards.geneval``; here a ``colors_of`` callback);
- position: box centres; the offset along each axis shrinks by ``position_threshold`` (0.1) × the
  sum of both boxes' sizes on that axis, and a relation holds when the shrunk offset, divided by
  the length of the raw offset, exceeds 0.5 in its direction (image y grows downwards).

Three verdicts per image (``Verdict``): ``correct`` is GenEval's; ``strict`` and ``score`` are the
reward Flow-GRPO trains on (its reward server's ``evaluate_reward``): ``strict`` needs exactly
``count`` objects of every included class (and all of them of the right color), ``score`` is the
mean of per-clause partial credits ``1 − |count − found| / count`` for counts and colors, 0 for a
color or position that cannot be checked, and for a position clause 1 when it holds and (as the
reference server does) both 0 and 1 when it fails; ``exclude`` clauses do not enter ``score``, and
``score`` goes below 0 when far more objects are found than asked (``1 − |1 − 3|/1 = −1``), as there.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from ..errors import UserError

TAGS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
COLORS: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
NUMBERS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")

# COCO's 80 detection classes in COCO order, with GenEval's spellings of three of them.
CLASS_NAMES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock",
    "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)
assert len(CLASS_NAMES) == 80 and len(set(CLASS_NAMES)) == 80

# Detector label spellings (COCO, Pascal-style and panoptic variants) -> GenEval class names.
LABEL_ALIASES: dict[str, str] = {
    "mouse": "computer mouse", "remote": "tv remote", "keyboard": "computer keyboard",
    "tvmonitor": "tv", "tv monitor": "tv", "television": "tv", "motorbike": "motorcycle", "aeroplane": "airplane",
    "sofa": "couch", "diningtable": "dining table", "pottedplant": "potted plant", "hair dryer": "hair drier",
    "doughnut": "donut", "cellphone": "cell phone", "mobile phone": "cell phone",
}


def class_of_label(label: str) -> str | None:
    """The GenEval class of a detector's label (case, ``_``/``-`` and the aliases above normalised),
    or None when the label is no GenEval class (e.g. a panoptic model's ``sky``)."""
    name = label.strip().lower().replace("_", " ").replace("-", " ")
    name = LABEL_ALIASES.get(name, name)
    return name if name in CLASS_NAMES else None


# --------------------------------------------------------------------------------------------------
# metadata: checking and reading


def check_metadata(row: Mapping, *, known_classes: Iterable[str] | None = None, need_prompt: bool = True) -> dict:
    """``row`` if it is a well-formed GenEval metadata row, else ValueError naming the field and the fix.
    ``known_classes``: when given, every ``class`` must be one of them (a closed-vocabulary detector);
    ``need_prompt=False`` for the metadata a reward receives (the prompt comes separately)."""
    if not isinstance(row, Mapping):
        raise UserError(f"GenEval metadata must be a JSON object, got {type(row).__name__}")
    example = ('{"tag": "colors", "include": [{"class": "car", "count": 1, "color": "pink"}], '
               '"prompt": "a photo of a pink car"}')
    for key in ("tag", "include", "prompt") if need_prompt else ("tag", "include"):
        if key not in row:
            raise UserError(f"GenEval metadata is missing the field {key!r}; every row needs 'tag', 'include' "
                             f"and 'prompt' (and 'exclude' for counting), e.g. {example}")
    if not isinstance(row["tag"], str) or not row["tag"]:
        raise UserError(f"GenEval metadata 'tag' must be a non-empty string such as {', '.join(TAGS)}")
    if need_prompt and (not isinstance(row["prompt"], str) or not row["prompt"].strip()):
        raise UserError("GenEval metadata 'prompt' must be a non-empty string")
    known = None if known_classes is None else set(known_classes)
    for kind in ("include", "exclude"):
        clauses = row.get(kind, [])
        if not isinstance(clauses, list) or (kind == "include" and not clauses):
            raise UserError(f"GenEval metadata {kind!r} must be a{' non-empty' if kind == 'include' else ''} list "
                             f"of clauses like {{\"class\": \"dog\", \"count\": 1}}")
        for i, c in enumerate(clauses):
            where = f"GenEval metadata {kind}[{i}]"
            if not isinstance(c, Mapping):
                raise UserError(f"{where} must be an object like {{\"class\": \"dog\", \"count\": 1}}")
            for key in ("class", "count"):
                if key not in c:
                    raise UserError(f"{where} is missing the field {key!r}; a clause needs 'class' and 'count'")
            if not isinstance(c["class"], str) or not c["class"]:
                raise UserError(f"{where} 'class' must be a non-empty string (a detector class name)")
            if known is not None and c["class"] not in known:
                raise UserError(f"{where} class {c['class']!r} is not a class of the detector; GenEval classes are "
                                 f"the 80 COCO names of flowalign.eval.geneval.CLASS_NAMES")
            if isinstance(c["count"], bool) or not isinstance(c["count"], int) or c["count"] < 1:
                raise UserError(f"{where} 'count' must be an integer >= 1, got {c['count']!r}")
            if kind == "exclude":
                continue
            if "color" in c and c["color"] not in COLORS:
                raise UserError(f"{where} color {c['color']!r} is not one of GenEval's colors {', '.join(COLORS)}")
            if "position" in c:
                pos = c["position"]
                if (not isinstance(pos, (list, tuple)) or len(pos) != 2 or pos[0] not in RELATIONS
                        or isinstance(pos[1], bool) or not isinstance(pos[1], int) or not 0 <= pos[1] < i):
                    raise UserError(f"{where} position must be [relation, j] with relation one of "
                                     f"{', '.join(RELATIONS)} and j the index of an earlier include clause, got {pos!r}")
    return dict(row)


def read_metadata(path: str | os.PathLike, *, known_classes: Iterable[str] | None = None) -> list[dict]:
    """Rows of a GenEval metadata ``.jsonl`` file, each checked (errors name the file and line)."""
    from ..prompts import read_prompts

    path = Path(path)
    if path.suffix != ".jsonl":
        raise UserError(f"GenEval metadata {str(path)!r} must be a .jsonl file (GenEval's evaluation_metadata.jsonl "
                         "format: one object with tag, include, prompt per line)")
    return read_prompts(path, parse=lambda row: check_metadata(row, known_classes=known_classes))


def write_metadata(path: str | os.PathLike, rows: Sequence[Mapping]) -> Path:
    from ..io import atomic_write_text

    return atomic_write_text(path, "".join(json.dumps(dict(r)) + "\n" for r in rows))


# --------------------------------------------------------------------------------------------------
# the generator (GenEval's templates)


def with_article(name: str) -> str:
    return f"an {name}" if name[0] in "aeiou" else f"a {name}"


def plural(name: str) -> str:
    return f"{name}es" if name.endswith("s") else f"{name}s"


def _colorable(classes: Sequence[str]) -> list[str]:
    return [c for c in classes if c != "person"]  # GenEval writes no "<color> person" prompts


def make_sample(tag: str, rng: np.random.Generator, classes: Sequence[str] = CLASS_NAMES,
                max_count: int = 4) -> dict:
    """One GenEval-format row of category ``tag`` drawn with ``rng`` from its template."""
    def pick(pool, k):
        return [pool[i] for i in rng.choice(len(pool), size=k, replace=False)]

    if tag == "single_object":
        (a,) = pick(classes, 1)
        return {"tag": tag, "include": [{"class": a, "count": 1}], "prompt": f"a photo of {with_article(a)}"}
    if tag == "two_object":
        a, b = pick(classes, 2)
        return {"tag": tag, "include": [{"class": a, "count": 1}, {"class": b, "count": 1}],
                "prompt": f"a photo of {with_article(a)} and {with_article(b)}"}
    if tag == "counting":
        (a,) = pick(classes, 1)
        n = int(rng.integers(2, max_count, endpoint=True))
        return {"tag": tag, "include": [{"class": a, "count": n}], "exclude": [{"class": a, "count": n + 1}],
                "prompt": f"a photo of {NUMBERS[n]} {plural(a)}"}
    if tag == "colors":
        (a,) = pick(_colorable(classes), 1)
        (c,) = pick(COLORS, 1)
        return {"tag": tag, "include": [{"class": a, "count": 1, "color": c}],
                "prompt": f"a photo of {with_article(c)} {a}"}
    if tag == "position":
        a, b = pick(classes, 2)
        (rel,) = pick(RELATIONS, 1)
        return {"tag": tag, "include": [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [rel, 0]}],
                "prompt": f"a photo of {with_article(a)} {rel} {with_article(b)}"}
    if tag == "color_attr":
        a, b = pick(_colorable(classes), 2)
        ca, cb = pick(COLORS, 2)
        return {"tag": tag, "include": [{"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}],
                "prompt": f"a photo of {with_article(ca)} {a} and {with_article(cb)} {b}"}
    raise UserError(f"unknown GenEval tag {tag!r}; tags are {', '.join(TAGS)}")


def _key(row: Mapping) -> str:
    return json.dumps({k: row[k] for k in ("tag", "include", "exclude", "prompt") if k in row}, sort_keys=True)


def generate_suite(seed: int, per_tag: int | Mapping[str, int] = 100, *, exclude: Iterable[Mapping] = (),
                   max_tries: int = 50) -> list[dict]:
    """Distinct GenEval-format rows, ``per_tag`` of each tag (an int, or a count per tag), drawn
    with ``numpy.random.default_rng(seed)``; rows equal to one of ``exclude`` (same tag, clauses and
    prompt) or to one already drawn are drawn again. A tag with fewer possible rows than asked
    (``single_object`` has 80) stops after ``max_tries`` × ``per_tag`` draws with what it found."""
    counts = {t: per_tag for t in TAGS} if isinstance(per_tag, int) else dict(per_tag)
    unknown = set(counts) - set(TAGS)
    if unknown:
        raise UserError(f"unknown GenEval tag(s) {sorted(unknown)}; tags are {', '.join(TAGS)}")
    rng = np.random.default_rng(seed)
    seen = {_key(r) for r in exclude}
    rows = []
    for tag in TAGS:
        want = counts.get(tag, 0)
        found = tries = 0
        while found < want and tries < max_tries * max(want, 1):
            tries += 1
            row = make_sample(tag, rng)
            k = _key(row)
            if k in seen:
                continue
            seen.add(k)
            rows.append(row)
            found += 1
    return rows


def training_set(test_rows: Sequence[Mapping], seed: int, per_tag: int | Mapping[str, int] = 1000) -> list[dict]:
    """A seeded GenEval-style training set with no prompt of ``test_rows`` (compared by prompt text,
    so a rephrased clause list cannot sneak a test prompt in)."""
    test_prompts = {r["prompt"].strip().lower() for r in test_rows}
    rows = generate_suite(seed, per_tag, exclude=test_rows)
    return [r for r in rows if r["prompt"].strip().lower() not in test_prompts]


# --------------------------------------------------------------------------------------------------
# the rules


@dataclass(frozen=True)
class Detection:
    """One detected object: ``box`` (x0, y0, x1, y1) in pixels, ``score`` its confidence; ``color``
    when already known (synthetic detections, the pocket world); ``mask`` [H,W] bool when the
    detector segments (color crops keep only the object's pixels)."""

    label: str
    box: tuple[float, float, float, float]
    score: float = 1.0
    color: str | None = None
    mask: np.ndarray | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Thresholds:
    """GenEval's evaluation options (``evaluate_images.py --options``), with its defaults."""

    threshold: float = 0.3  # min detection confidence
    counting_threshold: float = 0.9  # min confidence for counting prompts
    max_objects: int = 16  # most confident detections kept per class
    max_overlap: float = 1.0  # per-class suppression IoU; 1.0 = off
    position_threshold: float = 0.1  # offset shrink per unit of box size


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU with GenEval's inclusive-pixel box areas ((x1 − x0 + 1)·(y1 − y0 + 1))."""
    def area(x0, y0, x1, y1):
        return max(x1 - x0 + 1, 0) * max(y1 - y0 + 1, 0)

    inter = area(max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3]))
    union = area(*a[:4]) + area(*b[:4]) - inter
    return inter / union if union else 0.0


def select(detections: Iterable[Detection], tag: str, th: Thresholds = Thresholds()) -> dict[str, list[Detection]]:
    """Detections kept for scoring, by class, most confident first: above the tag's confidence
    threshold, at most ``max_objects`` per class, then overlap suppression unless ``max_overlap`` is 1."""
    cut = th.counting_threshold if tag == "counting" else th.threshold
    by_class: dict[str, list[Detection]] = {}
    for d in detections:
        if d.score > cut:
            by_class.setdefault(d.label, []).append(d)
    kept = {}
    for label, dets in by_class.items():
        order = sorted(dets, key=lambda d: -d.score)[:th.max_objects]
        out = []
        while order:
            top = order.pop(0)
            out.append(top)
            if th.max_overlap < 1:
                order = [d for d in order if box_iou(top.box, d.box) < th.max_overlap]
        kept[label] = out
    return kept


def relations_between(a: Detection, b: Detection, position_threshold: float = 0.1) -> set[str]:
    """The relations of ``a`` to ``b`` (``"left of"``: a is left of b), GenEval's rule from box centres."""
    (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = a.box[:4], b.box[:4]
    off = np.array([(ax0 + ax1) / 2 - (bx0 + bx1) / 2, (ay0 + ay1) / 2 - (by0 + by1) / 2])
    size_sum = np.array([abs(ax1 - ax0) + abs(bx1 - bx0), abs(ay1 - ay0) + abs(by1 - by0)])
    shrunk = np.maximum(np.abs(off) - position_threshold * size_sum, 0) * np.sign(off)
    if np.all(np.abs(shrunk) < 1e-3):
        return set()
    dx, dy = shrunk / np.linalg.norm(off)
    return {rel for rel, holds in (("left of", dx < -0.5), ("right of", dx > 0.5), ("above", dy < -0.5),
                                   ("below", dy > 0.5)) if holds}


@dataclass
class Verdict:
    """GenEval's ``correct``, Flow-GRPO's ``strict`` and partial ``score``, and the reasons it failed."""

    correct: bool
    strict: bool
    score: float
    reasons: list[str]


ColorsOf = Callable[[str, list[Detection]], list[str]]


def known_colors(classname: str, dets: list[Detection]) -> list[str]:
    """Colors already on the detections (synthetic or pocket detections)."""
    if any(d.color is None for d in dets):
        raise UserError(f"a {classname!r} detection has no color; pass colors_of (a CLIP color classifier)")
    return [d.color for d in dets]


def evaluate(meta: Mapping, objects: Mapping[str, list[Detection]], colors_of: ColorsOf = known_colors,
             position_threshold: float = 0.1) -> Verdict:
    """Score one image's selected detections (``select``) against its metadata row (rules in the module
    docstring). ``colors_of(class, detections) -> colors`` is called at most once per clause."""
    correct, reasons = _geneval_correct(meta, objects, colors_of, position_threshold)
    strict, score = _flow_grpo_reward(meta, objects, colors_of, position_threshold)
    return Verdict(correct, strict, score, reasons)


def _position_fails(clause, found, groups, position_threshold) -> str | None:
    rel, j = clause["position"]
    if groups[j] is None:
        return f"no target for {clause['class']} to be {rel}"
    for obj in found:
        for target in groups[j]:
            actual = relations_between(obj, target, position_threshold)
            if rel not in actual:
                return f"expected {clause['class']} {rel} target, found {' and '.join(sorted(actual)) or 'no relation'}"
    return None


def _geneval_correct(meta, objects, colors_of, position_threshold) -> tuple[bool, list[str]]:
    reasons: list[str] = []
    groups: list[list[Detection] | None] = []
    for clause in meta["include"]:
        cls, n = clause["class"], clause["count"]
        found = objects.get(cls, [])[:n]
        ok = len(found) >= n
        if not ok:
            reasons.append(f"expected {cls}>={n}, found {len(found)}")
        else:
            if "color" in clause:
                colors = colors_of(cls, found)
                if colors.count(clause["color"]) < n:
                    ok = False
                    reasons.append(f"expected {clause['color']} {cls}>={n}, found colors {colors}")
            if "position" in clause and ok:
                why = _position_fails(clause, found, groups, position_threshold)
                if why:
                    ok = False
                    reasons.append(why)
        groups.append(found if ok else None)
    for clause in meta.get("exclude", []):
        cls = clause["class"]
        if len(objects.get(cls, [])) >= clause["count"]:
            reasons.append(f"expected {cls}<{clause['count']}, found {len(objects[cls])}")
    return not reasons, reasons


def _flow_grpo_reward(meta, objects, colors_of, position_threshold) -> tuple[bool, float]:
    strict = True
    credits: list[float] = []
    groups: list[list[Detection] | None] = []
    for clause in meta["include"]:
        cls, n = clause["class"], clause["count"]
        found = objects.get(cls, [])
        credits.append(1 - abs(n - len(found)) / n)
        ok = len(found) == n
        if not ok:
            if "color" in clause or "position" in clause:
                credits.append(0.0)
        else:
            if "color" in clause:
                right = colors_of(cls, found).count(clause["color"])
                credits.append(1 - abs(n - right) / n)
                ok = right == n
            if "position" in clause and ok:
                if groups[clause["position"][1]] is None:
                    credits.append(0.0)
                    ok = False
                else:
                    if _position_fails(clause, found, groups, position_threshold):
                        credits.append(0.0)
                        ok = False
                    credits.append(1.0)  # the reference server appends it whether or not the relation held
        strict &= ok
        groups.append(found if ok else None)
    return strict, (sum(credits) / len(credits) if credits else 0.0)


def summarize(tags: Sequence[str], correct: Sequence[bool]) -> dict[str, float]:
    """GenEval's summary: accuracy per tag (tags in GenEval's order), ``overall`` = mean over tags,
    ``overall_images`` = mean over images."""
    values = np.asarray(correct, dtype=np.float64)
    tags_arr = np.asarray(tags)
    present = [t for t in TAGS if t in set(tags)] + sorted(set(tags) - set(TAGS))
    out = {t: float(values[tags_arr == t].mean()) for t in present}
    out["overall"] = float(np.mean([out[t] for t in present])) if present else math.nan
    out["overall_images"] = float(values.mean()) if values.size else math.nan
    return out


# --------------------------------------------------------------------------------------------------
# the pocket world in GenEval's terms (its shapes are the classes)


def from_pocket_spec(spec, prompt: str | None = None) -> dict:
    """A pocket ``PromptSpec`` as a GenEval metadata row: one include clause per phrase (its shape as
    the class), ``exclude`` count + 1 for counting phrases, and GenEval's position form ("A rel B":
    B first, then A with ``position: [rel, 0]``)."""
    from ..pocket.grammar import spec_to_prompt

    def clause(p):
        c = {"class": p.shape, "count": p.count}
        if p.color is not None:
            c["color"] = p.color
        return c

    objs = list(spec.objects)
    if spec.relation is not None:
        include = [clause(objs[1]), {**clause(objs[0]), "position": [spec.relation, 0]}]
    else:
        include = [clause(p) for p in objs]
    row = {"tag": spec.category, "include": include, "prompt": prompt or spec_to_prompt(spec)}
    exclude = [{"class": p.shape, "count": p.count + 1} for p in objs if p.count > 1]
    if exclude:
        row["exclude"] = exclude
    return row


def from_pocket_objects(objects) -> list[Detection]:
    """The pocket evaluator's ``DetectedObject``s as detections (confidence 1, exact colors); objects
    of no known shape or color are nothing a class detector would report, so they are dropped."""
    return [Detection(label=o.shape, box=tuple(float(v) for v in o.bbox), score=1.0, color=o.color)
            for o in objects if o.shape is not None and o.color != "other"]
