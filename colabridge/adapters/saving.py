"""Image adapters on a Cola DiT: add, save and load (PEFT folder + projection weights).

An adapter folder holds the LoRA of the trunk in the PEFT format (``adapter_config.json`` +
``adapter_model.safetensors``, see :mod:`colabridge.training.lora`) and the modality projections as
a diffusers model folder ``projections/`` (``config.json`` with the latent space +
``diffusion_pytorch_model.safetensors``).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..training.lora import add_lora, load_adapter, lora_config, save_adapter
from .image_adapter import ImageAdapter

PROJECTIONS = "projections"
DEFAULT_ADAPTER = "image"


def add_image_adapter(transformer, space, r: int = 8, alpha: float | None = None,
                      adapter_name: str = DEFAULT_ADAPTER) -> ImageAdapter:
    """Freeze ``transformer``, inject a trainable LoRA ``adapter_name`` and return new projections for ``space``.

    Trainable afterwards: the LoRA weights (``"lora_" in name``) and every parameter of the returned adapter.
    """
    add_lora(transformer, lora_config(r=r, alpha=alpha), adapter_name=adapter_name)
    return _like(ImageAdapter(space.to_config(), transformer.config.txt_dim), transformer)


def _like(adapter: ImageAdapter, transformer) -> ImageAdapter:
    """``adapter`` on the transformer's device and dtype (cast only when they differ)."""
    adapter.to(device=transformer.device)
    return adapter if adapter.dtype == transformer.dtype else adapter.to(dtype=transformer.dtype)


def save_image_adapter(transformer, adapter: ImageAdapter, folder: str | os.PathLike,
                       adapter_name: str = DEFAULT_ADAPTER) -> Path:
    """Write the LoRA ``adapter_name`` of ``transformer`` and ``adapter``'s projections to ``folder``."""
    folder = save_adapter(transformer, folder, adapter_name)
    adapter.save_pretrained(folder / PROJECTIONS)
    return folder


def fuse_image_adapter(transformer) -> None:
    """Merge the transformer's LoRA into its base weights and remove the PEFT layers (in place).

    The fused DiT computes the same function (up to float rounding; tested) and saves as a plain
    ``ColaDiT`` folder, which is how an image pipeline ships its trunk. Not reversible.
    """
    if not getattr(transformer, "peft_config", None):
        raise ValueError("the transformer has no LoRA adapter to fuse; load one with load_image_adapter() first.")
    transformer.fuse_lora()
    transformer.unload_lora()


def load_image_adapter(transformer, folder: str | os.PathLike, adapter_name: str = DEFAULT_ADAPTER,
                       space=None) -> ImageAdapter:
    """Inject the folder's LoRA into ``transformer`` and return its projections, all frozen.

    Raises ``ValueError`` if no LoRA key matches the transformer, if the projections were made for
    another DiT width, or (when ``space`` is given) for another latent space (naming both).
    """
    folder = Path(folder)
    if not (folder / PROJECTIONS / ImageAdapter.config_name).is_file():
        raise FileNotFoundError(f"{folder}: missing {PROJECTIONS}/{ImageAdapter.config_name} (not an image adapter folder).")
    adapter = ImageAdapter.from_pretrained(folder / PROJECTIONS)
    if adapter.config.txt_dim != transformer.config.txt_dim:
        raise ValueError(f"{folder}: projections are for txt_dim={adapter.config.txt_dim}, the transformer has "
                         f"txt_dim={transformer.config.txt_dim}; the adapter was trained for another base model.")
    if space is not None:
        adapter.space.check_compatible(space)
    load_adapter(transformer, folder, adapter_name)  # frozen, like the LoRA
    return _like(adapter.requires_grad_(False), transformer)
