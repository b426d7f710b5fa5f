"""From prompt ids to what the block loop needs: prefix latents, the pinned first block, guidance.

Implements spec §5.3: each prompt is padded with the pad id to a multiple of the block size and
encoded; the complete blocks form the history ("prefix"); a partial last block of ``r`` tokens is
re-generated as the first block with its first ``r`` latents *pinned* to the prompt's own latents,
and those ``r`` decoded tokens are trimmed from the output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data.text import pad_rows


@dataclass
class PromptPlan:
    """Per-batch layout of the prompts (B samples, block size ``bs``, latent channels ``C``)."""

    prefix: torch.Tensor  # (B, P, C) normalised prefix latents, left-padded to the longest prefix
    prefix_valid: torch.Tensor  # (B, P) True for real prefix latents
    pinned: torch.Tensor  # (B, bs) True where the first block is pinned to prompt latents
    pinned_values: torch.Tensor  # (B, bs, C) the prompt latents of the partial last block
    trim: list[int]  # prompt tokens re-decoded in block 0, trimmed from the output
    has_prefix: torch.Tensor  # (B,) True if the sample has a non-empty prefix

    @property
    def any_pinned(self) -> bool:
        return bool(self.pinned.any())


def pad_to_blocks(ids: list[list[int]], block_size: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad each sample to a multiple of ``block_size`` with ``pad_id`` (these pads are encoder input),
    then right-pad the batch to its longest sample (masked out). Returns ``(input_ids, attention_mask)``."""
    padded = [seq + [pad_id] * (-len(seq) % block_size) for seq in ids]
    return pad_rows(padded, max(len(seq) for seq in padded), pad_id)


def plan_prompts(latents: torch.Tensor | None, lengths: list[int], block_size: int, channels: int) -> PromptPlan:
    """Split encoded prompts ``latents`` ``(B, Lmax, C)`` (``None`` if all prompts are empty)."""
    bsz = len(lengths)
    rem = [n % block_size for n in lengths]
    prefix_lens = [n - r for n, r in zip(lengths, rem)]
    width = max(prefix_lens)
    device = latents.device if latents is not None else torch.device("cpu")
    prefix = torch.zeros(bsz, width, channels, device=device)
    prefix_valid = torch.zeros(bsz, width, dtype=torch.bool, device=device)
    pinned = torch.zeros(bsz, block_size, dtype=torch.bool, device=device)
    pinned_values = torch.zeros(bsz, block_size, channels, device=device)
    for i, (p, r) in enumerate(zip(prefix_lens, rem)):
        if p:
            prefix[i, width - p :] = latents[i, :p]
            prefix_valid[i, width - p :] = True
        if r:
            pinned[i, :r] = True
            pinned_values[i] = latents[i, p : p + block_size]
    has_prefix = torch.tensor([p > 0 for p in prefix_lens], device=device)
    return PromptPlan(prefix, prefix_valid, pinned, pinned_values, rem, has_prefix)
