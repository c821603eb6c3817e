"""Alt-text-like training captions for the pocket world.

Real text-to-image models learn from web captions that leave out most counts and positions and
sometimes get them wrong; that is why SD3.5-M *can* draw a GenEval scene and often doesn't. The
pocket build models it: every training image is rendered from an exact spec, and its caption is then
made *incomplete* (a detail left out) or *wrong* (a detail changed) with rates set in
:class:`CaptionNoise`. Where a caption leaves a detail out, the image still shows a definite count,
position and color, so the model learns a prior from it.

Each attribute of a caption is decided by one uniform draw ``u``: ``u < drop`` leaves it out,
``drop <= u < drop + wrong`` changes it, otherwise it stays exact. So ``drop + wrong <= 1`` per
attribute, and ``1 - drop - wrong`` is the rate of exact mentions.

=================  ==============================================  ==========================================
attribute          incomplete (``drop_*``)                          wrong (``wrong_*`` / ``swap_colors``)
=================  ==============================================  ==========================================
count (≥ 2)        bare plural: "three red circles" → "red         off by one, within 2–4: "three" → "two" or
                   circles"                                        "four"
relation           "and": "a circle to the left of a square" →     flipped: "left of" ↔ "right of",
                   "a circle and a square"                         "above" ↔ "below"
color (each)       left out: "a red circle" → "a circle"           its confusion partner, red ↔ yellow, green ↔
                                                                   blue (one colored object)
two colors         —                                               exchanged between the two objects
=================  ==============================================  ==========================================
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from .grammar import COLORS, MAX_OBJECTS, ObjectPhrase, PromptSpec, spec_to_prompt

_FLIP = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
# Wrong colors are systematic, as annotators' confusions are (warm with warm, cool with cool): a
# uniform pick among the other three would make every wrong color rarer than the right one, which
# classifier-free guidance then simply sharpens away.
CONFUSED_COLOR = {"red": "yellow", "yellow": "red", "green": "blue", "blue": "green"}
assert set(CONFUSED_COLOR) == set(COLORS)
_RELATION_TEXT = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}


@dataclass(frozen=True)
class CaptionNoise:
    """Per-caption corruption rates (each a probability, decided independently per attribute)."""

    drop_count: float = 0.0  # a count of 2–4 becomes a bare plural ("red circles")
    wrong_count: float = 0.0  # a count of 2–4 is off by one (staying within 2–4)
    drop_relation: float = 0.0  # a relation becomes "and"
    wrong_relation: float = 0.0  # a relation is flipped (left ↔ right, above ↔ below)
    drop_color: float = 0.0  # each color word is left out
    wrong_color: float = 0.0  # the color of a lone colored object becomes its confusion partner
    swap_colors: float = 0.0  # two colored objects of different colors exchange their colors

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not (isinstance(v, (int, float)) and 0.0 <= v <= 1.0):
                raise ValueError(f"caption noise {f.name}={v!r} is not a probability; use a number in [0, 1]")
        for drop, wrong in (("drop_count", "wrong_count"), ("drop_relation", "wrong_relation"),
                            ("drop_color", "wrong_color")):
            total = getattr(self, drop) + getattr(self, wrong)
            if total > 1.0 + 1e-9:
                raise ValueError(f"caption noise {drop} + {wrong} = {total:g} exceeds 1 (they are exclusive outcomes "
                                 f"of one attribute); lower one of them")

    @property
    def clean(self) -> bool:
        return not any(dataclasses.astuple(self))


def _phrase(o: ObjectPhrase, color: str | None, count: int | None) -> str:
    """``count`` None: a bare plural (no count word); a count of 1 is written "a"."""
    words = [] if count is None else ["a" if count == 1 else {2: "two", 3: "three", 4: "four"}[count]]
    if color is not None:
        words.append(color)
    words.append(o.shape if count == 1 else o.shape + "s")
    return " ".join(words)


def noisy_caption(spec: PromptSpec, noise: CaptionNoise, rng: np.random.Generator) -> tuple[str, set[str]]:
    """A caption of a scene drawn from ``spec``, corrupted as ``noise`` says (see the module docstring),
    and what was done to it: a subset of ``{"incomplete", "wrong"}``.

    Six uniform draws are taken for every caption, whatever the spec, so the captions of a dataset
    depend only on the seed and on each spec, not on the specs before it.
    """
    u_count, u_rel, u_swap, u_col0, u_col1, u_dir = rng.random(6)
    objs = list(spec.objects)
    colors = [o.color for o in objs]
    counts: list[int | None] = [o.count for o in objs]
    relation = spec.relation
    kinds: set[str] = set()

    if len(objs) == 2 and all(colors) and colors[0] != colors[1] and u_swap < noise.swap_colors:
        colors = colors[::-1]
        kinds.add("wrong")
    lone_colored = sum(c is not None for c in colors) == 1
    for i, u in enumerate((u_col0, u_col1)[:len(objs)]):
        if colors[i] is None:
            continue
        if u < noise.drop_color:
            colors[i] = None
            kinds.add("incomplete")
        elif lone_colored and u < noise.drop_color + noise.wrong_color:
            colors[i] = CONFUSED_COLOR[colors[i]]
            kinds.add("wrong")
    for i, o in enumerate(objs):
        if o.count < 2:
            continue
        if u_count < noise.drop_count:
            counts[i] = None
            kinds.add("incomplete")
        elif u_count < noise.drop_count + noise.wrong_count:
            options = [n for n in (o.count - 1, o.count + 1)
                       if 2 <= n <= MAX_OBJECTS and n + sum(objs[j].count for j in range(len(objs)) if j != i) <= MAX_OBJECTS]
            if options:
                counts[i] = options[int(u_dir * len(options))]
                kinds.add("wrong")
    if relation is not None:
        if u_rel < noise.drop_relation:
            relation = None
            kinds.add("incomplete")
        elif u_rel < noise.drop_relation + noise.wrong_relation:
            relation = _FLIP[relation]
            kinds.add("wrong")

    phrases = [_phrase(o, c, n) for o, c, n in zip(objs, colors, counts)]
    if len(phrases) == 1:
        return phrases[0], kinds
    if relation is None:
        return f"{phrases[0]} and {phrases[1]}", kinds
    return f"{phrases[0]} {_RELATION_TEXT[relation]} {phrases[1]}", kinds


def captions_for(specs: list[PromptSpec], noise: CaptionNoise, seed: int) -> tuple[list[str], dict[str, float]]:
    """The training caption of every scene — exact (``spec_to_prompt``) when ``noise`` is clean, else
    :func:`noisy_caption` with one generator seeded by ``seed`` — and the fractions of captions that
    are ``exact``, ``incomplete`` (only left-out details) and ``wrong`` (at least one changed detail)."""
    if noise.clean:
        return [spec_to_prompt(s) for s in specs], {"exact": 1.0, "incomplete": 0.0, "wrong": 0.0}
    rng = np.random.default_rng(seed)
    out = [noisy_caption(s, noise, rng) for s in specs]
    n = max(1, len(out))
    stats = {"exact": sum(not k for _, k in out) / n, "incomplete": sum(k == {"incomplete"} for _, k in out) / n,
             "wrong": sum("wrong" in k for _, k in out) / n}
    return [c for c, _ in out], {k: round(v, 4) for k, v in stats.items()}
