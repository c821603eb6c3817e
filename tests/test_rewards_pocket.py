import torch

from flowalign.pocket.render import render_batch
from flowalign.rewards import build_rewards


def test_pocket_gold_through_the_registry():
    prompts = ["two red circles", "a blue square to the left of a yellow triangle", "a green triangle"]
    images, _ = render_batch(prompts, seed=3)
    truth = torch.from_numpy(images)
    reward = build_rewards([{"name": "pocket_gold", "weight": 2.0}])
    assert not reward.differentiable
    good, info = reward(truth, prompts)
    blank, _ = reward(torch.zeros_like(truth), prompts)
    swapped, _ = reward(truth.roll(1, 0), prompts)  # each image scored against another prompt
    torch.testing.assert_close(good, torch.full((3,), 2.0))  # weight 2 x a perfect partial score
    torch.testing.assert_close(blank, torch.zeros(3))
    assert (swapped < good).all()
    torch.testing.assert_close(info["per_reward"]["pocket_gold"], torch.ones(3))


def _tiny_pocket_clip(tmp_path):
    from transformers import CLIPModel

    from flowalign.pocket import models as pm

    torch.manual_seed(0)
    tok = pm.build_tokenizer()
    model = CLIPModel(pm.clip_config(tok, width=32, layers=1, vision_width=32, vision_layers=1))
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    pm.image_processor().save_pretrained(tmp_path)
    return model, tok


def test_pocket_clip_reward_matches_the_processor_and_has_gradients(tmp_path):
    from transformers import CLIPProcessor

    model, tok = _tiny_pocket_clip(tmp_path)
    reward = build_rewards([{"name": "pocket_clip", "args": {"path": str(tmp_path)}}])
    assert reward.differentiable
    prompts = ["two red circles", "a blue square to the left of a yellow triangle"]
    images, _ = render_batch(prompts, seed=1)
    x = torch.from_numpy(images).requires_grad_()
    scores, _ = reward(x, prompts)
    assert scores.shape == (2,)
    scores.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # the reference path: the saved CLIPProcessor on uint8 PIL images
    from flowalign.pocket.render import to_pil

    proc = CLIPProcessor.from_pretrained(tmp_path)
    inputs = proc(text=prompts, images=[to_pil(im) for im in images], return_tensors="pt", padding="max_length")
    with torch.no_grad():
        out = model(**inputs)
    ref = out.logits_per_image.diagonal()
    torch.testing.assert_close(scores.detach(), ref, atol=1e-3 * model.logit_scale.detach().exp().item(), rtol=0)


def test_pocket_clip_without_shipped_weights_says_how(tmp_path, monkeypatch):
    import flowalign.pocket.assets as assets
    import pytest

    monkeypatch.setattr(assets, "CLIP_DIR", tmp_path / "missing")
    with pytest.raises(ValueError, match="flowalign pocket build"):
        build_rewards([{"name": "pocket_clip"}])
