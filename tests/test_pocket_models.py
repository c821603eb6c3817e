"""The shipped pocket models: standard formats, loadable by the stock libraries, and competent."""

import torch

from flowalign.pocket.assets import CLIP_DIR, T2I_DIR, WEIGHTS_DIR
from flowalign.pocket.sample import DEFAULT_GUIDANCE, initial_noise, load_pocket_policy, sample_images


def test_weights_fit_the_budget():
    total = sum(p.stat().st_size for p in WEIGHTS_DIR.rglob("*.safetensors"))
    assert 0 < total <= 25 * 2**20, total


def test_the_shipped_weights_are_the_base_preset_and_its_default_sampler_is_the_calibrated_best():
    """build_config.json is what `flowalign pocket build` (preset base) builds, and the default sampler is the
    setting calibration.json's sweep found best (gate 3), so neither drifts from the weights."""
    import json

    from flowalign.pocket.build import BuildConfig, sweep_key
    from flowalign.pocket.sample import DEFAULT_STEPS

    shipped = json.loads((WEIGHTS_DIR / "build_config.json").read_text())
    assert shipped == json.loads(json.dumps(BuildConfig.preset("base").to_dict()))
    cal = json.loads((WEIGHTS_DIR / "calibration.json").read_text())
    sweep = cal["sweep_strict_overall"]
    best = max(sweep.values())
    assert sweep[sweep_key(DEFAULT_STEPS, DEFAULT_GUIDANCE)] >= best - 1 / 384 + 1e-9, sweep
    assert cal["default_sampler"]["guidance_scale"] == DEFAULT_GUIDANCE and cal["stages"]["misalign"]
    # no build machine's paths in the shipped configs
    assert not [c for c in WEIGHTS_DIR.rglob("*.json") if "/root/" in c.read_text() or "_name_or_path" in c.read_text()]


def test_t2i_loads_in_the_stock_pipeline_and_matches_the_adapter():
    from diffusers import StableDiffusion3Pipeline

    prompts = ["a red circle", "two blue squares"]
    policy = load_pocket_policy()
    ours = sample_images(policy, prompts, seed=5, num_steps=4)
    stock = StableDiffusion3Pipeline.from_pretrained(T2I_DIR, text_encoder_3=None, tokenizer_3=None)
    stock.set_progress_bar_config(disable=True)
    ref = stock(prompts, latents=initial_noise(policy, 2, seed=5), num_inference_steps=4, guidance_scale=DEFAULT_GUIDANCE,
                height=32, width=32, output_type="pt",
                max_sequence_length=policy.max_sequence_length).images  # the folder's null T5 tokens
    assert ours.shape == ref.shape == (2, 3, 32, 32)
    assert (ours - ref).abs().max() <= 1e-4


def test_training_conditioning_equals_the_adapters():
    """The build encodes prompts with its own PocketTextEncoder; sampling uses SD3Policy.encode."""
    from flowalign.pocket.build import PocketTextEncoder

    policy = load_pocket_policy()
    prompts = ["a yellow triangle above a green square", ""]
    emb, pooled = PocketTextEncoder(policy.pipe.text_encoder, policy.pipe.tokenizer)(prompts)
    cond = policy.encode(prompts)
    torch.testing.assert_close(emb, cond.embeds, rtol=0, atol=1e-5)
    torch.testing.assert_close(pooled, cond.pooled, rtol=0, atol=1e-5)


def test_single_object_smoke_accuracy():
    from flowalign.pocket.evaluate import evaluate
    from flowalign.pocket.prompts import load_prompt_file

    rows = load_prompt_file("prompts/pocket/test_single_object.txt") + load_prompt_file("prompts/pocket/test_colors.txt")
    prompts = [r["prompt"] for r in rows][:32]
    images = sample_images(load_pocket_policy(), prompts, seed=0)
    strict = evaluate(images, prompts).strict.mean()
    assert strict >= 0.6, strict


def test_pocket_clip_prefers_the_right_caption():
    from transformers import CLIPModel, CLIPTokenizer

    from flowalign.pocket.build import clip_zero_shot

    acc = clip_zero_shot(CLIPModel.from_pretrained(CLIP_DIR), CLIPTokenizer.from_pretrained(CLIP_DIR), n=96)
    assert acc["overall"] >= 0.6, acc


def test_pocket_eval_cli_writes_report_and_grid(tmp_path):
    import json
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "flowalign.cli", "pocket", "eval", "--limit-per-category", "2",
                        "--steps", "4", "--out", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["images"] == 12 and report["num_steps"] == 4
    assert set(report["gold"]["strict"]) >= {"single_object", "position", "overall"}
    assert (tmp_path / "grid.png").stat().st_size > 0
    bad = subprocess.run([sys.executable, "-m", "flowalign.cli", "pocket", "eval", "--model", str(tmp_path / "nope")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "nope" in bad.stderr


def test_a_saved_lora_does_not_depend_on_the_hash_seed(tmp_path):
    # peft holds target_modules as a set, whose order follows PYTHONHASHSEED: two identical runs wrote the same
    # weights under different metadata. (The files' bytes still differ: safetensors orders its header's metadata
    # keys by a per-process random hash, so the weights and the parsed metadata are what can be compared.)
    import json
    import os
    import subprocess
    import sys

    from safetensors import safe_open

    script = ("import sys, torch; from flowalign.pocket.sample import load_pocket_policy\n"
              "torch.manual_seed(0); p = load_pocket_policy(train_mode='lora', lora_rank=4, lora_alpha=8.0)\n"
              "p.save_adapter(sys.argv[1])\n")
    saved = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        subprocess.run([sys.executable, "-c", script, str(tmp_path / seed)], check=True, env=env)
        with safe_open(tmp_path / seed / "pytorch_lora_weights.safetensors", "pt") as f:
            saved.append(({k: f.get_tensor(k) for k in f.keys()},  # noqa: SIM118 (safe_open is not iterable)
                          json.loads(f.metadata()["lora_adapter_metadata"])))
    (weights, meta), *others = saved
    assert meta["transformer.target_modules"] == sorted(meta["transformer.target_modules"])
    for w, m in others:
        assert m == meta and w.keys() == weights.keys() and all(torch.equal(w[k], weights[k]) for k in w)
