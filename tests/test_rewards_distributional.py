"""Exemplar-set rewards (DRAGON): the Fréchet distance against its closed form and scipy, exemplar
loading from an image folder, a features file and prompts, the errors users meet, and a pocket check
(blue renders are closer to a blue exemplar set than red renders)."""

import numpy as np
import pytest
import torch

from flowalign.pocket.render import render_batch, to_pil
from flowalign.rewards import build_reward
from flowalign.rewards.distributional import (
    clip_encoder, fd_leave_one_out_gains, feature_stats, frechet_distance, load_exemplars, save_exemplar_features,
    sqrtm_psd,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_frechet_distance_closed_form_on_diagonal_gaussians():
    # ‖μ1−μ2‖² = 1 + 4 = 5; Tr Σ1 + Tr Σ2 = 5 + 10; (Σ1Σ2)^½ = diag(2, 3) → FD = 5 + 15 − 2·5 = 10
    mu1, mu2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    cov1, cov2 = torch.diag(torch.tensor([4.0, 1.0])), torch.diag(torch.tensor([1.0, 9.0]))
    assert float(frechet_distance(mu1, cov1, mu2, cov2)) == pytest.approx(10.0, abs=1e-12)
    assert float(frechet_distance(mu2, cov2, mu1, cov1)) == pytest.approx(10.0, abs=1e-12)  # symmetric
    assert float(frechet_distance(mu1, cov1, mu1, cov1)) == pytest.approx(0.0, abs=1e-12)


def test_frechet_distance_matches_scipy_on_random_spd():
    from scipy import linalg

    g = torch.Generator().manual_seed(0)
    for d in (3, 8, 32):
        a, b = torch.randn(d, d, generator=g, dtype=torch.float64), torch.randn(d, d, generator=g, dtype=torch.float64)
        eye = torch.eye(d, dtype=torch.float64)
        cov1, cov2 = a @ a.T + 0.1 * eye, b @ b.T + 0.1 * eye
        mu1, mu2 = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
        covmean = linalg.sqrtm(cov1.numpy() @ cov2.numpy()).real
        ref = float(((mu1 - mu2) ** 2).sum()) + np.trace(cov1.numpy() + cov2.numpy() - 2 * covmean)
        assert float(frechet_distance(mu1, cov1, mu2, cov2)) == pytest.approx(ref, rel=1e-9, abs=1e-9)
        s = sqrtm_psd(cov1)
        torch.testing.assert_close(s @ s, cov1, rtol=1e-9, atol=1e-9)


def test_frechet_distance_of_a_singular_covariance_to_itself_is_zero():
    # 3 samples in 8 dimensions: a rank-2 covariance, where a general sqrtm struggles
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    mu, cov = feature_stats(x)
    assert torch.linalg.matrix_rank(cov) == 2
    assert abs(float(frechet_distance(mu, cov, mu, cov))) < 1e-12 * float(torch.trace(cov))
    torch.testing.assert_close(cov, torch.from_numpy(np.cov(x.numpy().T)).double())


def test_leave_one_out_gain_singles_out_the_sample_that_helps_most():
    g = torch.Generator().manual_seed(2)
    ref_mu, ref_cov = torch.zeros(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64)
    x = 0.3 * torch.randn(20, 2, generator=g) + torch.tensor([3.0, 0.0])  # far right of the reference
    x[7] = torch.tensor([-2.0, 0.5])  # the one sample on the reference's side of the cloud
    x[11] = torch.tensor([8.0, 0.0])  # the one sample pulling it further away
    gains = fd_leave_one_out_gains(x, ref_mu, ref_cov)
    assert int(gains.argmax()) == 7 and int(gains.argmin()) == 11


# --------------------------------------------------------------------------------------------------
# exemplar sets with a tiny real CLIP (seeded, 1 layer)


@pytest.fixture(scope="module")
def tiny_clip(tiny_clip_dir):
    return clip_encoder(tiny_clip_dir, device="cpu")


def _write_pngs(folder, prompts, seed):
    folder.mkdir(parents=True, exist_ok=True)
    images, _ = render_batch(prompts, seed=seed)
    for i, im in enumerate(images):
        to_pil(im).save(folder / f"{i:03d}.png")
    return images


def test_exemplars_from_an_image_folder_and_a_features_file(tiny_clip, tmp_path):
    prompts = ["a blue circle", "two red squares", "a green triangle", "a yellow circle"]
    images = _write_pngs(tmp_path / "ex", prompts, seed=4)
    (tmp_path / "ex" / "notes.txt").write_text("not an image")
    ex = load_exemplars(tiny_clip, images=tmp_path / "ex")
    assert ex.encoder == tiny_clip.name and ex.features.shape == (4, tiny_clip.dim)
    # the same features as encoding the renders directly (up to the PNG's 8-bit rounding)
    with torch.no_grad():
        direct = tiny_clip.images(torch.from_numpy(np.round(images * 255) / 255).float())
    torch.testing.assert_close(ex.features, direct, atol=1e-5, rtol=0)
    torch.testing.assert_close(ex.features.norm(dim=-1), torch.ones(4))

    save_exemplar_features(tmp_path / "ex.safetensors", ex.features, tiny_clip.name)
    again = load_exemplars(tiny_clip, features=tmp_path / "ex.safetensors")
    torch.testing.assert_close(again.features, ex.features)

    texts = load_exemplars(tiny_clip, texts=["a blue circle", "two red squares"])
    (tmp_path / "prompts.txt").write_text("a blue circle\n# comment\ntwo red squares\n")
    from_file = load_exemplars(tiny_clip, texts=tmp_path / "prompts.txt")
    assert texts.features.shape == (2, tiny_clip.dim)
    torch.testing.assert_close(from_file.features, texts.features)


def test_exemplar_errors_name_the_fix(tiny_clip, tmp_path):
    with pytest.raises(ValueError, match="does not exist.*exemplar_features"):
        load_exemplars(tiny_clip, images=tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("no images here")
    with pytest.raises(ValueError, match="holds no images.*put the exemplar images there"):
        load_exemplars(tiny_clip, images=tmp_path / "empty")
    save_exemplar_features(tmp_path / "wide.safetensors", torch.randn(5, tiny_clip.dim + 3), tiny_clip.name)
    with pytest.raises(ValueError, match=f"gives {tiny_clip.dim}-dimensional features; recompute them"):
        load_exemplars(tiny_clip, features=tmp_path / "wide.safetensors")
    save_exemplar_features(tmp_path / "other.safetensors", torch.randn(5, tiny_clip.dim), "open_clip:ViT-B-32:openai")
    with pytest.raises(ValueError, match="made with encoder 'open_clip:ViT-B-32:openai'.*recompute them"):
        load_exemplars(tiny_clip, features=tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="does not exist; write one with"):
        load_exemplars(tiny_clip, features=tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="exactly one exemplar source"):
        load_exemplars(tiny_clip, images=tmp_path / "empty", texts=["a blue circle"])


def test_exemplar_rewards_through_the_registry(tiny_clip_dir, tmp_path):
    _write_pngs(tmp_path / "blue", ["a blue circle", "a blue square", "a blue triangle"] * 2, seed=5)
    args = {"encoder": "clip", "encoder_args": {"path": tiny_clip_dir, "device": "cpu"},
            "exemplar_images": str(tmp_path / "blue")}
    fd_reward = build_reward("exemplar_fd", **args)
    sim = build_reward("exemplar_similarity", **args)
    assert not fd_reward.differentiable and sim.differentiable
    prompts = ["a blue circle", "a red square", "a blue triangle", "a green circle"]
    x = torch.from_numpy(render_batch(prompts, seed=9)[0]).requires_grad_()
    gains, info = fd_reward(x.detach(), prompts)
    assert gains.shape == (4,) and info["fd"] > 0
    scores, _ = sim(x, prompts)
    assert scores.shape == (4,) and float(scores.detach().abs().max()) <= 1.0 + 1e-6
    scores.sum().backward()
    assert x.grad.abs().sum() > 0


def test_open_clip_encoder_makes_exemplars_the_clip_encoder_refuses(tiny_clip, tmp_path):
    import json

    import open_clip

    from flowalign.rewards.distributional import open_clip_encoder

    cfg = {"embed_dim": 16,
           "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "tiny-dragon-clip.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "tiny-dragon-clip.json")
    torch.manual_seed(0)
    enc = open_clip_encoder("tiny-dragon-clip", pretrained=None, device="cpu")
    assert enc.name == "open_clip:tiny-dragon-clip:None" and enc.dim == 16
    images = torch.from_numpy(render_batch(["a blue circle", "a red square", "two green triangles"], seed=2)[0])
    with torch.no_grad():
        feats = enc.images(images)
    assert feats.shape == (3, 16)
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(3))
    assert load_exemplars(enc, texts=["a blue circle", "a red square"]).features.shape == (2, 16)
    save_exemplar_features(tmp_path / "oc.safetensors", feats, enc.name)
    assert load_exemplars(enc, features=tmp_path / "oc.safetensors").features.shape == (3, 16)
    with pytest.raises(ValueError, match="made with encoder 'open_clip:tiny-dragon-clip:None'"):
        load_exemplars(tiny_clip, features=tmp_path / "oc.safetensors")


# --------------------------------------------------------------------------------------------------
# pocket check: the shipped pocket CLIP tells blue scenes from red ones


def _pocket_clip_or_skip():
    from flowalign.pocket.assets import CLIP_DIR

    if not (CLIP_DIR / "config.json").exists():
        pytest.skip("this install has no shipped pocket CLIP")
    return clip_encoder(None, device="cpu")


def test_pocket_clip_blue_renders_are_closer_to_blue_exemplars_than_red_renders(tmp_path):
    enc = _pocket_clip_or_skip()
    shapes = ["circle", "square", "triangle"]
    blue = [f"a blue {s}" for s in shapes] + [f"two blue {s}s" for s in shapes]
    red = [p.replace("blue", "red") for p in blue]
    _write_pngs(tmp_path / "blue_exemplars", blue * 4, seed=100)  # 24 exemplars
    ex = load_exemplars(enc, images=tmp_path / "blue_exemplars")

    def fd(prompts):
        with torch.no_grad():
            f = enc.images(torch.from_numpy(render_batch(prompts * 4, seed=200)[0]))
        return float(frechet_distance(*feature_stats(f), *ex.stats))

    fd_blue, fd_red = fd(blue), fd(red)
    assert fd_blue < 0.5 * fd_red, (fd_blue, fd_red)
