"""``flowalign pocket render`` through argparse."""

import argparse
import json

import numpy as np
from PIL import Image

from flowalign.pocket.cli import main, register


def test_render_writes_a_png_of_the_right_size(tmp_path, capsys):
    out = tmp_path / "sub" / "scene.png"
    rc = main(["pocket", "render", "two red circles", "--out", str(out), "--size", "40", "--scale", "3", "--seed", "2"])
    assert rc == 0
    img = Image.open(out)
    assert img.size == (120, 120) and img.mode == "RGB"
    printed = json.loads(capsys.readouterr().out)
    assert [o["color"] for o in printed["objects"]] == ["red", "red"]
    assert [p.name for p in out.parent.iterdir()] == ["scene.png"]  # no temporary left behind
    pixels = {tuple(px) for px in np.asarray(img).reshape(-1, 3)}
    assert (255, 0, 0) in pixels and (0, 0, 0) in pixels


def test_render_rejects_prompts_outside_the_grammar(tmp_path, capsys):
    out = tmp_path / "x.png"
    assert main(["pocket", "render", "a purple dog", "--out", str(out)]) == 2
    assert "cannot parse pocket prompt" in capsys.readouterr().err
    assert not out.exists()


def test_register_adds_pocket_to_any_parser(tmp_path):
    parser = argparse.ArgumentParser(prog="flowalign")
    register(parser.add_subparsers(dest="command", required=True))
    ns = parser.parse_args(["pocket", "render", "a square", "--out", str(tmp_path / "s.png")])
    assert ns.size == 32 and ns.seed == 0 and ns.scale == 1
    assert ns.func(ns) == 0
    assert Image.open(tmp_path / "s.png").size == (32, 32)
