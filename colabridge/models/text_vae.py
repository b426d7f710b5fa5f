"""Cola Text VAE: tokens -> one continuous latent per token and back (spec §2.1, §3.2, §4.2).

Parameter names and config fields are those of the official ``ColaTextVAEModel`` /
``ColaTextVAEConfig``, so the released ``config.json`` + ``model.safetensors`` load unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin  # ModelMixin must be a module-level name for diffusers loading
from diffusers.configuration_utils import register_to_config

from .attention import apply_half_split_rope, attend, block_causal_mask, half_split_rope_tables
from .cache import KVCache, next_positions

LOGVAR_RANGE = (-30.0, 20.0)  # posterior log-variance clamp of the official DiagonalGaussianDistribution
ACTIVATIONS = ("swiglu", "silu", "gelu")


@dataclass
class TextLatentPosterior:
    """Diagonal Gaussian q(z|x), channels last: ``mean``/``logvar`` ``(B, L, latent_dim)``.

    ``mean`` is already LayerNorm-ed when ``encoder_last_ln`` is set; ``logvar`` is the raw head output
    (clamped only where used), as in the official ``DiagonalGaussianDistribution``.
    """

    mean: torch.Tensor
    logvar: torch.Tensor | None = None

    def mode(self) -> torch.Tensor:
        return self.mean

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar.clamp(*LOGVAR_RANGE))

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.logvar is None:
            return self.mean
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per token ``(B, L)``."""
        logvar = self.logvar.clamp(*LOGVAR_RANGE)
        return 0.5 * (self.mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)


class TextVAEBlock(nn.Module):
    """One encoder/decoder block; ``post_norm`` selects the official asymmetric layout (spec §7.9)."""

    def __init__(self, cfg) -> None:
        super().__init__()
        dim, kv_dim = cfg.dim, cfg.dim // cfg.shared_heads_kv
        self.post_norm, self.clip_qkv = cfg.post_norm, cfg.clip_qkv
        self.num_heads, self.head_dim = cfg.num_heads, cfg.dim // cfg.num_heads
        self.fused_dims = (dim, kv_dim, kv_dim)
        self.act = cfg.act
        self.norm_attn = nn.LayerNorm(dim, eps=cfg.layer_norm_eps, elementwise_affine=cfg.layer_norm_affine)
        self.qkv_proj = nn.Linear(dim, sum(self.fused_dims), bias=cfg.qk_bias)
        self.q_norm = self.k_norm = None
        if cfg.qk_norm:
            self.q_norm = nn.LayerNorm(dim, eps=cfg.layer_norm_eps, elementwise_affine=cfg.qk_norm_affine)
            self.k_norm = nn.LayerNorm(kv_dim, eps=cfg.layer_norm_eps, elementwise_affine=cfg.qk_norm_affine)
        self.attn_out_proj = nn.Linear(dim, dim, bias=cfg.bias)
        self.norm_ffn = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)  # always affine in the official code
        self.ffn_proj = nn.Linear(dim, cfg.ffn_dim, bias=cfg.bias)
        ffn_hidden = cfg.ffn_dim // 2 if cfg.act == "swiglu" else cfg.ffn_dim
        self.ffn_out = nn.Linear(ffn_hidden, dim, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)
        self.attn_dropout = cfg.attn_dropout

    def _ffn(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ffn_proj(x)
        if self.act == "swiglu":
            value, gate = h.chunk(2, dim=-1)  # rows [value half | gate half]
            h = F.silu(gate) * value
        else:
            h = F.silu(h) if self.act == "silu" else F.gelu(h)
        return self.ffn_out(h)

    def _attention(self, x, rope, mask, cache: KVCache | None, layer: int) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        if self.clip_qkv is not None:
            qkv = qkv.clamp(-self.clip_qkv, self.clip_qkv)
        q, k, v = qkv.split(self.fused_dims, dim=-1)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.unflatten(-1, (-1, self.head_dim)).transpose(1, 2)  # (B, H, L, hd)
        k = k.unflatten(-1, (-1, self.head_dim)).transpose(1, 2)  # (B, Hk, L, hd)
        v = v.unflatten(-1, (-1, self.head_dim)).transpose(1, 2)
        cos, sin = rope
        dtype = q.dtype
        q = apply_half_split_rope(q.to(cos.dtype), cos, sin).to(dtype)
        k = apply_half_split_rope(k.to(cos.dtype), cos, sin).to(dtype)
        if cache is not None:  # keys are cached after norm and RoPE: identical maths, no re-rotation
            k, v = cache.extend(layer, k, v)
        o = attend(q, k, v, mask, dropout_p=self.attn_dropout if self.training else 0.0)
        return self.attn_out_proj(o.transpose(1, 2).flatten(2))  # (B, L, D)

    def forward(self, x, rope, mask, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        if self.post_norm:  # x1 = LN(x) + Attn(x); x2 = x1 + LN(FFN(x1))
            x = self.norm_attn(x) + self.dropout(self._attention(x, rope, mask, cache, layer))
            return x + self.dropout(self.norm_ffn(self._ffn(x)))
        x = x + self.dropout(self._attention(self.norm_attn(x), rope, mask, cache, layer))
        return x + self.dropout(self._ffn(self.norm_ffn(x)))


class ColaTextVAE(ModelMixin, ConfigMixin):
    r"""Cola Text VAE: encoder q_φ(z|x) and block-causal decoder p_θ(x|z).

    Config fields are exactly those of the official ``ColaTextVAEConfig`` (spec §2.1). Dead official
    fields (``causal``, ``use_emb``) and init-only fields are stored so configs round-trip unchanged.
    ``block_causal=False`` gives bidirectional attention *within each sample* (the official code then
    also attends across samples of a batch, spec §7.7; that leak is not reproduced).
    """

    config_name = "config.json"
    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        vocab_size: int = 100278,
        encoder_num_blocks: int = 4,
        decoder_num_blocks: int = 4,
        dim: int = 1536,
        ffn_dim: int = 6144,
        latent_dim: int = 16,
        patch_size: int = 1,
        num_heads: int = 12,
        shared_heads_kv: int = 1,
        encoder_last_ln: bool = True,
        layer_norm_type: str = "layer_norm",
        layer_norm_eps: float = 1e-6,
        layer_norm_affine: bool = True,
        post_norm: bool = True,
        qk_bias: bool = False,
        qk_norm: bool = True,
        qk_norm_affine: bool = True,
        clip_qkv: float | None = None,
        rope_theta: float = 500000,
        rope_full_precision: bool = True,
        bias: bool = True,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        act: str = "swiglu",
        causal: bool = False,
        block_causal: bool = True,
        block_size: int = 4,
        init_fn: str = "normal",
        init_std: float = 0.02,
        init_cutoff_factor: float | None = 3,
        use_variation: bool = True,
        use_emb: bool = True,
        scaling_factor: float = 1.0,
        shifting_factor: float = 0.0,
    ):
        super().__init__()
        _check_vae_config(self.config)
        cfg = self.config
        out_dim = 2 * latent_dim if use_variation else latent_dim
        self.encoder = nn.ModuleDict(
            dict(
                wte=nn.Embedding(vocab_size + 1, dim),  # extra row: the [MASK] id of the masking loss
                patch_embedder=nn.Conv1d(dim, dim, kernel_size=patch_size, stride=patch_size),
                blocks=nn.ModuleList([TextVAEBlock(cfg) for _ in range(encoder_num_blocks)]),
                final_layer=nn.Linear(dim, out_dim, bias=bias),
                final_norm=nn.LayerNorm(latent_dim, eps=layer_norm_eps, elementwise_affine=False)
                if (encoder_last_ln or not use_variation) else nn.Identity(),
            )
        )
        self.decoder = nn.ModuleDict(
            dict(
                in_layer=nn.Linear(latent_dim, dim, bias=bias),
                blocks=nn.ModuleList([TextVAEBlock(cfg) for _ in range(decoder_num_blocks)]),
                unpatch_layer=nn.Linear(dim, patch_size * dim),
                final_norm=nn.LayerNorm(dim, eps=layer_norm_eps),
                final_layer=nn.Linear(dim, vocab_size, bias=bias),
            )
        )
        self.init_weights()

    @property
    def mask_token_id(self) -> int:
        """The extra embedding row, used as [MASK] by the masking loss."""
        return self.config.vocab_size

    def init_weights(self) -> None:
        """Truncated-normal init (±cutoff·std) for Linear/Embedding/Conv, unit/zero LayerNorms."""
        std, cutoff = self.config.init_std, (self.config.init_cutoff_factor or 3.0) * self.config.init_std
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding, nn.Conv1d)):
                nn.init.trunc_normal_(m.weight, std=std, a=-cutoff, b=cutoff)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm) and m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ helpers
    def _rope(self, position_ids: torch.Tensor, dtype: torch.dtype):
        cos, sin = half_split_rope_tables(position_ids, self.config.dim // self.config.num_heads, self.config.rope_theta)
        if not self.config.rope_full_precision:
            cos, sin = cos.to(dtype), sin.to(dtype)
        return cos, sin

    def _mask(self, q_pos, k_pos, k_valid, q_valid):
        block = self.config.block_size if self.config.block_causal else None
        return block_causal_mask(q_pos, k_pos, k_valid, block, q_valid)

    # ------------------------------------------------------------------ encoder
    def encode(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None) -> TextLatentPosterior:
        """Encode token ids ``(B, L)`` (``L`` a multiple of ``patch_size``) into q(z|x) over ``(B, L/p, c)``.

        ``attention_mask`` ``(B, L)`` marks real tokens (True/1); padding may only sit at the end.
        """
        p = self.config.patch_size
        if input_ids.shape[1] == 0 or input_ids.shape[1] % p:
            raise ValueError(f"input_ids length {input_ids.shape[1]} must be a positive multiple of patch_size={p}.")
        x = self.encoder.wte(input_ids)  # (B, L, D)
        x = self.encoder.patch_embedder(x.transpose(1, 2)).transpose(1, 2)  # (B, L/p, D)
        n = x.shape[1]
        pos = torch.arange(n, device=x.device).expand(x.shape[0], n)
        valid = None if attention_mask is None else attention_mask.bool().unflatten(1, (n, p)).any(-1)
        mask = self._mask(pos, pos, valid, valid)
        rope = self._rope(pos, x.dtype)
        for block in self.encoder.blocks:
            x = block(x, rope, mask)
        y = self.encoder.final_layer(x)  # (B, n, 2c) = [mean | logvar]
        if not self.config.use_variation:
            return TextLatentPosterior(self.encoder.final_norm(y))
        mean, logvar = y.chunk(2, dim=-1)
        return TextLatentPosterior(self.encoder.final_norm(mean), logvar)

    # ------------------------------------------------------------------ decoder
    def decode(
        self,
        latents: torch.Tensor,
        position_ids: torch.LongTensor | None = None,
        valid: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        commit: bool = False,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Latents ``(B, L, c)`` -> logits ``(B, L·p, V)``, attending to ``kv_cache`` history if given.

        Args:
            position_ids: ``(B, L)`` positions within each sample; default continues after the cache.
            valid: ``(B, L)`` False for padding rows.
            commit: append this call's keys/values to ``kv_cache`` (official ``update_kv=True``).
            attention_mask: boolean ``(B, 1, L, Lk)`` replacing the block-causal mask (True = may attend),
                e.g. the training "clean copy beside estimate" mask of :func:`~colabridge.training.losses.rounding_loss`.
        """
        bsz, n, _ = latents.shape
        if position_ids is None:
            position_ids = next_positions(kv_cache, bsz, n, latents.device)
        if valid is None:
            valid = torch.ones(bsz, n, dtype=torch.bool, device=latents.device)
        k_pos, k_valid = (position_ids, valid) if kv_cache is None else kv_cache.layout(position_ids, valid)
        mask = self._mask(position_ids, k_pos, k_valid, valid) if attention_mask is None else attention_mask
        x = self.decoder.in_layer(latents)
        rope = self._rope(position_ids, x.dtype)
        for i, block in enumerate(self.decoder.blocks):
            x = block(x, rope, mask, kv_cache, i)
        if kv_cache is not None and commit:
            kv_cache.commit(position_ids, valid)
        x = self.decoder.unpatch_layer(x)  # (B, n, p·D), channel-major "(c ps)"
        x = x.unflatten(-1, (-1, self.config.patch_size)).transpose(-1, -2).flatten(1, 2)  # (B, n·p, D)
        return self.decoder.final_layer(self.decoder.final_norm(x))  # (B, n·p, V)

    def new_cache(self, capacity: int = 256) -> KVCache:
        """An empty decoder cache for block-wise decoding (``capacity`` tokens preallocated, grows)."""
        return KVCache(self.config.decoder_num_blocks, capacity)

    def normalize(self, latents: torch.Tensor) -> torch.Tensor:
        """Latent normalisation ``(z - shifting_factor) · scaling_factor`` of encoder latents ``(B, L, c)``.

        The normalised space is the DiT's *and the decoder's*: the official inference decodes the
        normalised latents with no inverse (spec §4.2, §7.10), so training decodes them too.
        """
        return (latents - self.config.shifting_factor) * self.config.scaling_factor

    @torch.no_grad()
    def set_latent_stats(self, shift: float, scale: float) -> None:
        """Store new ``shifting_factor``/``scaling_factor`` and refit ``decoder.in_layer`` to them.

        The decoder reads ``normalize(z)``; changing the statistics changes that input, so the input
        layer is re-parametrised exactly: with ``x_old = x_new·(s_old/s_new) + (shift_new − shift_old)·s_old``,
        ``W' = W·s_old/s_new`` and ``b' = b + (shift_new − shift_old)·s_old·W·1``. Then
        ``decode(normalize(z))`` is unchanged for every ``z`` (up to float round-off).
        """
        if scale == 0:
            raise ValueError("set_latent_stats: scale=0 would map every latent to 0; estimate the statistics on real data.")
        layer = self.decoder.in_layer
        old_shift, old_scale = self.config.shifting_factor, self.config.scaling_factor
        offset = (shift - old_shift) * old_scale
        if layer.bias is None and offset != 0:
            raise ValueError(f"set_latent_stats: the decoder input layer has no bias (bias=False), so the shift "
                             f"{old_shift} -> {shift} cannot be folded into it; keep shift={old_shift} or use bias=True.")
        if layer.bias is not None:
            layer.bias.add_(offset * layer.weight.sum(dim=1))  # (dim,)
        layer.weight.mul_(old_scale / scale)
        self.register_to_config(shifting_factor=float(shift), scaling_factor=float(scale))

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstruction logits from the normalised posterior mode, as the pipeline decodes (no cache)."""
        return self.decode(self.normalize(self.encode(input_ids, attention_mask).mode()))


def _check_vae_config(cfg) -> None:
    """Reject configs the official code crashes on or silently mishandles (spec §7)."""
    if cfg.dim % cfg.num_heads:
        raise ValueError(f"dim={cfg.dim} must be divisible by num_heads={cfg.num_heads}.")
    if cfg.shared_heads_kv not in (1, cfg.num_heads):
        raise ValueError(
            f"shared_heads_kv={cfg.shared_heads_kv} is not supported: use 1 (one k/v head per query head) "
            f"or num_heads={cfg.num_heads} (a single shared k/v head); other values crash the official code."
        )
    if cfg.layer_norm_type != "layer_norm":
        raise ValueError(f"layer_norm_type={cfg.layer_norm_type!r}: only 'layer_norm' is implemented.")
    if cfg.act not in ACTIVATIONS:
        raise ValueError(f"act={cfg.act!r} is not one of {ACTIVATIONS}.")
    if cfg.act == "swiglu" and cfg.ffn_dim % 2:
        raise ValueError(f"ffn_dim={cfg.ffn_dim} must be even for act='swiglu'.")
    if (cfg.dim // cfg.num_heads) % 2:
        raise ValueError(f"head dim {cfg.dim // cfg.num_heads} must be even for RoPE.")
    if cfg.block_size < 1 or cfg.patch_size < 1:
        raise ValueError(f"block_size={cfg.block_size} and patch_size={cfg.patch_size} must be >= 1.")
