"""Image inputs → pixel batches, shared by the pipelines and the CLIP tower (no silent resize)."""

from __future__ import annotations

import numpy as np
import torch

UINT8_MAX = 255


def pixel_batch(image, size: int, owner: str, low: float) -> torch.Tensor:
    """A uint8 array ``(H, W, 3)`` / ``(B, H, W, 3)`` or a tensor ``(3, S, S)`` / ``(B, 3, S, S)`` → float
    ``(B, 3, S, S)``. Arrays are mapped from [0, 255] to [``low``, 1]; tensors are taken as given.
    ``owner`` names whose ``size`` the images must have (in the error)."""
    if isinstance(image, np.ndarray):
        array = image[None] if image.ndim == 3 else image
        if array.ndim != 4 or array.shape[-1] != 3 or array.dtype != np.uint8:
            raise ValueError(f"array images must be uint8 (H, W, 3) or (B, H, W, 3) RGB in [0, 255], "
                             f"got {image.dtype} {image.shape}.")
        image = torch.from_numpy(array.copy()).permute(0, 3, 1, 2).float() / (UINT8_MAX / (1 - low)) + low
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"images must be PIL images, uint8 arrays or tensors, got {type(image).__name__}.")
    pixels = image[None] if image.ndim == 3 else image
    if pixels.ndim != 4 or pixels.shape[1] != 3 or tuple(pixels.shape[2:]) != (size, size):
        raise ValueError(f"images must be {size}×{size} RGB (the {owner}), got shape {tuple(image.shape)}; "
                         f"resize to {size}×{size} first.")
    return pixels.float()
