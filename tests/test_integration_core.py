"""Config → policy → sampling core → rewards, wired together the way the trainer will use them."""

import functools

import torch

from flowalign.config import load_config
from flowalign.models import load_policy
from flowalign.models.testing import tiny_pipeline_dir
from flowalign.rewards import build_rewards
from flowalign.sampling import group_noise, plan_from_config, rollout, transition_log_prob


def test_config_to_rollout_to_reward_and_ratio():
    path = tiny_pipeline_dir("sd3_no_t5")
    cfg = load_config(None, [
        f"model.path={path}", "model.family=sd3", "model.dtype=float32", "model.device=cpu", "model.lora_rank=4",
        "model.lora_alpha=8", "sampling.num_steps=4", "sampling.plan=window", "sampling.window_size=2",
        "sampling.window_start=1", "sampling.guidance_scale=3.0", "sampling.height=32", "sampling.width=32",
        "train.group_size=3", "train.prompts_per_iteration=2", "train.micro_batch_size=2",
        "train.mixed_precision=fp32",
    ])
    policy = load_policy(cfg.model)
    s = cfg.sampling
    prompts = ["a red cat", "a blue dog"]
    cond = policy.encode(prompts).repeat_interleave(cfg.train.group_size)
    C, h, w = policy.latent_shape(s.height, s.width)
    g = torch.Generator().manual_seed(0)
    noise = group_noise(len(prompts), cfg.train.group_size, (C, h, w), shared=True, generator=g)
    sigmas = policy.sigmas(s.num_steps, s.height, s.width)
    vel = functools.partial(policy.velocity, cond=cond, guidance_scale=s.guidance_scale)
    traj = rollout(lambda x, sig: vel(x, sig), noise, sigmas, plan_from_config(s), kind=s.sde_kind,
                   noise_level=s.noise_level, generator=g)
    assert traj.log_probs.shape == (6, 2) and traj.step_indices.tolist() == [1, 2]
    # shared noise: members of a group differ only through the SDE steps
    assert not torch.allclose(traj.final[0], traj.final[1])
    images = policy.decode(traj.final)
    assert images.shape == (6, 3, s.height, s.width) and 0 <= float(images.min()) <= float(images.max()) <= 1
    scores, info = build_rewards(cfg.rewards)(images, [p for p in prompts for _ in range(3)])
    assert scores.shape == (6,) and torch.isfinite(scores).all()
    # recomputing the recorded transitions with the policy gives ratio 1, and gradients reach the LoRA
    j = 0
    x, x_next = traj.latents[:, j], traj.next_latents[:, j]
    v = policy.velocity(x, traj.sigmas[j].expand(6), cond, s.guidance_scale)
    res = transition_log_prob(s.sde_kind, x, x_next, v, traj.sigmas[j], traj.sigmas_next[j], s.noise_level)
    torch.testing.assert_close(res.log_prob, traj.log_probs[:, j], rtol=0, atol=1e-5)
    res.log_prob.mean().backward()
    grads = [p.grad for p in policy.trainable_parameters() if p.grad is not None]
    assert grads and any(float(gr.abs().sum()) > 0 for gr in grads)
