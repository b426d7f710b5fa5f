"""Time grids for block transport, expressed as diffusers flow-match sigmas (σ=1 noise, σ=0 data)."""

from __future__ import annotations

import numpy as np
import torch

NUM_TRAIN_TIMESTEPS = 1000  # the DiT reads τ = σ·1000 (spec §4.3)


def official_sigmas(num_inference_steps: int) -> np.ndarray:
    """The official grid ``linspace(int(T), 0, N+1)`` (float32) divided by T, without the final 0.

    diffusers' flow-match schedulers append the terminal σ=0 themselves.
    """
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}.")
    tau = torch.linspace(NUM_TRAIN_TIMESTEPS, 0, num_inference_steps + 1, dtype=torch.float32)
    return (tau[:-1] / NUM_TRAIN_TIMESTEPS).numpy()
