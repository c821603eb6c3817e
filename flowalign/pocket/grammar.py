"""The pocket world's scene grammar: prompts ⇄ structured specs.

Vocabulary: shapes ``circle, square, triangle``; colors ``red, green, blue, yellow``; counts one to
four; relations ``left of, right of, above, below``.

Grammar (lower case, words separated by spaces, an optional final ``.``, an optional leading
``a photo of``)::

    prompt   := phrase | phrase "and" phrase | phrase RELATION phrase
    phrase   := COUNT [COLOR] SHAPE          -- SHAPE is plural ("circles") when COUNT > 1
    COUNT    := "a" | "an" | "one" | "two" | "three" | "four"
    RELATION := ["to the"] "left of" | ["to the"] "right of" | "above" | "below"

A relation joins two single objects (``a red circle to the left of a green square``) and means
*the first phrase's object* is left of / right of / above / below *the second's*. A scene holds at
most ``MAX_OBJECTS`` = 4 objects, so every prompt of the grammar can be drawn at 32×32 with objects
large enough to recognise. A phrase without a color accepts an object of any color.

Categories mirror GenEval (Ghosh et al., 2023) and are decided by the prompt's structure:

==============  =====================================================  =========================
category        form                                                    example
==============  =====================================================  =========================
single_object   one phrase, count 1, no color                          ``a circle``
colors          one phrase, count 1, with a color                      ``a blue square``
counting        one phrase, count 2–4 (color optional)                 ``three triangles``
two_object      two phrases joined by "and", count 1, no colors        ``a circle and a square``
color_attr      two phrases joined by "and", count 1, both colored      ``a red square and a green
                                                                        circle``
position        two phrases joined by a relation (colors optional)     ``a red circle to the left
                                                                        of a green square``
compound        anything else the grammar allows                       ``two circles and a
                                                                        square``
==============  =====================================================  =========================

As in GenEval, ``single_object`` is the shape alone (any color is right); ``a red circle`` is a
``colors`` prompt. ``compound`` prompts are never written to the prompt sets; they exist so that
``pocket render`` and the evaluator accept every sentence the grammar can say.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
CATEGORIES: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
MAX_OBJECTS = 4

NUMBER_WORDS: dict[int, str] = {1: "a", 2: "two", 3: "three", 4: "four"}
_COUNT_WORDS: dict[str, int] = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4}
_PLURALS: dict[str, str] = {s + "s": s for s in SHAPES}
# Relation phrases as word sequences; "to the left of" is what spec_to_prompt writes.
_RELATION_WORDS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("to", "the", "left", "of"), "left of"),
    (("to", "the", "right", "of"), "right of"),
    (("left", "of"), "left of"),
    (("right", "of"), "right of"),
    (("above",), "above"),
    (("below",), "below"),
)
_RELATION_TEXT: dict[str, str] = {
    "left of": "to the left of",
    "right of": "to the right of",
    "above": "above",
    "below": "below",
}


@dataclass(frozen=True)
class ObjectPhrase:
    """``count`` objects of ``shape``; ``color`` None means any color."""

    shape: str
    color: str | None = None
    count: int = 1

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise UserError(f"unknown shape {self.shape!r}; pocket shapes are {', '.join(SHAPES)}")
        if self.color is not None and self.color not in COLORS:
            raise UserError(f"unknown color {self.color!r}; pocket colors are {', '.join(COLORS)}")
        if not 1 <= self.count <= MAX_OBJECTS:
            raise UserError(f"count {self.count} out of range; pocket counts are 1 to {MAX_OBJECTS}")

    def matches(self, shape: str | None, color: str | None) -> bool:
        return shape == self.shape and (self.color is None or color == self.color)

    def to_dict(self) -> dict:
        return {"shape": self.shape, "color": self.color, "count": self.count}


@dataclass(frozen=True)
class PromptSpec:
    """A prompt of the grammar as data: one or two object phrases, and an optional relation.

    With ``relation`` set, ``objects[0] <relation> objects[1]`` (both of count 1).
    """

    objects: tuple[ObjectPhrase, ...]
    relation: str | None = None

    def __post_init__(self):
        if not 1 <= len(self.objects) <= 2:
            raise UserError(f"a pocket prompt names one or two object phrases, got {len(self.objects)}")
        if self.relation is not None:
            if self.relation not in RELATIONS:
                raise UserError(f"unknown relation {self.relation!r}; pocket relations are {', '.join(RELATIONS)}")
            if len(self.objects) != 2 or any(o.count != 1 for o in self.objects):
                raise UserError("a relation joins exactly two single objects ('a red circle above a square')")
        if self.total_objects > MAX_OBJECTS:
            raise UserError(
                f"the prompt asks for {self.total_objects} objects; a pocket scene holds at most {MAX_OBJECTS}"
            )
        if len(self.objects) == 2 and self.objects[0] == self.objects[1]:
            raise UserError(
                f"both phrases are the same ({spec_phrase(self.objects[0])!r}); "
                f"say it once with a count instead, e.g. 'two {self.objects[0].shape}s'"
            )

    @property
    def total_objects(self) -> int:
        return sum(o.count for o in self.objects)

    @property
    def category(self) -> str:
        objs = self.objects
        if self.relation is not None:
            return "position"
        if len(objs) == 1:
            (o,) = objs
            if o.count > 1:
                return "counting"
            return "single_object" if o.color is None else "colors"
        if all(o.count == 1 for o in objs):
            colored = [o.color is not None for o in objs]
            if not any(colored) and objs[0].shape != objs[1].shape:
                return "two_object"
            if all(colored) and objs[0].shape != objs[1].shape and objs[0].color != objs[1].color:
                return "color_attr"
        return "compound"

    def to_dict(self) -> dict:
        """JSON-serialisable form (with the derived ``category`` for readers of the .jsonl files)."""
        return {
            "objects": [o.to_dict() for o in self.objects],
            "relation": self.relation,
            "category": self.category,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "PromptSpec":
        objects = tuple(ObjectPhrase(o["shape"], o.get("color"), int(o.get("count", 1))) for o in d["objects"])
        return cls(objects, d.get("relation"))


def spec_phrase(o: ObjectPhrase) -> str:
    words = [NUMBER_WORDS[o.count]]
    if o.color is not None:
        words.append(o.color)
    words.append(o.shape if o.count == 1 else o.shape + "s")
    return " ".join(words)


def spec_to_prompt(spec: PromptSpec) -> str:
    """The canonical sentence for ``spec``; ``parse_prompt(spec_to_prompt(s)) == s``."""
    if spec.relation is not None:
        a, b = spec.objects
        return f"{spec_phrase(a)} {_RELATION_TEXT[spec.relation]} {spec_phrase(b)}"
    return " and ".join(spec_phrase(o) for o in spec.objects)


def _describe_expected(kind: str) -> str:
    return {
        "count": "a count word (a, an, one, two, three, four)",
        "color_or_shape": f"a color ({', '.join(COLORS)}) or a shape ({', '.join(SHAPES)})",
        "shape": f"a shape ({', '.join(SHAPES)})",
        "joiner": "'and', a relation (to the left of, to the right of, above, below) or the end of the prompt",
    }[kind]


def parse_prompt(text: str) -> PromptSpec:
    """Parse a sentence of the pocket grammar (see module docstring) into a :class:`PromptSpec`.

    Raises ``UserError`` (a ValueError) naming the word that does not fit and what was expected there.
    """
    words = text.strip().lower().rstrip(".").split()
    if words[:3] == ["a", "photo", "of"]:
        words = words[3:]

    def fail(i: int, expected: str) -> UserError:
        got = f"word {i + 1} {words[i]!r}" if i < len(words) else "the end of the prompt"
        return UserError(f"cannot parse pocket prompt {text!r}: got {got}, expected {_describe_expected(expected)}")

    def phrase(i: int) -> tuple[ObjectPhrase, int]:
        if i >= len(words) or words[i] not in _COUNT_WORDS:
            raise fail(i, "count")
        count = _COUNT_WORDS[words[i]]
        i += 1
        color = None
        if i < len(words) and words[i] in COLORS:
            color = words[i]
            i += 1
        if i >= len(words):
            raise fail(i, "shape" if color else "color_or_shape")
        w = words[i]
        if count == 1 and w in SHAPES:
            return ObjectPhrase(w, color, 1), i + 1
        if count > 1 and w in _PLURALS:
            return ObjectPhrase(_PLURALS[w], color, count), i + 1
        if w in SHAPES or w in _PLURALS:
            want = w if w in SHAPES else _PLURALS[w]
            form = f"the plural {want + 's'!r}" if count > 1 else f"the singular {want!r}"
            raise UserError(f"cannot parse pocket prompt {text!r}: after {words[i - 1 - (color is not None)]!r} "
                             f"write {form}")
        raise fail(i, "shape" if color else "color_or_shape")

    first, i = phrase(0)
    if i == len(words):
        return PromptSpec((first,))
    if words[i] == "and":
        second, j = phrase(i + 1)
        if j != len(words):
            raise UserError(f"cannot parse pocket prompt {text!r}: unexpected {' '.join(words[j:])!r} after the "
                             "second object; a pocket prompt names at most two object phrases")
        return PromptSpec((first, second))
    for rel_words, relation in _RELATION_WORDS:
        if tuple(words[i:i + len(rel_words)]) == rel_words:
            second, j = phrase(i + len(rel_words))
            if j != len(words):
                raise UserError(f"cannot parse pocket prompt {text!r}: unexpected {' '.join(words[j:])!r} after "
                                 "the second object")
            return PromptSpec((first, second), relation)
    raise fail(i, "joiner")


def canonical_relation(spec: PromptSpec) -> tuple[str, str, str]:
    """``(axis, first_shape, second_shape)`` with ``first`` left of / above ``second``.

    ``a circle to the left of a square`` and ``a square to the right of a circle`` say the same thing
    and both give ``("horizontal", "circle", "square")``; held-out relations use this form.
    """
    assert spec.relation is not None
    a, b = spec.objects[0].shape, spec.objects[1].shape
    return {
        "left of": ("horizontal", a, b),
        "right of": ("horizontal", b, a),
        "above": ("vertical", a, b),
        "below": ("vertical", b, a),
    }[spec.relation]
