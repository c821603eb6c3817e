"""The pocket renderer: deterministic, anti-aliased, layouts that satisfy the prompt."""

import numpy as np
import pytest

from flowalign.pocket.grammar import CATEGORIES, parse_prompt
from flowalign.pocket.prompts import all_prompts, sample_specs
from flowalign.pocket.render import PALETTE, RELATION_MARGIN, render_batch, render_scene


def test_same_seed_same_image_and_different_seed_different_image():
    prompts = ["two red circles", "a blue square to the left of a yellow triangle", "four triangles"]
    a, scenes_a = render_batch(prompts, seed=5)
    b, scenes_b = render_batch(prompts, seed=5)
    c, _ = render_batch(prompts, seed=6)
    assert np.array_equal(a, b)
    assert [s.to_dict() for s in scenes_a] == [s.to_dict() for s in scenes_b]
    for i in range(len(prompts)):
        assert not np.array_equal(a[i], c[i])


def test_scene_depends_only_on_its_prompt_seed_and_index():
    single, scene = render_scene("a circle and a square", seed=3)
    batch, _ = render_batch(["a circle and a square", "three squares"], seed=3)
    other, _ = render_batch(["a circle and a square", "a red triangle above a green circle"], seed=3)
    assert np.array_equal(single, batch[0]) and np.array_equal(batch[0], other[0])
    assert scene.index == 0 and scene.seed == 3


def test_images_are_anti_aliased_floats_in_unit_range():
    imgs, _ = render_batch(["a circle", "a yellow triangle"], seed=0, size=40)
    assert imgs.shape == (2, 3, 40, 40) and imgs.dtype == np.float32
    assert imgs.min() >= 0.0 and imgs.max() <= 1.0
    bright = imgs.max(axis=1)
    assert ((bright > 0.05) & (bright < 0.95)).sum() > 10  # soft edges, not a binary mask
    assert (bright == 0).mean() > 0.5  # black background


@pytest.mark.parametrize("size", [32, 64])
def test_layouts_satisfy_their_prompts(size):
    specs = sample_specs(300, np.random.default_rng(size))
    imgs, scenes = render_batch(specs, seed=1, size=size)
    gap = max(2.0, size / 16)
    for spec, scene in zip(specs, scenes):
        objs = scene.objects
        assert len(objs) == spec.total_objects
        drawn = [(o.shape, o.color) for o in objs]
        i = 0
        for phrase in spec.objects:
            for shape, color in drawn[i:i + phrase.count]:
                assert shape == phrase.shape and (phrase.color is None or color == phrase.color)
            i += phrase.count
        for o in objs:
            x0, y0, x1, y1 = o.bbox
            assert x0 >= 1 and y0 >= 1 and x1 <= size - 1 and y1 <= size - 1
            assert 0.25 * size <= o.size <= 0.41 * size  # 8–13 px at 32×32
        for j, a in enumerate(objs):
            for b in objs[j + 1:]:
                ax0, ay0, ax1, ay1 = a.bbox
                bx0, by0, bx1, by1 = b.bbox
                assert max(bx0 - ax1, ax0 - bx1, by0 - ay1, ay0 - by1) >= gap - 1e-9
        if spec.relation is not None:
            (ax, ay), (bx, by) = objs[0].centroid, objs[1].centroid
            along = {"left of": bx - ax, "right of": ax - bx, "above": by - ay, "below": ay - by}[spec.relation]
            across = abs(by - ay) if spec.relation in ("left of", "right of") else abs(bx - ax)
            assert along >= RELATION_MARGIN * size and across <= 0.5 * along


def test_pixels_carry_the_palette_color_of_their_object():
    img, scene = render_scene("a green square", seed=2)
    (obj,) = scene.objects
    x0, y0, x1, y1 = obj.bbox
    inner = img[:, int(y0) + 2:int(y1) - 1, int(x0) + 2:int(x1) - 1]
    assert np.allclose(inner, np.array(PALETTE["green"])[:, None, None])
    # every lit pixel is a multiple of green (blended with the black background only)
    lit = img.max(axis=0) > 0
    assert np.all(img[0][lit] == 0) and np.all(img[2][lit] == 0)


def test_every_category_and_the_densest_prompts_render():
    for cat in CATEGORIES:
        render_batch(all_prompts(cat), seed=0)
    dense = [parse_prompt(f"four {c} squares") for c in ("red", "blue")] * 50
    imgs, scenes = render_batch(dense, seed=0, size=24)
    assert all(len(s.objects) == 4 for s in scenes)


def test_too_small_size_is_refused():
    with pytest.raises(ValueError, match="24 or more"):
        render_scene("a circle", size=16)
