"""PRDP and DRAGON as trainer objectives (``train.objective: prdp | dragon``): micro-batches of whole
groups, the step-by-step PRDP update against the coupled loss's gradient, a dense known reward raised on
held-out noise, the residual of PRDP's regression, the config and exemplar errors before any rollout, and
(slow) DRAGON lowering the Fréchet distance of the pocket model's images to an all-blue exemplar set."""

from pathlib import Path

import pytest
import torch

from flowalign.config import ConfigError, load_config
from flowalign.grpo import prdp
from flowalign.grpo.trainer import GRPOTrainer, _columns, _shuffled
from test_grpo_trainer import _Brightness, _held_out_brightness, load, pocket_config, tiny_sd3_config

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


def test_group_micro_batches_keep_whole_groups_and_one_column_order_per_group():
    g = torch.Generator().manual_seed(0)
    order, live = _shuffled(torch.arange(12), 16, g, per=4)  # 3 groups of 4, padded to 4 groups
    blocks = order.reshape(4, 4)
    assert all(int(b[0]) % 4 == 0 and torch.equal(b, b[0] + torch.arange(4)) for b in blocks)
    assert sorted(int(b[0]) for b in blocks[:3]) == [0, 4, 8] and live.tolist() == [True] * 12 + [False] * 4
    cols = _columns(12, 3, 2, True, g, per=4).reshape(3, 4, 2)
    assert all(torch.equal(c, c[:1].expand(4, 2)) for c in cols)  # a group's units share their columns


def test_prdp_step_by_step_update_is_the_gradient_of_the_coupled_loss(tmp_path):
    """The trainer back-propagates PRDP one recorded step at a time (surrogate weights from a no-grad pass);
    over a batch that must be the gradient of the mean over all pairs of the loss that couples every step
    of both trajectories, computed here in one graph."""
    cfg = tiny_sd3_config(tmp_path, train={"objective": "prdp", "kl_beta": 0.0, "prdp_beta": 0.5,
                                           "prdp_clip_range": 1e-3})
    trainer = GRPOTrainer(load(tmp_path, cfg), log=lambda *_: None)
    batch = trainer.rollout(0)
    trainer.score(batch)
    grad = trainer.policy_gradient(batch)
    assert grad.abs().sum() > 0

    s = trainer.cfg.sampling
    n, T = batch.log_probs.shape

    def log_probs():
        out = []
        for j in range(T):
            v = trainer.policy.velocity(batch.latents[:, j], batch.sigmas[:, j], batch.cond, s.guidance_scale)
            out.append(trainer.sde.log_prob(batch.latents[:, j], batch.next_latents[:, j], v, batch.sigmas[:, j],
                                            batch.sigmas_next[:, j]).log_prob)
        return torch.stack(out, 1)  # [n, T]

    with torch.no_grad(), trainer.policy.reference():
        ref = log_probs()
    loss, _ = prdp.prdp_loss(log_probs(), batch.log_probs, batch.rewards, prdp.prdp_pairs(batch.group_ids),
                             beta=0.5, clip_range=1e-3, ref_log_prob_NT=ref)
    direct = torch.autograd.grad(loss.mean(), trainer.params, allow_unused=True)
    direct = torch.cat([(d if d is not None else torch.zeros_like(p)).flatten() for d, p in zip(direct, trainer.params)])
    torch.testing.assert_close(grad, direct, rtol=2e-3, atol=1e-6 * float(direct.abs().max()))


def _brightness_run(tmp_path, train: dict):
    train = {"group_size": 8, "prompts_per_iteration": 4, "micro_batch_size": 8, "num_iterations": 5, "kl_beta": 0.0,
             **train}
    data = pocket_config(tmp_path, sampling={"num_steps": 8}, train=train, eval={"prompts": None})
    trainer = GRPOTrainer(load(tmp_path, data), reward=_Brightness(), log=lambda *a: None)
    held_out = [r["prompt"] for r in trainer.prompts[-16:]]
    noise = torch.randn(16, *trainer.latent_shape, generator=torch.Generator().manual_seed(5))
    before = _held_out_brightness(trainer, held_out, noise)
    rows = [trainer.train_iteration(it) for it in range(train["num_iterations"])]
    return before, _held_out_brightness(trainer, held_out, noise), rows


def test_prdp_raises_a_known_reward_on_held_out_noise(tmp_path):
    """PRDP through the whole loop on brightness (as the GRPO/NFT test in test_grpo_trainer.py). Measured on
    the misaligned pocket base (shipped 2026-11-30; mostly dark images: brightness ≈ 0.065, so reward
    differences are small and the regression target Δr/β needs a small β), 5 iterations of 32 images, ε = 1e-2:
    β = 0.5 at lr 3e-3 +23.7% held-out brightness; at lr 1e-3 +5.0% (+16.7% after 8 iterations); β = 0.25 at
    lr 1e-3 +8.9%. (The from-scratch base before it: β = 0.5 at lr 1e-3 +23%, β = 2 +0.0%, no clip +0.0%; the
    first world, with brighter images: β = 2 +8.6%; β = 10 at lr 3e-3 darker.) On each iteration's fresh samples the correlation of the
    predicted with the observed reward differences rose 0 → 0.03 → 0.08 over iterations 1–4 while the
    relative residual stayed ≈ 1.1–1.8 (the log-ratios' spread grows faster than what they explain): at
    this budget PRDP is far from its optimum on unseen samples; the fit to a batch is the next test."""
    before, after, rows = _brightness_run(tmp_path, {"objective": "prdp", "lr": 3e-3, "prdp_beta": 0.5,
                                                     "prdp_clip_range": 1e-2})
    assert after > 1.05 * before, (before, after, [r["reward/total/mean"] for r in rows])
    # the policy starts at the reference (LoRA B = 0): it predicts no difference, relative residual exactly 1
    assert rows[0]["train/prdp_relative_residual_before"] == pytest.approx(1.0, abs=1e-6)
    assert all(r["train/optimizer_steps"] > 0 and "train/ratio_mean" not in r for r in rows)


def _scored_batch(tmp_path, train: dict, reward, num_steps: int):
    """A pocket trainer with ``train`` settings and ``reward``, and its first rollout, scored."""
    data = pocket_config(tmp_path, sampling={"num_steps": num_steps}, train=train, eval={"prompts": None})
    trainer = GRPOTrainer(load(tmp_path, data), reward=reward, log=lambda *a: None)
    batch = trainer.rollout(0)
    trainer.score(batch)
    return trainer, batch


def test_prdp_regression_approaches_its_optimum_on_a_batch(tmp_path):
    """PRDP's stated optimum: predicted and observed reward differences agree. Updating again and again on
    one scored batch of 4 groups of 4 (the trainer's own update; each call one inner epoch of 4 optimizer steps),
    the rms of its pairs' residuals Δr̂ − Δr/β relative to their value at the sampling policy falls (measured on
    the base shipped 2026-11-30: 1.01, 3.60 (Adam's first steps overshoot), 1.16, 1.41, 0.78, 0.24, 0.35, 0.41,
    0.33, 0.18; with groups of 8, twice the cost, 0.43 after 8 and 0.17 after 12; with 4 steps instead of 8 it
    falls slower, 0.77 after 12)."""
    train = {"group_size": 4, "prompts_per_iteration": 4, "micro_batch_size": 4, "objective": "prdp", "kl_beta": 0.0,
             "lr": 1e-3, "prdp_beta": 2.0, "prdp_clip_range": 1e-2}
    trainer, batch = _scored_batch(tmp_path, train, _Brightness(), num_steps=8)
    ratios = [trainer.update(batch, 0)["train/prdp_residual_ratio"] for _ in range(10)]
    assert ratios[-1] < 0.4 and ratios[-1] < min(ratios[:5]), ratios


class _HalfFlat:
    """Brightness for the images of the batch's first prompt, 0 for every other: one group to learn from,
    the others flat (every pair's observed difference 0)."""

    name, differentiable = "half_flat", False

    def __call__(self, images, prompts, metadata=None):
        first = torch.tensor([p == prompts[0] for p in prompts], dtype=torch.float32)
        return 10 * images.float().mean(dim=(1, 2, 3)) * first, {}


def test_prdp_residual_ratio_is_left_out_where_there_is_nothing_to_predict(tmp_path):
    """A flat group at π_old = π_ref has a residual of exactly 0 at sampling; once the other group's steps
    have moved the weights, its ratio to that 0 used to read ~1e9 (8e8 in a pocket run's first iteration).
    Such micro-batches now leave the ratio out; the learnable group still reports it."""
    train = {"group_size": 4, "prompts_per_iteration": 2, "micro_batch_size": 4, "objective": "prdp", "kl_beta": 0.0,
             "lr": 1e-3, "prdp_beta": 2.0, "prdp_clip_range": 1e-2}
    trainer, batch = _scored_batch(tmp_path, train, _HalfFlat(), num_steps=4)
    assert len(set(batch.prompts)) == 2 and (batch.rewards != 0).sum() >= 2
    ratios = [trainer.update(batch, 0)["train/prdp_residual_ratio"] for _ in range(3)]
    assert all(0 < r < 10 for r in ratios), ratios


@pytest.mark.parametrize("loss, lr, gain", [
    # measured on the rebuilt pocket base (dark images, brightness ≈ 0.06), 5 iterations of 32 images, β = 1000:
    # dpo (the best/worst pair of each group) ×2.8 at lr 3e-3 (+4% at lr 1e-3, +5% with β = 5000, +18% after 8
    # iterations); kto (top/bottom quarter of each group) passes at lr 1e-3. First world: +20% / +17% at lr 1e-3.
    ("dpo", 3e-3, 1.10),
    ("kto", 1e-3, 1.08),
])
def test_dragon_raises_a_known_reward_on_held_out_noise(tmp_path, loss, lr, gain):
    before, after, rows = _brightness_run(tmp_path, {"objective": "dragon", "dragon_loss": loss, "lr": lr})
    assert after > gain * before, (before, after, [r["reward/total/mean"] for r in rows])
    assert all(r["train/dragon_positives"] == r["train/dragon_negatives"] > 0 for r in rows)


# ------------------------------------------------------------------ bad input, before any rollout
@pytest.mark.parametrize("overrides, message", [
    (["train.objective=prdpp"], "did you mean 'prdp'.*choose one of: grpo, nft, prdp, dragon"),
    (["train.objective=prdp", "train.kl_beta=0", "train.group_size=1"], "train.group_size' must be >= 2"),
    (["train.objective=prdp", "train.kl_beta=0", "train.micro_batch_size=24"],
     "whole prompt groups per micro-batch: train.micro_batch_size=24 must be a multiple of train.group_size=16"),
    (["train.objective=dragon", "train.kl_beta=0", "sampling.plan=branching", "sampling.branch_steps=[0,1]"],
     "TempFlow branching units are single steps"),
    (["train.objective=dragon", "train.kl_beta=0.04"], "set train.kl_beta=0"),
    (["train.objective=dragon", "train.kl_beta=0", "model.train_mode=full"], "frozen reference"),
    (["train.objective=dragon", "train.kl_beta=0", "train.kto_reference_point=mean"], "'batch' or a number"),
    (["train.objective=dragon", "train.kl_beta=0", "train.dragon_fraction=0.7"], "dragon_fraction' must be <= 0.5"),
])
def test_bad_objective_configs_are_refused_at_load(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ROOT / "configs/pocket/flow_grpo.yaml", overrides)


def test_bad_exemplar_sets_fail_when_the_trainer_is_built(tmp_path, tiny_clip_dir):
    from flowalign.rewards.distributional import save_exemplar_features

    enc = {"encoder": "clip", "encoder_args": {"path": tiny_clip_dir, "device": "cpu"}}
    (tmp_path / "empty").mkdir()
    save_exemplar_features(tmp_path / "wide.safetensors", torch.randn(4, 7), f"clip:{tiny_clip_dir}")
    save_exemplar_features(tmp_path / "other.safetensors", torch.randn(4, 32), "open_clip:ViT-H-14:laion2b_s32b_b79k")
    cases = [({"exemplar_images": str(tmp_path / "missing")}, "does not exist"),
             ({"exemplar_images": str(tmp_path / "empty")}, "holds no images"),
             ({"exemplar_features": str(tmp_path / "wide.safetensors")}, "gives 32-dimensional features"),
             ({"exemplar_features": str(tmp_path / "other.safetensors")}, "made with encoder 'open_clip:ViT-H-14")]
    for args, message in cases:
        cfg = tiny_sd3_config(tmp_path, train={"objective": "dragon", "kl_beta": 0.0},
                              rewards=[{"name": "exemplar_fd", "args": {**enc, **args}}])
        with pytest.raises(ValueError, match=message):
            GRPOTrainer(load(tmp_path, cfg), log=lambda *_: None)  # the rewards are built before any rollout


# ------------------------------------------------------------------ DRAGON with a distributional reward
@pytest.mark.slow
def test_dragon_lowers_the_fd_to_blue_exemplars(tmp_path):
    """The pocket model trained by DRAGON (dpo, β = 100) on ``exemplar_fd``: pocket CLIP features of 48
    renders where every object is blue. On ODE samples from held-out prompts and noise, the Fréchet distance
    to the exemplars falls and more of the detected objects are blue; the strict gold accuracy of the same
    samples (the prompts' counts, shapes, colors and positions, which this reward ignores) is reported.
    Measured (8 iterations of 32 images, one contended core, ~90 s): FD 0.567 → 0.472, blue objects
    19.5% → 30.3%, gold strict 0.646 → 0.333 (the reward pulls every image towards the exemplars, whatever
    its prompt asks for); with β = 1000 the FD fell only to 0.545 in the same budget."""
    from flowalign.pocket.assets import CLIP_DIR
    from flowalign.pocket.evaluate import PocketGold, detect_objects
    from flowalign.pocket.render import render_batch, to_pil
    from flowalign.rewards import build_reward

    if not (CLIP_DIR / "config.json").exists():
        pytest.skip("this install has no shipped pocket CLIP")
    shapes = ["circle", "square", "triangle"]
    blue = [f"{n} blue {s}{'s' if n != 'a' else ''}" for n in ("a", "two", "three") for s in shapes]
    folder = tmp_path / "blue"
    folder.mkdir()
    images, _ = render_batch((blue * 6)[:48], seed=7)
    for i, im in enumerate(images):
        to_pil(im).save(folder / f"{i:03d}.png")
    args = {"encoder": "pocket_clip", "exemplar_images": str(folder)}
    train = {"group_size": 8, "prompts_per_iteration": 4, "micro_batch_size": 8, "num_iterations": 8,
             "objective": "dragon", "dragon_beta": 100.0, "kl_beta": 0.0, "lr": 1e-3}
    data = pocket_config(tmp_path, sampling={"num_steps": 8}, train=train, eval={"prompts": None},
                         rewards=[{"name": "exemplar_fd", "args": args}])
    trainer = GRPOTrainer(load(tmp_path, data), log=lambda *a: None)
    fd_reward = build_reward("exemplar_fd", **args)
    gold = PocketGold("strict")
    held_out = [r["prompt"] for r in trainer.prompts[-48:]]
    noise = torch.randn(48, *trainer.latent_shape, generator=torch.Generator().manual_seed(5))

    def measure():
        with trainer.local_denoiser() as policy, torch.no_grad():
            x = policy.generate(noise, policy.encode(held_out), num_steps=8, guidance_scale=1.5, checkpoint=False)
        objects = [o for row in detect_objects(x) for o in row]
        blue_frac = sum(o.color == "blue" for o in objects) / max(1, len(objects))
        return fd_reward.fd(fd_reward.features(x)), blue_frac, float(gold(x, held_out)[0].mean())

    fd_before, blue_before, gold_before = measure()
    for it in range(train["num_iterations"]):
        trainer.train_iteration(it)
    fd_after, blue_after, gold_after = measure()
    print(f"FD to blue exemplars {fd_before:.4f} -> {fd_after:.4f}; blue objects {blue_before:.3f} -> {blue_after:.3f}; "
          f"held-out strict gold {gold_before:.3f} -> {gold_after:.3f}")
    assert fd_after < 0.9 * fd_before, (fd_before, fd_after)
    assert blue_after > blue_before + 0.05, (blue_before, blue_after)
