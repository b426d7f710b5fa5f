"""Explicit key/value caches for block-wise generation.

A :class:`KVCache` belongs to one model call sequence (one generation), is passed into ``forward`` and
owned by the caller. Each layer writes the keys/values of the current call *after* the committed
history; ``commit=True`` in the model's forward makes them part of the history, otherwise the next
call overwrites them. Buffers are preallocated and grow geometrically, so appending a block costs a
copy of the block only.

The cache also records, per committed column, the token's position within its sample and whether it
is a real token, so models can build block-causal masks without the caller re-deriving the layout.
"""

from __future__ import annotations

import torch


class KVCache:
    """Per-layer key/value buffers ``(B, H, capacity, head_dim)`` sharing one committed length."""

    def __init__(self, num_layers: int, capacity: int = 256):
        self.num_layers = num_layers
        self.capacity = capacity
        self.length = 0
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.positions: torch.Tensor | None = None  # (B, capacity) long
        self.valid: torch.Tensor | None = None  # (B, capacity) bool

    @property
    def batch_size(self) -> int | None:
        return None if self.positions is None else self.positions.shape[0]

    def _fit(self, buf: torch.Tensor | None, like: torch.Tensor, needed: int, dim: int) -> torch.Tensor:
        """``buf`` (time axis ``dim``) with room for ``needed`` columns: allocated like ``like`` if
        missing, grown geometrically (keeping the committed columns) if too short."""
        if buf is not None and buf.shape[dim] >= needed:
            return buf
        old = 0 if buf is None else buf.shape[dim]
        shape = list(like.shape)
        shape[dim] = max(needed, self.capacity, 2 * old)
        grown = like.new_zeros(shape)
        if buf is not None:
            grown.narrow(dim, 0, self.length).copy_(buf.narrow(dim, 0, self.length))
        return grown

    def check_batch(self, batch_size: int) -> None:
        """Raise if a call of ``batch_size`` samples does not match the committed history."""
        if self.batch_size is not None and self.length > 0 and self.batch_size != batch_size:
            raise ValueError(
                f"kv_cache holds {self.batch_size} samples but the call has {batch_size}; "
                "use one cache per batch (or KVCache.select to drop samples)."
            )

    def layout(self, position_ids: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Key positions and validity ``(B, length + L)`` for a call adding ``position_ids`` ``(B, L)``."""
        if self.positions is None or self.length == 0:
            return position_ids, valid
        self.check_batch(position_ids.shape[0])
        k_pos = torch.cat((self.positions[:, : self.length], position_ids), dim=1)
        k_valid = torch.cat((self.valid[:, : self.length], valid), dim=1)
        return k_pos, k_valid

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this call's ``k``/``v`` ``(B, H, L, hd)`` after the history; return history + new."""
        end = self.length + k.shape[2]
        self.keys[layer] = self._fit(self.keys[layer], k, end, dim=2)
        self.values[layer] = self._fit(self.values[layer], v, end, dim=2)
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def commit(self, position_ids: torch.Tensor, valid: torch.Tensor) -> None:
        """Make the keys/values written by the last call part of the history."""
        end = self.length + position_ids.shape[1]
        self.positions = self._fit(self.positions, position_ids, end, dim=1)
        self.valid = self._fit(self.valid, valid, end, dim=1)
        self.positions[:, self.length : end] = position_ids
        self.valid[:, self.length : end] = valid
        self.length = end

    def select(self, index: torch.Tensor) -> "KVCache":
        """A cache holding only the samples ``index`` (e.g. to drop finished samples)."""
        out = KVCache(self.num_layers, self.capacity)
        out.length = self.length
        out.keys = [None if k is None else k[index] for k in self.keys]
        out.values = [None if v is None else v[index] for v in self.values]
        if self.positions is not None:
            out.positions, out.valid = self.positions[index], self.valid[index]
        return out


def next_positions(cache: KVCache | None, batch_size: int, length: int, device) -> torch.Tensor:
    """Positions ``(B, length)`` that continue each sample after its cached history (0 if none)."""
    start = torch.zeros(batch_size, dtype=torch.long, device=device)
    if cache is not None and cache.length > 0:
        cache.check_batch(batch_size)
        hist = cache.positions[:, : cache.length].masked_fill(~cache.valid[:, : cache.length], -1)
        start = hist.max(dim=1).values + 1
    return start[:, None] + torch.arange(length, device=device)
