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
