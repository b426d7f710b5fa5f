"""Shared attention pieces of the Cola models: block-causal masks, RoPE tables, SDPA.

Layout used everywhere in colabridge: padded batches ``(B, L, ...)`` with explicit per-token
``position_ids`` (the index of a token *within its sample*) and a boolean ``valid`` mask for padding.
Positions, not columns, define the block structure (spec §4.1): query ``a`` may see key ``b`` iff
``pos_a // block_size >= pos_b // block_size`` and both belong to the same sample. Samples are rows,
so attention never crosses samples (the official "NA" layout needs a block-diagonal mask for that).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def block_causal_mask(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    k_valid: torch.Tensor | None,
    block_size: int | None,
    q_valid: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Boolean attention mask ``(B, 1, Lq, Lk)`` (True = may attend), or ``None`` if all allowed.

    Args:
        q_pos: ``(B, Lq)`` query positions.
        k_pos: ``(B, Lk)`` key positions.
        k_valid: ``(B, Lk)`` False for padding keys, or None.
        block_size: block length; ``None`` means bidirectional (no block-causal constraint).
        q_valid: ``(B, Lq)`` False for padding queries. Padding queries attend to every key so
            their (discarded) outputs stay finite instead of NaN.
    """
    allowed = None
    if block_size is not None:
        allowed = (q_pos // block_size)[:, :, None] >= (k_pos // block_size)[:, None, :]  # (B, Lq, Lk)
    if k_valid is not None:
        kv = k_valid[:, None, :].expand(q_pos.shape[0], q_pos.shape[1], k_pos.shape[1])
        allowed = kv if allowed is None else allowed & kv
    if allowed is None:
        return None
    if q_valid is not None:
        allowed = allowed | ~q_valid[:, :, None]
    if bool(allowed.all()):
        return None
    return allowed[:, None]  # (B, 1, Lq, Lk)


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, dropout_p: float = 0.0
) -> torch.Tensor:
    """Scaled dot-product attention; ``k``/``v`` may have one head shared by all query heads.

    Shapes: q ``(B, H, Lq, hd)``, k/v ``(B, Hk, Lk, hd)`` with ``Hk`` in ``{1, H}``.
    """
    if k.shape[1] != q.shape[1]:
        k = k.expand(-1, q.shape[1], -1, -1)
        v = v.expand(-1, q.shape[1], -1, -1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


# --------------------------------------------------------------------------- RoPE


def half_split_rope_tables(position_ids: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``(B, 1, L, head_dim)`` of the VAE's NeoX-style RoPE, computed in float32.

    ``inv_j = 1 / theta**(2j/head_dim)``; the angle vector is ``[phi, phi]`` (spec §4.2).
    """
    exponent = torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim
    inv_freq = 1.0 / (theta**exponent)
    angles = position_ids.to(torch.float32)[..., None] * inv_freq  # (B, L, hd/2)
    angles = torch.cat((angles, angles), dim=-1)[:, None]  # (B, 1, L, hd)
    return angles.cos(), angles.sin()


def apply_half_split_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel ``j`` with channel ``j + hd/2``: ``x·cos + [-x2, x1]·sin``."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def interleaved_rope_tables(
    position_ids: torch.Tensor, inv_freq: torch.Tensor, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``(B, 1, L, head_dim)`` of the DiT's GPT-J-style partial RoPE.

    Pairs ``(2j, 2j+1)`` for ``j < R/2`` share ``inv_j``; the channels past ``R = 2·len(inv_freq)`` get
    cos 1 / sin 0, so one full-width multiply-add rotates the first R channels and passes the rest
    through exactly.
    """
    angles = position_ids.to(torch.float32)[..., None] * inv_freq.to(torch.float32)  # (B, L, R/2)
    angles = angles.repeat_interleave(2, dim=-1)[:, None]  # (B, 1, L, R)
    pad = head_dim - angles.shape[-1]
    cos = torch.cat((angles.cos(), angles.new_ones(*angles.shape[:-1], pad)), -1)
    sin = torch.cat((angles.sin(), angles.new_zeros(*angles.shape[:-1], pad)), -1)
    return cos, sin


_PAIR_SIGN = torch.tensor([-1.0, 1.0])


def apply_interleaved_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x·cos + rot(x)·sin`` with ``rot(x0, x1) = (-x1, x0)`` on every channel pair."""
    pairs = x.unflatten(-1, (-1, 2))  # (..., hd/2, 2)
    rotated = (pairs.flip(-1) * _PAIR_SIGN.to(x.dtype)).flatten(-2)
    return x * cos + rotated * sin
