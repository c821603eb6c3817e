"""The labelled grid a person reads: its size follows from the images and groups, every image sits in a
frame and badge of its verdict's colour, each group starts a new row under its band, captions fit, and
``pocket eval`` and the training evaluation write it with the gold verdicts."""

import numpy as np
import pytest
from PIL import Image, ImageFont

from flowalign.io import (
    BADGE,
    CAPTION_LINES,
    FRAME,
    GRID_PAD,
    HEADER_H,
    MARK_COLORS,
    _wrap,
    labelled_grid_layout,
    labelled_image_grid,
    save_labelled_grid,
)

pytestmark = pytest.mark.usefixtures("one_thread")
S = 16  # image side in these tests
GREY = 0.5  # every test image is flat grey, so frame, badge and image pixels cannot be confused


def grid(verdicts, groups, prompts=None, ncol=8, scale=3, images=None, per_group=None):
    n = len(verdicts)
    images = np.full((n, 3, S, S), GREY, dtype=np.float32) if images is None else images
    return np.asarray(labelled_image_grid(images, prompts or ["a red circle"] * n, verdicts, groups,
                                          per_group=per_group, ncol=ncol, scale=scale))


def cell_origin(lay, group_index, j):
    """Top-left pixel of the cell of image j of group ``group_index`` (rows of ``ncol``, left to right)."""
    r, c = divmod(j, lay["ncol"])
    return (GRID_PAD + c * (lay["cell"][0] + GRID_PAD),
            lay["group_y"][group_index] + HEADER_H + r * (lay["cell"][1] + GRID_PAD))


def test_size_follows_from_images_and_groups():
    lay = labelled_grid_layout([8, 3, 10], (S, S), ncol=8, scale=3)
    cw, ch = lay["cell"]
    assert cw == S * 3 + 2 * FRAME
    assert ch > S * 3 + 2 * FRAME + CAPTION_LINES * 8  # room for the caption lines under the image
    # three bands; rows: 1 + 1 + 2 (ten images wrap at eight)
    assert lay["size"] == (GRID_PAD + 8 * (cw + GRID_PAD), GRID_PAD + 3 * HEADER_H + 4 * (ch + GRID_PAD))
    img = grid([True] * 21, ["a"] * 8 + ["b"] * 3 + ["c"] * 10)
    assert img.shape[:2] == (lay["size"][1], lay["size"][0])
    # one more image in the last group adds nothing; one more group adds a band and a row
    assert grid([True] * 22, ["a"] * 8 + ["b"] * 3 + ["c"] * 11).shape == img.shape
    four = grid([True] * 22, ["a"] * 8 + ["b"] * 3 + ["c"] * 10 + ["d"])
    assert four.shape[0] == img.shape[0] + HEADER_H + ch + GRID_PAD and four.shape[1] == img.shape[1]
    # groups smaller than ncol make a narrower grid; scale grows the cells
    assert grid([True] * 3, ["a"] * 3).shape[1] == GRID_PAD + 3 * (cw + GRID_PAD)
    assert labelled_grid_layout([1], (S, S), scale=4)["cell"][0] == S * 4 + 2 * FRAME


def test_marks_are_drawn_in_the_verdicts_colours_where_the_verdicts_say():
    verdicts = [True, False, False, True, True, False]
    img = grid(verdicts, ["a"] * 6, ncol=4)
    lay = labelled_grid_layout([6], (S, S), ncol=4, scale=3)
    h = S * 3
    for j, ok in enumerate(verdicts):
        x, y = cell_origin(lay, 0, j)
        want, other = np.array(MARK_COLORS[ok]), np.array(MARK_COLORS[not ok])
        # the frame: left edge and top edge of the cell
        assert (img[y + h // 2, x] == want).all() and (img[y, x + h // 2] == want).all()
        # the image inside the frame is the image, not a mark
        assert (img[y + FRAME + h // 2, x + FRAME + h // 2] == round(GREY * 255)).all()
        # the badge under the image: mostly its colour, none of the other verdict's, and a white stroke
        badge = img[y + h + 2 * FRAME + 3:][:BADGE, x:x + BADGE].reshape(-1, 3)
        assert (badge == want).all(1).mean() > 0.5 and not (badge == other).all(1).any()
        assert (badge == 255).all(1).sum() >= 10
    # a ✓ and a ✗ are different strokes
    x0, y0 = cell_origin(lay, 0, 0)
    x1, y1 = cell_origin(lay, 0, 1)
    dy = h + 2 * FRAME + 3
    tick = (img[y0 + dy:y0 + dy + BADGE, x0:x0 + BADGE] == 255).all(-1)
    cross = (img[y1 + dy:y1 + dy + BADGE, x1:x1 + BADGE] == 255).all(-1)
    assert (tick != cross).sum() >= 10
    assert (cross == cross[:, ::-1]).all() and (tick != tick[:, ::-1]).sum() >= 5  # an X is mirror-symmetric


def test_each_group_starts_a_new_row_under_its_band():
    verdicts = [True, True, True, False, False]
    groups = ["colors"] * 3 + ["position"] * 2
    img = grid(verdicts, groups, prompts=["a blue circle"] * 3 + ["a red square above a red circle"] * 2)
    lay = labelled_grid_layout([3, 2], (S, S), ncol=8, scale=3)
    assert lay["ncol"] == 3
    x, y = cell_origin(lay, 1, 0)
    assert x == GRID_PAD  # column 0, not column 3 of the first group's row
    assert (img[y + 5, x] == MARK_COLORS[False]).all()
    # the second band lies between the groups' rows, and names its group in dark text
    band = img[lay["group_y"][1]:lay["group_y"][1] + HEADER_H - 4]
    assert lay["group_y"][1] > cell_origin(lay, 0, 0)[1] + lay["cell"][1]
    assert (band.max(-1) < 100).any() and (band == 225).all(-1).mean() > 0.5
    # the row of the first group ends after its third image: the place of a fourth is blank
    x3 = GRID_PAD + 3 * (lay["cell"][0] + GRID_PAD)
    assert x3 >= img.shape[1] or (img[cell_origin(lay, 0, 0)[1] + 5, x3:] == 255).all()
    # a group that comes back joins its block (two bands, not three)
    assert grid([True] * 3, ["a", "b", "a"]).shape[0] == labelled_grid_layout([2, 1], (S, S))["size"][1]


def test_captions_wrap_and_abbreviate_within_the_cell():
    font = ImageFont.load_default()
    long = "a yellow square to the right of a yellow triangle " * 3
    lines = _wrap(long, font, [40, 60, 60])
    assert len(lines) == 3 and lines[-1].endswith("...")
    assert all(font.getlength(line) <= w for line, w in zip(lines, [40, 60, 60]))
    assert _wrap("a red circle", font, [200, 200]) == ["a red circle"]
    assert "".join(_wrap("abcdefghijklmnopqrstuvwxyz", font, [30, 30, 30, 30, 30])) == "abcdefghijklmnopqrstuvwxyz"
    # a captioned cell has dark text under the badge's row; an empty caption leaves it white
    lay = labelled_grid_layout([1], (S, S))
    x, y = cell_origin(lay, 0, 0)
    text_rows = slice(y + S * 3 + 2 * FRAME + 3, y + lay["cell"][1])
    with_text = grid([True], ["a"], prompts=["a green triangle to the left of a yellow triangle"])
    without = grid([True], ["a"], prompts=[""])
    assert (with_text[text_rows, x + BADGE + 2:x + lay["cell"][0]].max(-1) < 100).sum() > 30
    assert (without[text_rows, x + BADGE + 2:x + lay["cell"][0]] == 255).all()
    with pytest.raises(ValueError, match="as many prompts"):
        grid([True, False], ["a"])


def test_per_group_shows_images_evenly_spread_over_each_group():
    groups = ["a"] * 64 + ["b"] * 3 + ["c"] * 16
    images = np.repeat((np.arange(83, dtype=np.float32) / 255)[:, None, None, None], 3, 1).repeat(S, 2).repeat(S, 3)
    img = grid([True] * 83, groups, images=images, per_group=8)
    lay = labelled_grid_layout([8, 3, 8], (S, S))
    assert img.shape[:2] == (lay["size"][1], lay["size"][0])
    shown = [[int(img[y + FRAME + 1, x + FRAME + 1, 0]) for x, y in (cell_origin(lay, g, j) for j in range(n))]
             for g, n in enumerate([8, 3, 8])]
    assert shown == [list(range(0, 64, 8)), [64, 65, 66], list(range(67, 83, 2))]


def test_save_labelled_grid_writes_the_png(tmp_path):
    rgb = np.zeros((2, 3, S, S), dtype=np.float32)
    rgb[1, 0] = 1.0  # a red image
    path = save_labelled_grid(tmp_path / "g" / "grid.png", rgb, ["a", "b"], [False, True], ["x", "x"])
    img = np.asarray(Image.open(path).convert("RGB"))
    assert (img == grid([False, True], ["x", "x"], prompts=["a", "b"], images=rgb)).all()
    assert not list((tmp_path / "g").glob(".*tmp*"))


def test_pocket_eval_grid_shows_the_evaluators_verdicts(tmp_path):
    from flowalign.pocket.evaluate import evaluate
    from flowalign.pocket.prompts import limit_per_category, load_prompt_file
    from flowalign.pocket.sample import evaluate_model, load_pocket_policy, sample_images

    policy = load_pocket_policy()
    evaluate_model(policy, "prompts/pocket/test.jsonl", num_steps=3, limit_per_category=2, out_dir=tmp_path)
    rows = limit_per_category(load_prompt_file("prompts/pocket/test.jsonl"), 2)
    res = evaluate(sample_images(policy, [r["prompt"] for r in rows], num_steps=3), [r["prompt"] for r in rows])
    img = np.asarray(Image.open(tmp_path / "grid.png").convert("RGB"))
    lay = labelled_grid_layout([2] * 6, (32, 32))
    assert img.shape[:2] == (lay["size"][1], lay["size"][0])
    for k, ok in enumerate(res.strict):
        x, y = cell_origin(lay, k // 2, k % 2)
        assert (img[y + 48, x] == MARK_COLORS[bool(ok)]).all(), (k, rows[k]["prompt"])


def test_training_eval_grid_is_labelled_by_the_pocket_gold_reward(tmp_path):
    import torch

    from flowalign.grpo.evaluation import Evaluator
    from flowalign.io import image_grid
    from flowalign.pocket.render import render_batch
    from flowalign.rewards.registry import build_rewards

    prompts = ["a red circle", "a blue square", "two green triangles", "three red circles"]
    drawn = ["a red circle", "a red circle", "two green triangles", "a red circle"]  # ✓ ✗ ✓ ✗
    images = torch.from_numpy(render_batch(drawn, seed=0)[0])
    _, info = build_rewards([{"name": "pocket_gold", "args": {"score": "partial"}}])(images, prompts)
    assert info["info"]["pocket_gold"]["strict"].tolist() == [1, 0, 1, 0]
    Evaluator.save_grid(tmp_path / "gold.png", images, prompts, info)
    img = np.asarray(Image.open(tmp_path / "gold.png").convert("RGB"))
    lay = labelled_grid_layout([2, 2], (32, 32))  # single_object, counting
    assert img.shape[:2] == (lay["size"][1], lay["size"][0])
    for k, ok in enumerate([True, False, True, False]):
        x, y = cell_origin(lay, k // 2, k % 2)
        assert (img[y + 48, x] == MARK_COLORS[ok]).all(), k
    # a reward with no gold verdicts in its info (a plain callable's {}): the unlabelled grid
    Evaluator.save_grid(tmp_path / "plain.png", images, prompts, {})
    assert Image.open(tmp_path / "plain.png").size == image_grid(images, nrow=8, scale=4).size
