"""The reward registry, dotted paths, multi-reward bookkeeping, and the JPEG rewards."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field

import pytest
import torch

from flowalign.rewards import REWARDS, MultiReward, build_reward, build_rewards


def _flat_and_noise(size: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    flat = torch.full((3, size, size), 0.5)
    noise = torch.rand(3, size, size, generator=g)
    return torch.stack([flat, noise])


class Brightness:
    """A user reward, reached through a dotted path: mean pixel value (differentiable)."""

    differentiable = True

    def __init__(self, scale: float = 1.0):
        self.scale = scale
        self.name = "brightness"

    def __call__(self, images, prompts, metadata=None):
        return self.scale * images.mean(dim=(1, 2, 3)), {"scale": self.scale}


def test_jpeg_rewards_order_flat_and_noise():
    images = _flat_and_noise()
    comp = build_reward("jpeg_compressibility")
    incomp = build_reward("jpeg_incompressibility")
    assert not comp.differentiable and not incomp.differentiable
    c, info = comp(images, ["x", "x"])
    i, _ = incomp(images, ["x", "x"])
    assert c.shape == i.shape == (2,)
    assert c[0] > c[1]  # the flat image compresses better
    assert i[1] > i[0]  # the noise image is larger
    assert torch.allclose(c, -i)
    # sizes in kB: a 64x64 noise image at quality 95 takes several kB, the flat one well under 2
    assert info["jpeg_kb"][1] > 5 and info["jpeg_kb"][0] < 2


def test_unknown_name_lists_valid_names_and_suggests_nearest():
    with pytest.raises(ValueError) as err:
        build_reward("pickscor")
    msg = str(err.value)
    assert "Did you mean 'pickscore'" in msg
    for name in ("clip", "hpsv2.1", "jpeg_compressibility", "aesthetic"):
        assert name in msg


def test_bad_args_name_the_valid_ones():
    with pytest.raises(ValueError, match="quality"):
        build_reward("jpeg_compressibility", qualty=90)


def test_dotted_path_user_reward():
    r = build_reward("test_rewards_registry:Brightness", scale=2.0)
    s, info = r(torch.full((2, 3, 8, 8), 0.25), ["a", "b"])
    assert torch.allclose(s, torch.tensor([0.5, 0.5])) and info == {"scale": 2.0}
    with pytest.raises(ValueError, match="no attribute"):
        build_reward("test_rewards_registry:Nope")
    with pytest.raises(ValueError, match="cannot import"):
        build_reward("not_a_module_xyz:thing")


@dataclass
class Spec:  # the shape of config.RewardSpec
    name: str
    weight: float = 1.0
    args: dict = field(default_factory=dict)


def test_build_rewards_weighted_sum_keeps_per_reward_scores():
    images = _flat_and_noise()
    multi = build_rewards([
        {"name": "jpeg_incompressibility", "weight": 0.5},
        Spec("test_rewards_registry:Brightness", 2.0, {"scale": 3.0}),
        {"name": "test_rewards_registry:Brightness", "weight": -1.0, "args": {"scale": 1.0}},
    ])
    assert isinstance(multi, MultiReward)
    assert not multi.differentiable  # jpeg is not
    total, info = multi(images, ["p", "p"])
    per = info["per_reward"]
    assert list(per) == ["jpeg_incompressibility", "brightness", "brightness#2"]
    assert info["weights"] == {"jpeg_incompressibility": 0.5, "brightness": 2.0, "brightness#2": -1.0}
    expected = 0.5 * per["jpeg_incompressibility"] + 2.0 * per["brightness"] - per["brightness#2"]
    assert torch.allclose(total, expected)
    assert torch.allclose(per["brightness"], 3.0 * images.mean(dim=(1, 2, 3)))
    assert info["info"]["brightness"] == {"scale": 3.0}


def test_multireward_differentiable_only_when_all_parts_are():
    b = build_reward("test_rewards_registry:Brightness")
    multi = MultiReward([(b, 1.0), (build_reward("test_rewards_registry:Brightness", scale=2.0), 0.5)])
    assert multi.differentiable
    x = torch.rand(2, 3, 8, 8, requires_grad=True)
    total, _ = multi(x, ["a", "b"])
    total.sum().backward()
    assert torch.allclose(x.grad, torch.full_like(x, 2.0 / (3 * 8 * 8)))


def test_build_rewards_rejects_bad_specs():
    with pytest.raises(ValueError, match="unknown key"):
        build_rewards([{"name": "jpeg_compressibility", "wieght": 1.0}])
    with pytest.raises(ValueError, match="no reward specs"):
        build_rewards([])
    with pytest.raises(ValueError, match="Did you mean 'jpeg_compressibility'"):
        build_rewards([{"name": "jpeg_compresibility"}])


def test_registry_slots_and_light_import():
    assert {"clip", "hpsv2", "hpsv2.1", "pickscore", "imagereward", "aesthetic", "jpeg_compressibility",
            "jpeg_incompressibility", "vlm_score", "win_rate"} <= set(REWARDS)
    code = ("import sys, flowalign, flowalign.rewards; "
            "print(sorted(m for m in ('open_clip', 'transformers', 'torchvision', 'httpx', 'timm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
