"""One DiT trunk, several latent spaces: per-token in/out projections around the shared Cola blocks.

:class:`MultimodalPrior` runs the Cola DiT's own modules (timestep MLP, blocks, final AdaLN) on a
sequence whose tokens may belong to different modalities: text tokens go through the DiT's
``txt_in`` / ``txt_out``, the tokens of a registered adapter through that adapter's projections.
LoRA adapters injected into the transformer with PEFT act on the whole trunk.

Block structure (spec §4.1, extended): text tokens are block-causal by ``position // block_size``;
the tokens of one image form ONE block (bidirectional), so an image query sees every token of its
image and everything before it. Images must start at a block boundary and span whole blocks
(``num_tokens % block_size == 0``, checked), so text after an image sees all of it and text before
an image sees none of it.

Mixed sequences (training) carry every token at the widest modality width, zero-padded
(:func:`pad_tokens`); single-modality calls (sampling) use the modality's own width.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..models.attention import block_causal_mask
from ..models.cache import KVCache, next_positions
from ..models.dit import ColaDiTOutput, TimestepEmbeddings, _per_token

TEXT = "text"  # modality id 0: the DiT's own txt_in / txt_out


def pad_tokens(x: torch.Tensor, width: int) -> torch.Tensor:
    """Zero-pad the channel axis of ``x`` ``(B, L, C)`` to ``width``."""
    return torch.nn.functional.pad(x, (0, width - x.shape[-1]))


class MultimodalPrior(nn.Module):
    """The Cola DiT with modality adapters routed per token.

    Args:
        transformer: a :class:`~colabridge.ColaDiT` (``patch_size`` 1).
        adapters: ``{modality name: adapter}``; ids are 1, 2, … in this order (0 is text).
    """

    def __init__(self, transformer, adapters: dict[str, nn.Module]):
        super().__init__()
        cfg = transformer.config
        if cfg.patch_size != 1:
            raise ValueError(f"MultimodalPrior needs a DiT with patch_size=1, got {cfg.patch_size}.")
        if TEXT in adapters:
            raise ValueError(f"{TEXT!r} is the DiT's own modality; name the adapter differently.")
        for name, adapter in adapters.items():
            if adapter.config.txt_dim != cfg.txt_dim:
                raise ValueError(f"adapter {name!r} projects to txt_dim={adapter.config.txt_dim} but the DiT has "
                                 f"txt_dim={cfg.txt_dim}; use an adapter made for this transformer.")
            if adapter.num_tokens % cfg.block_size:
                raise ValueError(f"adapter {name!r} makes {adapter.num_tokens} tokens per item, not a multiple of the "
                                 f"DiT block_size={cfg.block_size}; change the patch size or image size.")
        self.transformer = transformer
        self.adapters = nn.ModuleDict(adapters)
        self.modalities = (TEXT, *adapters)

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    def in_width(self, modality: str) -> int:
        return self.transformer.config.txt_in_channels if modality == TEXT else self.adapters[modality].token_dim

    def out_width(self, modality: str) -> int:
        return self.transformer.config.txt_out_channels if modality == TEXT else self.adapters[modality].token_dim

    @property
    def width(self) -> int:
        """Channel width of mixed sequences (the widest modality)."""
        return max(max(self.in_width(m), self.out_width(m)) for m in self.modalities)

    def modality_id(self, name: str) -> int:
        if name not in self.modalities:
            raise ValueError(f"unknown modality {name!r}; this prior has {self.modalities}.")
        return self.modalities.index(name)

    def for_modality(self, name: str) -> "ModalityView":
        """A callable running this prior on blocks of ``name`` (for :mod:`colabridge.sampling`)."""
        self.modality_id(name)
        return ModalityView(self, name)

    def rotary_tables(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The DiT's RoPE cos/sin for ``position_ids`` ``(B, L)``."""
        return self.transformer.rotary_tables(position_ids)

    def _ids(self, modality, sample: torch.Tensor) -> torch.LongTensor:
        """Per-token modality ids ``(B, L)`` from a name or an id tensor; checks the sample width."""
        if isinstance(modality, str):
            ids = torch.full(sample.shape[:2], self.modality_id(modality), dtype=torch.long, device=sample.device)
            need = self.in_width(modality)
            if sample.shape[-1] != need:
                raise ValueError(f"{modality} tokens must have {need} channels, got sample of shape "
                                 f"{tuple(sample.shape)}; was this adapter trained for another latent space?")
            return ids
        if modality.shape != sample.shape[:2]:
            raise ValueError(f"modality ids {tuple(modality.shape)} must match sample {tuple(sample.shape[:2])}.")
        if sample.shape[-1] < self.width:
            raise ValueError(f"mixed sequences need {self.width} channels (pad_tokens), got {sample.shape[-1]}.")
        return modality.long()

    def _patch_index(self, ids: torch.LongTensor, k: int) -> torch.LongTensor:
        """Index of each modality-``k`` token within its item: consecutive items of N tokens each."""
        n_tok = self.adapters[self.modalities[k]].num_tokens
        return ((ids == k).long().cumsum(1) - 1).clamp(min=0) % n_tok  # (B, L)

    def embed(self, sample: torch.Tensor, ids: torch.LongTensor) -> torch.Tensor:
        """Inputs ``(B, L, C)`` → trunk inputs ``(B, L, D)``, each token through its modality's projection."""
        t = self.transformer
        x = None
        for k, name in enumerate(self.modalities):
            sel = ids == k
            if not bool(sel.any()):
                continue
            tokens = sample[..., : self.in_width(name)]
            h = t.txt_in(tokens) if name == TEXT else self.adapters[name].embed(tokens, self._patch_index(ids, k))
            x = h if x is None else torch.where(sel[..., None], h, x)
        return x  # (B, L, D)

    def project(self, hidden: torch.Tensor, ids: torch.LongTensor, width: int) -> torch.Tensor:
        """Trunk outputs ``(B, L, D)`` → velocities ``(B, L, width)`` through each token's out-projection."""
        out = None
        for k, name in enumerate(self.modalities):
            sel = ids == k
            if not bool(sel.any()):
                continue
            v = self.transformer.txt_out(hidden) if name == TEXT else self.adapters[name].project(hidden)
            v = pad_tokens(v, width)  # (B, L, width)
            out = v if out is None else torch.where(sel[..., None], v, out)
        return out  # (B, L, width)

    def block_mask(self, position_ids, ids, valid, kv_cache: KVCache | None) -> torch.Tensor | None:
        """Block-causal mask where all tokens of one adapter item form a single block.

        An item query at patch index j is given the block of its item's LAST token,
        ``position + N − 1 − j``, so it sees the whole item (and every earlier block).
        """
        q_pos = position_ids
        for k, name in enumerate(self.modalities[1:], start=1):
            n_tok = self.adapters[name].num_tokens
            q_pos = torch.where(ids == k, q_pos + n_tok - 1 - self._patch_index(ids, k), q_pos)
        k_pos, k_valid = (position_ids, valid) if kv_cache is None else kv_cache.layout(position_ids, valid)
        return block_causal_mask(q_pos, k_pos, k_valid, self.transformer.config.block_size, valid)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        position_ids: torch.LongTensor | None = None,
        valid: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        commit: bool = False,
        attention_mask: torch.Tensor | None = None,
        rotary_tables: tuple[torch.Tensor, torch.Tensor] | None = None,
        modality: str | torch.LongTensor = TEXT,
        return_dict: bool = True,
    ):
        r"""Velocity for ``sample`` ``(B, L, C)`` whose tokens are of ``modality``.

        Same arguments as :meth:`ColaDiT.forward`, plus ``modality``: a name (every token; ``C`` is that
        modality's width) or per-token ids ``(B, L)`` (mixed; ``C`` = :attr:`width`, zero-padded). The
        output has the modality's out width, or :attr:`width` for mixed calls. Pure text calls are the
        transformer's own forward.
        """
        ids = self._ids(modality, sample)  # (B, L); also checks the sample width
        if isinstance(modality, str) and modality == TEXT:  # exactly the base DiT (LoRA as enabled)
            extra = {} if rotary_tables is None else {"rotary_tables": rotary_tables}
            return self.transformer(sample, timestep, position_ids=position_ids, valid=valid, kv_cache=kv_cache,
                                    commit=commit, attention_mask=attention_mask, return_dict=return_dict, **extra)
        t = self.transformer
        x = self.embed(sample, ids)  # (B, L, D)
        bsz, n, _ = x.shape
        if position_ids is None:
            position_ids = next_positions(kv_cache, bsz, n, x.device)
        if valid is None:
            valid = torch.ones(bsz, n, dtype=torch.bool, device=x.device)
        mask = attention_mask if attention_mask is not None else self.block_mask(position_ids, ids, valid, kv_cache)
        rope = rotary_tables if rotary_tables is not None else self.rotary_tables(position_ids)
        emb = TimestepEmbeddings.build(t.emb_in, _per_token(timestep, bsz, n, x.device), x.dtype)
        for i, block in enumerate(t.blocks):
            x = block(x, emb, rope, mask, kv_cache, i)
        if kv_cache is not None and commit:
            kv_cache.commit(position_ids, valid)
        shift, scale = emb.modulate(t.txt_out_ada.out_in).chunk(2, dim=-1)
        x = t.txt_out_norm(x) * (1 + scale) + shift
        width = self.out_width(modality) if isinstance(modality, str) else self.width
        out = self.project(x, ids, width)  # (B, L, width)
        return ColaDiTOutput(sample=out) if return_dict else (out,)


class ModalityView:
    """``prior`` bound to one modality: the ``model`` of a :class:`~colabridge.sampling.CachedStream`.

    A ``modality=`` keyword still overrides (e.g. prefilling a text history before an image block).
    """

    def __init__(self, prior: MultimodalPrior, modality: str):
        self.prior, self.modality = prior, modality

    @property
    def dtype(self) -> torch.dtype:
        return self.prior.dtype

    def rotary_tables(self, position_ids: torch.Tensor):
        return self.prior.rotary_tables(position_ids)

    def __call__(self, sample: torch.Tensor, timestep, **kwargs):
        kwargs.setdefault("modality", self.modality)
        return self.prior(sample, timestep, **kwargs)
