"""Modality adapters: teach the Cola text prior other latent spaces (PEFT LoRA + per-modality projections).

* :mod:`.latent_spaces` — registry of target latent spaces (``ImageLatentSpace`` for any diffusers
  ``AutoencoderKL``): latents ↔ DiT tokens.
* :mod:`.clip_space` — ``ClipEmbeddingSpace`` (kind ``"open_clip"``): an open_clip image embedding as one
  block of DiT tokens.
* :mod:`.image_adapter` — ``ImageAdapter``: the in/out projections and modality embedding.
* :mod:`.multimodal` — ``MultimodalPrior``: the DiT trunk with per-token routing of projections.
* :mod:`.losses` — flow matching for text → image and image → text sequences.
* :mod:`.saving` — add / save / load adapters (PEFT files + projections).
"""

from .clip_space import ClipEmbeddingSpace
from .image_adapter import ImageAdapter
from .latent_spaces import LATENT_SPACES, ImageLatentSpace, latent_space_from_config, register_latent_space
from .losses import DIRECTIONS, flow_matching_loss_image, text_to_image_errors
from .multimodal import TEXT, ModalityView, MultimodalPrior, pad_tokens
from .saving import add_image_adapter, fuse_image_adapter, load_image_adapter, save_image_adapter

__all__ = [
    "ClipEmbeddingSpace", "DIRECTIONS", "ImageAdapter", "ImageLatentSpace", "LATENT_SPACES", "ModalityView", "MultimodalPrior", "TEXT",
    "add_image_adapter", "flow_matching_loss_image", "fuse_image_adapter", "latent_space_from_config", "load_image_adapter", "pad_tokens",
    "register_latent_space", "save_image_adapter", "text_to_image_errors",
]
