"""Target latent spaces of the modality adapters, registered by name.

A latent space says how a modality's latents become DiT tokens and back: its token width, how many
tokens one item (an image) occupies, and the (de)normalisation the prior sees. New kinds (video,
CLIP embeddings) register themselves with :func:`register_latent_space`; adapters store the space as
a plain dict (``to_config``) and rebuild it with :func:`latent_space_from_config`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

LATENT_SPACES: dict[str, type] = {}


def register_latent_space(kind: str):
    """Class decorator adding a latent-space class to :data:`LATENT_SPACES` under ``kind``."""

    def register(cls):
        if kind in LATENT_SPACES:
            raise ValueError(f"latent space {kind!r} is already registered ({LATENT_SPACES[kind].__name__}).")
        cls.kind = kind
        LATENT_SPACES[kind] = cls
        return cls

    return register


def latent_space_from_config(config: dict):
    """Rebuild a registered latent space from its ``to_config()`` dict (``{"kind": ..., fields...}``)."""
    fields = dict(config)
    kind = fields.pop("kind", None)
    if kind not in LATENT_SPACES:
        raise ValueError(f"unknown latent space kind {kind!r}; registered kinds: {sorted(LATENT_SPACES)}.")
    return LATENT_SPACES[kind](**fields)


@register_latent_space("image")
@dataclass(frozen=True)
class ImageLatentSpace:
    """Latents of a diffusers ``AutoencoderKL``: ``(B, c, h, w)`` ↔ ``(h/p)·(w/p)`` tokens of ``c·p·p``.

    Attributes:
        channels: latent channels ``c`` (``vae.config.latent_channels``).
        downsample: pixels per latent pixel, ``2 ** (len(block_out_channels) - 1)``.
        sample_size: image side in pixels (square images).
        patch_size: latent pixels per token side ``p``.
        scaling_factor, shift_factor: the prior sees ``(z − shift)·scaling`` (diffusers' convention).
    """

    channels: int
    downsample: int
    sample_size: int
    patch_size: int = 1
    scaling_factor: float = 1.0
    shift_factor: float = 0.0

    def __post_init__(self):
        if self.sample_size % self.downsample:
            raise ValueError(f"sample_size={self.sample_size} must be a multiple of downsample={self.downsample}.")
        if self.latent_size % self.patch_size:
            raise ValueError(f"patch_size={self.patch_size} must divide the latent side {self.latent_size} "
                             f"(sample_size {self.sample_size} / downsample {self.downsample}).")

    @classmethod
    def from_autoencoder(cls, vae, patch_size: int = 1, sample_size: int | None = None) -> "ImageLatentSpace":
        """The latent space of ``vae`` (an ``AutoencoderKL``), read from its config."""
        cfg = vae.config
        size = sample_size if sample_size is not None else cfg.sample_size
        if isinstance(size, (list, tuple)):
            if len(set(size)) != 1:
                raise ValueError(f"only square images are supported; the autoencoder's sample_size is {size}.")
            size = size[0]
        return cls(channels=cfg.latent_channels, downsample=2 ** (len(cfg.block_out_channels) - 1),
                   sample_size=int(size), patch_size=patch_size, scaling_factor=float(cfg.scaling_factor or 1.0),
                   shift_factor=float(getattr(cfg, "shift_factor", None) or 0.0))

    def to_config(self) -> dict:
        return {"kind": self.kind, **dataclasses.asdict(self)}

    @property
    def latent_size(self) -> int:
        return self.sample_size // self.downsample

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.latent_size, self.latent_size)

    @property
    def grid(self) -> int:
        return self.latent_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid * self.grid

    @property
    def token_dim(self) -> int:
        return self.channels * self.patch_size * self.patch_size

    def describe(self) -> str:
        return (f"{self.kind} latents {self.latent_shape} (c, h, w) → {self.num_tokens} tokens × {self.token_dim} "
                f"(patch {self.patch_size}, {self.sample_size}px images)")

    def check_compatible(self, other: "ImageLatentSpace") -> None:
        """Raise ``ValueError`` naming both spaces if ``other`` yields different tokens than this one."""
        if (other.latent_shape, other.token_dim) != (self.latent_shape, self.token_dim):
            raise ValueError(f"latent space mismatch: the adapter was trained for {self.describe()}, but got "
                             f"{other.describe()}. Use an adapter trained for this latent space.")

    def check_autoencoder(self, vae) -> None:
        """Raise ``ValueError`` naming both latent shapes if ``vae`` does not produce this space's latents."""
        theirs = ImageLatentSpace.from_autoencoder(vae, 1, self.sample_size).latent_shape
        if theirs != self.latent_shape:
            raise ValueError(f"latent space mismatch: the adapter was trained for {self.describe()}, but this "
                             f"autoencoder makes latents of shape {theirs} (c, h, w) at {self.sample_size}px. "
                             "Use an adapter trained for this autoencoder.")

    def check_latents(self, latents: torch.Tensor) -> None:
        if tuple(latents.shape[1:]) != self.latent_shape:
            raise ValueError(f"latents of shape {tuple(latents.shape[1:])} (c, h, w) do not fit {self.describe()}.")

    def patchify(self, latents: torch.Tensor) -> torch.Tensor:
        """``(B, c, h, w)`` → ``(B, (h/p)·(w/p), c·p·p)`` tokens in raster order."""
        self.check_latents(latents)
        p, g = self.patch_size, self.grid
        x = latents.reshape(latents.shape[0], self.channels, g, p, g, p)  # (B, c, h/p, p, w/p, p)
        return x.permute(0, 2, 4, 1, 3, 5).reshape(latents.shape[0], g * g, self.token_dim)  # (B, N, c·p·p)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, N, c·p·p)`` → ``(B, c, h, w)`` (inverse of :meth:`patchify`)."""
        if tuple(tokens.shape[1:]) != (self.num_tokens, self.token_dim):
            raise ValueError(f"tokens of shape {tuple(tokens.shape[1:])} do not fit {self.describe()}.")
        p, g = self.patch_size, self.grid
        x = tokens.reshape(tokens.shape[0], g, g, self.channels, p, p)  # (B, h/p, w/p, c, p, p)
        return x.permute(0, 3, 1, 4, 2, 5).reshape(tokens.shape[0], *self.latent_shape)  # (B, c, h, w)

    def normalize(self, latents: torch.Tensor) -> torch.Tensor:
        return (latents - self.shift_factor) * self.scaling_factor

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        return latents / self.scaling_factor + self.shift_factor

    def encode(self, vae, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images ``(B, 3, S, S)`` in [-1, 1] → normalised tokens ``(B, N, c·p·p)``.

        Uses the posterior mode, or a posterior sample when ``generator`` is given.
        """
        self.check_autoencoder(vae)
        if images.ndim != 4 or tuple(images.shape[1:]) != (vae.config.in_channels, self.sample_size, self.sample_size):
            raise ValueError(f"images must be (B, {vae.config.in_channels}, {self.sample_size}, {self.sample_size}) "
                             f"in [-1, 1], got {tuple(images.shape)}.")
        posterior = vae.encode(images.to(vae.dtype)).latent_dist
        latents = posterior.sample(generator) if generator is not None else posterior.mode()
        return self.patchify(self.normalize(latents.float()))

    def decode(self, vae, tokens: torch.Tensor) -> torch.Tensor:
        """Normalised tokens ``(B, N, c·p·p)`` → images ``(B, 3, S, S)`` (about [-1, 1])."""
        self.check_autoencoder(vae)
        latents = self.denormalize(self.unpatchify(tokens.float()))
        return vae.decode(latents.to(vae.dtype)).sample
