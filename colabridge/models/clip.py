"""An open_clip CLIP as a diffusers model: ``ColaClipEmbedder`` (+ its caption tokenizer).

open_clip models are not diffusers components (they are missing from ``LOADABLE_CLASSES`` and would be
saved as ``[null, null]``), so the CLIP is wrapped in a ``ModelMixin`` + ``ConfigMixin`` whose config holds
open_clip's own ``model_cfg`` (``embed_dim``, ``vision_cfg``, ``text_cfg``) and whose weights are the
open_clip state dict under ``model.`` in ``diffusion_pytorch_model.safetensors``. The module inside is a
plain ``open_clip.CLIP``; training uses ``open_clip.ClipLoss``.

The text tower reads ids of a Hugging Face tokenizer through open_clip's ``HFTokenizer`` (no network: a
local folder) and pools at the eos token (``text_cfg["pool_type"] = "eos"``), so a small caption
vocabulary keeps the token table small; :class:`ClipCaptionTokenizer` appends that eos.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from ..data.images import pixel_batch

TOKENIZER_FOLDER = "tokenizer"
# open_clip's default image statistics (OPENAI_DATASET_MEAN / _STD), kept in the config so a model
# trained with other statistics states them
DEFAULT_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
DEFAULT_IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


class ColaClipEmbedder(ModelMixin, ConfigMixin):
    r"""An ``open_clip.CLIP`` (image + text towers) with diffusers saving/loading.

    Args:
        embed_dim: joint embedding width ``D``.
        vision_cfg, text_cfg: open_clip's ``CLIPVisionCfg`` / ``CLIPTextCfg`` fields as dicts.
        image_mean, image_std: per-channel statistics of :meth:`preprocess` (pixels in [0, 1]).
    """

    config_name = "config.json"

    @register_to_config
    def __init__(self, embed_dim: int, vision_cfg: dict, text_cfg: dict,
                 image_mean: tuple = DEFAULT_IMAGE_MEAN, image_std: tuple = DEFAULT_IMAGE_STD):
        super().__init__()
        import open_clip

        if len(image_mean) != 3 or len(image_std) != 3:
            raise ValueError(f"image_mean and image_std need 3 values (RGB), got {image_mean} and {image_std}.")
        self.model = open_clip.CLIP(embed_dim=embed_dim, vision_cfg=dict(vision_cfg), text_cfg=dict(text_cfg))
        self.register_buffer("pixel_mean", torch.tensor(image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(image_std).view(1, 3, 1, 1), persistent=False)

    @property
    def image_size(self) -> int:
        size = self.config.vision_cfg["image_size"]
        return int(size[0] if isinstance(size, (list, tuple)) else size)

    @property
    def embed_dim(self) -> int:
        return int(self.config.embed_dim)

    @property
    def context_length(self) -> int:
        return int(self.config.text_cfg["context_length"])

    def preprocess(self, images) -> torch.Tensor:
        """PIL RGB image(s), ``(H, W, 3)``/``(B, H, W, 3)`` uint8 arrays, or ``(B, 3, S, S)`` float tensors in
        [0, 1] → normalised pixels ``(B, 3, S, S)``. The size must be the model's (no silent resize)."""
        items = list(images) if isinstance(images, (list, tuple)) else [images]
        if not items:
            raise ValueError("`images` is empty; pass at least one image.")
        pixels = torch.cat([self._to_unit_pixels(im) for im in items]).to(self.device, self.dtype)
        return (pixels - self.pixel_mean.to(pixels)) / self.pixel_std.to(pixels)  # (B, 3, S, S)

    def _to_unit_pixels(self, image) -> torch.Tensor:
        if isinstance(image, PIL.Image.Image):
            image = np.asarray(image.convert("RGB"))
        return pixel_batch(image, self.image_size, "CLIP's image_size", low=0.0)

    def encode_image(self, pixels: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Preprocessed pixels ``(B, 3, S, S)`` → image embeddings ``(B, D)`` (unit norm if ``normalize``)."""
        return self.model.encode_image(pixels, normalize=normalize)

    def encode_text(self, input_ids: torch.LongTensor, normalize: bool = True) -> torch.Tensor:
        """Token ids ``(B, context_length)`` → text embeddings ``(B, D)`` (unit norm if ``normalize``)."""
        return self.model.encode_text(input_ids, normalize=normalize)

    def embed_images(self, images) -> torch.Tensor:
        """Any :meth:`preprocess` input → unit-norm image embeddings ``(B, D)``."""
        return self.encode_image(self.preprocess(images))

    def forward(self, pixels: torch.Tensor, input_ids: torch.LongTensor):
        """open_clip's forward: ``(image_features (B, D), text_features (B, D), logit_scale)``, normalised."""
        return self.model(pixels, input_ids)


class ClipCaptionTokenizer:
    """open_clip's ``HFTokenizer`` over a local Hugging Face tokenizer folder, appending the eos the text
    tower pools at (``text_cfg["eos_id"]``)."""

    def __init__(self, folder: str | os.PathLike, context_length: int):
        from open_clip.tokenizer import HFTokenizer

        self.inner = HFTokenizer(str(folder), context_length=context_length)
        hf = self.inner.tokenizer
        if hf.eos_token is None or hf.pad_token_id is None:
            raise ValueError(f"{folder}: the CLIP tokenizer needs an eos and a pad token.")
        self.eos_token_id, self.pad_token_id, self.vocab_size = hf.eos_token_id, hf.pad_token_id, len(hf)
        self.context_length = context_length

    def __call__(self, texts: str | list[str]) -> torch.LongTensor:
        """Texts → ids ``(B, context_length)``: tokens + eos, padded; over-long texts keep their eos."""
        items = [texts] if isinstance(texts, str) else list(texts)
        ids = self.inner([t + self.inner.tokenizer.eos_token for t in items])  # (B, L)
        ids[:, -1] = torch.where(ids[:, -1] == self.pad_token_id, ids[:, -1], self.eos_token_id)
        return ids

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        self.inner.save_pretrained(str(folder))


def load_clip(folder: str | os.PathLike) -> tuple[ColaClipEmbedder, ClipCaptionTokenizer]:
    """A saved CLIP folder (``config.json`` + weights + ``tokenizer/``) → ``(embedder, tokenizer)``, eval mode."""
    folder = Path(folder)
    if not (folder / ColaClipEmbedder.config_name).is_file():
        raise FileNotFoundError(f"{folder}: missing {ColaClipEmbedder.config_name} (not a ColaClipEmbedder folder).")
    embedder = ColaClipEmbedder.from_pretrained(folder).eval()
    return embedder, ClipCaptionTokenizer(folder / TOKENIZER_FOLDER, embedder.context_length)


def contrastive_logits(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """Cosine similarities ``(B_text, B_image)`` of text rows against image columns."""
    return F.normalize(text_embeds, dim=-1) @ F.normalize(image_embeds, dim=-1).T


__all__ = ["ClipCaptionTokenizer", "ColaClipEmbedder", "contrastive_logits", "load_clip"]
