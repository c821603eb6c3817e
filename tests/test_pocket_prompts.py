"""The pocket prompt sets: reproducible, balanced, and held out as promised."""

import json
from pathlib import Path

import pytest

from flowalign.pocket.grammar import CATEGORIES, COLORS, RELATIONS, SHAPES, parse_prompt
from flowalign.pocket.prompts import (
    HELDOUT,
    QUICK_PER_CATEGORY,
    TEST_PER_CATEGORY,
    TRAIN_PER_CATEGORY,
    all_prompts,
    combinations,
    load_prompt_file,
    write_prompt_sets,
)

COMMITTED = Path(__file__).resolve().parents[1] / "prompts" / "pocket"


def test_committed_files_equal_the_regenerated_ones(tmp_path):
    written = write_prompt_sets(tmp_path, seed=0)
    assert sorted(p.name for p in written) == sorted(p.name for p in COMMITTED.iterdir())
    for p in written:
        assert (COMMITTED / p.name).read_bytes() == p.read_bytes(), f"{p.name} is stale: rerun " \
            "`python -m flowalign.pocket.prompts prompts/pocket`"


def test_regeneration_is_seeded(tmp_path):
    a = write_prompt_sets(tmp_path / "a", seed=1)
    b = write_prompt_sets(tmp_path / "b", seed=1)
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b))
    assert (tmp_path / "a" / "train.txt").read_bytes() != (COMMITTED / "train.txt").read_bytes()


@pytest.fixture(scope="module")
def sets():
    return {name: load_prompt_file(COMMITTED / f"{name}.jsonl") for name in ("train", "test")}


def test_test_combinations_never_appear_in_training(sets):
    train_combos = set().union(*(combinations(parse_prompt(r["prompt"])) for r in sets["train"]))
    assert not train_combos & HELDOUT
    for row in sets["test"]:
        spec = parse_prompt(row["prompt"])
        if row["category"] == "single_object":  # a bare shape: no combination to hold out
            continue
        assert combinations(spec) & HELDOUT, row["prompt"]
        assert combinations(spec) - train_combos, row["prompt"]  # something in it was never trained on
    train_prompts = {r["prompt"] for r in sets["train"]}
    shared = {r["prompt"] for r in sets["test"]} & train_prompts
    assert shared == {f"a {s}" for s in SHAPES}
    # the mirrored sentence of a held-out relation is held out too
    assert "a square to the right of a circle" not in train_prompts
    assert "a circle to the left of a square" not in train_prompts


def test_training_still_covers_every_word(sets):
    specs = [parse_prompt(r["prompt"]) for r in sets["train"]]
    phrases = [o for s in specs for o in s.objects]
    assert {o.shape for o in phrases} == set(SHAPES)
    assert {o.color for o in phrases} - {None} == set(COLORS)
    assert {o.count for o in phrases} == {1, 2, 3, 4}
    assert {s.relation for s in specs} - {None} == set(RELATIONS)


def test_sets_are_balanced_and_consistent(sets):
    for name, quota in (("train", TRAIN_PER_CATEGORY), ("test", TEST_PER_CATEGORY)):
        rows = sets[name]
        assert [r["prompt"] for r in rows] == (COMMITTED / f"{name}.txt").read_text().splitlines()
        for cat in CATEGORIES:
            assert sum(r["category"] == cat for r in rows) == quota
        for r in rows:
            assert parse_prompt(r["prompt"]).to_dict() == r["spec"] and r["spec"]["category"] == r["category"]
    for cat in CATEGORIES:
        quick = load_prompt_file(COMMITTED / f"test_{cat}.txt")
        assert len(quick) == QUICK_PER_CATEGORY and {r["category"] for r in quick} == {cat}
        distinct_test = {r["prompt"] for r in sets["test"] if r["category"] == cat}
        assert len({r["prompt"] for r in quick}) == min(len(distinct_test), QUICK_PER_CATEGORY)
    # test sets hold every distinct held-out prompt of the small categories
    for cat in ("colors", "two_object", "counting"):
        distinct_test = {r["prompt"] for r in sets["test"] if r["category"] == cat}
        assert len(distinct_test) == sum(bool(combinations(s) & HELDOUT) for s in all_prompts(cat))


def test_load_prompt_file_names_the_bad_line(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("a circle\ntwo dogs\n")
    with pytest.raises(ValueError, match=r"bad.txt:2: cannot parse pocket prompt 'two dogs'"):
        load_prompt_file(bad)
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"prompt": "two red circles", "category": "counting",
                                "spec": parse_prompt("two red circles").to_dict()}) + "\n")
    assert load_prompt_file(good)[0]["spec"]["objects"][0]["count"] == 2
