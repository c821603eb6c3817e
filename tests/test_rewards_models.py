"""Model-backed rewards on tiny models of the real architectures, saved in the real checkpoint
formats and loaded through flowalign's real loading code (no hub: HF_HUB_OFFLINE=1).

Each reward is checked for: scores of shape [B]; gradients reaching the pixels; and agreement with
the model's reference preprocessing, which runs on PIL images (open_clip's transform, HPSv2's
ResizeMaxSize, CLIPProcessor, ImageReward's torchvision transform), within 1e-3.
"""

from __future__ import annotations

import gzip
import json
from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image

from flowalign.rewards import build_reward

PROMPTS = ["a red cube", "a blue ball on the left", "a red cube"]
TINY_OPEN_CLIP = "flowalign-test-tiny-clip"


def _images(seed: int, n: int = 3, h: int = 80, w: int = 64) -> torch.Tensor:
    """Smooth random images on the 8-bit grid, so PIL and torch see the same pixels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.interpolate(torch.rand(n, 3, 6, 5, generator=g), size=(h, w), mode="bilinear")
    return (x * 255).round() / 255


def _pil(images: torch.Tensor) -> list[Image.Image]:
    return [Image.fromarray((im * 255).round().byte().permute(1, 2, 0).numpy()) for im in images]


def _grad_reaches_pixels(reward, images, prompts) -> torch.Tensor:
    x = images.clone().requires_grad_(True)
    scores, _ = reward(x, prompts, None)
    scores.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert x.grad.abs().sum() > 0
    return x.grad


# --------------------------------------------------------------------------------------------------
# open_clip: clip, hpsv2, hpsv2.1


@pytest.fixture(scope="module")
def tiny_open_clip(tmp_path_factory):
    """A 2-layer ViT / text transformer open_clip model registered under a custom config name,
    with its weights in open_clip's checkpoint format (a plain state dict)."""
    import open_clip

    d = tmp_path_factory.mktemp("open_clip")
    cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    }
    (d / f"{TINY_OPEN_CLIP}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(d / f"{TINY_OPEN_CLIP}.json")
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_OPEN_CLIP, pretrained=None)
    torch.save(model.state_dict(), d / "tiny_clip.pt")
    return d, model


def test_clip_matches_open_clip_pil_pipeline(tiny_open_clip):
    import open_clip

    d, _ = tiny_open_clip
    reward = build_reward("clip", model_name=TINY_OPEN_CLIP, pretrained=str(d / "tiny_clip.pt"), device="cpu")
    assert reward.differentiable and reward.name == "clip"
    ref_model, _, ref_pre = open_clip.create_model_and_transforms(TINY_OPEN_CLIP, pretrained=str(d / "tiny_clip.pt"))
    tok = open_clip.get_tokenizer(TINY_OPEN_CLIP)
    for seed in range(3):
        images = _images(seed)
        scores, _ = reward(images, PROMPTS)
        assert scores.shape == (3,)
        with torch.no_grad():
            x = torch.stack([ref_pre(p) for p in _pil(images)])
            ref = (ref_model.encode_image(x, normalize=True) * ref_model.encode_text(tok(PROMPTS), normalize=True)).sum(-1)
        assert torch.allclose(scores, ref, atol=1e-3), (scores, ref)
    _grad_reaches_pixels(reward, _images(0), PROMPTS)


def _hps_reference_preprocess(img: Image.Image, size: int) -> torch.Tensor:
    """HPSv2's evaluation transform (its open_clip fork's ResizeMaxSize + ToTensor + Normalize)."""
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    width, height = img.size
    scale = size / float(max(height, width))
    new_size = tuple(round(dim * scale) for dim in (height, width))
    img = TF.resize(img, new_size, InterpolationMode.BICUBIC)
    pad_h, pad_w = size - new_size[0], size - new_size[1]
    img = TF.pad(img, padding=[pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)
    x = TF.to_tensor(img)
    return TF.normalize(x, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))


@pytest.mark.parametrize("name,filename", [("hpsv2", "HPS_v2_compressed.pt"), ("hpsv2.1", "HPS_v2.1_compressed.pt")])
def test_hps_loads_checkpoint_format_and_matches_reference(tiny_open_clip, tmp_path, name, filename):
    import open_clip

    _, model = tiny_open_clip
    # The released files are {"state_dict": <full open_clip state dict>}; HPSv2 loads them with
    # model.load_state_dict(checkpoint["state_dict"]).
    torch.manual_seed(1)
    hps_model = open_clip.create_model(TINY_OPEN_CLIP, pretrained=None)
    torch.save({"state_dict": hps_model.state_dict()}, tmp_path / filename)
    reward = build_reward(name, checkpoint=str(tmp_path), model_name=TINY_OPEN_CLIP, device="cpu")
    assert reward.name == name and reward.differentiable

    images = _images(3, h=48, w=40)  # not square: exercises the longest-side resize and the padding
    scores, _ = reward(images, PROMPTS)
    assert scores.shape == (3,)
    tok = open_clip.get_tokenizer(TINY_OPEN_CLIP)
    with torch.no_grad():
        x = torch.stack([_hps_reference_preprocess(p, 32) for p in _pil(images)])
        ref = (hps_model.encode_image(x, normalize=True) * hps_model.encode_text(tok(PROMPTS), normalize=True)).sum(-1)
    assert torch.allclose(scores, ref, atol=1e-3), (scores, ref)
    # The checkpoint's weights were loaded, not the tiny CLIP's: the scores differ from it.
    with torch.no_grad():
        other = (model.encode_image(x, normalize=True) * model.encode_text(tok(PROMPTS), normalize=True)).sum(-1)
    assert (other - ref).abs().max() > 1e-2
    _grad_reaches_pixels(reward, images, PROMPTS)


def test_hps_missing_checkpoint_is_a_clear_error(tiny_open_clip, tmp_path):
    with pytest.raises(ValueError, match="HPS_v2.1_compressed.pt"):
        build_reward("hpsv2.1", checkpoint=str(tmp_path), model_name=TINY_OPEN_CLIP, device="cpu")
    with pytest.raises(ValueError, match="pass the local path"):  # hub id, but the hub is offline
        build_reward("hpsv2", checkpoint="xswu/HPSv2", model_name=TINY_OPEN_CLIP, device="cpu")


# --------------------------------------------------------------------------------------------------
# transformers CLIP: pickscore, aesthetic


def _write_clip_tokenizer_files(d) -> None:
    """CLIP's real BPE vocabulary (shipped inside open_clip) as vocab.json + merges.txt."""
    from open_clip.tokenizer import SimpleTokenizer, default_bpe

    encoder = dict(SimpleTokenizer().encoder)
    encoder = {{"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}.get(k, k): v
               for k, v in encoder.items()}
    (d / "vocab.json").write_text(json.dumps(encoder))
    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


@pytest.fixture(scope="module")
def tiny_hf_clip(tmp_path_factory):
    """A tiny transformers CLIPModel + CLIPProcessor saved with save_pretrained (the hub format of
    PickScore_v1 / laion CLIP-H / openai clip-vit-large-patch14)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    d = tmp_path_factory.mktemp("hf_clip")
    _write_clip_tokenizer_files(d)
    tokenizer = CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"))
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
    )
    config = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=77, vocab_size=49408),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = CLIPModel(config)
    model.save_pretrained(d)
    processor.save_pretrained(d)
    return d, model.eval(), processor


def _features(out):
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def test_pickscore_matches_clip_processor(tiny_hf_clip):
    d, model, processor = tiny_hf_clip
    reward = build_reward("pickscore", model=str(d), processor=str(d), device="cpu")
    assert reward.differentiable and reward.name == "pickscore"
    scale = model.logit_scale.exp().item()
    for seed in range(3):
        images = _images(seed)
        scores, _ = reward(images, PROMPTS)
        assert scores.shape == (3,)
        # PickScore's reference code (model card): processor on PIL images and on the text.
        with torch.no_grad():
            img_in = processor(images=_pil(images), return_tensors="pt")
            txt_in = processor(text=PROMPTS, padding=True, truncation=True, max_length=77, return_tensors="pt")
            ie = _features(model.get_image_features(**img_in))
            te = _features(model.get_text_features(**txt_in))
            ie, te = ie / ie.norm(dim=-1, keepdim=True), te / te.norm(dim=-1, keepdim=True)
            ref = scale * (ie * te).sum(-1)
        # logit_scale multiplies the cosine: the cosines agree within 1e-3.
        assert torch.allclose(scores / scale, ref / scale, atol=1e-3), (scores, ref)
    _grad_reaches_pixels(reward, _images(0), PROMPTS)


def test_aesthetic_matches_reference_pipeline(tiny_hf_clip, tmp_path):
    from flowalign.rewards import LinearMLPHead

    d, model, processor = tiny_hf_clip
    torch.manual_seed(2)
    mlp = LinearMLPHead(16)
    # improved-aesthetic-predictor's .pth is the MLP's plain state dict (layers.0 ... layers.7).
    torch.save(mlp.state_dict(), tmp_path / "aesthetic-model.pth")
    assert sorted(k.split(".")[1] for k in mlp.state_dict() if k.endswith("weight")) == ["0", "2", "4", "6", "7"]
    reward = build_reward("aesthetic", clip_model=str(d), weights=str(tmp_path), device="cpu")
    assert reward.differentiable and reward.name == "aesthetic"
    for seed in range(3):
        images = _images(seed)
        scores, _ = reward(images, PROMPTS)
        assert scores.shape == (3,)
        with torch.no_grad():  # DDPO's AestheticScorer
            emb = _features(model.get_image_features(**processor(images=_pil(images), return_tensors="pt")))
            ref = mlp.eval()(emb / emb.norm(dim=-1, keepdim=True)).squeeze(-1)
        assert torch.allclose(scores, ref, atol=1e-3), (scores, ref)
    _grad_reaches_pixels(reward, _images(0), None)


# --------------------------------------------------------------------------------------------------
# ImageReward


IR_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "blue", "cube", "ball", "on", "the", "left"]


@pytest.fixture(scope="module")
def tiny_imagereward(tmp_path_factory):
    """ImageReward.pt in the original layout: BLIP's ViT (timm-style keys, built here with timm's
    VisionTransformer, from which BLIP's vit.py derives), BLIP's med.py BERT text encoder with
    cross-attention (key-identical to transformers' BlipTextModel), the MLP head, and the unused
    vision_proj/text_proj of BLIP_Pretrain; plus med_config.json and a BERT tokenizer folder."""
    import timm.models.vision_transformer as vit
    from transformers import BertTokenizer, BlipTextConfig, BlipTextModel

    from flowalign.rewards import LinearMLPHead

    d = tmp_path_factory.mktemp("imagereward")
    (d / "vocab.txt").write_text("\n".join(IR_WORDS) + "\n")
    tok_dir = d / "tokenizer"
    BertTokenizer(str(d / "vocab.txt")).save_pretrained(tok_dir)
    vocab = len(IR_WORDS) + 2  # BLIP adds [DEC] and [ENC]
    med = {"architectures": ["BertModel"], "hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 2,
           "intermediate_size": 64, "hidden_act": "gelu", "layer_norm_eps": 1e-12, "vocab_size": vocab,
           "max_position_embeddings": 64, "encoder_width": 48, "add_cross_attention": True, "pad_token_id": 0}
    (d / "med_config.json").write_text(json.dumps(med))

    torch.manual_seed(0)
    visual = vit.VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4, mlp_ratio=2.0,
                                   qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                                   num_classes=0, global_pool="").eval()
    with torch.no_grad():  # timm zero-inits some of these; random values test the mapping
        visual.cls_token.normal_()
        visual.pos_embed.normal_(std=0.5)
    text = BlipTextModel(BlipTextConfig(vocab_size=vocab, hidden_size=32, encoder_hidden_size=48,
                                        intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        max_position_embeddings=64), add_pooling_layer=False).eval()
    mlp = LinearMLPHead(32).eval()
    state = {f"blip.visual_encoder.{k}": v for k, v in visual.state_dict().items()}
    state |= {f"blip.text_encoder.{k}": v for k, v in text.state_dict().items()}
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(64)[None]
    state |= {"blip.vision_proj.weight": torch.randn(8, 48), "blip.vision_proj.bias": torch.zeros(8),
              "blip.text_proj.weight": torch.randn(8, 32), "blip.text_proj.bias": torch.zeros(8)}
    state |= {f"mlp.{k}": v for k, v in mlp.state_dict().items()}
    torch.save(state, d / "ImageReward.pt")
    return d, tok_dir, visual, text, mlp


def test_imagereward_matches_original_layout_model(tiny_imagereward):
    import torchvision.transforms as TV
    from transformers import BertTokenizer

    from flowalign.rewards.imagereward import IMAGEREWARD_MEAN, IMAGEREWARD_STD

    d, tok_dir, visual, text, mlp = tiny_imagereward
    reward = build_reward("imagereward", checkpoint=str(d / "ImageReward.pt"), tokenizer=str(tok_dir),
                          vision_heads=4, device="cpu")
    assert reward.differentiable and reward.name == "imagereward"

    # ImageReward.score: its torchvision transform on PIL, BLIP's tokenizer (padding to 35).
    transform = TV.Compose([TV.Resize(32, interpolation=TV.InterpolationMode.BICUBIC), TV.CenterCrop(32),
                            TV.ToTensor(), TV.Normalize((0.48145466, 0.4578275, 0.40821073),
                                                        (0.26862954, 0.26130258, 0.27577711))])
    tok = BertTokenizer.from_pretrained(tok_dir)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    for seed in range(2):
        images = _images(seed)
        scores, _ = reward(images, PROMPTS)
        assert scores.shape == (3,)
        with torch.no_grad():
            x = torch.stack([transform(p) for p in _pil(images)])
            img_embeds = visual.forward_features(x)
            t = tok(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
            out = text(input_ids=t.input_ids, attention_mask=t.attention_mask, encoder_hidden_states=img_embeds,
                       encoder_attention_mask=torch.ones(img_embeds.shape[:2], dtype=torch.long))
            ref = ((mlp(out.last_hidden_state[:, 0]) - IMAGEREWARD_MEAN) / IMAGEREWARD_STD).squeeze(-1)
        assert torch.allclose(scores, ref, atol=1e-3), (scores, ref)
    # The prompt matters (cross-attention from text to image): two prompts, same image, differ.
    img = _images(5, n=1).expand(2, -1, -1, -1)
    s, _ = reward(img, ["a red cube", "a blue ball on the left"])
    assert (s[0] - s[1]).abs() > 1e-4
    _grad_reaches_pixels(reward, _images(0), PROMPTS)


def test_imagereward_rejects_foreign_checkpoint(tmp_path, tiny_imagereward):
    d, tok_dir, *_ = tiny_imagereward
    torch.save({"model.weight": torch.zeros(2)}, tmp_path / "ImageReward.pt")
    (tmp_path / "med_config.json").write_text((d / "med_config.json").read_text())
    with pytest.raises(ValueError, match="ImageReward checkpoint"):
        build_reward("imagereward", checkpoint=str(tmp_path), tokenizer=str(tok_dir), device="cpu")


def test_tensor_preprocessing_matches_pil_resize_and_crop():
    """The transforms themselves, against torchvision's PIL path, pixel by pixel (8-bit rounding)."""
    import torchvision.transforms as TV

    from flowalign.rewards import transforms as T

    images = _images(7, n=2, h=70, w=51)
    ref = torch.stack([TV.Compose([TV.Resize(24, interpolation=TV.InterpolationMode.BICUBIC), TV.CenterCrop(24),
                                   TV.ToTensor()])(p) for p in _pil(images)])
    ours = T.center_crop(T.resize_shortest(images, 24), (24, 24))
    assert ours.shape == ref.shape == (2, 3, 24, 24)
    assert (ours - ref).abs().max() <= 1.01 / 255  # PIL rounds to 8 bits (and its fixed point may differ by 1)
    assert (ours - ref).abs().mean() < 0.3 / 255
    assert np.isclose(T.resize_longest_pad(images, 24)[:, :, :, :3].abs().sum().item(), 0.0)  # zero padding left
