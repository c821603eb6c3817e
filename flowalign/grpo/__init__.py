"""GRPO fine-tuning of flow models: advantages, losses (the clipped policy gradient, and DiffusionNFT's
forward-process objective), the objectives built on them, and the trainer (``flowalign train``)."""

from .advantages import group_advantages, group_stats, multi_reward_advantages
from .losses import approx_kl, clip_fraction, mean_kl, nft_loss, nft_optimality, ppo_clip_loss, timestep_weights
from .objectives import NFT, OBJECTIVES, MicroBatch, Objective, PPOClip, RolloutBatch

__all__ = [
    "group_advantages", "group_stats", "multi_reward_advantages",
    "approx_kl", "clip_fraction", "mean_kl", "nft_loss", "nft_optimality", "ppo_clip_loss", "timestep_weights",
    "Objective", "PPOClip", "NFT", "OBJECTIVES", "MicroBatch", "RolloutBatch", "GRPOTrainer", "train",
]


def __getattr__(name):
    # the trainer imports accelerate; load it on first use
    if name in ("GRPOTrainer", "train"):
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'flowalign.grpo' has no attribute {name!r}")
