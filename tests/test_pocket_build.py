"""The pocket build: alt-text-like captions, keyed stage cache, resumable stages, clear errors."""

import dataclasses
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from flowalign.pocket.build import (
    BASE_NOISE,
    PRESETS,
    BuildConfig,
    BuildStopped,
    Stage,
    build,
    snapshot,
    snapshot_stage,
    stages,
)
from flowalign.pocket.captions import CaptionNoise, captions_for, noisy_caption
from flowalign.pocket.grammar import CATEGORIES, parse_prompt, spec_to_prompt
from flowalign.pocket.prompts import sample_specs
from flowalign.pocket.sample import load_pocket_policy, sample_images

pytestmark = pytest.mark.usefixtures("one_thread")


def _specs(n=4000, seed=0):
    return sample_specs(n, np.random.default_rng(seed), CATEGORIES, split="all")


# ---------------------------------------------------------------------------------------------
# captions


def test_clean_captions_are_the_exact_prompts():
    specs = _specs(300)
    caps, stats = captions_for(specs, CaptionNoise(), seed=1)
    assert caps == [spec_to_prompt(s) for s in specs] and stats["exact"] == 1.0


@pytest.mark.parametrize("noise, prompt, want, kinds", [
    (CaptionNoise(drop_relation=1.0), "a red circle to the left of a green square", "a red circle and a green square",
     {"incomplete"}),
    (CaptionNoise(wrong_relation=1.0), "a red circle to the left of a green square",
     "a red circle to the right of a green square", {"wrong"}),
    (CaptionNoise(wrong_relation=1.0), "a circle above a square", "a circle below a square", {"wrong"}),
    (CaptionNoise(drop_count=1.0), "three red circles", "red circles", {"incomplete"}),
    (CaptionNoise(drop_color=1.0), "a red square and a green circle", "a square and a circle", {"incomplete"}),
    (CaptionNoise(swap_colors=1.0), "a red square and a green circle", "a green square and a red circle", {"wrong"}),
    (CaptionNoise(swap_colors=1.0, drop_color=1.0), "a red square and a green circle", "a square and a circle",
     {"wrong", "incomplete"}),
    (CaptionNoise(wrong_count=1.0, wrong_relation=1.0, swap_colors=1.0), "a circle", "a circle", set()),
])
def test_each_corruption_does_what_it_says(noise, prompt, want, kinds):
    assert noisy_caption(parse_prompt(prompt), noise, np.random.default_rng(0)) == (want, kinds)


def test_wrong_counts_stay_off_by_one_within_the_grammar():
    noise = CaptionNoise(wrong_count=1.0)
    rng = np.random.default_rng(0)
    seen = {}
    for n in (2, 3, 4):
        spec = parse_prompt(f"{ {2: 'two', 3: 'three', 4: 'four'}[n]} blue triangles")
        seen[n] = {parse_prompt(noisy_caption(spec, noise, rng)[0]).objects[0].count for _ in range(200)}
    assert seen == {2: {3}, 3: {2, 4}, 4: {3}}


def test_wrong_color_of_a_lone_object_is_its_confusion_partner():
    rng = np.random.default_rng(0)
    noise = CaptionNoise(wrong_color=1.0)
    got = {c: {noisy_caption(parse_prompt(f"a {c} circle"), noise, rng)[0] for _ in range(50)}
           for c in ("red", "yellow", "green", "blue")}
    assert got == {"red": {"a yellow circle"}, "yellow": {"a red circle"}, "green": {"a blue circle"},
                   "blue": {"a green circle"}}
    # two colored objects are never recolored one by one (their error is the swap)
    assert noisy_caption(parse_prompt("a red circle and a green square"), noise, rng)[0] == \
        "a red circle and a green square"


def test_corruption_rates_match_the_config():
    """Measured rates of each outcome over many position/counting captions equal the configured ones."""
    noise = CaptionNoise(drop_relation=0.3, wrong_relation=0.2, drop_count=0.5, wrong_count=0.1)
    rng = np.random.default_rng(3)
    rel = [noisy_caption(parse_prompt("a circle to the left of a square"), noise, rng)[0] for _ in range(4000)]
    assert abs(np.mean([c == "a circle and a square" for c in rel]) - 0.3) < 0.03
    assert abs(np.mean([c == "a circle to the right of a square" for c in rel]) - 0.2) < 0.03
    cnt = [noisy_caption(parse_prompt("three squares"), noise, rng)[0] for _ in range(4000)]
    assert abs(np.mean([c == "squares" for c in cnt]) - 0.5) < 0.03
    assert abs(np.mean([c in ("two squares", "four squares") for c in cnt]) - 0.1) < 0.02


def test_base_captions_are_mostly_incomplete_rather_than_wrong_and_seeded():
    specs = _specs()
    caps, stats = captions_for(specs, BASE_NOISE, seed=5)
    assert stats["incomplete"] > stats["wrong"] > 0.1 and stats["exact"] < 0.6
    assert captions_for(specs, BASE_NOISE, seed=5)[0] == caps
    assert captions_for(specs, BASE_NOISE, seed=6)[0] != caps


@pytest.mark.parametrize("kwargs, match", [
    ({"drop_count": 1.5}, "drop_count=1.5 is not a probability"),
    ({"wrong_relation": -0.1}, "wrong_relation=-0.1 is not a probability"),
    ({"drop_color": 0.7, "wrong_color": 0.4}, "drop_color \\+ wrong_color = 1.1 exceeds 1"),
])
def test_bad_rates_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CaptionNoise(**kwargs)


# ---------------------------------------------------------------------------------------------
# config and cache


def test_oracle_and_base_share_data_and_vae_but_not_the_caption_stages(tmp_path):
    base, oracle = stages(BuildConfig.preset("base"), tmp_path), stages(BuildConfig.preset("oracle"), tmp_path)
    assert base["data"].dir == oracle["data"].dir and base["vae"].dir == oracle["vae"].dir
    assert base["clip"].dir != oracle["clip"].dir
    # the base's T2I model is the oracle's (shared stage) misaligned by its own stage on the noisy captions
    assert base["t2i"].dir == oracle["t2i"].dir and "misalign" in base and "misalign" not in oracle
    scratch = stages(BuildConfig.preset("base").with_overrides(["misalign_steps=0"]), tmp_path)
    assert scratch["t2i"].dir != oracle["t2i"].dir and "misalign" not in scratch
    legacy = stages(BuildConfig.preset("legacy"), tmp_path)
    assert legacy["vae"].dir != base["vae"].dir and legacy["t2i"].settings["clip"] == legacy["clip"].key


def test_the_default_presets_keep_their_stage_keys(tmp_path):
    """The keys the real cache was built with (the 12 000-step T2I stage and its misalign stage; the 6 000-step
    world before it was t2i-566c396fdc10): a change here orphans every built stage."""
    names = {p: {k: s.dir.name for k, s in stages(BuildConfig.preset(p), tmp_path).items()} for p in PRESETS}
    assert names["base"] == {"data": "data-76d9f5e15770", "vae": "vae-c8f6546c8c1d", "clip": "clip-6be0bb79d0a3",
                             "t2i": "t2i-688e7cd651ef", "misalign": "misalign-0d9679f4a2a4"}
    scratch = {"data": "data-76d9f5e15770", "vae": "vae-c8f6546c8c1d", "clip": "clip-6be0bb79d0a3",
               "t2i": "t2i-f2392ec92bec"}  # the base trained from scratch on the noisy captions (misalign_steps=0)
    assert names["oracle"] == {"data": "data-76d9f5e15770", "vae": "vae-c8f6546c8c1d", "clip": "clip-0c312b1cf93e",
                               "t2i": "t2i-688e7cd651ef"}
    assert names["legacy"]["t2i"] == "t2i-69fb0eb1117d"
    # misaligned (the base; `--set misalign_steps=800` changes it): the oracle's T2I stage, then the misalign stage
    assert BuildConfig.preset("base").misalign_steps == 300 and BuildConfig.preset("base").misalign_lr == 5e-4
    assert BuildConfig.quick().misalign_steps == 0 and BuildConfig.preset("oracle", quick=True).misalign_steps == 0
    cfg = BuildConfig.preset("base").with_overrides(["misalign_steps=800", "misalign_lr=1e-4"])
    st = stages(cfg, tmp_path)
    assert cfg.misalign_steps == 800 and cfg.misalign_lr == 1e-4 and cfg.to_dict()["misalign_steps"] == 800
    assert st["t2i"].dir.name == "t2i-688e7cd651ef" and st["clip"].dir.name == "clip-6be0bb79d0a3"
    assert st["misalign"].settings["t2i"] == st["t2i"].key and st["misalign"].settings["steps"] == 800
    assert stages(cfg.with_overrides(["misalign_lr=5e-4"]), tmp_path)["misalign"].dir != st["misalign"].dir
    # clean captions or no steps: no misalign stage, the keys of before
    for other in (cfg.with_overrides(["captions=clean"]), cfg.with_overrides(["misalign_steps=0"])):
        assert {k: s.dir.name for k, s in stages(other, tmp_path).items()} == (
            names["oracle"] if other.captions == "clean" else scratch)


def test_bad_misalign_settings_get_one_clear_error():
    for kwargs, match in [({"misalign_steps": -1}, "misalign_steps must be an integer >= 0"),
                          ({"misalign_steps": 2.5}, "misalign_steps must be an integer >= 0"),
                          ({"misalign_steps": True}, "misalign_steps must be an integer >= 0"),
                          ({"misalign_lr": 0.0}, "misalign_lr must be a finite number > 0, got 0.0"),
                          ({"misalign_lr": float("inf")}, "misalign_lr must be a finite number > 0"),
                          ({"misalign_lr": "fast"}, "misalign_lr must be a finite number > 0, got 'fast'"),
                          ({"misalign_steps": 5, "t2i_text": "frozen_clip"}, "it needs t2i_text='joint'")]:
        with pytest.raises(ValueError, match=match):
            BuildConfig(**kwargs)
    for pair, match in [("misalign_steps=-3", "misalign_steps must be an integer >= 0, got -3"),
                        ("misalign_steps=1.5", "build key 'misalign_steps' needs a int, got '1.5'"),
                        ("misalign_lr=nan", "misalign_lr must be a finite number > 0, got nan")]:
        with pytest.raises(ValueError, match=match):
            BuildConfig().with_overrides([pair])
    # the first world keeps its frozen tower: misalign_steps has nothing to do with clean captions
    assert not BuildConfig.preset("legacy").with_overrides(["misalign_steps=5"]).misaligned


def test_t2i_training_draws_categories_in_the_configured_proportions():
    from flowalign.pocket.build import _image_weights

    rng = np.random.default_rng(0)
    prompts = [spec_to_prompt(s) for s in sample_specs(3000, rng, CATEGORIES, split="all")]
    cfg = BuildConfig()
    weights = _image_weights(prompts, cfg.t2i_category_weights)
    draws = torch.multinomial(weights, 60_000, replacement=True, generator=torch.Generator().manual_seed(0))
    drawn = np.bincount([CATEGORIES.index(parse_prompt(prompts[i]).category) for i in draws.tolist()], minlength=6)
    have = np.bincount([CATEGORIES.index(parse_prompt(p).category) for p in prompts], minlength=6)
    want = np.array(cfg.t2i_category_weights) * have / (np.array(cfg.t2i_category_weights) * have).sum()
    assert np.abs(drawn / drawn.sum() - want).max() < 0.01, (drawn / drawn.sum(), want)
    assert _image_weights(prompts, (2.0,) * 6) is None  # all equal: uniform over images, as before
    with pytest.raises(ValueError, match="t2i_category_weights takes 6 non-negative finite numbers"):
        BuildConfig(t2i_category_weights=(1.0, -1.0, 1.0, 1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="t2i_category_weights takes 6"):
        BuildConfig().with_overrides(["t2i_category_weights=1,2"])


def test_bad_build_settings_get_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match="unknown caption regime 'dirty'; use one of clean, noisy"):
        BuildConfig(captions="dirty")
    with pytest.raises(ValueError, match="unknown pocket build preset"):
        BuildConfig.preset("best")
    with pytest.raises(ValueError, match="unknown build key 't2i_stepz'"):
        BuildConfig().with_overrides(["t2i_stepz=3"])
    with pytest.raises(ValueError, match="noise.drop_count=2.0 is not a probability|drop_count=2.0 is not a prob"):
        BuildConfig().with_overrides(["noise.drop_count=2"])
    assert BuildConfig().with_overrides(["noise.drop_count=0.1", "t2i_steps=7"]).noise.drop_count == 0.1
    # a stage folder whose record says it was made with other settings
    st = Stage(tmp_path, "vae", {"steps": 1})
    (st.dir / "stage.json").write_text('{"steps": 2}')
    with pytest.raises(ValueError, match="made with other settings \\(differs in steps\\); delete it or pass another"):
        Stage(tmp_path, "vae", {"steps": 1})
    # the first world's single-folder layout
    old = tmp_path / "old"
    old.mkdir()
    (old / "build_config.json").write_text("{}")
    with pytest.raises(ValueError, match="older single-folder layout; pass another --work"):
        build(tmp_path / "out", BuildConfig.quick(), work_dir=old)
    with pytest.raises(ValueError, match="has no checkpoint yet"):
        snapshot(tmp_path / "snap", BuildConfig.quick(), work_dir=tmp_path / "empty")


def test_build_cli_refuses_bad_input_in_one_line(tmp_path):
    for args, match in [(["--captions", "dirty"], "invalid choice: 'dirty'"),
                        (["--set", "noise.wrong_relation=0.9", "--set", "noise.drop_relation=0.5"], "exceeds 1"),
                        (["--set", "nonsense=1"], "unknown build key 'nonsense'"),
                        (["--set", "misalign_steps=-2"], "misalign_steps must be an integer >= 0, got -2")]:
        r = subprocess.run([sys.executable, "-m", "flowalign.cli", "pocket", "build", "--quick", "--out",
                            str(tmp_path / "o"), "--work", str(tmp_path / "w"), *args], capture_output=True, text=True)
        assert r.returncode == 2 and match in r.stderr, r.stderr[-1500:]
        assert "Traceback" not in r.stderr


# ---------------------------------------------------------------------------------------------
# resumable, deterministic builds


def _weights(out):
    from safetensors.torch import load_file

    return {str(f.relative_to(out)): load_file(f) for f in sorted(out.rglob("*.safetensors"))}


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """One uninterrupted quick build (the reference for the resume tests)."""
    tmp = tmp_path_factory.mktemp("whole")
    report = build(tmp / "out", BuildConfig.quick(), work_dir=tmp / "cache")
    return {"out": tmp / "out", "cache": tmp / "cache", "report": report}


def _assert_same_weights(a_dir, b_dir):
    a, b = _weights(a_dir), _weights(b_dir)
    assert a.keys() == b.keys() and len(a) >= 5
    for name in a:
        assert a[name].keys() == b[name].keys()
        assert all(torch.equal(a[name][k], b[name][k]) for k in a[name]), name


def test_a_stopped_build_resumes_to_the_same_weights(tmp_path, whole):
    """Stopped inside the VAE stage, then inside the T2I stage (off a checkpoint boundary), then run to
    the end: the exported weights equal an uninterrupted build's, bit for bit. (A stop saves a checkpoint
    where it stops; a kill resumes from the last periodic one: see the SIGKILL test.)"""
    cfg = BuildConfig.quick()
    stops = []
    for budget in (13, 20, None):
        try:
            build(tmp_path / "parts", cfg, work_dir=tmp_path / "cache_parts", stop_after_steps=budget)
        except BuildStopped as e:
            stops.append(str(e))
        if len(stops) == 2 and budget == 20:  # a snapshot of the T2I stage part-way loads and samples
            assert snapshot(tmp_path / "snap", cfg, work_dir=tmp_path / "cache_parts") == 12
            img = sample_images(load_pocket_policy(tmp_path / "snap" / "t2i"), ["a red circle"], num_steps=2)
            assert img.shape == (1, 3, 32, 32) and torch.isfinite(img).all()
    assert stops == ["stopped in stage vae at step 12", "stopped in stage t2i at step 12"], stops
    _assert_same_weights(whole["out"], tmp_path / "parts")
    report = whole["report"]
    assert report["config"]["captions"] == "noisy" and 0 < report["captions"]["wrong"] < report["captions"]["incomplete"]
    # exported in the storage dtype
    t = next(iter(_weights(whole["out"])["t2i/transformer/diffusion_pytorch_model.safetensors"].values()))
    assert t.dtype == torch.float16
    assert not any((tmp_path / "cache_parts").rglob("checkpoint.pt")), "finished stages keep no checkpoint"


def test_the_t2i_folder_carries_its_null_token_count_to_policies_and_the_stock_pipeline(tmp_path, whole):
    """Built with one null T5 token (the recipe since the relation probe): the folder's flowalign.json
    says so, a policy loaded from it uses 1 unless told otherwise, the stock pipeline called with
    ``max_sequence_length=1`` draws the same images, and the stock default (256) draws others."""
    import json

    from diffusers import StableDiffusion3Pipeline

    from flowalign.pocket.sample import initial_noise

    folder = whole["out"] / "t2i"
    assert json.loads((folder / "flowalign.json").read_text())["max_sequence_length"] == 1
    policy = load_pocket_policy(folder)
    assert policy.max_sequence_length == 1 and load_pocket_policy(folder, max_sequence_length=7).max_sequence_length == 7
    ours = sample_images(policy, ["a red circle", "two blue squares"], seed=3, num_steps=3, guidance_scale=2.0)
    stock = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)
    stock.set_progress_bar_config(disable=True)

    def run(**kw):
        return stock(["a red circle", "two blue squares"], latents=initial_noise(policy, 2, seed=3), num_inference_steps=3,
                     guidance_scale=2.0, height=32, width=32, output_type="pt", **kw).images

    assert (ours - run(max_sequence_length=1)).abs().max() <= 1e-4
    assert (ours - run()).abs().max() > 1e-3  # 256 null tokens are another model's conditioning
    # the first world's recipe writes no settings file (256 is the stock default) ...
    assert BuildConfig.preset("legacy").t2i_null_tokens == 256
    # ... and a damaged settings file is one clear error
    bad = tmp_path / "t2i"
    shutil.copytree(folder, bad)
    (bad / "flowalign.json").write_text('{"max_sequence_length": 0}')
    with pytest.raises(ValueError, match="max_sequence_length must be an integer >= 1"):
        load_pocket_policy(bad)


def test_oracle_quick_build_reuses_the_base_data_and_vae(tmp_path, whole):
    cache = whole["cache"]
    before = {p.name for p in cache.iterdir()}
    oracle = dataclasses.replace(BuildConfig.quick(), captions="clean")
    report = build(tmp_path / "oracle", oracle, work_dir=cache, stop_after_steps=10**6)
    added = {p.name for p in cache.iterdir()} - before
    assert sorted(n.split("-")[0] for n in added) == ["clip", "t2i"]
    assert report["captions"]["exact"] == 1.0


def test_a_killed_build_resumes_to_the_same_weights(tmp_path, whole):
    """SIGKILL a quick build part-way (wherever it happens to be), then run it again to the end."""
    import signal
    import time

    cfg = BuildConfig.quick()
    code = ("import sys, torch; torch.set_num_threads(1); from flowalign.pocket.build import BuildConfig, build; "
            f"build({str(tmp_path / 'killed')!r}, BuildConfig.quick(), work_dir={str(tmp_path / 'cache_killed')!r})")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not any((tmp_path / "cache_killed").glob("vae-*/checkpoint.pt")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert any((tmp_path / "cache_killed").glob("vae-*/checkpoint.pt")), "the build never reached a checkpoint"
    build(tmp_path / "killed", cfg, work_dir=tmp_path / "cache_killed")
    _assert_same_weights(whole["out"], tmp_path / "killed")


# ---------------------------------------------------------------------------------------------
# the misalign stage: the base = the oracle's T2I model fine-tuned on the noisy captions


def _misaligned_quick():
    return dataclasses.replace(BuildConfig.quick(), misalign_steps=8)  # checkpoints every 5 steps


@pytest.fixture(scope="module")
def misaligned(tmp_path_factory):
    """One uninterrupted quick misaligned build (the reference for the misalign tests)."""
    tmp = tmp_path_factory.mktemp("misaligned")
    report = build(tmp / "out", _misaligned_quick(), work_dir=tmp / "cache")
    return {"out": tmp / "out", "cache": tmp / "cache", "report": report}


def _stage_weights(folder):
    """A T2I stage folder's transformer and text tower tensors, as the checkpoint's modules name them."""
    from safetensors.torch import load_file

    return {"transformer": load_file(folder / "transformer" / "diffusion_pytorch_model.safetensors"),
            "text_encoder": load_file(folder / "text_encoder" / "model.safetensors")}


def test_a_stopped_misalign_stage_starts_from_the_oracle_and_resumes_to_the_same_weights(tmp_path, misaligned):
    """Stopped at the misalign stage's step 0 (its checkpoint holds the oracle's weights), then part-way
    off a checkpoint boundary, then run to the end: the export equals an uninterrupted build's, bit for bit,
    and differs from the oracle's model it started from."""
    cfg = _misaligned_quick()
    cache = tmp_path / "cache"
    st = stages(cfg, cache)
    stops = []
    for budget in (41, 7, None):  # data 1 chunk + vae 20 + oracle t2i 20 = 41 steps before the misalign stage
        try:
            build(tmp_path / "parts", cfg, work_dir=cache, stop_after_steps=budget)
        except BuildStopped as e:
            stops.append(str(e))
        if len(stops) == 1 and budget == 41:  # step 0: the oracle's weights, exactly
            assert st["t2i"].done and not st["misalign"].done
            state = torch.load(st["misalign"].dir / "checkpoint.pt", weights_only=True)
            oracle = _stage_weights(st["t2i"].out)
            for name, tensors in oracle.items():
                ckpt = state["modules"][name]
                assert all(torch.equal(ckpt[k], v) for k, v in tensors.items()), name
            assert snapshot_stage(cfg, cache).name == "misalign" and snapshot(tmp_path / "snap", cfg, cache) == 0
        if len(stops) == 2 and budget == 7:  # a snapshot part-way through the misalign stage loads and samples
            assert snapshot(tmp_path / "snap", cfg, work_dir=cache) == 7
            img = sample_images(load_pocket_policy(tmp_path / "snap" / "t2i"), ["a red circle"], num_steps=2)
            assert img.shape == (1, 3, 32, 32) and torch.isfinite(img).all()
    assert stops == ["stopped in stage misalign at step 0", "stopped in stage misalign at step 7"], stops
    _assert_same_weights(misaligned["out"], tmp_path / "parts")
    assert not any(cache.rglob("checkpoint.pt")), "finished stages keep no checkpoint"
    # the exported base is the misalign stage's model, which fine-tuning moved away from the oracle's
    final, oracle = _stage_weights(st["misalign"].out), _stage_weights(st["t2i"].out)
    for name in final:
        assert final[name].keys() == oracle[name].keys()
        assert not all(torch.equal(final[name][k], oracle[name][k]) for k in final[name]), name
    exported = _weights(misaligned["out"])["t2i/transformer/diffusion_pytorch_model.safetensors"]
    assert all(torch.equal(v, final["transformer"][k].half()) for k, v in exported.items())
    report = misaligned["report"]
    assert report["stages"]["misalign"] == st["misalign"].dir.name and report["config"]["misalign_steps"] == 8
    assert "misalign" in report["seconds_this_run"]


def test_the_oracle_build_reuses_the_misaligned_builds_oracle_stage(tmp_path, misaligned):
    cache = misaligned["cache"]
    before = {p.name for p in cache.iterdir()}
    oracle = dataclasses.replace(_misaligned_quick(), captions="clean")  # misalign_steps has no effect here
    report = build(tmp_path / "oracle", oracle, work_dir=cache, stop_after_steps=20)  # the clean CLIP's 20 steps
    added = {p.name for p in cache.iterdir()} - before
    assert sorted(n.split("-")[0] for n in added) == ["clip"], added
    assert report["stages"]["t2i"] in before and "misalign" not in report["stages"]
    oracle_t2i = _stage_weights(stages(oracle, cache)["t2i"].out)["transformer"]
    exported = _weights(tmp_path / "oracle")["t2i/transformer/diffusion_pytorch_model.safetensors"]
    assert all(torch.equal(v, oracle_t2i[k].half()) for k, v in exported.items())
