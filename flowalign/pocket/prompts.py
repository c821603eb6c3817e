"""The pocket prompt sets: every prompt of each category, the held-out combinations, and the files
under ``prompts/pocket/``.

**Held out.** A prompt's *combinations* are
``("color-shape", color, shape)`` for each colored phrase, ``("count-shape", count, shape)`` for
each phrase of count ≥ 2, ``("and-pair", shape, shape)`` (sorted) for two phrases joined by "and",
and ``("relation", axis, first, second)`` for a relation, in the order-free form of
:func:`~flowalign.pocket.grammar.canonical_relation` (``a circle left of a square`` and
``a square right of a circle`` are the same combination). ``HELDOUT`` lists held-out combinations.
The training set holds only prompts with none of them; the test set holds only prompts with at
least one — except ``single_object``, whose prompts (a bare shape) have no combination to hold out
and appear in both, as GenEval's single-object prompts do in GenEval-style RL training sets. Every
color, shape, count and relation still appears in training; only these pairings never do.

**Files** (``write_prompt_sets``; deterministic for a seed, checked by a test against the committed
copies): ``train.txt``/``.jsonl`` (``TRAIN_PER_CATEGORY`` lines per category, shuffled),
``test.txt``/``.jsonl`` (``TEST_PER_CATEGORY`` per category, grouped by category),
``test_<category>.txt`` (``QUICK_PER_CATEGORY`` each, for quick runs), ``test_96.jsonl`` (the first 16
test prompts of each category: training runs' quick held-out eval), ``train_32.jsonl`` (32 distinct
training prompts taken from ``train`` in order, one category after another in turn — single objects
have only three — a small prompt set for PRDP's "stable as the prompt set grows" comparison) and
``heldout.json``. A line is
one sample, not one distinct prompt: categories with fewer distinct prompts than the quota repeat
them (in a fixed shuffled cycle) so that every category weighs the same in training and in a
one-image-per-line evaluation. ``.jsonl`` rows are ``{"prompt", "category", "spec"}``.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import numpy as np

from ..io import atomic_write_text
from .grammar import (
    CATEGORIES,
    COLORS,
    RELATIONS,
    SHAPES,
    ObjectPhrase,
    PromptSpec,
    canonical_relation,
    parse_prompt,
    spec_to_prompt,
)

TRAIN_PER_CATEGORY = 200
TEST_PER_CATEGORY = 64
QUICK_PER_CATEGORY = 24

HELDOUT: frozenset[tuple] = frozenset({
    # each color loses one shape, each shape keeps at least two colors
    ("color-shape", "red", "square"),
    ("color-shape", "green", "triangle"),
    ("color-shape", "blue", "circle"),
    ("color-shape", "yellow", "triangle"),
    # each count 2–4 and each shape once (a Latin square)
    ("count-shape", 2, "triangle"),
    ("count-shape", 3, "circle"),
    ("count-shape", 4, "square"),
    ("and-pair", "circle", "triangle"),
    # both axes; the mirrored order of each stays in training
    ("relation", "horizontal", "circle", "square"),
    ("relation", "horizontal", "triangle", "triangle"),
    ("relation", "vertical", "square", "circle"),
    ("relation", "vertical", "triangle", "square"),
})


def combinations(spec: PromptSpec) -> set[tuple]:
    """The attribute / count / relation combinations a prompt contains (see module docstring)."""
    out: set[tuple] = set()
    for o in spec.objects:
        if o.color is not None:
            out.add(("color-shape", o.color, o.shape))
        if o.count >= 2:
            out.add(("count-shape", o.count, o.shape))
    if spec.relation is not None:
        out.add(("relation", *canonical_relation(spec)))
    elif len(spec.objects) == 2:
        out.add(("and-pair", *sorted(o.shape for o in spec.objects)))
    return out


def is_heldout(spec: PromptSpec) -> bool:
    return bool(combinations(spec) & HELDOUT)


def all_prompts(category: str) -> list[PromptSpec]:
    """Every prompt of a category, in a fixed order. ``position`` prompts name either no colors
    (GenEval's form, distinct shapes) or a color for both objects."""
    colored = [ObjectPhrase(s, c) for c in COLORS for s in SHAPES]
    plain = [ObjectPhrase(s) for s in SHAPES]
    if category == "single_object":
        return [PromptSpec((o,)) for o in plain]
    if category == "colors":
        return [PromptSpec((o,)) for o in colored]
    if category == "counting":
        return [PromptSpec((ObjectPhrase(s, c, n),)) for n in (2, 3, 4) for c in (None, *COLORS) for s in SHAPES]
    if category == "two_object":
        return [PromptSpec((a, b)) for a, b in itertools.permutations(plain, 2)]
    if category == "color_attr":
        return [PromptSpec((a, b)) for a, b in itertools.permutations(colored, 2)
                if a.shape != b.shape and a.color != b.color]
    if category == "position":
        pairs = list(itertools.permutations(plain, 2)) + list(itertools.permutations(colored, 2))
        return [PromptSpec((a, b), rel) for rel in RELATIONS for a, b in pairs]
    raise ValueError(f"unknown pocket category {category!r}; categories are {', '.join(CATEGORIES)}")


def split_prompts(category: str, split: str) -> list[PromptSpec]:
    """Prompts of a category allowed in ``split`` ("train", "test" or "all")."""
    specs = all_prompts(category)
    if split == "all" or category == "single_object":
        return specs
    if split == "train":
        return [s for s in specs if not is_heldout(s)]
    if split == "test":
        return [s for s in specs if is_heldout(s)]
    raise ValueError(f"unknown split {split!r}; use 'train', 'test' or 'all'")


def sample_specs(
    n: int, rng: np.random.Generator, categories: tuple[str, ...] = CATEGORIES, split: str = "all"
) -> list[PromptSpec]:
    """``n`` prompts for dataset making: a uniform category, then a uniform prompt of it."""
    pools = [split_prompts(c, split) for c in categories]
    cats = rng.integers(len(pools), size=n)
    picks = rng.random(n)
    return [pools[c][int(u * len(pools[c]))] for c, u in zip(cats, picks)]


def _cycle(specs: list[PromptSpec], n: int, rng: np.random.Generator) -> list[PromptSpec]:
    """``n`` samples: a seeded shuffle of ``specs``, repeated as often as needed."""
    order = [specs[i] for i in rng.permutation(len(specs))]
    return [order[i % len(order)] for i in range(n)]


def _row(spec: PromptSpec) -> dict:
    return {"prompt": spec_to_prompt(spec), "category": spec.category, "spec": spec.to_dict()}


def build_prompt_sets(seed: int = 0) -> dict[str, list[PromptSpec]]:
    """``{"train": [...], "test": [...], "test_<category>": [...]}`` as lists of specs."""
    rng = np.random.default_rng(seed)
    sets: dict[str, list[PromptSpec]] = {"train": [], "test": []}
    for cat in CATEGORIES:
        sets["train"] += _cycle(split_prompts(cat, "train"), TRAIN_PER_CATEGORY, rng)
        test = _cycle(split_prompts(cat, "test"), TEST_PER_CATEGORY, rng)
        sets["test"] += test
        sets[f"test_{cat}"] = test[:QUICK_PER_CATEGORY]
    sets["train"] = [sets["train"][i] for i in rng.permutation(len(sets["train"]))]
    return sets


def write_prompt_sets(out_dir: str | os.PathLike = "prompts/pocket", seed: int = 0) -> list[Path]:
    """Write the prompt set files (see module docstring) into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, specs in build_prompt_sets(seed).items():
        atomic_write_text(out / f"{name}.txt", "".join(spec_to_prompt(s) + "\n" for s in specs))
        written.append(out / f"{name}.txt")
        if name in ("train", "test"):
            atomic_write_text(out / f"{name}.jsonl", "".join(json.dumps(_row(s)) + "\n" for s in specs))
            written.append(out / f"{name}.jsonl")
        if name == "train":
            small = _round_robin_distinct(specs, 32)
            atomic_write_text(out / "train_32.jsonl", "".join(json.dumps(_row(sp)) + "\n" for sp in small))
            written.append(out / "train_32.jsonl")
        if name == "test":
            # the first 16 test prompts of each category: the quick held-out eval of training runs
            small = limit_per_category(specs, 16, category=lambda sp: sp.category)
            atomic_write_text(out / "test_96.jsonl", "".join(json.dumps(_row(sp)) + "\n" for sp in small))
            written.append(out / "test_96.jsonl")
    heldout = {"seed": seed, "heldout": sorted(list(c) for c in HELDOUT)}
    atomic_write_text(out / "heldout.json", json.dumps(heldout, indent=1) + "\n")
    written.append(out / "heldout.json")
    return written


def _round_robin_distinct(specs: list[PromptSpec], n: int) -> list[PromptSpec]:
    """``n`` distinct prompts: each category's first unseen prompt in turn (categories in order of appearance)."""
    by_cat: dict[str, list[PromptSpec]] = {}
    for sp in dict.fromkeys(specs):
        by_cat.setdefault(sp.category, []).append(sp)
    # rank 0 of every category, then rank 1, ...; a category out of distinct prompts drops out of the turns
    turns = [sp for rank in itertools.zip_longest(*by_cat.values()) for sp in rank if sp is not None]
    if len(turns) < n:
        raise ValueError(f"only {len(turns)} distinct prompts, asked for {n}")
    return turns[:n]


def limit_per_category(rows: list, per_category: int | None, category=lambda r: r.get("category", "all")) -> list:
    """The first ``per_category`` rows of each category, in file order (all rows when None)."""
    if per_category is None:
        return list(rows)
    seen: dict[str, int] = {}
    kept = []
    for r in rows:
        cat = category(r)
        if seen.get(cat, 0) < per_category:
            kept.append(r)
            seen[cat] = seen.get(cat, 0) + 1
    return kept


def write_prompt_subset(src: str | os.PathLike, out: str | os.PathLike, per_category: int) -> Path:
    """The first ``per_category`` prompts of each category of ``src`` (a pocket ``.jsonl`` or ``.txt``
    file) written to ``out`` as ``.jsonl`` rows (e.g. a smaller held-out set for a training run's
    ``eval.prompts``); returns ``out``."""
    if per_category < 1:
        raise ValueError(f"per_category must be >= 1, got {per_category}")
    if Path(out).suffix != ".jsonl":
        raise ValueError(f"the subset is written as .jsonl; give an output path ending in .jsonl, got {str(out)!r}")
    rows = limit_per_category(load_prompt_file(src), per_category)
    return atomic_write_text(out, "".join(json.dumps(r) + "\n" for r in rows))


def load_prompt_file(path: str | os.PathLike) -> list[dict]:
    """Rows ``{"prompt", "category", "spec"}`` of a ``.jsonl`` file, or of a ``.txt`` file (one
    prompt per line, parsed): ``flowalign.prompts.read_prompts`` with the pocket grammar. A row's
    ``spec`` is checked, a row without one is parsed from its prompt; a line outside the grammar
    raises ``ValueError`` naming file and line."""
    from ..prompts import read_prompts

    return read_prompts(path, parse=_with_spec)


def _with_spec(row: dict) -> dict:
    if "spec" in row:
        spec = row["spec"]
        try:
            return {**row, "spec": PromptSpec.from_dict(spec).to_dict()}
        except (KeyError, TypeError, AttributeError):
            raise ValueError(f"'spec' {json.dumps(spec)[:80]} is not a pocket scene spec; write it as "
                             '{"objects": [{"shape": "circle", "color": "red", "count": 2}], "relation": null}, '
                             "or leave 'spec' out to parse the prompt") from None
    return {**_row(parse_prompt(row["prompt"])), **{k: v for k, v in row.items() if k != "prompt"}}


if __name__ == "__main__":
    import sys

    for p in write_prompt_sets(sys.argv[1] if len(sys.argv) > 1 else "prompts/pocket"):
        print(p)
