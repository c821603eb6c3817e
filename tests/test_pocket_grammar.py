"""The pocket grammar: exact parsing, canonical prompts, categories, clear errors."""

import json

import pytest

from flowalign.pocket.grammar import (
    CATEGORIES,
    ObjectPhrase,
    PromptSpec,
    canonical_relation,
    parse_prompt,
    spec_to_prompt,
)
from flowalign.pocket.prompts import all_prompts


def test_round_trip_on_every_category_prompt():
    n = 0
    for cat in CATEGORIES:
        for spec in all_prompts(cat):
            text = spec_to_prompt(spec)
            assert parse_prompt(text) == spec, text
            assert spec.category == cat, text
            assert PromptSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
            n += 1
    assert n > 600


@pytest.mark.parametrize("text, category, total", [
    ("a circle", "single_object", 1),
    ("a blue square", "colors", 1),
    ("two red circles", "counting", 2),
    ("four triangles", "counting", 4),
    ("a circle and a square", "two_object", 2),
    ("a red square and a green circle", "color_attr", 2),
    ("a red circle to the left of a green square", "position", 2),
    ("a triangle below a circle", "position", 2),
    ("two circles and a blue square", "compound", 3),
])
def test_categories(text, category, total):
    spec = parse_prompt(text)
    assert spec.category == category
    assert spec.total_objects == total
    assert spec_to_prompt(spec) == text


def test_accepted_variants_parse_to_the_canonical_spec():
    canon = parse_prompt("a red circle to the left of a green square")
    assert parse_prompt("A photo of a red circle left of a green square.") == canon
    assert parse_prompt("  a red   circle to the left of a green square ") == canon
    assert parse_prompt("one circle") == parse_prompt("an circle") == parse_prompt("a circle")


def test_relation_canonical_form_identifies_mirrored_sentences():
    assert canonical_relation(parse_prompt("a circle to the left of a square")) == \
        canonical_relation(parse_prompt("a square to the right of a circle")) == ("horizontal", "circle", "square")
    assert canonical_relation(parse_prompt("a red circle below a blue circle")) == ("vertical", "circle", "circle")


@pytest.mark.parametrize("text, words", [
    ("a dog", ["word 2", "'dog'", "shape"]),
    ("three purple circles", ["word 2", "'purple'", "color"]),
    ("five circles", ["word 1", "'five'", "count word"]),
    ("two circle", ["plural", "'circles'"]),
    ("a circles", ["singular", "'circle'"]),
    ("a red", ["end of the prompt", "shape"]),
    ("a circle next to a square", ["word 3", "'next'", "relation"]),
    ("a circle and a square and a triangle", ["at most two"]),
    ("", ["end of the prompt", "count word"]),
    ("two circles to the left of a square", ["relation joins exactly two single objects"]),
    ("three circles and two squares", ["5 objects", "at most 4"]),
    ("a circle and a circle", ["same", "two circles"]),
])
def test_errors_name_what_could_not_be_parsed(text, words):
    with pytest.raises(ValueError) as e:
        parse_prompt(text)
    for w in words:
        assert w in str(e.value), str(e.value)


def test_spec_validation():
    with pytest.raises(ValueError, match="unknown shape"):
        ObjectPhrase("hexagon")
    with pytest.raises(ValueError, match="count 5"):
        ObjectPhrase("circle", count=5)
    with pytest.raises(ValueError, match="unknown relation"):
        PromptSpec((ObjectPhrase("circle"), ObjectPhrase("square")), "inside")
