"""Training of Cola models: objectives (:mod:`.losses`) and the accelerate trainer (:mod:`.trainer`)."""

from .losses import (
    FlowMatchingConfig,
    JointLossConfig,
    VAELossConfig,
    estimate_latent_stats,
    flow_matching_loss,
    joint_loss,
    store_latent_stats,
    two_l_mask,
    vae_loss,
)

__all__ = [
    "FlowMatchingConfig", "JointLossConfig", "VAELossConfig", "estimate_latent_stats", "flow_matching_loss",
    "joint_loss", "store_latent_stats", "two_l_mask", "vae_loss",
]
