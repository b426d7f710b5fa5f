"""The image-embedding space of an open_clip model as a target of the Cola prior (kind ``"open_clip"``).

A unit-norm CLIP image embedding ``e`` (dim ``D``) becomes ONE block of ``k`` DiT tokens of width
``D / k`` (contiguous slices of ``e``; the adapter's per-patch embedding tells the trunk which slice a
token holds). The prior sees ``(e − mean) / std`` per dimension, the standardisation of Kandinsky's
``PriorTransformer`` (``clip_mean`` / ``clip_std``); without statistics, ``std = 1/√D`` gives a unit
vector unit-variance entries. Decoding de-standardises and projects back onto the unit sphere.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .latent_spaces import register_latent_space

CLIP_MODALITY = "image_embeds"  # the adapter's modality name in a MultimodalPrior (training and pipeline agree)


@register_latent_space("open_clip")
@dataclass(frozen=True)
class ClipEmbeddingSpace:
    """Unit-norm CLIP image embeddings ``(B, D)`` ↔ ``k`` tokens of ``D / k``.

    Attributes:
        embed_dim: ``D`` (the CLIP's ``embed_dim``).
        num_tokens: ``k``; must divide ``D`` (and be a multiple of the DiT block size, checked by
            :class:`~colabridge.adapters.MultimodalPrior`).
        mean, std: per-dimension statistics of training embeddings (``D`` values each), or ``None`` for
            ``0`` and ``1/√D``.
    """

    embed_dim: int
    num_tokens: int
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self):
        if self.embed_dim % self.num_tokens:
            raise ValueError(f"num_tokens={self.num_tokens} must divide embed_dim={self.embed_dim}.")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None:
                if len(value) != self.embed_dim:
                    raise ValueError(f"{name} has {len(value)} values; embed_dim={self.embed_dim} needs one per dimension.")
                object.__setattr__(self, name, tuple(float(v) for v in value))  # JSON lists → tuples
        if self.std is not None and min(self.std) <= 0:
            raise ValueError("std values must be > 0.")

    @classmethod
    def from_embeddings(cls, embeds: torch.Tensor, num_tokens: int, eps: float = 1e-6) -> "ClipEmbeddingSpace":
        """A space standardised by the statistics of unit-norm training embeddings ``(N, D)``."""
        embeds = F.normalize(embeds.float(), dim=-1)
        std = embeds.std(0).clamp(min=eps)
        return cls(embeds.shape[1], num_tokens, tuple(embeds.mean(0).tolist()), tuple(std.tolist()))

    def to_config(self) -> dict:
        return {"kind": self.kind, **dataclasses.asdict(self)}

    @property
    def token_dim(self) -> int:
        return self.embed_dim // self.num_tokens

    def describe(self) -> str:
        return (f"{self.kind} image embeddings of dim {self.embed_dim} → {self.num_tokens} tokens × {self.token_dim}")

    def check_compatible(self, other) -> None:
        """Raise ``ValueError`` naming both spaces if ``other`` yields different tokens than this one."""
        theirs = (getattr(other, "embed_dim", None), other.num_tokens, other.token_dim)
        if theirs != (self.embed_dim, self.num_tokens, self.token_dim):
            raise ValueError(f"latent space mismatch: the adapter was trained for {self.describe()}, but got "
                             f"{other.describe()}. Use an adapter trained for this embedding space.")

    def check_encoder(self, embedder) -> None:
        """Raise ``ValueError`` naming both dims if ``embedder`` (a CLIP) does not make embeddings of this space."""
        if embedder.embed_dim != self.embed_dim:
            raise ValueError(f"embedding space mismatch: the adapter was trained for {self.describe()}, but this CLIP "
                             f"embeds images to dim {embedder.embed_dim} (shape (B, {embedder.embed_dim}) vs "
                             f"(B, {self.embed_dim})). Use an adapter trained for this CLIP.")

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mean is None:
            mean = torch.zeros(self.embed_dim)
        else:
            mean = torch.tensor(self.mean)
        std = torch.full((self.embed_dim,), 1 / math.sqrt(self.embed_dim)) if self.std is None else torch.tensor(self.std)
        return mean.to(like), std.to(like)

    def normalize(self, embeds: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(embeds)
        return (embeds - mean) / std

    def denormalize(self, embeds: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(embeds)
        return embeds * std + mean

    def patchify(self, embeds: torch.Tensor) -> torch.Tensor:
        """``(B, D)`` → ``(B, k, D/k)`` tokens (contiguous slices)."""
        if embeds.ndim != 2 or embeds.shape[1] != self.embed_dim:
            raise ValueError(f"embeddings of shape {tuple(embeds.shape)} do not fit {self.describe()}; "
                             f"expected (B, {self.embed_dim}).")
        return embeds.reshape(embeds.shape[0], self.num_tokens, self.token_dim)  # (B, k, D/k)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, k, D/k)`` → ``(B, D)`` (inverse of :meth:`patchify`)."""
        if tuple(tokens.shape[1:]) != (self.num_tokens, self.token_dim):
            raise ValueError(f"tokens of shape {tuple(tokens.shape[1:])} do not fit {self.describe()}.")
        return tokens.reshape(tokens.shape[0], self.embed_dim)  # (B, D)

    def tokens_from_embeds(self, embeds: torch.Tensor) -> torch.Tensor:
        """Image embeddings ``(B, D)`` (any norm; made unit-norm) → normalised tokens ``(B, k, D/k)``."""
        return self.patchify(self.normalize(F.normalize(embeds.float(), dim=-1)))

    def embeds_from_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Normalised tokens ``(B, k, D/k)`` → unit-norm image embeddings ``(B, D)``."""
        return F.normalize(self.denormalize(self.unpatchify(tokens.float())), dim=-1)

    def encode(self, embedder, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed pixels ``(B, 3, S, S)`` → normalised tokens ``(B, k, D/k)`` through the image tower."""
        self.check_encoder(embedder)
        return self.tokens_from_embeds(embedder.encode_image(pixels))

    def decode(self, embedder, tokens: torch.Tensor) -> torch.Tensor:
        """Normalised tokens → unit-norm image embeddings ``(B, D)`` (``embedder`` only checks the dim)."""
        self.check_encoder(embedder)
        return self.embeds_from_tokens(tokens)


__all__ = ["CLIP_MODALITY", "ClipEmbeddingSpace"]
