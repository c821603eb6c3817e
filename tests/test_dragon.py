"""DRAGON (Bai et al. 2025): the velocity-space Diffusion-DPO/KTO surrogates against hand-computed values
and on a tiny flow model, and the demonstration sets on known cases."""

import math

import pytest
import torch

from flowalign.grpo.dragon import (
    diffusion_dpo_loss, diffusion_kto_loss, distributional_pairs, flow_noising, paired_demonstrations,
    unpaired_demonstrations, velocity_errors,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_flow_noising_follows_the_flow_convention():
    x0, eps = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, -1.0]])
    x_t, u = flow_noising(x0, torch.tensor([0.25]), eps)
    torch.testing.assert_close(x_t, torch.tensor([[1.5, 1.25]]))  # 0.75·x0 + 0.25·ε
    torch.testing.assert_close(u, torch.tensor([[2.0, -3.0]]))  # ε − x0
    x_1, _ = flow_noising(x0, torch.tensor(1.0), eps)
    torch.testing.assert_close(x_1, eps)  # σ = 1 is pure noise


def test_dpo_loss_by_hand():
    # errors (element means): policy⁺ .5, ref⁺ 0, policy⁻ 2, ref⁻ .5 → z = −1·[(.5 − 0) − (2 − .5)] = 1
    zero = torch.zeros(1, 2)
    loss, info = diffusion_dpo_loss(torch.tensor([[1.0, 0.0]]), zero, zero,
                                    torch.tensor([[0.0, 2.0]]), torch.tensor([[0.0, 1.0]]), zero, beta=1.0)
    torch.testing.assert_close(loss, torch.tensor([math.log1p(math.exp(-1.0))]))  # −log σ(1)
    torch.testing.assert_close(info["margin"], torch.tensor([1.0]))
    # the gradient lowers the policy's error on the positive and raises it on the negative
    v_pos, v_neg = torch.tensor([[1.0, 0.0]], requires_grad=True), torch.tensor([[0.0, 2.0]], requires_grad=True)
    diffusion_dpo_loss(v_pos, zero, zero, v_neg, torch.tensor([[0.0, 1.0]]), zero, beta=1.0)[0].sum().backward()
    assert float((v_pos.grad * (v_pos.detach() - zero)).sum()) > 0  # descent moves v⁺ towards u⁺
    assert float((v_neg.grad * (v_neg.detach() - zero)).sum()) < 0  # and v⁻ away from u⁻


def test_kto_loss_by_hand():
    v = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # error .5 against target 0; reference error 0
    zero = torch.zeros(2, 2)
    desirable = torch.tensor([True, False])
    loss, info = diffusion_kto_loss(v, zero, zero, desirable, beta=2.0, reference_point=0.0)
    # h = −2·(.5 − 0) = −1: desirable 1 − σ(−1) = σ(1); undesirable 1 − σ(1)
    s1 = 1 / (1 + math.exp(-1.0))
    torch.testing.assert_close(loss, torch.tensor([s1, 1 - s1]))
    torch.testing.assert_close(info["implicit_reward"], torch.tensor([-1.0, -1.0]))
    _, batch = diffusion_kto_loss(v, zero, zero, desirable, beta=2.0)
    assert float(batch["reference_point"]) == 0.0  # max(0, mean h = −1)
    with pytest.raises(ValueError, match="reference_point"):
        diffusion_kto_loss(v, zero, zero, desirable, beta=2.0, reference_point="mean")


def _train_linear_flow(loss_kind: str, steps: int = 150):
    """A linear velocity model v = W·x_t + b on 2-D data; positives near (+2, 0), negatives near (−2, 0),
    the reference is the initial model. Returns (flow-matching error − reference error) on held-out
    positives and negatives, before and after training."""
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Linear(3, 2)  # input: x_t and σ
    torch.nn.init.zeros_(model.weight)
    torch.nn.init.zeros_(model.bias)
    ref = torch.nn.Linear(3, 2)
    ref.load_state_dict(model.state_dict())
    ref.requires_grad_(False)

    def v(m, x_t, s):
        return m(torch.cat([x_t, s[:, None]], dim=1))

    def sample(n, centre, gen):
        return torch.tensor(centre) + 0.2 * torch.randn(n, 2, generator=gen)

    held_g = torch.Generator().manual_seed(99)
    held = {}
    for k, c in (("pos", [2.0, 0.0]), ("neg", [-2.0, 0.0])):  # x0, σ, ε
        held[k] = (sample(256, c, held_g), torch.rand(256, generator=held_g) * 0.8 + 0.1,
                   torch.randn(256, 2, generator=held_g))

    def gap(kind):
        x0, s, eps = held[kind]
        x_t, u = flow_noising(x0, s, eps)
        with torch.no_grad():
            return float((velocity_errors(v(model, x_t, s), u) - velocity_errors(v(ref, x_t, s), u)).mean())

    before = (gap("pos"), gap("neg"))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(steps):
        pos, neg = sample(16, [2.0, 0.0], g), sample(16, [-2.0, 0.0], g)
        s, eps = torch.rand(16, generator=g) * 0.8 + 0.1, torch.randn(16, 2, generator=g)  # shared per pair
        (xp, up), (xn, un) = flow_noising(pos, s, eps), flow_noising(neg, s, eps)
        if loss_kind == "dpo":
            loss, _ = diffusion_dpo_loss(v(model, xp, s), v(ref, xp, s), up, v(model, xn, s), v(ref, xn, s), un,
                                         beta=2.0)
        else:
            x, u, ss = torch.cat([xp, xn]), torch.cat([up, un]), torch.cat([s, s])
            loss, _ = diffusion_kto_loss(v(model, x, ss), v(ref, x, ss), u,
                                         torch.arange(32) < 16, beta=2.0)
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
    return before, (gap("pos"), gap("neg"))


@pytest.mark.parametrize("kind", ["dpo", "kto"])
def test_contrastive_losses_pull_the_flow_to_positives_and_push_it_from_negatives(kind):
    (pos0, neg0), (pos1, neg1) = _train_linear_flow(kind)
    assert pos0 == neg0 == 0.0  # the policy starts as the reference
    assert pos1 < -0.5  # better than the reference on held-out positives
    assert neg1 > 0.5  # worse on held-out negatives


def test_paired_demonstrations_on_a_known_case():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.3, 0.7, 0.4, 0.4])
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])  # group 2 is a tie: no pair
    pos, neg = paired_demonstrations(scores, groups)
    assert pos.tolist() == [1, 5] and neg.tolist() == [0, 3]
    pos, neg = paired_demonstrations(scores, groups, pairs="all")
    assert list(zip(pos.tolist(), neg.tolist())) == [(1, 0), (2, 0), (1, 2), (5, 3), (5, 4)]
    pos, neg = paired_demonstrations(scores, groups, pairs="all", min_gap=0.45)  # only gaps above .45
    assert list(zip(pos.tolist(), neg.tolist())) == [(1, 0)]


def test_unpaired_demonstrations_on_a_known_case():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.3, 0.7])
    pos, neg = unpaired_demonstrations(scores, torch.tensor([0, 0, 0, 1, 1, 1]), fraction=1 / 3)
    assert pos.tolist() == [1, 5] and neg.tolist() == [0, 4]  # per group: top 1, bottom 1 (ties: later is lower)
    pos, neg = unpaired_demonstrations(scores, None, fraction=0.5)
    assert pos.tolist() == [1, 5, 2] and neg.tolist() == [3, 4, 0]
    pos, neg = unpaired_demonstrations(torch.ones(4), torch.zeros(4, dtype=torch.long), fraction=0.5)
    assert len(pos) == len(neg) == 0  # a flat group has no signal
    with pytest.raises(ValueError, match="fraction"):
        unpaired_demonstrations(scores, None, fraction=0.7)


def test_distributional_pairs_keep_the_generations_that_lower_fd():
    # reference N(0, I); the first generation of every prompt sits near (3, 0); the second is near the
    # origin for prompts 1 and 4 (swapping it in lowers FD) and near (9, 0) otherwise (raises FD)
    g = torch.Generator().manual_seed(0)
    wiggle = 0.5 * torch.tensor([[0.0, 1.0], [0.0, -1.0]]).repeat(3, 1) + 0.05 * torch.randn(6, 2, generator=g)
    a = torch.tensor([3.0, 0.0]) + wiggle
    b = torch.tensor([9.0, 0.0]) + wiggle.flip(0)
    b[1], b[4] = torch.tensor([0.1, 0.6]), torch.tensor([-0.1, -0.6])
    ref_mu, ref_cov = torch.zeros(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64)
    b_positive, trace = distributional_pairs(a, b, ref_mu, ref_cov)
    assert b_positive.tolist() == [False, True, False, False, True, False]
    assert trace.shape == (7,) and bool((trace[1:] <= trace[:-1]).all()) and float(trace[-1]) < float(trace[0])
    with pytest.raises(ValueError, match="two \\[P, D\\]"):
        distributional_pairs(a, b[:3], ref_mu, ref_cov)
