"""CARINOX's category-aware reward weights: the paper's table, the per-prompt multiplier, and
`flowalign reno` on the pocket model, where a category multiplier m must act exactly as a reward
weight m for that prompt (same noise trajectory, same best image)."""

import json

import pytest
import torch

from flowalign.cli import main
from flowalign.noise_opt.categories import categories_of, load_table, multiplier

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_papers_table_and_the_multiplier():
    t = load_table("builtin:carinox")
    assert set(t) == {"color", "shape", "texture", "2d_spatial", "non_spatial", "complex", "3d_spatial", "numeracy",
                      "overall", "none"}
    assert t["color"] == {"hpsv2.1": 0.40, "imagereward": 1.06, "dascore": 1.41, "vqascore": 1.14}
    assert t["3d_spatial"]["vqascore"] == 1.43 and all(v == 1.0 for v in t["none"].values())
    mixed = categories_of({"categories": [["color", 3], ["shape", 1]]}, None)
    assert mixed == {"color": 0.75, "shape": 0.25}
    assert multiplier(t, mixed, "hpsv2.1") == pytest.approx(0.75 * 0.40 + 0.25 * 0.95)
    assert multiplier(t, categories_of({"category": "numeracy"}, None), "pickscore") == 1.0  # not in the row
    assert categories_of({"prompt": "x"}, "texture") == {"texture": 1.0}
    assert categories_of(None, None) == {"none": 1.0}


def _reno(tmp_path, name, prompts_rows, *extra):
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in prompts_rows))
    out = tmp_path / name
    code = main(["reno", "--prompts", str(path), "--out", str(out), "optim.iterations=3", "optim.reg_weight=0",
                 "optim.lr=20", "run.progress=false", "model.device=cpu", "run.batch_size=2", *extra])
    return code, out


def test_a_category_multiplier_is_a_per_prompt_reward_weight(tmp_path):
    table = tmp_path / "table.yaml"
    table.write_text("double: {pocket_clip: 2.0}\nmuted: {pocket_clip: 0.0}\n")
    rows = [{"prompt": "two red circles", "category": "double"}, {"prompt": "a blue square", "category": "muted"}]
    code, out = _reno(tmp_path, "cat", rows, f"search.category_weights={table}")
    assert code == 0
    logs = [json.loads(p.read_text()) for p in sorted(out.glob("*/log.json"))]
    # the same prompts (same rows, so the same start noise) with plain weights 2 and 0 for the whole run
    code, out2 = _reno(tmp_path, "w2", rows, "--rewards", "pocket_clip=2")
    code0, out0 = _reno(tmp_path, "w0", rows, "--rewards", "pocket_clip=0")
    assert code == code0 == 0
    w2 = json.loads(sorted(out2.glob("*/log.json"))[0].read_text())
    w0 = json.loads(sorted(out0.glob("*/log.json"))[1].read_text())
    for cat_log, plain in ((logs[0], w2), (logs[1], w0)):
        assert [h["reward_total"] for h in cat_log["history"]] == pytest.approx(
            [h["reward_total"] for h in plain["history"]], rel=1e-5, abs=1e-6)
        assert [h["noise_norm"] for h in cat_log["history"]] == pytest.approx(
            [h["noise_norm"] for h in plain["history"]], rel=1e-5)
    assert logs[0]["history"][0]["rewards"]["pocket_clip"] == pytest.approx(
        2 * w2["history"][0]["rewards"]["pocket_clip"], rel=1e-5)  # recorded: the scaled score m·r
    assert len({round(h["noise_norm"], 4) for h in logs[1]["history"]}) == 1  # m = 0: the noise never moves
    best_cat = sorted(out.glob("*/best.png"))
    assert best_cat[0].read_bytes() == sorted(out2.glob("*/best.png"))[0].read_bytes()


def test_unknown_category_fails_before_generation(tmp_path, capsys):
    code, out = _reno(tmp_path, "bad", [{"prompt": "a circle", "category": "colour"}],
                      "search.category_weights=builtin:carinox")
    assert code == 2
    err = capsys.readouterr().err
    assert "category ['colour'] is not in builtin:carinox" in err and "2d_spatial" in err
    assert not any(out.glob("*/best.png"))
    code, _ = _reno(tmp_path, "bad2", [{"prompt": "a circle"}], "search.category=color")
    assert code == 2 and "needs search.category_weights" in capsys.readouterr().err
