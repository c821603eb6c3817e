"""``flowalign reno``: a real run on the pocket model with a 2-iteration budget, and the errors users see."""

import argparse
import json

import pytest

from flowalign.models.testing import force_hub_offline
from flowalign.noise_opt.cli import main, output_name, parse_rewards, register, slugify
from flowalign.noise_opt.config import load_noise_opt_config

force_hub_offline()


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: intra-op threads only cost


def test_single_prompt_run_writes_images_and_log(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["reno", "--prompt", "Two red circles!", "--out", str(out), "optim.iterations=2",
               "generation.num_steps=2", "run.save_every_iteration=true", "run.progress=false"])
    assert rc == 0
    folder = out / output_name("Two red circles!")
    assert folder.name.startswith("two_red_circles_")
    for name in ("initial.png", "best.png", "log.json", "iterations/0000.png", "iterations/0001.png"):
        assert (folder / name).is_file(), name
    assert (out / "config.yaml").is_file() and (out / "summary.json").is_file()
    log = json.loads((folder / "log.json").read_text())
    assert log["prompt"] == "Two red circles!" and log["generator_calls"] == 2 and len(log["history"]) == 2
    for rec in log["history"]:
        assert set(rec) >= {"rewards", "reward_total", "loss", "reg", "noise_norm"} and "pocket_clip" in rec["rewards"]
    assert "reward" in capsys.readouterr().out


def test_prompt_file_batch_with_seeds_and_carinox(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a blue square"}\n\n{"prompt": "a/red circle"}\n')
    out = tmp_path / "batch"
    parser = argparse.ArgumentParser(prog="flowalign")
    register(parser.add_subparsers(dest="command", required=True))
    ns = parser.parse_args(["reno", "--prompts", str(prompts), "--out", str(out), "--seeds", "0,1",
                            "--rewards", "pocket_clip=1,pocket_clip=0.5", "search.method=carinox",
                            "search.num_seeds=2", "optim.iterations=1", "generation.num_steps=1",
                            "run.batch_size=2", "run.progress=false", "optim.reward_views=2"])
    assert ns.func(ns) == 0
    names = sorted(p.name for p in out.iterdir() if p.is_dir())
    blue, red = output_name("a blue square"), output_name("a/red circle")
    assert names == [f"0000_{blue}_seed0", f"0000_{blue}_seed1", f"0001_{red}_seed0", f"0001_{red}_seed1"]
    assert red.startswith("a_red_circle_")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["generator_calls_per_prompt"] == 3 and len(summary["results"]) == 4
    assert set(summary["results"][0]["best_rewards"]) == {"pocket_clip", "pocket_clip#2"}


@pytest.mark.parametrize("options, overrides, message", [
    (["--prompt", "   "], [], "--prompt is empty"),
    (["--prompt", "a cat", "--rewards", "pocket_clipp"], [],
     "unknown reward 'pocket_clipp'. Did you mean 'pocket_clip'?"),
    (["--prompt", "a cat", "--rewards", "pocket_clip=heavy"], [], "weight 'heavy' is not a number"),
    (["--prompt", "a cat"], ["optim.lrr=2"], "unknown config key 'optim.lrr'; did you mean 'optim.lr'?"),
    (["--prompt", "a cat"], ["optim.lr=fast"], "optim.lr"),
    (["--prompt", "a cat"], ["optim.optimizer=lbfgs"], "choose one of: sgd, adam"),
    (["--prompt", "a cat"], ["model.family=sd_turbo", "model.path=x"], "set generation.num_steps=1"),
    (["--prompt", "a cat", "--rewards", "pocket_gold"], [], "needs differentiable rewards; ['pocket_gold'] is not"),
    (["--prompts", "no/such/file.txt"], [], "does not exist"),
    (["--prompt", "a cat", "--config", "no/such.yaml"], [], "config file not found"),
    (["--prompt", "a cat", "--seeds", "1,x"], [], "comma-separated integers"),
    (["--prompt", "a cat"], ["optim.reward_views=0"], "optim.reward_views"),
])
def test_bad_input_is_a_clear_error(options, overrides, message, tmp_path, capsys):
    # argparse takes the key=value overrides after the options
    assert main(["reno", *options, "--out", str(tmp_path / "o"), *overrides, "run.progress=false"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flowalign reno: ") and message in err, err


def test_keys_lists_the_schema(capsys):
    assert main(["reno", "--keys"]) == 0
    out = capsys.readouterr().out
    assert "optim.reg_weight" in out and "search.num_seeds" in out and "generation.num_steps" in out


def test_helpers_and_recipes():
    assert slugify("A photo of a cat, on a mat!") == "a_photo_of_a_cat_on_a_mat"
    assert slugify("???") == "prompt" and len(slugify("x" * 200)) == 60
    # output folder names: safe (no separators, no dot-only names) and unique per prompt
    prompts = ["/", "..", "../../etc", "???", "a red circle", "A red circle!", "x" * 100, "x" * 99 + "y"]
    names = [output_name(p) for p in prompts]
    assert len(set(names)) == len(prompts)
    for n in names:
        assert "/" not in n and "\\" not in n and not set(n) <= {"."} and n.replace("_", "").isalnum() and len(n) <= 57
    assert output_name("a red circle") == output_name("a red circle")  # stable between runs
    assert parse_rewards("hpsv2.1=5, pickscore=0.05,clip") == [
        {"name": "hpsv2.1", "weight": 5.0, "args": {}}, {"name": "pickscore", "weight": 0.05, "args": {}},
        {"name": "clip", "weight": 1.0, "args": {}}]
    for name in ("pocket", "sd_turbo", "sdxl_turbo", "flux_schnell"):
        cfg = load_noise_opt_config(f"configs/reno/{name}.yaml")
        assert cfg.optim.iterations == 50 and cfg.optim.grad_clip == 0.1 and cfg.optim.reg_weight == 0.01
    real = load_noise_opt_config("configs/reno/sd_turbo.yaml")
    assert (real.optim.optimizer, real.optim.lr, real.optim.momentum, real.optim.nesterov) == ("sgd", 5.0, 0.9, True)
    assert {r.name: r.weight for r in real.rewards} == {"hpsv2.1": 5.0, "imagereward": 1.0, "pickscore": 0.05,
                                                      "clip": 1.0}
    default = load_noise_opt_config()
    assert default.model.path == "builtin:pocket" and [r.name for r in default.rewards] == ["pocket_clip"]
