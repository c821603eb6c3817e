"""Noise optimization (ReNO, Best-of-N, CARINOX) with the real pocket model, tiny real turbo/flux
pipelines and the shipped pocket CLIP as the differentiable reward."""

import math

import pytest
import torch

from flowalign.models import policy_class
from flowalign.models.testing import force_hub_offline, tiny_pipeline_dir
from flowalign.noise_opt import (
    GenerationConfig, OptimConfig, best_of_n_batch, carinox, chi_norm_regularizer, clip_rows, optimize_noise, reno,
    reno_batch, reward_terms, sample_noise,
)
from flowalign.noise_opt.objective import multi_clip_sum
from flowalign.rewards import MultiReward, build_reward

force_hub_offline()

POCKET_PROMPTS = ["two red circles", "a blue square", "a yellow triangle above a green circle"]
POCKET_GEN = GenerationConfig(num_steps=2, guidance_scale=1.5, checkpoint=False)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: intra-op threads only cost


@pytest.fixture(scope="module")
def pocket():
    from flowalign.pocket.sample import load_pocket_policy

    return load_pocket_policy()


@pytest.fixture(scope="module")
def pocket_clip():
    return build_reward("pocket_clip", device="cpu")


class RedMean:
    """A tiny differentiable reward: the mean of the red channel (times ``scale``)."""

    differentiable = True

    def __init__(self, scale=1.0, name="red"):
        self.scale, self.name = scale, name

    def __call__(self, images, prompts, metadata=None):
        return self.scale * images[:, 0].mean((1, 2)), {}


class GreenMean(RedMean):
    def __call__(self, images, prompts, metadata=None):
        return self.scale * images[:, 1].mean((1, 2)), {}


def pixel_generator(noise, cond):
    """A differentiable toy generator: noise [B,3,H,W] → images in [0,1]."""
    return torch.sigmoid(noise)


# ------------------------------------------------------------------ the math


def test_regularizer_value_and_gradient_match_the_formula():
    noise = torch.randn(3, 4, 5, 5, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    d = 4 * 5 * 5
    reg = chi_norm_regularizer(noise)
    norms = [noise[b].detach().flatten().norm().item() for b in range(3)]
    expected = torch.tensor([0.5 * n**2 - (d - 1) * math.log(n) for n in norms])
    torch.testing.assert_close(reg.detach(), expected, rtol=1e-5, atol=1e-4)
    (grad,) = torch.autograd.grad(reg.sum(), noise)
    for b in range(3):  # dR/dε = ε·(1 − (d−1)/‖ε‖²)
        torch.testing.assert_close(grad[b], noise[b].detach() * (1 - (d - 1) / norms[b] ** 2), rtol=1e-4, atol=1e-5)


def test_regularizer_minimum_is_on_the_shell():
    d = 256
    direction = torch.randn(1, d, generator=torch.Generator().manual_seed(1))
    direction = direction / direction.norm()
    radii = torch.linspace(5, 30, 2501)
    values = chi_norm_regularizer(radii[:, None] * direction)
    assert abs(radii[values.argmin()].item() - math.sqrt(d - 1)) < 0.02
    at_min = (math.sqrt(d - 1) * direction).requires_grad_(True)
    (grad,) = torch.autograd.grad(chi_norm_regularizer(at_min).sum(), at_min)
    assert grad.norm() < 1e-4


def test_clipping_is_per_sample_and_multi_clip_bounds_each_reward():
    g = torch.tensor([[3.0, 4.0], [0.03, 0.04]])  # norms 5 and 0.05
    torch.testing.assert_close(clip_rows(g, 0.1), torch.tensor([[0.06, 0.08], [0.03, 0.04]]), atol=1e-6, rtol=0)
    assert torch.equal(clip_rows(g, 0), g)
    big = torch.tensor([[1000.0, 0.0]])
    small = torch.tensor([[0.0, 0.05]])
    combined = multi_clip_sum([big, small], 0.1)
    # the huge reward contributes at most 0.1; the small one keeps its full gradient
    torch.testing.assert_close(combined, torch.tensor([[0.1, 0.05]]), atol=1e-6, rtol=0)
    single = clip_rows(big + small, 0.1)
    assert single[0, 1] < 1e-5  # one clip of the sum: the small reward is drowned out


def test_multi_clip_step_gives_every_reward_its_share():
    noise0 = torch.zeros(1, 3, 4, 4)
    terms = reward_terms([(RedMean(1000.0, "red"), 1.0), (GreenMean(1.0, "green"), 1.0)])
    opt = OptimConfig(iterations=2, lr=1.0, momentum=0.0, grad_clip=0.1, reg_weight=0.0)
    plain = optimize_noise(pixel_generator, None, terms, ["x"], noise0, opt)[0]
    multi_opt = OptimConfig(**{**vars(opt), "multi_clip": True})
    multi = optimize_noise(pixel_generator, None, terms, ["x"], noise0, multi_opt)[0]
    assert plain.history[0]["grad_norm"] <= 0.1 + 1e-6
    assert multi.history[0]["grad_norm"] <= 0.2 + 1e-6  # two terms, each clipped to 0.1
    green_gain = [r.history[1]["rewards"]["green"] - r.history[0]["rewards"]["green"] for r in (plain, multi)]
    assert green_gain[1] > 100 * max(green_gain[0], 1e-9)


def test_best_iterate_is_the_best_not_the_last():
    # a too-large step overshoots the target brightness, so later iterates get worse
    class Target:
        name, differentiable = "target", True

        def __call__(self, images, prompts, metadata=None):
            return -(images.mean((1, 2, 3)) - 0.6) ** 2, {}

    noise0 = torch.zeros(2, 3, 4, 4)
    opt = OptimConfig(iterations=6, lr=40.0, momentum=0.9, grad_clip=1.0, reg_weight=0.0)
    results = optimize_noise(pixel_generator, None, reward_terms(Target()), ["a", "b"], noise0, opt)
    for r in results:
        totals = [h["reward_total"] for h in r.history]
        assert r.best_iteration == max(range(len(totals)), key=lambda i: (totals[i], -i))
        assert r.best_iteration != len(totals) - 1 and totals[-1] < r.best_reward
        assert r.best_reward == totals[r.best_iteration]
        torch.testing.assert_close(pixel_generator(r.best_noise[None], None)[0], r.best_image)
        torch.testing.assert_close(r.initial_image, torch.full((3, 4, 4), 0.5))


def test_non_differentiable_rewards_are_refused(pocket):
    with pytest.raises(ValueError, match=r"differentiable rewards; \['pocket_gold'\] is not"):
        reno(pocket, build_reward("pocket_gold"), "two red circles", iterations=2, gen=POCKET_GEN)
    with pytest.raises(ValueError, match="unknown option"):
        reno(pocket, RedMean(), "two red circles", iterations=2, learning_rate=3)
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        reno(pocket, RedMean(), "  ", iterations=2)


# ------------------------------------------------------------------ the pocket model


def test_reno_raises_pocket_clip_on_the_pocket_model(pocket, pocket_clip):
    results = reno_batch(pocket, pocket_clip, POCKET_PROMPTS, gen=POCKET_GEN, iterations=6, lr=5.0, seed=3)
    for r in results:
        assert r.generator_calls == 6 and len(r.history) == 6
        assert r.best_reward > r.initial_reward
        assert r.best_image.shape == (3, 32, 32) and r.best_noise.shape == (4, 8, 8)
        assert {"rewards", "reward_total", "loss", "reg", "noise_norm", "grad_norm"} <= set(r.history[0])
    last = sum(r.history[-1]["reward_total"] for r in results) / 3
    first = sum(r.initial_reward for r in results) / 3
    assert last > first + 0.5, (first, last)


def test_reno_is_deterministic_and_batching_keeps_each_sample(pocket, pocket_clip):
    kw = dict(gen=POCKET_GEN, iterations=3, seed=7)
    a = reno_batch(pocket, pocket_clip, POCKET_PROMPTS[:2], **kw)
    b = reno_batch(pocket, pocket_clip, POCKET_PROMPTS[:2], **kw)
    for x, y in zip(a, b):
        assert [h["reward_total"] for h in x.history] == [h["reward_total"] for h in y.history]
        assert torch.equal(x.best_image, y.best_image)
    # the second prompt alone (its noise index is 1) follows the same trajectory as in the batch
    alone = reno_batch(pocket, pocket_clip, POCKET_PROMPTS[1:2], offset=1, **kw)[0]
    torch.testing.assert_close(alone.initial_noise, a[1].initial_noise)
    for h_alone, h_batch in zip(alone.history, a[1].history):
        assert abs(h_alone["reward_total"] - h_batch["reward_total"]) < 1e-3


def test_best_of_n_and_carinox_spend_their_calls(pocket, pocket_clip):
    rewards = MultiReward([(pocket_clip, 1.0), (RedMean(), 2.0)])
    bon = best_of_n_batch(pocket, rewards, POCKET_PROMPTS[:2], num=4, gen=POCKET_GEN, seed=5)
    start = reno_batch(pocket, rewards, POCKET_PROMPTS[:2], gen=POCKET_GEN, iterations=1, seed=5)
    for r, s in zip(bon, start):
        totals = [h["reward_total"] for h in r.history]
        assert r.generator_calls == 4 and r.best_reward == max(totals)
        assert set(r.history[0]["rewards"]) == {"pocket_clip", "red"}
        torch.testing.assert_close(r.initial_image, s.initial_image)  # candidate 0 = ReNO's start
    res = carinox(pocket, rewards, POCKET_PROMPTS[0], num_seeds=3, gen=POCKET_GEN, iterations=3, seed=5)
    assert res.generator_calls == 6 and len(res.history) == 6
    assert res.best_reward >= max(h["reward_total"] for h in res.history[:3])
    assert res.best_reward == max(h["reward_total"] for h in res.history)
    each = carinox(pocket, rewards, POCKET_PROMPTS[0], num_seeds=2, gen=POCKET_GEN, iterations=2, seed=5,
                   optimize="each")
    assert each.generator_calls == 4 and len(each.history) == 4


@pytest.mark.parametrize("optimize, calls", [("best", 3 + 2), ("each", 2 * 3)])
def test_carinox_reports_every_call_per_prompt_numbered_as_its_history(pocket, pocket_clip, optimize, calls):
    """on_iteration sees both phases, B rows per call, numbered like Result.history; the image it saw at
    the best call is the best image (the CLI saves every iterate through it)."""
    from flowalign.noise_opt import carinox_batch

    seen = {}

    def record(it, images, records):
        assert it not in seen and images.shape[0] == 2 and len(records) == 2
        seen[it] = (images.clone(), [r["reward_total"] for r in records])

    k, iters = (3, 2) if optimize == "best" else (2, 3)
    res = carinox_batch(pocket, pocket_clip, POCKET_PROMPTS[:2], num_seeds=k, gen=POCKET_GEN, iterations=iters,
                        seed=5, optimize=optimize, on_iteration=record)
    assert sorted(seen) == list(range(calls))
    for b, r in enumerate(res):
        assert [h["iteration"] for h in sorted(r.history, key=lambda h: h["iteration"])] == list(range(calls))
        for h in r.history:
            assert seen[h["iteration"]][1][b] == pytest.approx(h["reward_total"])
        torch.testing.assert_close(seen[r.best_iteration][0][b], r.best_image)


# ------------------------------------------------------------------ other generator families


@pytest.mark.parametrize("kind, gen", [
    ("sd_turbo", GenerationConfig(num_steps=1, guidance_scale=0.0)),
    ("sdxl_turbo", GenerationConfig(num_steps=1, guidance_scale=0.0)),
    ("flux_schnell", GenerationConfig(num_steps=2, guidance_scale=0.0, checkpoint=True, reward_checkpoint=True)),
])
def test_reno_runs_on_tiny_turbo_and_flux_models(kind, gen, pocket_clip):
    family = {"flux_schnell": "flux"}.get(kind, kind)
    policy = policy_class(family).from_pretrained(tiny_pipeline_dir(kind), device="cpu", train_mode="none")
    assert not any(p.requires_grad for p in policy.denoiser.parameters())
    r = reno(policy, pocket_clip, "a red cat", gen=gen, iterations=4, lr=5.0, seed=0)
    assert r.best_image.shape == (3, 32, 32) and r.best_reward > r.initial_reward
    assert all(p.grad is None for p in policy.denoiser.parameters())
    mc = carinox(policy, pocket_clip, "a red cat", num_seeds=2, gen=gen, iterations=2, seed=0)
    assert mc.generator_calls == 4


def test_turbo_refuses_multi_step_generation():
    policy = policy_class("sd_turbo").from_pretrained(tiny_pipeline_dir("sd_turbo"), device="cpu", train_mode="none")
    with pytest.raises(ValueError, match="one-step generator; set num_steps=1"):
        reno(policy, RedMean(), "a cat", iterations=1, num_steps=4)


def test_sample_noise_matches_the_pocket_rule(pocket):
    from flowalign.pocket.sample import initial_noise

    torch.testing.assert_close(sample_noise((4, 8, 8), 3, range(2, 5)), initial_noise(pocket, 3, 3, offset=2))


# ------------------------------------------------------------------ shifted views


class CornerMean:
    """Differentiable, position-sensitive: the mean of the top-left 4x4 pixels (all channels)."""

    name, differentiable = "corner", True

    def __call__(self, images, prompts, metadata=None):
        return images[:, :, :4, :4].mean((1, 2, 3)), {}


def test_shifted_views_average_the_reward_over_the_drawn_shifts():
    from flowalign.rewards import ShiftedViews

    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 16, 16, generator=g, requires_grad=True)
    wrapped = ShiftedViews(CornerMean(), views=5, max_shift=2, seed=4)
    shifts = ShiftedViews(CornerMean(), views=5, max_shift=2, seed=4).shifts()  # the same draw
    scores, info = wrapped(images, ["p"] * 3)
    assert info["views"] == shifts and shifts[0] == (0, 0) and all(abs(v) <= 2 for s in shifts for v in s)
    assert len(set(shifts)) > 1
    # by hand: shift the image content by (dx, dy) with edges replicated, then score
    padded = torch.nn.functional.pad(images.detach(), (2, 2, 2, 2), mode="replicate")
    expect = torch.stack([padded[:, :, 2 + dy:2 + dy + 4, 2 + dx:2 + dx + 4].mean((1, 2, 3)) for dx, dy in shifts])
    torch.testing.assert_close(scores.detach(), expect.mean(0))
    scores.sum().backward()  # gradients reach the pixels
    assert images.grad is not None and images.grad.abs().sum() > 0
    # one view is the reward itself; a uniform image scores the same in every view
    one = ShiftedViews(CornerMean(), views=1)(images.detach(), ["p"] * 3)[0]
    torch.testing.assert_close(one, CornerMean()(images.detach(), ["p"] * 3)[0])
    flat = torch.full((2, 3, 16, 16), 0.3)
    torch.testing.assert_close(wrapped(flat, ["p"] * 2)[0], torch.full((2,), 0.3))
    with pytest.raises(ValueError, match="views must be >= 1"):
        ShiftedViews(CornerMean(), views=0)


def test_reward_views_keep_searches_deterministic_and_shared_by_best_of_n(pocket, pocket_clip):
    kw = dict(gen=POCKET_GEN, iterations=3, seed=7, reward_views=3, view_shift=2)
    a = reno_batch(pocket, pocket_clip, POCKET_PROMPTS[:2], **kw)
    b = reno_batch(pocket, pocket_clip, POCKET_PROMPTS[:2], **kw)
    plain = reno_batch(pocket, pocket_clip, POCKET_PROMPTS[:2], gen=POCKET_GEN, iterations=3, seed=7)
    for x, y, z in zip(a, b, plain):
        assert [h["reward_total"] for h in x.history] == [h["reward_total"] for h in y.history]
        assert x.history[0]["reward_total"] != z.history[0]["reward_total"]  # scored over views, not one image
    bon = best_of_n_batch(pocket, pocket_clip, POCKET_PROMPTS[:2], num=1, gen=POCKET_GEN, seed=7,
                          reward_views=3, view_shift=2)
    for x, r in zip(a, bon):  # candidate 0 = ReNO's start, scored with the same first views
        assert abs(x.history[0]["reward_total"] - r.history[0]["reward_total"]) < 1e-4
    with pytest.raises(ValueError, match="unknown option"):
        best_of_n_batch(pocket, pocket_clip, POCKET_PROMPTS[:1], num=1, gen=POCKET_GEN, reward_view=3)
    with pytest.raises(ValueError, match=r"no optimizer options \(lr\)"):
        best_of_n_batch(pocket, pocket_clip, POCKET_PROMPTS[:1], num=1, gen=POCKET_GEN, lr=0.1)
