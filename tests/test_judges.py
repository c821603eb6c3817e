"""Pairwise judges and group win rates: hand-computable cases."""

from __future__ import annotations

import math

import pytest
import torch

from flowalign.rewards import FromPointwiseJudge, build_judge, build_reward, group_pairs, win_rates
from flowalign.rewards.vlm import parse_pairwise, parse_pointwise


def _gray(levels) -> torch.Tensor:
    return torch.stack([torch.full((3, 4, 4), float(v)) for v in levels])


def _brightness(images):
    return images.mean(dim=(1, 2, 3))


class BrighterJudge:
    """Prefers the brighter image: 1 or 0, and 0.5 on equal brightness."""

    name = "brighter"

    def __init__(self):
        self.calls = 0

    def prefer(self, prompts, images_a, images_b):
        self.calls += 1
        a, b = _brightness(images_a), _brightness(images_b)
        return torch.where(a > b, 1.0, torch.where(a < b, 0.0, 0.5))


class PositionBiasedJudge(BrighterJudge):
    """The brighter judge mixed with a fixed preference for the first position."""

    name = "biased"

    def prefer(self, prompts, images_a, images_b):
        return 0.75 * super().prefer(prompts, images_a, images_b) + 0.25


class Brightness:
    differentiable = True
    name = "brightness"

    def __call__(self, images, prompts, metadata=None):
        return _brightness(images), {}


def test_brighter_judge_gives_exact_rates_with_interleaved_groups():
    # Two groups of 4 interleaved in the batch: groups come from the ids, never from adjacency.
    levels = [0.1, 0.8, 0.4, 0.6, 0.2, 0.7, 0.9, 0.5]
    ids = ["g0", "g1"] * 4
    prompts = ["p0" if i == "g0" else "p1" for i in ids]
    rates, info = win_rates(BrighterJudge(), _gray(levels), prompts, group_ids=ids)
    # g0 = 0.1, 0.4, 0.2, 0.9 -> beaten by 3, 1, 2, 0 others; g1 = 0.8, 0.6, 0.7, 0.5
    expected = torch.tensor([0, 3, 2, 1, 1, 2, 3, 0]) / 3
    assert torch.allclose(rates, expected)
    assert info == {"comparisons": 12, "requests": 12, "failures": 0, "ties_from_failures": 0, "failure_rate": 0.0,
                    "groups": 2, "singletons": 0}


def test_groups_default_to_prompts_and_ids_override_them():
    levels = [0.1, 0.9, 0.2, 0.8]
    by_prompt, _ = win_rates(BrighterJudge(), _gray(levels), ["a", "b", "a", "b"])
    assert torch.allclose(by_prompt, torch.tensor([0.0, 1.0, 1.0, 0.0]))
    # Same prompts, but explicit ids make one group of four.
    one_group, info = win_rates(BrighterJudge(), _gray(levels), ["a", "b", "a", "b"], group_ids=[7, 7, 7, 7])
    assert torch.allclose(one_group, torch.tensor([0, 3, 1, 2]) / 3) and info["groups"] == 1


def test_ties_count_half_and_rates_sum_to_half_the_group():
    rates, _ = win_rates(BrighterJudge(), _gray([0.5, 0.5, 0.2]), ["p"] * 3)
    assert torch.allclose(rates, torch.tensor([0.75, 0.75, 0.0]))
    assert math.isclose(rates.sum().item(), 3 / 2)


class FlakyJudge(BrighterJudge):
    """Fails (NaN) every comparison that involves the darkest image (level 0.1)."""

    def prefer(self, prompts, images_a, images_b):
        p = super().prefer(prompts, images_a, images_b)
        dark = (_brightness(images_a) < 0.15) | (_brightness(images_b) < 0.15)
        return torch.where(dark, torch.full_like(p, float("nan")), p)


def test_failures_count_as_ties_and_are_counted():
    rates, info = win_rates(FlakyJudge(), _gray([0.1, 0.5, 0.9]), ["p"] * 3)
    # 0.1 ties both its comparisons (0.5 + 0.5); 0.5 gets 0.5 from 0.1 and loses to 0.9.
    assert torch.allclose(rates, torch.tensor([0.5, 0.25, 0.75]))
    assert info["failures"] == 2 and info["comparisons"] == 3
    assert math.isclose(info["failure_rate"], 2 / 3)


def test_both_orders_cancel_a_fixed_position_bias():
    levels = [0.3, 0.1, 0.9, 0.6]
    images, prompts = _gray(levels), ["p"] * 4
    true_rates, _ = win_rates(BrighterJudge(), images, prompts)
    one, _ = win_rates(PositionBiasedJudge(), images, prompts)
    both, info = win_rates(PositionBiasedJudge(), images, prompts, both_orders=True)
    assert info["comparisons"] == 12
    # With both orders each image's rate is 0.125 + 0.75 * its unbiased rate (hand-derived):
    # the position bias cancels and the order of the batch no longer matters.
    assert torch.allclose(both, 0.125 + 0.75 * true_rates)
    perm = torch.tensor([2, 0, 3, 1])
    both_perm, _ = win_rates(PositionBiasedJudge(), images[perm], prompts, both_orders=True)
    assert torch.allclose(both_perm, both[perm])
    # One order: earlier images are favoured, so the rates are not an affine map of the truth.
    assert not torch.allclose(one, 0.125 + 0.75 * true_rates)
    # A judge that always picks position 1 gives everyone 0.5 with both orders.

    class AlwaysFirst:
        name = "first"

        def prefer(self, prompts, a, b):
            return torch.ones(a.shape[0])

    flat, _ = win_rates(AlwaysFirst(), images, prompts, both_orders=True)
    assert torch.allclose(flat, torch.full((4,), 0.5))


def test_singletons_and_chunking():
    judge = BrighterJudge()
    rates, info = win_rates(judge, _gray([0.2, 0.7, 0.4, 0.3, 0.9]), ["a", "a", "a", "a", "alone"],
                            max_pairs_per_call=2)
    assert torch.allclose(rates, torch.tensor([0, 3, 2, 1, 1.5]) / 3)
    assert info["singletons"] == 1 and info["comparisons"] == 6 and judge.calls == 3


def test_group_pairs():
    assert group_pairs(["x", "y", "x", "x"]) == [(0, 2), (0, 3), (2, 3)]
    assert group_pairs(["x", "x"], both_orders=True) == [(0, 1), (1, 0)]


def test_judge_out_of_range_is_an_error():
    class Bad:
        name = "bad"

        def prefer(self, prompts, a, b):
            return torch.full((a.shape[0],), 1.5)

    with pytest.raises(ValueError, match="outside"):
        win_rates(Bad(), _gray([0.1, 0.2]), ["p", "p"])


def test_from_pointwise_is_bradley_terry():
    judge = FromPointwiseJudge(Brightness(), temperature=0.5)
    p = judge.prefer(["p", "p"], _gray([0.9, 0.2]), _gray([0.4, 0.2]))
    assert torch.allclose(p, torch.tensor([1 / (1 + math.exp(-1.0)), 0.5]))
    # Cold temperature -> the brighter judge's hard verdicts.
    cold = build_judge("from_pointwise", reward="test_judges:Brightness", temperature=1e-4)
    rates, _ = win_rates(cold, _gray([0.1, 0.4, 0.2, 0.9]), ["p"] * 4)
    assert torch.allclose(rates, torch.tensor([0, 2, 1, 3]) / 3, atol=1e-6)


def test_win_rate_reward_uses_group_ids_from_metadata():
    reward = build_reward("win_rate", judge="from_pointwise",
                          judge_args={"reward": "test_judges:Brightness", "temperature": 1e-4}, both_orders=True)
    assert reward.name == "win_rate" and not reward.differentiable
    images = _gray([0.1, 0.9, 0.5, 0.3])
    scores, info = reward(images, ["same"] * 4, [{"group_id": 0}, {"group_id": 1}, {"group_id": 0}, {"group_id": 1}])
    assert torch.allclose(scores, torch.tensor([0.0, 1.0, 1.0, 0.0]), atol=1e-6)
    assert info["groups"] == 2 and info["comparisons"] == 4
    scores, _ = reward(images, ["same"] * 4, None)  # no ids -> one prompt group
    assert torch.allclose(scores, torch.tensor([0, 3, 2, 1]) / 3, atol=1e-6)
    with pytest.raises(ValueError, match="group_id"):
        reward(images, ["same"] * 4, [{"group_id": 0}, {}, {}, {}])


def test_unknown_judge_suggests_nearest():
    with pytest.raises(ValueError, match="Did you mean 'from_pointwise'"):
        build_judge("from_pointwis")


@pytest.mark.parametrize("text,expected", [
    ("<think>Image 1 (9/10)...</think>\n<answer>Image 1 is better</answer>", 1.0),
    ("<think>...</think><answer> image 2 is better </answer>", 0.0),
    ("<answer>Image 2 is better</answer> then <answer>Image 1 is better</answer>", 1.0),  # the last answer
    ("Image 1 is better", None),  # no answer tag
    ("<answer>Both are good</answer>", None),
    ("<answer>Image 1 is better. Image 2 is better</answer>", None),
    ("", None),
])
def test_parse_pairwise(text, expected):
    assert parse_pairwise(text) == expected


def test_parse_pointwise():
    text = "Alignment Score (1-5): 4\nCoherence Score (1-5): 3.5\nStyle Score (1-5): 5"
    assert parse_pointwise(text, ("Alignment", "Coherence", "Style")) == pytest.approx(12.5 / 3)
    assert parse_pointwise(text, ("Alignment",)) == 4.0
    assert parse_pointwise("Alignment Score (1-5): 4", ("Alignment", "Style")) is None
    assert parse_pointwise("Alignment Score (1-5): -12.5", ("Alignment",)) == -12.5


def test_data_urls_round_trip_and_encode_each_image_once():
    from flowalign.rewards.vlm import data_urls, decode_data_url

    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(3, 6, 5, generator=g), torch.rand(3, 6, 5, generator=g)
    encoded = []

    def counting_map(fn, items):
        items = list(items)
        encoded.extend(items)
        return [fn(x) for x in items]

    urls = data_urls(torch.stack([a, b, a, a]), counting_map)
    assert len(encoded) == 2 and urls[0] == urls[2] == urls[3] != urls[1]
    assert urls[0].startswith("data:image/png;base64,")
    assert torch.equal(decode_data_url(urls[1]), (b * 255).round() / 255)
