"""The exact evaluator (gold reward): right on rendered truth, rejects mismatches, not hackable."""

from pathlib import Path

import numpy as np
import pytest
import torch

from flowalign.pocket.evaluate import (
    PocketGold,
    aggregate,
    classify_pixels,
    connected_components,
    detect_objects,
    evaluate,
)
from flowalign.pocket.grammar import CATEGORIES, canonical_relation
from flowalign.pocket.prompts import all_prompts, load_prompt_file
from flowalign.pocket.render import render_batch

PER_CATEGORY = 60


def _content_key(spec):
    """Prompts with equal keys describe the same scene ("A left of B" = "B right of A")."""
    phrases = sorted((o.shape, o.color or "", o.count) for o in spec.objects)
    if spec.relation is None:
        return (tuple(phrases),)
    a, b = spec.objects if spec.relation in ("left of", "above") else spec.objects[::-1]
    return (a, b, canonical_relation(spec)[0])


@pytest.fixture(scope="module")
def rendered():
    rng = np.random.default_rng(0)
    specs, mismatched = [], []
    for cat in CATEGORIES:
        pool = all_prompts(cat)
        for i in rng.integers(len(pool), size=PER_CATEGORY):
            specs.append(pool[i])
            others = [p for p in pool if _content_key(p) != _content_key(pool[i])]
            mismatched.append(others[rng.integers(len(others))])
    images, _ = render_batch(specs, seed=1)
    return specs, mismatched, images


def test_right_on_rendered_truth_in_every_category(rendered):
    specs, _, images = rendered
    res = evaluate(images, specs)
    strict = aggregate(res.categories, res.strict)
    assert set(strict) == {*CATEGORIES, "overall", "overall_images"}
    for cat in CATEGORIES:
        assert strict[cat] >= 0.99, (cat, strict)
    assert res.exact.mean() >= 0.99 and res.partial.mean() >= 0.99


def test_rejects_images_rendered_for_another_prompt_of_the_same_category(rendered):
    specs, mismatched, images = rendered
    truth = evaluate(images, specs)
    wrong = evaluate(images, mismatched)
    for cat, acc in aggregate(wrong.categories, wrong.strict).items():
        assert acc <= 0.05, (cat, acc)
    for cat, partial in aggregate(wrong.categories, wrong.partial).items():
        assert partial <= 0.5, (cat, partial)
    assert np.all(wrong.partial <= truth.partial)
    assert (wrong.partial < truth.partial).mean() >= 0.97


def test_blank_and_dark_images_score_zero():
    prompts = [spec for cat in CATEGORIES for spec in all_prompts(cat)[:5]]
    for fill in (0.0, 0.2):
        res = evaluate(np.full((len(prompts), 3, 32, 32), fill, np.float32), prompts)
        assert not res.strict.any() and not res.exact.any()
        assert np.all(res.partial == 0.0)


def test_extra_objects_are_penalised():
    imgs, _ = render_batch(["a red circle and a blue square", "four circles"], seed=4)
    # every requested object present, plus one unrequested object
    res = evaluate(imgs, ["a red circle", "three circles"])
    assert res.strict[0] and not res.exact[0]  # GenEval ignores unmentioned objects; exact does not
    assert res.partial[0] == pytest.approx(1 / 2)
    assert not res.strict[1] and res.partial[1] == pytest.approx(3 / 4)
    # junk in a color outside the palette
    clean, _ = render_batch(["a red circle"], seed=4)
    assert evaluate(clean, ["a red circle"]).partial[0] == 1.0
    junk = clean.copy()
    free = np.argwhere(clean[0].max(axis=0) == 0)
    y, x = free[len(free) // 2]
    junk[0, :, max(0, y - 2):y + 3, max(0, x - 2):x + 3] = 0.8  # a gray blob
    res = evaluate(junk, ["a red circle"])
    assert res.strict[0] and not res.exact[0] and res.partial[0] < 1.0


def test_partial_credit_is_graded():
    imgs, _ = render_batch(["a blue square", "two red circles", "a red circle to the left of a green square"], seed=0)
    res = evaluate(imgs, ["a red square", "three red circles", "a red circle to the right of a green square"])
    assert res.partial[0] == pytest.approx(0.5)  # right shape, wrong color
    assert res.partial[1] == pytest.approx(2 / 3)  # two of three
    assert res.partial[2] == pytest.approx(2 / 3)  # both objects, wrong relation
    assert not res.strict.any()


def test_specks_are_ignored_and_mild_noise_tolerated(rendered):
    specs, _, images = rendered
    rng = np.random.default_rng(0)
    noisy = np.clip(images + rng.normal(0, 0.05, images.shape).astype(np.float32), 0, 1)
    speck = images.copy()
    speck[:, :, 0, 0] = 1.0  # a one-pixel white dot in a corner
    for imgs in (noisy, speck):
        assert evaluate(imgs, specs).strict.mean() >= 0.97


def test_connected_components_match_scipy():
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(0)
    labels = rng.integers(-1, 2, size=(6, 20, 20)).astype(np.int8)
    labels[rng.random(labels.shape) < 0.4] = -1
    roots = connected_components(labels)
    for b in range(labels.shape[0]):
        for lab in (0, 1):
            ref, n = ndimage.label(labels[b] == lab, structure=np.ones((3, 3)))
            ours = np.where(labels[b] == lab, roots[b], -1)
            assert len(np.unique(ours[ours >= 0])) == n
            for k in range(1, n + 1):  # each scipy component is exactly one of ours
                assert len(np.unique(ours[ref == k])) == 1


def test_palette_classification_survives_anti_aliasing():
    imgs, _ = render_batch(["a yellow circle", "a blue triangle"], seed=0)
    labels = classify_pixels(imgs)
    assert set(np.unique(labels[0])) == {-1, 3}  # background and yellow, edges included
    assert set(np.unique(labels[1])) == {-1, 2}


def test_detection_on_torch_and_larger_images():
    imgs, scenes = render_batch(["a red triangle above a green circle"], seed=2, size=64)
    (found,) = detect_objects(torch.from_numpy(imgs))
    assert sorted((o.shape, o.color) for o in found) == [("circle", "green"), ("triangle", "red")]
    for obj, truth in zip(sorted(found, key=lambda o: o.shape), sorted(scenes[0].objects, key=lambda o: o.shape)):
        assert np.allclose(obj.centroid, truth.centroid, atol=0.5)


def test_pocket_gold_reward_callable():
    rows = load_prompt_file(Path(__file__).resolve().parents[1] / "prompts/pocket/test.jsonl")
    rows = [r for r in rows if r["category"] == "color_attr"][:6]
    prompts = [r["prompt"] for r in rows]
    imgs, _ = render_batch(prompts, seed=0)
    wrong, _ = render_batch(["a circle"] * 6, seed=0)
    images = torch.from_numpy(np.concatenate([imgs, wrong]))
    reward = PocketGold()
    assert reward.differentiable is False
    scores, info = reward(images, prompts * 2, rows * 2)
    assert scores.shape == (12,) and scores.dtype == torch.float32
    assert torch.all(scores[:6] == 1.0) and torch.all(scores[6:] < 0.5)
    assert info["strict"].tolist() == [1.0] * 6 + [0.0] * 6
    assert info["per_category"]["color_attr"] == 0.5
    by_spec, _ = reward(images, ["a circle"] * 12, rows * 2)  # metadata["spec"] wins over the text
    assert torch.equal(by_spec, scores)
    strict_scores, _ = PocketGold(score="strict")(images, prompts * 2)
    assert torch.equal(strict_scores, info["strict"])
    with pytest.raises(ValueError, match="unknown pocket gold score"):
        PocketGold(score="f1")


def test_aggregate_averages_categories_like_geneval():
    agg = aggregate(["counting", "counting", "colors"], [1.0, 0.0, 1.0])
    assert agg["counting"] == 0.5 and agg["colors"] == 1.0
    assert agg["overall"] == 0.75 and agg["overall_images"] == pytest.approx(2 / 3)


def test_bad_input_fails_loudly():
    with pytest.raises(ValueError, match=r"\[B,3,H,W\]"):
        evaluate(np.zeros((2, 32, 32)), ["a circle", "a square"])
    with pytest.raises(ValueError, match="one prompt per image"):
        evaluate(np.zeros((2, 3, 32, 32)), ["a circle"])
    with pytest.raises(ValueError, match="cannot parse"):
        evaluate(np.zeros((1, 3, 32, 32)), ["a dog"])
