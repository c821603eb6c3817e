"""``flowalign eval`` and ``flowalign sample`` on the shipped pocket model with a few prompts: images
equal to the pocket sampler's, a stopped run resumes with the same files, LoRA applied, file names
safe and unique, and bad GenEval input fails before any image is generated."""

import json

import pytest
import torch

from flowalign.cli import main
from flowalign.eval.runner import load_pngs
from flowalign.pocket.sample import DEFAULT_GUIDANCE

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS = "6"


@pytest.fixture(scope="module")
def few_prompts(tmp_path_factory):
    """Two prompts of each of three pocket categories."""
    from flowalign.pocket.prompts import load_prompt_file

    rows = load_prompt_file("prompts/pocket/test.jsonl")
    picked = [r for c in ("colors", "counting", "position") for r in [x for x in rows if x["category"] == c][:2]]
    path = tmp_path_factory.mktemp("prompts") / "few.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in picked))
    return path, picked


def test_eval_pocket_matches_the_pocket_sampler_and_resumes(few_prompts, tmp_path, capsys):
    from flowalign.pocket.evaluate import evaluate
    from flowalign.pocket.sample import load_pocket_policy, sample_images

    path, rows = few_prompts
    out = tmp_path / "eval"
    args = ["eval", "pocket", "--prompts", str(path), "--out", str(out), "--device", "cpu", "--steps", STEPS,
            "--no-progress"]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "colors" in table and "position" in table and "overall" in table
    report = json.loads((out / "report.json").read_text())
    files = [out / "images" / f"{i:05d}_0.png" for i in range(len(rows))]
    assert report["generated_this_run"] == 6 and report["resolution"] == [32, 32] and report["guidance"] == DEFAULT_GUIDANCE
    saved = load_pngs(files)
    # the same images as the pocket sampler draws for these rows (noise (seed, row)), up to 8-bit rounding
    ref = sample_images(load_pocket_policy(), [r["prompt"] for r in rows], num_steps=int(STEPS))
    assert saved.shape == ref.shape and (saved - ref).abs().max() <= 0.5 / 255 + 1e-6
    truth = evaluate(saved, [r["prompt"] for r in rows])
    assert report["summary"]["strict"] == pytest.approx(truth.summary()["strict"])
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["strict"] for r in results] == truth.strict.tolist()
    assert (out / "grid.png").is_file()

    # a stopped run: two images are missing; the rerun draws exactly those, the same bytes as before
    before = {f: f.read_bytes() for f in files}
    files[1].unlink()
    files[4].unlink()
    assert main(args) == 0
    report2 = json.loads((out / "report.json").read_text())
    assert report2["generated_this_run"] == 2 and report2["kept"] == 4
    assert all(f.read_bytes() == before[f] for f in files)
    assert report2["summary"] == report["summary"]
    assert main(args) == 0 and json.loads((out / "report.json").read_text())["generated_this_run"] == 0


def test_sample_names_resolution_and_lora(tmp_path):
    from flowalign.pocket.sample import load_pocket_policy

    prompts = tmp_path / "p.txt"
    prompts.write_text("two red circles\nTwo red circles?! ../../etc\ntwo red circles\n")
    out = tmp_path / "base"
    assert main(["sample", "--prompts", str(prompts), "--out", str(out), "--images-per-prompt", "2",
                 "--device", "cpu", "--steps", STEPS, "--no-progress"]) == 0
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == ["0000_two_red_circles_0.png", "0000_two_red_circles_1.png",
                     "0001_two_red_circles_etc_0.png", "0001_two_red_circles_etc_1.png",
                     "0002_two_red_circles_0.png", "0002_two_red_circles_1.png"]
    index = [json.loads(line) for line in (out / "prompts.jsonl").read_text().splitlines()]
    assert index[2] == {"file": "0001_two_red_circles_etc_0.png", "prompt": "Two red circles?! ../../etc"}
    base = load_pngs(sorted(out.glob("*.png")))
    assert base.shape == (6, 3, 32, 32)  # the model's resolution
    assert not torch.equal(base[0], base[1])  # two samples of a prompt: different noise
    assert not torch.equal(base[0], base[4])  # the same prompt in another row: its own noise

    # a LoRA with nonzero weights changes the images; the base is untouched without it
    policy = load_pocket_policy(train_mode="lora", lora_rank=4, lora_alpha=4.0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    policy.save_adapter(tmp_path / "lora")
    lora_out = tmp_path / "lora_run"
    assert main(["sample", "--prompt", "two red circles", "--out", str(lora_out), "--lora", str(tmp_path / "lora"),
                 "--device", "cpu", "--steps", STEPS, "--no-progress"]) == 0
    with_lora = load_pngs([lora_out / "0000_two_red_circles.png"])
    assert (with_lora[0] - base[0]).abs().max() > 0.05
    assert main(["sample", "--prompt", "two red circles", "--out", str(tmp_path / "again"), "--device", "cpu",
                 "--steps", STEPS, "--no-progress"]) == 0
    assert torch.equal(load_pngs([tmp_path / "again" / "0000_two_red_circles.png"])[0], base[0])


def test_bad_input_fails_before_generation(tmp_path, tiny_clip_dir, capsys):
    meta = tmp_path / "meta.jsonl"
    meta.write_text(json.dumps({"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}],
                                "prompt": "a photo of a red car"}) + "\n"
                    + json.dumps({"tag": "colors", "prompt": "a photo of a blue car"}) + "\n")
    out = tmp_path / "out"
    base = ["eval", "geneval", "--prompts", str(meta), "--out", str(out), "--device", "cpu", "--no-progress"]
    assert main(base + ["--clip", tiny_clip_dir]) == 2
    err = capsys.readouterr().err
    assert "meta.jsonl:2: GenEval metadata is missing the field 'include'" in err and err.count("\n") == 1
    assert not out.exists()

    meta.write_text(json.dumps({"tag": "single_object", "include": [{"class": "car", "count": 1}],
                                "prompt": "a photo of a car"}) + "\n")
    assert main(base + ["--detector", tiny_clip_dir, "--clip", tiny_clip_dir]) == 2
    err = capsys.readouterr().err
    assert "is a 'clip' model, not an object detector" in err and err.count("\n") == 1
    assert not out.exists()

    assert main(["sample", "--prompt", "a circle", "--out", str(out), "--height", "32", "--device", "cpu"]) == 2
    assert "give both --height and --width" in capsys.readouterr().err

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for cmd in (["sample", "--prompt", "a circle"], ["eval", "pocket", "--prompts", "prompts/pocket/test_96.jsonl"]):
        assert main([*cmd, "--out", str(blocker), "--device", "cpu", "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "--out" in err and "is a file" in err and err.count("\n") == 1, err


def test_eval_geneval_writes_genevals_layout_and_resumes(tmp_path, tiny_clip_dir, capsys):
    """The whole GenEval path on the pocket model with a seeded random DETR (labels: COCO names): the
    verdicts in results.jsonl are the rule engine's on the detections of the saved images."""
    from transformers import DetrConfig, DetrForObjectDetection, DetrImageProcessor, ResNetConfig

    from flowalign.eval import geneval as G
    from flowalign.rewards.geneval import geneval

    torch.manual_seed(0)
    labels = {0: "cat", 1: "dog", 2: "car"}
    backbone = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
                            out_features=["stage2"])
    cfg = DetrConfig(use_timm_backbone=False, backbone_config=backbone, use_pretrained_backbone=False, d_model=16,
                     encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                     encoder_ffn_dim=16, decoder_ffn_dim=16, num_queries=8, id2label=labels,
                     label2id={v: k for k, v in labels.items()})
    DetrForObjectDetection(cfg).save_pretrained(tmp_path / "detr")
    DetrImageProcessor(size={"shortest_edge": 32, "longest_edge": 32}).save_pretrained(tmp_path / "detr")
    rows = [{"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"},
            {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}], "prompt": "a photo of a red car"}]
    meta = tmp_path / "meta.jsonl"
    G.write_metadata(meta, rows)
    out = tmp_path / "out"
    args = ["eval", "geneval", "--prompts", str(meta), "--out", str(out), "--detector", str(tmp_path / "detr"),
            "--clip", tiny_clip_dir, "--device", "cpu", "--steps", "4", "--images-per-prompt", "2", "--no-progress"]
    assert main(args) == 0
    assert "single_object" in capsys.readouterr().out
    for i, row in enumerate(rows):
        folder = out / "images" / f"{i:05d}"
        assert json.loads((folder / "metadata.jsonl").read_text()) == row
        assert sorted(p.name for p in (folder / "samples").glob("*.png")) == ["0000.png", "0001.png"]
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    reward = geneval(detector=str(tmp_path / "detr"), clip=tiny_clip_dir, device="cpu")
    images = load_pngs([r["file"] for r in results])
    verdicts, _ = reward.scorer.score(images, [rows[0]] * 2 + [rows[1]] * 2)
    assert [(r["correct"], r["strict"], r["partial"]) for r in results] == \
        [(v.correct, v.strict, v.score) for v in verdicts]
    report = json.loads((out / "report.json").read_text())
    assert set(report["summary"]) == {"correct", "strict", "partial"}
    assert report["summary"]["correct"]["overall_images"] == pytest.approx(sum(v.correct for v in verdicts) / 4)
    (out / "images" / "00001" / "samples" / "0000.png").unlink()
    assert main(args) == 0 and json.loads((out / "report.json").read_text())["generated_this_run"] == 1
