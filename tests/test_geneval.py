"""GenEval: the prompt generator, the rule engine on hand-built detections (each expected verdict
worked out by hand from GenEval's rules), agreement with the pocket world's exact evaluator, and
the detector path on tiny random transformers models (DETR, Mask2Former, OWLv2; no hub)."""

import json

import numpy as np
import pytest
import torch

from flowalign.eval import geneval as G

pytestmark = pytest.mark.usefixtures("one_thread")


def det(label, box, score=1.0, color=None):
    return G.Detection(label, tuple(float(v) for v in box), score, color)


# ------------------------------------------------------------------------------------------ rules


def test_relations_from_box_centres_with_the_margin():
    a = det("cat", (0, 0, 10, 10))
    # centres 30 px apart horizontally; shrunk by 0.1·(10+10) = 2 → 28/30 = 0.93 > 0.5
    assert G.relations_between(a, det("dog", (30, 0, 40, 10))) == {"left of"}
    assert G.relations_between(det("dog", (30, 0, 40, 10)), a) == {"right of"}
    # diagonal: shrunk (-18, -18) over |(-20, -20)| = 28.28 → both components -0.64
    assert G.relations_between(a, det("dog", (20, 20, 30, 30))) == {"left of", "above"}
    # 1 px sideways, 30 px down: the sideways offset is inside the margin → only "above"
    assert G.relations_between(a, det("dog", (1, 30, 11, 40))) == {"above"}
    # overlapping boxes 1 px apart: both offsets inside the margin → no relation
    assert G.relations_between(a, det("dog", (1, 1, 11, 11))) == set()
    # steep diagonal: shrunk (-8, -28) over |(-10, -30)| = 31.6 → dx -0.25 (not left), dy -0.89
    assert G.relations_between(a, det("dog", (10, 30, 20, 40))) == {"above"}
    # a wider margin (0.5·20 = 10 px) turns the 10 px sideways offset off too
    assert G.relations_between(a, det("dog", (10, 30, 20, 40)), position_threshold=0.5) == {"above"}
    assert G.relations_between(a, det("dog", (12, 0, 22, 10)), position_threshold=0.5) == set()


def test_select_thresholds_cap_and_overlap():
    dets = [det("cat", (0, 0, 10, 10), 0.35), det("cat", (50, 0, 60, 10), 0.95), det("dog", (0, 0, 5, 5), 0.3)]
    kept = G.select(dets, "two_object")
    assert [d.score for d in kept["cat"]] == [0.95, 0.35]  # most confident first
    assert "dog" not in kept  # 0.3 is not above the 0.3 threshold
    assert [d.score for d in G.select(dets, "counting")["cat"]] == [0.95]  # counting needs > 0.9
    many = [det("cat", (i, 0, i + 5, 5), 0.5 + i / 100) for i in range(20)]
    assert len(G.select(many, "single_object")["cat"]) == 16
    # overlap suppression only when asked: IoU of (0,0,10,10) and (1,0,11,10) = 100/121 (inclusive pixels)
    pair = [det("cat", (0, 0, 10, 10), 0.9), det("cat", (1, 0, 11, 10), 0.8)]
    assert len(G.select(pair, "single_object")["cat"]) == 2
    assert G.box_iou(pair[0].box, pair[1].box) == pytest.approx(110 / 132)
    assert len(G.select(pair, "single_object", G.Thresholds(max_overlap=0.5))["cat"]) == 1
    assert len(G.select(pair, "single_object", G.Thresholds(max_overlap=0.9))["cat"]) == 2


COUNT3 = {"tag": "counting", "include": [{"class": "cat", "count": 3}], "exclude": [{"class": "cat", "count": 4}],
          "prompt": "a photo of three cats"}


@pytest.mark.parametrize("n, correct, strict, score", [
    (3, True, True, 1.0),
    (2, False, False, 1 - 1 / 3),
    (4, False, False, 1 - 1 / 3),  # include holds (top 3), exclude fails; Flow-GRPO: |3-4|/3 off
    (0, False, False, 0.0),
    (9, False, False, -1.0),  # 1 - |3 - 9|/3: the reference's credit is not bounded below
])
def test_counting(n, correct, strict, score):
    objs = G.select([det("cat", (20 * i, 0, 20 * i + 10, 10), 0.95) for i in range(n)], "counting")
    v = G.evaluate(COUNT3, objs)
    assert (v.correct, v.strict) == (correct, strict)
    assert v.score == pytest.approx(score)


def test_color_is_checked_on_the_most_confident_objects_only():
    meta = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "pink"}], "prompt": "a photo of a pink car"}
    top_wrong = G.select([det("car", (0, 0, 9, 9), 0.9, "blue"), det("car", (20, 0, 29, 9), 0.8, "pink")], "colors")
    v = G.evaluate(meta, top_wrong)
    assert not v.correct and not v.strict
    assert v.score == 0.0  # two cars for one: count credit 1 - 1/1 = 0, and the color cannot be checked: 0
    v = G.evaluate(meta, G.select([det("car", (0, 0, 9, 9), 0.9, "pink")], "colors"))
    assert v.correct and v.strict and v.score == 1.0
    v = G.evaluate(meta, G.select([det("car", (0, 0, 9, 9), 0.9, "red")], "colors"))
    assert not v.correct and v.score == 0.5  # credits [1 (count), 0 (color)]


def test_color_attr_partial_credit():
    meta = {"tag": "color_attr", "prompt": "a photo of a red cup and a blue bowl",
            "include": [{"class": "cup", "count": 1, "color": "red"}, {"class": "bowl", "count": 1, "color": "blue"}]}
    objs = G.select([det("cup", (0, 0, 9, 9), 0.9, "red"), det("bowl", (20, 0, 29, 9), 0.9, "green")], "color_attr")
    v = G.evaluate(meta, objs)
    assert not v.correct and not v.strict
    assert v.score == pytest.approx(3 / 4)  # credits [1, 1, 1, 0]
    assert any("blue bowl" in r for r in v.reasons)


POSITION = {"tag": "position", "prompt": "a photo of a dog right of a teddy bear",
            "include": [{"class": "teddy bear", "count": 1}, {"class": "dog", "count": 1, "position": ["right of", 0]}]}


def test_position_verdicts_and_flow_grpo_credit():
    right = G.select([det("teddy bear", (0, 0, 10, 10), 0.9), det("dog", (40, 0, 50, 10), 0.9)], "position")
    v = G.evaluate(POSITION, right)
    assert v.correct and v.strict and v.score == 1.0  # credits [1, 1, 1]
    wrong = G.select([det("teddy bear", (40, 0, 50, 10), 0.9), det("dog", (0, 0, 10, 10), 0.9)], "position")
    v = G.evaluate(POSITION, wrong)
    assert not v.correct and not v.strict
    assert v.score == pytest.approx(3 / 4)  # credits [1, 1, 0, 1]: the reference appends 1 after a failure too
    no_target = G.select([det("dog", (40, 0, 50, 10), 0.9)], "position")
    v = G.evaluate(POSITION, no_target)
    assert not v.correct and v.score == pytest.approx(1 / 3)  # credits [0 (bear), 1 (dog), 0 (no target)]
    assert "no target" in " ".join(v.reasons)


def test_colors_come_from_the_callback_once_per_clause():
    calls = []

    def colors_of(cls, dets):
        calls.append((cls, len(dets)))
        return ["red"] * len(dets)

    meta = {"tag": "colors", "include": [{"class": "cup", "count": 1, "color": "red"}], "prompt": "a photo of a red cup"}
    v = G.evaluate(meta, G.select([det("cup", (0, 0, 5, 5), 0.9)], "colors"), colors_of)
    assert v.correct and calls == [("cup", 1), ("cup", 1)]  # GenEval's verdict, then Flow-GRPO's reward


def test_summary_is_the_mean_over_tags():
    s = G.summarize(["counting", "single_object", "single_object"], [False, True, True])
    assert s["single_object"] == 1.0 and s["counting"] == 0.0
    assert s["overall"] == 0.5 and s["overall_images"] == pytest.approx(2 / 3)
    assert list(s)[:2] == ["single_object", "counting"]  # GenEval's tag order


# ------------------------------------------------------------------------------------------ metadata


def test_generator_writes_the_published_templates():
    rng = np.random.default_rng(0)
    rows = {t: G.make_sample(t, rng) for t in G.TAGS}
    for row in rows.values():
        assert G.check_metadata(row) == row
    c = rows["counting"]
    n = c["include"][0]["count"]
    assert c["exclude"] == [{"class": c["include"][0]["class"], "count": n + 1}]
    assert c["prompt"] == f"a photo of {G.NUMBERS[n]} {G.plural(c['include'][0]['class'])}"
    p = rows["position"]
    b, a = p["include"][0]["class"], p["include"][1]["class"]
    rel = p["include"][1]["position"][0]
    assert p["prompt"] == f"a photo of {G.with_article(a)} {rel} {G.with_article(b)}" and a != b
    assert G.with_article("apple") == "an apple" and G.plural("bus") == "buses" and G.plural("cat") == "cats"
    assert all(r["include"][0]["class"] != "person" for t, r in rows.items() if t in ("colors", "color_attr"))


def test_suite_is_seeded_distinct_and_the_training_set_avoids_the_test_set():
    test = G.generate_suite(43, 30)
    assert test == G.generate_suite(43, 30) and test != G.generate_suite(44, 30)
    assert len({json.dumps(r, sort_keys=True) for r in test}) == len(test) == 6 * 30
    train = G.training_set(test, seed=0, per_tag=200)
    test_prompts = {r["prompt"] for r in test}
    assert not test_prompts & {r["prompt"] for r in train}
    per_tag = {t: sum(r["tag"] == t for r in train) for t in G.TAGS}
    assert per_tag["single_object"] == 80 - 30 and per_tag["counting"] == 200, per_tag  # 80 classes exist


@pytest.mark.parametrize("row, fragment", [
    ({"include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"}, "missing the field 'tag'"),
    ({"tag": "single_object", "prompt": "a photo of a cat"}, "missing the field 'include'"),
    ({"tag": "single_object", "include": [{"count": 1}], "prompt": "a cat"}, "include[0] is missing the field 'class'"),
    ({"tag": "single_object", "include": [{"class": "cat"}], "prompt": "a cat"}, "missing the field 'count'"),
    ({"tag": "colors", "include": [{"class": "cat", "count": 1, "color": "teal"}], "prompt": "x"}, "GenEval's colors"),
    ({"tag": "position", "include": [{"class": "cat", "count": 1, "position": ["left of", 0]}], "prompt": "x"},
     "earlier include clause"),
    ({"tag": "single_object", "include": [{"class": "unicorn", "count": 1}], "prompt": "x"}, "not a class"),
])
def test_bad_metadata_fails_naming_the_field(row, fragment):
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace("[", r"\[")):
        G.check_metadata(row, known_classes=G.CLASS_NAMES)


def test_read_metadata_names_file_and_line(tmp_path):
    path = tmp_path / "meta.jsonl"
    path.write_text(json.dumps(G.make_sample("colors", np.random.default_rng(0))) + "\n"
                    + json.dumps({"tag": "colors", "prompt": "a photo of a red car"}) + "\n")
    with pytest.raises(ValueError, match=r"meta.jsonl:2: GenEval metadata is missing the field 'include'"):
        G.read_metadata(path)


def test_labels_map_to_geneval_names():
    assert G.class_of_label("mouse") == "computer mouse" and G.class_of_label("Hair_Dryer") == "hair drier"
    assert G.class_of_label("sky") is None and G.class_of_label("teddy bear") == "teddy bear"


# ------------------------------------------------------------------------------------------ pocket


def _expressible(spec, objects) -> bool:
    """The cases GenEval's format states the pocket rule for: the prompt names each class once (GenEval
    never writes "a red circle and a blue circle") and no colored single object shares its class with
    another object (GenEval checks the color of the most confident one only)."""
    shapes = [p.shape for p in spec.objects]
    if len(set(shapes)) < len(shapes):
        return False
    return all(p.color is None or sum(o.shape == p.shape and o.color != "other" for o in objects) <= p.count
               for p in spec.objects)


def test_pocket_scenes_get_the_pocket_evaluators_verdicts():
    from flowalign.pocket.evaluate import detect_objects, score_objects
    from flowalign.pocket.grammar import PromptSpec, spec_to_prompt
    from flowalign.pocket.prompts import load_prompt_file
    from flowalign.pocket.render import render_batch

    rows = load_prompt_file("prompts/pocket/test.jsonl")
    specs = [PromptSpec.from_dict(r["spec"]) for r in rows]
    flip = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
    flipped = [PromptSpec(s.objects, flip[s.relation]) for s in specs if s.relation]
    images, _ = render_batch(specs + flipped, seed=0)
    found = detect_objects(images)
    rng = np.random.default_rng(0)
    cases = []
    for i, spec in enumerate(specs):
        cases += [(spec, i)] + [(spec, int(j)) for j in rng.choice(len(specs), 7, replace=False)]
    k = len(specs)
    for spec in specs:
        if spec.relation:
            cases.append((spec, k))  # the same objects, the relation reversed
            k += 1
    agree, verdicts, skipped = 0, [], 0
    for spec, j in cases:
        if not _expressible(spec, found[j]):
            skipped += 1
            continue
        gold = score_objects(spec, found[j], images.shape[2:]).strict
        meta = G.from_pocket_spec(spec)
        assert G.check_metadata(meta)["prompt"] == spec_to_prompt(spec)
        ours = G.evaluate(meta, G.select(G.from_pocket_objects(found[j]), meta["tag"])).correct
        agree += gold == ours
        verdicts.append((spec.category, gold))
    assert agree == len(verdicts), f"{len(verdicts) - agree} of {len(verdicts)} verdicts differ"
    assert len(verdicts) > 2500 and skipped < len(cases) / 4
    for cat in ("single_object", "two_object", "counting", "colors", "position", "color_attr"):
        got = {g for c, g in verdicts if c == cat}
        assert got == {True, False}, f"{cat}: only {got}"  # every category is tested both ways


# ------------------------------------------------------------------------------------------ detectors

LABELS = {0: "cat", 1: "dog", 2: "mouse", 3: "sky"}


@pytest.fixture(scope="module")
def tiny_detectors(tmp_path_factory):
    """Seeded random DETR (boxes), Mask2Former (masks) and OWLv2 (open vocabulary) folders."""
    from transformers import (
        DetrConfig, DetrForObjectDetection, DetrImageProcessor, Mask2FormerConfig,
        Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor, Owlv2Config, Owlv2ForObjectDetection,
        Owlv2ImageProcessor, Owlv2Processor, ResNetConfig, SwinConfig,
    )

    root = tmp_path_factory.mktemp("detectors")
    label2id = {v: k for k, v in LABELS.items()}
    torch.manual_seed(0)
    backbone = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
                            out_features=["stage2"])
    detr = DetrConfig(use_timm_backbone=False, backbone_config=backbone, use_pretrained_backbone=False, d_model=16,
                      encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                      encoder_ffn_dim=16, decoder_ffn_dim=16, num_queries=12, id2label=LABELS, label2id=label2id)
    DetrForObjectDetection(detr).save_pretrained(root / "detr")
    DetrImageProcessor(size={"shortest_edge": 64, "longest_edge": 64}).save_pretrained(root / "detr")
    swin = SwinConfig(image_size=64, patch_size=4, embed_dim=32, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                      window_size=2, out_features=["stage1", "stage2", "stage3", "stage4"])
    m2f = Mask2FormerConfig(backbone_config=swin, use_pretrained_backbone=False, hidden_dim=32, mask_feature_size=32,
                            feature_size=32, num_queries=6, encoder_layers=1, decoder_layers=2,
                            encoder_feedforward_dim=32, dim_feedforward=32, num_attention_heads=2, common_stride=4,
                            id2label=LABELS, label2id=label2id)
    Mask2FormerForUniversalSegmentation(m2f).save_pretrained(root / "m2f")
    Mask2FormerImageProcessor(size={"height": 64, "width": 64}).save_pretrained(root / "m2f")
    tok = _tokenizer_with_nonzero_bos()
    owl = Owlv2Config(
        text_config=dict(vocab_size=len(tok), hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=tok.model_max_length,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8), projection_dim=16)
    Owlv2ForObjectDetection(owl).save_pretrained(root / "owl")
    Owlv2Processor(image_processor=Owlv2ImageProcessor(size={"height": 32, "width": 32}),
                   tokenizer=tok).save_pretrained(root / "owl")
    return {k: str(root / k) for k in ("detr", "m2f", "owl")}


def _tokenizer_with_nonzero_bos():
    """A word-level CLIPTokenizer whose start token is not id 0 (OWL masks queries starting with id 0)."""
    from flowalign.models.tokenizers import word_clip_tokenizer

    tok = word_clip_tokenizer(("a", "an", "photo", "of", "cat", "dog", "computer", "mouse"), 16, specials_first=False)
    assert tok.bos_token_id != 0
    return tok


def _images(n=3, size=48):
    from flowalign.pocket.render import render_batch

    arr, _ = render_batch(["a red circle", "two blue squares", "a yellow triangle above a green circle"][:n],
                          seed=0, size=size)
    return torch.from_numpy(arr).float()


@pytest.mark.parametrize("name", ["detr", "m2f", "owl"])
def test_detector_path_on_tiny_random_models(tiny_detectors, tiny_clip_dir, name):
    from flowalign.rewards.geneval import CropColors, GenEvalReward, GenEvalScorer, ObjectDetector

    classes = G.CLASS_NAMES if name != "owl" else ("cat", "dog", "computer mouse")
    detector = ObjectDetector(tiny_detectors[name], device="cpu", classes=classes, min_score=0.0)
    assert detector.kind == {"detr": "boxes", "m2f": "masks", "owl": "open_vocabulary"}[name]
    images = _images()
    found = detector.detect(images)
    assert len(found) == 3 and sum(map(len, found)) > 0
    for dets in found:
        for d in dets:
            assert d.label in {"cat", "dog", "computer mouse"}  # "sky" is no GenEval class; "mouse" renamed
            x0, y0, x1, y1 = d.box
            assert 0 <= x0 <= x1 <= 48 and 0 <= y0 <= y1 <= 48 and 0 <= d.score <= 1
            assert (d.mask is not None) == (name == "m2f")
    assert [[(d.label, d.score) for d in ds] for ds in detector.detect(images)] == \
        [[(d.label, d.score) for d in ds] for ds in found]  # deterministic

    colors = CropColors(tiny_clip_dir, device="cpu")
    th = G.Thresholds(threshold=0.0, counting_threshold=0.0)  # random models are never confident
    scorer = GenEvalScorer(detector, colors, th)
    metadata = [
        {"tag": "colors", "include": [{"class": "cat", "count": 1, "color": "red"}], "prompt": "a photo of a red cat"},
        {"tag": "counting", "include": [{"class": "dog", "count": 2}], "exclude": [{"class": "dog", "count": 3}],
         "prompt": "a photo of two dogs"},
        {"tag": "position", "include": [{"class": "cat", "count": 1},
                                        {"class": "dog", "count": 1, "position": ["above", 0]}],
         "prompt": "a photo of a dog above a cat"},
    ]
    verdicts, kept = scorer.score(images, metadata)
    from flowalign.rewards.geneval import _to_pil

    for img, meta, objs, v in zip(_to_pil(images), metadata, kept, verdicts):
        assert objs == G.select(sum(objs.values(), []), meta["tag"], th)  # kept = GenEval's selection
        again = G.evaluate(meta, objs, lambda c, ds, img=img: colors(img, c, ds))
        assert (again.correct, again.strict, again.score) == (v.correct, v.strict, v.score)
        for c, ds in objs.items():
            assert set(colors(img, c, ds)) <= set(G.COLORS)
    reward = GenEvalReward(scorer, score="partial")
    scores, info = reward(images, [m["prompt"] for m in metadata], metadata)
    assert scores.shape == (3,) and torch.equal(scores, torch.tensor([v.score for v in verdicts]))
    assert torch.equal(info["correct"], torch.tensor([float(v.correct) for v in verdicts]))
    with pytest.raises(ValueError, match="missing the field 'include'"):
        reward(images, ["x"] * 3, [{"tag": "colors", "prompt": "x"}] * 3)
    if name == "owl":
        with pytest.raises(ValueError, match="not a class of the detector"):
            reward(images[:1], ["x"], [{"tag": "single_object", "include": [{"class": "bus", "count": 1}],
                                        "prompt": "a photo of a bus"}])


def test_a_model_that_is_no_detector_fails_clearly(tiny_clip_dir, tmp_path):
    from flowalign.rewards import build_reward
    from flowalign.rewards.geneval import detector_kind

    with pytest.raises(ValueError, match="is a 'clip' model, not an object detector"):
        detector_kind(tiny_clip_dir)
    with pytest.raises(ValueError, match="cannot read its config"):
        build_reward("geneval", detector=str(tmp_path / "nothing-here"), clip=tiny_clip_dir)


def test_the_color_classifier_picks_the_color_its_text_side_prefers(tiny_clip_dir):
    """With CLIP's text side fixed, a crop's color is the argmax of image·text over the ten colors:
    checked against the same product computed here from the model's own embeddings."""
    from PIL import Image

    from flowalign.rewards.geneval import CropColors
    from flowalign.rewards.pickscore import clip_features

    colors = CropColors(tiny_clip_dir, device="cpu")
    img = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8))
    dets = [det("cat", (0, 0, 16, 16)), det("cat", (8, 8, 32, 32))]
    got = colors(img, "cat", dets)
    text = colors._classifier("cat")
    assert text.shape == (10, text.shape[1]) and torch.allclose(text.norm(dim=-1), torch.ones(10))
    crops = [img.crop((0, 0, 16, 16)), img.crop((8, 8, 32, 32))]
    px = colors.processor(images=crops, return_tensors="pt")["pixel_values"]
    f = clip_features(colors.model.get_image_features(pixel_values=px)).float()
    want = [G.COLORS[i] for i in (f / f.norm(dim=-1, keepdim=True) @ text.T).argmax(1).tolist()]
    assert got == want


def test_the_reward_checks_prompts_before_generation_and_scores_rows_without_prompt(tiny_detectors, tiny_clip_dir):
    """What the trainer does before its first rollout (rewards.base.check_prompts), and what it passes
    at scoring time (rows without their 'prompt')."""
    from flowalign.rewards import build_rewards
    from flowalign.rewards.base import check_prompts

    rewards = build_rewards([{"name": "geneval", "args": {"detector": tiny_detectors["detr"], "clip": tiny_clip_dir,
                                                          "device": "cpu", "threshold": 0.0}}])
    good = {"prompt": "a photo of a cat", "tag": "single_object", "include": [{"class": "cat", "count": 1}]}
    check_prompts(rewards, [good], "train.prompts=x.jsonl")
    with pytest.raises(ValueError, match=r"train.prompts=x.jsonl: reward geneval cannot score prompt 2 "
                                         r"'a photo of a dog': GenEval metadata is missing the field 'include'"):
        check_prompts(rewards, [good, {"prompt": "a photo of a dog", "tag": "single_object"}], "train.prompts=x.jsonl")
    scores, info = rewards(_images(1), ["a photo of a cat"], [{k: v for k, v in good.items() if k != "prompt"}])
    assert scores.shape == (1,) and float(scores[0]) <= 1  # 1 - |1 - found|: below 0 past 2 cats found
    assert set(info["info"]["geneval"]["per_tag"]) == {"single_object", "overall", "overall_images"}
