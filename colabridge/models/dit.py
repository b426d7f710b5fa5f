"""Cola DiT prior: a block-causal 1-D DiT predicting the flow-matching velocity (spec §2.2, §3.3, §4.3).

Parameter names and config fields are those of the official ``ColaDiTModel`` / ``ColaDiTConfig``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin  # ModelMixin must be a module-level name for diffusers loading
from diffusers.configuration_utils import register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.utils import BaseOutput

from .attention import apply_interleaved_rope, attend, block_causal_mask, interleaved_rope_tables
from .cache import KVCache, next_positions

SINUSOID_DIM = 256  # width of the timestep sinusoid (hard-coded in the official code)
ROPE_THETA = 10000.0  # DiT RoPE base (hard-coded in the official code)


@dataclass
class ColaDiTOutput(BaseOutput):
    """``sample``: predicted velocity ``v ≈ z1 - z0``, ``(B, L, txt_out_channels)``."""

    sample: torch.Tensor


def timestep_sinusoid(timestep: torch.Tensor, dim: int = SINUSOID_DIM) -> torch.Tensor:
    """``[sin(τ·k) | cos(τ·k)]`` with ``k_i = 10000^(-i/half)``, τ on the 0…1000 scale, float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=timestep.device) / half)
    angles = timestep.float()[..., None] * freqs
    return torch.cat((torch.sin(angles), torch.cos(angles)), dim=-1)


class TimestepMLP(nn.Module):
    """256 → D → D → E, SiLU between layers, none after the last (official ``TimestepEmbedding``)."""

    def __init__(self, hidden_dim: int, output_dim: int):
        super().__init__()
        self.proj_in = nn.Linear(SINUSOID_DIM, hidden_dim)
        self.proj_hid = nn.Linear(hidden_dim, hidden_dim)
        self.proj_out = nn.Linear(hidden_dim, output_dim)

    def forward(self, timestep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        emb = timestep_sinusoid(timestep).to(dtype)
        return self.proj_out(F.silu(self.proj_hid(F.silu(self.proj_in(emb)))))


class Linear1D(nn.Module):
    """``proj`` holder so parameter names match the official ``txt_in.proj`` / ``txt_out.proj``."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.proj = nn.Linear(in_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class RotaryFrequencies(nn.Module):
    """Holds the persistent ``freqs`` buffer ``10000^(-2j/R)`` that official checkpoints carry."""

    def __init__(self, rope_dim: int):
        super().__init__()
        j = torch.arange(0, rope_dim, 2, dtype=torch.float32)
        self.register_buffer("freqs", 1.0 / (ROPE_THETA ** (j / rope_dim)), persistent=True)


def _modulation(dim: int, chunks: int) -> nn.Sequential:
    return nn.Sequential(nn.SiLU(), nn.Linear(dim, chunks * dim))  # key index .1 as in the official AdaLN


class AdaLNModulation(nn.Module):
    """Four modulation linears on SiLU(emb): msa/mlp × in ([shift | scale]) / out (gate)."""

    def __init__(self, dim: int):
        super().__init__()
        self.msa_in, self.msa_out = _modulation(dim, 2), _modulation(dim, 1)
        self.mlp_in, self.mlp_out = _modulation(dim, 2), _modulation(dim, 1)


class DiTAttention(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, qk_bias: bool, eps: float, rope_dim: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.proj_qkv = nn.Linear(dim, 3 * heads * head_dim, bias=qk_bias)
        self.proj_out = nn.Linear(heads * head_dim, dim, bias=qk_bias)
        self.norm_q = nn.LayerNorm(head_dim, eps=eps)
        self.norm_k = nn.LayerNorm(head_dim, eps=eps)
        self.rope = nn.ModuleDict({"rope": RotaryFrequencies(rope_dim)})

    def forward(self, x, rope, mask, cache: KVCache | None, layer: int) -> torch.Tensor:
        qkv = self.proj_qkv(x).unflatten(-1, (3, self.heads, self.head_dim))  # (B, L, 3, H, hd)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # (B, H, L, hd)
        q, k = self.norm_q(q), self.norm_k(k)
        cos, sin = rope
        q = apply_interleaved_rope(q.float(), cos, sin).to(v.dtype)  # RoPE in float32 (spec §4.3)
        k = apply_interleaved_rope(k.float(), cos, sin).to(v.dtype)
        if cache is not None:  # keys cached after norm and RoPE (the official caches pre-RoPE; same maths)
            k, v = cache.extend(layer, k, v)
        out = attend(q, k, v, mask)  # (B, H, L, hd)
        return self.proj_out(out.transpose(1, 2).flatten(2))  # (B, L, D)


class MLP(nn.Module):
    def __init__(self, dim: int, expand_ratio: int):
        super().__init__()
        self.proj_in = nn.Linear(dim, dim * expand_ratio)
        self.proj_out = nn.Linear(dim * expand_ratio, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_out(F.gelu(self.proj_in(x), approximate="tanh"))


class ColaDiTBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.msa_norm = nn.LayerNorm(cfg.txt_dim, eps=cfg.norm_eps, elementwise_affine=False)
        self.msa = DiTAttention(cfg.txt_dim, cfg.heads, cfg.head_dim, cfg.qk_bias, cfg.norm_eps, cfg.rope_dim)
        self.mlp_norm = nn.LayerNorm(cfg.txt_dim, eps=cfg.norm_eps, elementwise_affine=False)
        self.mlp = MLP(cfg.txt_dim, cfg.expand_ratio)
        self.ada = AdaLNModulation(cfg.txt_dim)

    def forward(self, x, emb, rope, mask, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        """``emb`` is a :class:`TimestepEmbeddings` (SiLU applied once, one row per distinct timestep)."""
        ada = self.ada
        shift, scale = emb.modulate(ada.msa_in).chunk(2, dim=-1)
        h = self.msa(self.msa_norm(x) * (1 + scale) + shift, rope, mask, cache, layer)
        x = h * emb.modulate(ada.msa_out) + x
        shift, scale = emb.modulate(ada.mlp_in).chunk(2, dim=-1)
        h = self.mlp(self.mlp_norm(x) * (1 + scale) + shift)
        return h * emb.modulate(ada.mlp_out) + x


@dataclass
class TimestepEmbeddings:
    """SiLU(timestep embedding) of the *distinct* timesteps of a call, and where each token's is.

    Every token of a sampling step shares one timestep (pinned tokens aside), so the timestep MLP and
    the AdaLN linears run on a handful of rows and are gathered per token (spec §4.3 computes them
    per token; the maths is the same).
    """

    table: torch.Tensor  # (U, E)
    index: torch.Tensor  # (B, L) row of ``table`` for every token

    @classmethod
    def build(cls, mlp: TimestepMLP, timestep: torch.Tensor, dtype: torch.dtype) -> "TimestepEmbeddings":
        distinct, index = torch.unique(timestep, return_inverse=True)
        return cls(F.silu(mlp(distinct, dtype)), index)

    def modulate(self, layer: nn.Sequential) -> torch.Tensor:
        """``layer[1]`` (the Linear after the SiLU) applied per distinct timestep, gathered per token."""
        out = layer[1](self.table)  # (U, out)
        return out if out.shape[0] == 1 else out[self.index]  # (1, out) broadcasts, else (B, L, out)


class ColaDiT(ModelMixin, ConfigMixin, PeftAdapterMixin):
    r"""Block-causal DiT prior p_ψ over text latents (bidirectional within a block, causal across).

    Config fields are those of the official ``ColaDiTConfig`` (spec §2.2), plus one colabridge option:
    ``self_condition`` adds ``sc_in``, a zero-initialised input projection of the previous estimate of the
    clean latents (self-conditioning, Chen et al. 2022), so official checkpoints load unchanged and a
    converted model starts from the same outputs.
    """

    config_name = "config.json"
    _no_split_modules = ["ColaDiTBlock"]

    @register_to_config
    def __init__(
        self,
        txt_in_channels: int = 16,
        txt_out_channels: int = 16,
        txt_dim: int = 2048,
        emb_dim: int = 2048,
        heads: int = 16,
        head_dim: int = 128,
        expand_ratio: int = 4,
        num_layers: int = 24,
        norm_eps: float = 1e-5,
        qk_bias: bool = False,
        patch_size: int = 1,
        rope_dim: int = 96,
        block_size: int = 4,
        self_condition: bool = False,
    ):
        super().__init__()
        _check_dit_config(self.config)
        self.txt_in = Linear1D(txt_in_channels * patch_size, txt_dim)
        self.sc_in = Linear1D(txt_in_channels * patch_size, txt_dim) if self_condition else None
        self.emb_in = TimestepMLP(txt_dim, emb_dim)
        self.blocks = nn.ModuleList([ColaDiTBlock(self.config) for _ in range(num_layers)])
        self.txt_out_norm = nn.LayerNorm(txt_dim, eps=norm_eps)
        self.txt_out_ada = nn.ModuleDict({"out_in": _modulation(txt_dim, 2)})
        self.txt_out = Linear1D(txt_dim, txt_out_channels * patch_size)
        self.init_weights()

    def init_weights(self) -> None:
        """adaLN-Zero: xavier for linears, zero modulation and output layers, so a new DiT starts at v=0."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for emb_layer in (self.emb_in.proj_in, self.emb_in.proj_hid, self.emb_in.proj_out):
            nn.init.normal_(emb_layer.weight, std=0.02)
        for block in self.blocks:
            for mod in (block.ada.msa_in, block.ada.msa_out, block.ada.mlp_in, block.ada.mlp_out):
                nn.init.zeros_(mod[1].weight)
                nn.init.zeros_(mod[1].bias)
        zero = [self.txt_out_ada.out_in[1], self.txt_out.proj] + ([self.sc_in.proj] if self.sc_in is not None else [])
        for layer in zero:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def new_cache(self, capacity: int = 256) -> KVCache:
        """An empty cache; ``capacity`` (tokens per sample) is preallocated, and grows if exceeded."""
        return KVCache(self.config.num_layers, capacity)

    def rotary_tables(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE cos/sin ``(B, 1, L, rope_dim)`` for ``position_ids`` (every layer holds the same freqs)."""
        return interleaved_rope_tables(position_ids, self.blocks[0].msa.rope.rope.freqs, self.config.head_dim)

    def _patchify(self, x: torch.Tensor) -> torch.Tensor:
        p = self.config.patch_size
        return x if p == 1 else x.unflatten(1, (-1, p)).flatten(2)  # (B, L/p, p·C), time-major

    def _unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        p = self.config.patch_size
        return x if p == 1 else x.unflatten(-1, (p, -1)).flatten(1, 2)  # (B, L, C)

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
        self_cond: torch.Tensor | None = None,
        return_dict: bool = True,
    ):
        r"""Velocity field v_ψ(z_t, t; history) for queries ``sample`` ``(B, L, C_in)``.

        Args:
            timestep: τ on the 0…1000 scale: scalar, ``(B,)`` or per token ``(B, L)``.
            position_ids: ``(B, L)`` positions within each sample (after patching); by default they
                continue each sample's history in ``kv_cache`` (or start at 0).
            valid: ``(B, L)`` False for padding rows (their outputs are meaningless but finite).
            kv_cache: history keys/values; queries attend to history ∪ themselves, block-causally.
            commit: append this call's keys/values to ``kv_cache`` (official ``update_kv=True``).
            attention_mask: optional boolean ``(B, 1, L, L_history + L)`` replacing the block-causal mask
                (e.g. the training-time "clean copy beside noisy copy" mask).
            rotary_tables: precomputed :meth:`rotary_tables` of ``position_ids`` (samplers reuse them
                for every step of a block).
            self_cond: ``(B, L, C_in)`` previous estimate of the clean latents (zeros when None), read
                only by a ``self_condition`` model; history tokens carry their own clean values.
        """
        x = self.txt_in(self._patchify(sample))  # (B, L, D)
        if self.sc_in is not None:
            x = x + self.sc_in(self._patchify(torch.zeros_like(sample) if self_cond is None else self_cond.to(sample.dtype)))
        elif self_cond is not None:
            raise ValueError("self_cond was given, but this ColaDiT has self_condition=False; drop the argument or "
                             "build the model with self_condition=True.")
        bsz, n, _ = x.shape
        if position_ids is None:
            position_ids = next_positions(kv_cache, bsz, n, x.device)
        if valid is None:
            valid = torch.ones(bsz, n, dtype=torch.bool, device=x.device)
        mask = attention_mask
        if mask is None:
            k_pos, k_valid = (position_ids, valid) if kv_cache is None else kv_cache.layout(position_ids, valid)
            mask = block_causal_mask(position_ids, k_pos, k_valid, self.config.block_size, valid)
        rope = rotary_tables if rotary_tables is not None else self.rotary_tables(position_ids)
        emb = TimestepEmbeddings.build(self.emb_in, _per_token(timestep, bsz, n, x.device), x.dtype)
        for i, block in enumerate(self.blocks):
            x = block(x, emb, rope, mask, kv_cache, i)
        if kv_cache is not None and commit:
            kv_cache.commit(position_ids, valid)
        shift, scale = emb.modulate(self.txt_out_ada.out_in).chunk(2, dim=-1)
        x = self.txt_out_norm(x) * (1 + scale) + shift
        out = self._unpatchify(self.txt_out(x))  # (B, L·p, C_out)
        return ColaDiTOutput(sample=out) if return_dict else (out,)


def _per_token(timestep, bsz: int, n: int, device) -> torch.Tensor:
    """Broadcast a scalar / per-sample / per-token timestep to ``(B, L)``."""
    t = torch.as_tensor(timestep, device=device)
    if t.ndim == 0:
        return t.expand(bsz, n)
    if t.ndim == 1:
        return t[:, None].expand(bsz, n)
    return t


def _check_dit_config(cfg) -> None:
    """Reject configs the official code crashes on or silently mishandles (spec §7)."""
    if cfg.emb_dim != cfg.txt_dim:
        raise ValueError(
            f"emb_dim={cfg.emb_dim} must equal txt_dim={cfg.txt_dim}: the AdaLN linears read txt_dim-wide "
            "embeddings (the official model crashes otherwise). Set emb_dim = txt_dim."
        )
    if cfg.rope_dim % 2 or not 0 < cfg.rope_dim <= cfg.head_dim:
        raise ValueError(f"rope_dim={cfg.rope_dim} must be even and in (0, head_dim={cfg.head_dim}].")
    if cfg.block_size < 1 or cfg.patch_size < 1:
        raise ValueError(f"block_size={cfg.block_size} and patch_size={cfg.patch_size} must be >= 1.")
