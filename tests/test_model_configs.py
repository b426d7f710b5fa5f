"""Non-default configs of the Cola models: structure, save/load round-trips, cached vs uncached maths.

Every model here is tiny and built in code. Weights are perturbed after init (as the fixture's were)
so LayerNorm gains are not 1, biases are not 0 and the DiT's adaLN-Zero layers are live: otherwise a
fresh DiT outputs zeros and every equality below would hold trivially.
"""

from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from colabridge import checkpoints
from colabridge.models import ColaDiT, ColaTextVAE, KVCache
from colabridge.models.attention import block_causal_mask
from colabridge.pipelines import ColaPipeline, load_tokenizer
from colabridge.sampling import CachedStream

TOKENIZER = Path(__file__).parent / "fixtures" / "cola-official-tiny" / "tokenizer.json"
BLOCK = 8
ATOL = 1e-5

VAE_BASE = dict(vocab_size=50, encoder_num_blocks=1, decoder_num_blocks=2, dim=32, ffn_dim=64, latent_dim=4,
                num_heads=4, block_size=BLOCK)
DIT_BASE = dict(txt_in_channels=4, txt_out_channels=4, txt_dim=32, emb_dim=32, heads=2, head_dim=16,
                expand_ratio=2, num_layers=2, rope_dim=16, block_size=BLOCK)

# name -> (config overrides, {state-dict key: expected shape, or None if the key must be absent})
VAE_VARIANTS = {
    "shared_kv": (dict(shared_heads_kv=4), {  # one k/v head of width dim/num_heads = 8
        "encoder.blocks.0.qkv_proj.weight": (32 + 2 * 8, 32), "decoder.blocks.0.k_norm.weight": (8,)}),
    "qk_bias_clip": (dict(qk_bias=True, clip_qkv=0.05), {"decoder.blocks.1.qkv_proj.bias": (96,)}),
    "non_affine_norms": (dict(layer_norm_affine=False, qk_norm_affine=False), {
        "encoder.blocks.0.norm_attn.weight": None, "encoder.blocks.0.q_norm.weight": None,
        "decoder.blocks.0.k_norm.bias": None, "decoder.blocks.0.norm_ffn.weight": (32,)}),  # norm_ffn stays affine
    "no_qk_norm": (dict(qk_norm=False), {"decoder.blocks.0.q_norm.weight": None, "decoder.blocks.0.qkv_proj.bias": None}),
    "pre_norm": (dict(post_norm=False), {"decoder.blocks.0.norm_attn.weight": (32,)}),
    "no_bias": (dict(bias=False), {
        "decoder.blocks.0.attn_out_proj.bias": None, "decoder.blocks.0.ffn_out.bias": None,
        "decoder.final_layer.bias": None, "decoder.in_layer.bias": None, "encoder.final_layer.bias": None,
        "decoder.unpatch_layer.bias": (32,), "encoder.patch_embedder.bias": (32,)}),  # always biased
    "silu": (dict(act="silu"), {"decoder.blocks.0.ffn_out.weight": (32, 64)}),
    "gelu": (dict(act="gelu", ffn_dim=48), {"decoder.blocks.0.ffn_out.weight": (32, 48)}),
    "no_variation": (dict(use_variation=False), {"encoder.final_layer.weight": (4, 32)}),
    "no_last_ln": (dict(encoder_last_ln=False), {"encoder.final_layer.weight": (8, 32)}),
    "rope_theta": (dict(rope_theta=1000.0), {}),
    "combined": (dict(shared_heads_kv=4, qk_bias=True, clip_qkv=0.5, layer_norm_affine=False, qk_norm_affine=False,
                      post_norm=False, bias=False, act="gelu", use_variation=False, encoder_last_ln=False,
                      rope_theta=10000.0), {"decoder.blocks.0.norm_attn.weight": None}),
}

DIT_VARIANTS = {
    "qk_bias": (dict(qk_bias=True), {"blocks.0.msa.proj_qkv.bias": (96,), "blocks.1.msa.proj_out.bias": (32,)}),
    "narrow_inner": (dict(heads=2, head_dim=8, rope_dim=8), {  # heads*head_dim = 16 != txt_dim = 32
        "blocks.0.msa.proj_qkv.weight": (48, 32), "blocks.0.msa.proj_out.weight": (32, 16),
        "blocks.0.msa.proj_qkv.bias": None}),
    "partial_rope": (dict(rope_dim=4), {"blocks.0.msa.rope.rope.freqs": (2,), "blocks.0.msa.norm_q.weight": (16,)}),
    "patch2": (dict(patch_size=2), {"txt_in.proj.weight": (32, 8), "txt_out.proj.weight": (8, 32)}),
    "combined": (dict(qk_bias=True, heads=3, head_dim=8, rope_dim=6, norm_eps=1e-6), {
        "blocks.0.msa.proj_qkv.weight": (72, 32), "blocks.0.msa.rope.rope.freqs": (3,)}),
}


def perturb(model, seed: int = 0, scale: float = 0.1):
    """Add noise to every parameter, as the official fixture did, so no layer is at its init value."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return model.eval()


def make_vae(seed: int = 0, **overrides) -> ColaTextVAE:
    torch.manual_seed(seed)
    return perturb(ColaTextVAE(**{**VAE_BASE, **overrides}), seed)


def make_dit(seed: int = 0, **overrides) -> ColaDiT:
    torch.manual_seed(seed)
    return perturb(ColaDiT(**{**DIT_BASE, **overrides}), seed)


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


def dit_inputs(dit, length: int, batch: int = 2, seed: int = 1):
    """Latents ``(B, length·p, C)`` and per-token timesteps ``(B, length)`` (one per DiT token)."""
    gen = torch.Generator().manual_seed(seed)
    p = dit.config.patch_size
    x = torch.randn(batch, length * p, dit.config.txt_in_channels, generator=gen)
    t = torch.rand(batch, length, generator=gen) * 1000
    return x, t


def vae_latents(vae, length: int, batch: int = 2, seed: int = 1):
    return torch.randn(batch, length, vae.config.latent_dim, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- structure + round-trips


@pytest.mark.parametrize("name", list(VAE_VARIANTS))
def test_vae_variant_structure_and_roundtrip(name, tmp_path):
    overrides, shapes = VAE_VARIANTS[name]
    vae = make_vae(**overrides)
    state = vae.state_dict()
    for key, shape in shapes.items():
        if shape is None:
            assert key not in state, key
        else:
            assert tuple(state[key].shape) == shape, key

    checkpoints.save_official(vae, tmp_path / "official")
    loaded = checkpoints.model_from_official(ColaTextVAE, tmp_path / "official")
    assert_same_state(vae, loaded)
    assert {k: loaded.config[k] for k in overrides} == overrides

    vae.save_pretrained(tmp_path / "diffusers")
    reloaded = ColaTextVAE.from_pretrained(tmp_path / "diffusers").eval()
    assert_same_state(vae, reloaded)
    assert {k: reloaded.config[k] for k in overrides} == overrides
    ids = torch.randint(0, VAE_BASE["vocab_size"], (2, 2 * BLOCK), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(vae(ids), reloaded(ids))
        assert torch.equal(vae(ids), loaded(ids))


@pytest.mark.parametrize("name", list(DIT_VARIANTS))
def test_dit_variant_structure_and_roundtrip(name, tmp_path):
    overrides, shapes = DIT_VARIANTS[name]
    dit = make_dit(**overrides)
    state = dit.state_dict()
    for key, shape in shapes.items():
        if shape is None:
            assert key not in state, key
        else:
            assert tuple(state[key].shape) == shape, key

    checkpoints.save_official(dit, tmp_path / "official")
    loaded = checkpoints.model_from_official(ColaDiT, tmp_path / "official")
    assert_same_state(dit, loaded)
    assert {k: loaded.config[k] for k in overrides} == overrides

    dit.save_pretrained(tmp_path / "diffusers")
    reloaded = ColaDiT.from_pretrained(tmp_path / "diffusers").eval()
    assert_same_state(dit, reloaded)
    x, t = dit_inputs(dit, BLOCK)
    with torch.no_grad():
        assert torch.equal(dit(x, t).sample, reloaded(x, t).sample)
        assert torch.equal(dit(x, t).sample, loaded(x, t).sample)


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("name", list(VAE_VARIANTS))
def test_vae_variant_shapes(name):
    overrides, _ = VAE_VARIANTS[name]
    vae = make_vae(**overrides)
    ids = torch.randint(0, VAE_BASE["vocab_size"], (3, 2 * BLOCK))
    with torch.no_grad():
        posterior = vae.encode(ids)
        logits = vae.decode(posterior.mode())
    assert posterior.mean.shape == (3, 2 * BLOCK, VAE_BASE["latent_dim"])
    if vae.config.use_variation:
        assert posterior.logvar.shape == posterior.mean.shape
    else:
        assert posterior.logvar is None
    assert logits.shape == (3, 2 * BLOCK, VAE_BASE["vocab_size"])
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", list(DIT_VARIANTS))
def test_dit_variant_shapes(name):
    overrides, _ = DIT_VARIANTS[name]
    dit = make_dit(**overrides)
    x, t = dit_inputs(dit, 2 * BLOCK, batch=3)
    with torch.no_grad():
        out = dit(x, t).sample
        scalar_t = dit(x, 500.0).sample
        per_sample_t = dit(x, torch.full((3,), 500.0)).sample
    assert out.shape == (3, 2 * BLOCK * dit.config.patch_size, DIT_BASE["txt_out_channels"]) == x.shape
    assert torch.isfinite(out).all()
    assert torch.equal(scalar_t, per_sample_t)  # scalar and (B,) timesteps broadcast alike


def test_vae_clip_qkv_takes_effect():
    """The clip variant must actually clip (otherwise the variants above would not test it)."""
    clipped = make_vae(qk_bias=True, clip_qkv=0.05)
    free = ColaTextVAE(**{**VAE_BASE, "qk_bias": True}).eval()
    free.load_state_dict(clipped.state_dict())
    ids = torch.randint(0, VAE_BASE["vocab_size"], (1, BLOCK))
    with torch.no_grad():
        assert not torch.allclose(clipped(ids), free(ids), atol=1e-3)


# --------------------------------------------------------------------------- cached vs uncached


@pytest.mark.parametrize("name", list(DIT_VARIANTS))
def test_dit_cached_blocks_match_uncached(name):
    overrides, _ = DIT_VARIANTS[name]
    dit = make_dit(**overrides)
    p = dit.config.patch_size
    x, t = dit_inputs(dit, 3 * BLOCK)
    with torch.no_grad():
        full = dit(x, t).sample  # default block-causal mask, positions 0..L-1
        cache = dit.new_cache()
        parts = [
            dit(x[:, b * BLOCK * p : (b + 1) * BLOCK * p], t[:, b * BLOCK : (b + 1) * BLOCK], kv_cache=cache,
                commit=True).sample
            for b in range(3)
        ]
    assert cache.length == 3 * BLOCK
    assert full.abs().max() > 1e-2  # the perturbed model is live, so the comparison means something
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("name", list(VAE_VARIANTS))
def test_vae_cached_decode_matches_uncached(name):
    overrides, _ = VAE_VARIANTS[name]
    vae = make_vae(**overrides)
    z = vae_latents(vae, 3 * BLOCK)
    with torch.no_grad():
        full = vae.decode(z)
        cache = vae.new_cache()
        parts = [vae.decode(z[:, b * BLOCK : (b + 1) * BLOCK], kv_cache=cache, commit=True) for b in range(3)]
    assert cache.length == 3 * BLOCK
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=ATOL, rtol=1e-5)


def test_uncommitted_query_does_not_enter_history():
    """``commit=False`` leaves the history as it was: the next committed block sees only committed keys."""
    dit = make_dit()
    x, t = dit_inputs(dit, 2 * BLOCK)
    with torch.no_grad():
        full = dit(x, t).sample
        cache = dit.new_cache()
        dit(x[:, :BLOCK], t[:, :BLOCK], kv_cache=cache, commit=True)
        dit(torch.randn_like(x[:, BLOCK:]), t[:, BLOCK:], kv_cache=cache)  # a draft, not committed
        second = dit(x[:, BLOCK:], t[:, BLOCK:], kv_cache=cache, commit=True).sample
    assert cache.length == 2 * BLOCK
    torch.testing.assert_close(second, full[:, BLOCK:], atol=ATOL, rtol=1e-5)


HISTORY_LENGTHS = [2 * BLOCK, 0, BLOCK]  # per sample, left-padded to the longest


def _left_padded_history(channels: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    width = max(HISTORY_LENGTHS)
    hist = torch.randn(len(HISTORY_LENGTHS), width, channels, generator=gen)
    valid = torch.zeros(len(HISTORY_LENGTHS), width, dtype=torch.bool)
    for i, n in enumerate(HISTORY_LENGTHS):
        valid[i, width - n :] = True
    hist = hist.masked_fill(~valid[..., None], 123.0)  # padding values must not matter
    blocks = torch.randn(2, len(HISTORY_LENGTHS), BLOCK, channels, generator=gen)
    return hist, valid, blocks


def test_dit_batched_histories_match_single_runs():
    dit = make_dit(qk_bias=True, rope_dim=8)
    hist, valid, blocks = _left_padded_history(DIT_BASE["txt_in_channels"], seed=5)
    t_block = torch.tensor([937.5, 250.0, 600.0])  # per sample
    with torch.no_grad():
        stream = CachedStream(dit, dit.new_cache(), len(HISTORY_LENGTHS), torch.device("cpu"))
        stream.prefill(hist, valid, torch.zeros(valid.shape))
        first = stream.query(blocks[0], t_block, commit=True).sample
        second = stream.query(blocks[1], t_block).sample
        for i, n in enumerate(HISTORY_LENGTHS):
            # plain reference: one uncached forward of this sample's history + both blocks
            seq = torch.cat((hist[i, hist.shape[1] - n :], blocks[0, i], blocks[1, i]))[None]
            t = torch.cat((torch.zeros(n), torch.full((2 * BLOCK,), float(t_block[i]))))[None]
            ref = dit(seq, t).sample[0, n:]
            torch.testing.assert_close(first[i], ref[:BLOCK], atol=ATOL, rtol=1e-5)
            torch.testing.assert_close(second[i], ref[BLOCK:], atol=ATOL, rtol=1e-5)
    assert stream.lengths.tolist() == [n + BLOCK for n in HISTORY_LENGTHS]


def test_vae_batched_histories_match_single_runs():
    vae = make_vae(shared_heads_kv=4, post_norm=False)
    hist, valid, blocks = _left_padded_history(VAE_BASE["latent_dim"], seed=6)
    with torch.no_grad():
        stream = CachedStream(vae.decode, vae.new_cache(), len(HISTORY_LENGTHS), torch.device("cpu"))
        stream.prefill(hist, valid)
        first = stream.query(blocks[0], commit=True)
        second = stream.query(blocks[1])
        for i, n in enumerate(HISTORY_LENGTHS):
            seq = torch.cat((hist[i, hist.shape[1] - n :], blocks[0, i], blocks[1, i]))[None]
            ref = vae.decode(seq)[0, n:]
            torch.testing.assert_close(first[i], ref[:BLOCK], atol=ATOL, rtol=1e-5)
            torch.testing.assert_close(second[i], ref[BLOCK:], atol=ATOL, rtol=1e-5)


def test_cache_rejects_other_batch_size():
    dit = make_dit()
    cache = dit.new_cache()
    x, t = dit_inputs(dit, BLOCK, batch=2)
    with torch.no_grad():
        dit(x, t, kv_cache=cache, commit=True)
        with pytest.raises(ValueError, match="kv_cache holds 2 samples"):
            dit(x[:1], t[:1], kv_cache=cache)


def test_cache_select_keeps_chosen_samples():
    dit = make_dit()
    x, t = dit_inputs(dit, 2 * BLOCK, batch=3)
    with torch.no_grad():
        full = dit(x, t).sample
        cache = dit.new_cache()
        dit(x[:, :BLOCK], t[:, :BLOCK], kv_cache=cache, commit=True)
        kept = cache.select(torch.tensor([2, 0]))
        assert isinstance(kept, KVCache) and kept.batch_size == 2
        out = dit(x[[2, 0], BLOCK:], t[[2, 0], BLOCK:], kv_cache=kept).sample
    torch.testing.assert_close(out, full[[2, 0], BLOCK:], atol=ATOL, rtol=1e-5)


# --------------------------------------------------------------------------- masks


def test_block_causal_mask_table():
    pos = torch.arange(6)[None]
    T, F = True, False
    expected = torch.tensor([
        [T, T, F, F, F, F],
        [T, T, F, F, F, F],
        [T, T, T, T, F, F],
        [T, T, T, T, F, F],
        [T, T, T, T, T, T],
        [T, T, T, T, T, T],
    ])
    mask = block_causal_mask(pos, pos, None, 2)
    assert mask.shape == (1, 1, 6, 6)
    assert torch.equal(mask[0, 0], expected)


def test_block_causal_mask_padding_table():
    """Sample 0: 4 real tokens. Sample 1: left-padded, 2 pads then positions 0, 1 (one block)."""
    T, F = True, False
    q_pos = k_pos = torch.tensor([[0, 1, 2, 3], [0, 0, 0, 1]])
    valid = torch.tensor([[T, T, T, T], [F, F, T, T]])
    expected = torch.tensor([
        [[T, T, F, F], [T, T, F, F], [T, T, T, T], [T, T, T, T]],
        # pad queries see everything (finite, discarded); real queries see only real keys
        [[T, T, T, T], [T, T, T, T], [F, F, T, T], [F, F, T, T]],
    ])
    mask = block_causal_mask(q_pos, k_pos, valid, 2, valid)
    assert torch.equal(mask[:, 0], expected)
    # without a block structure only the padding constraint remains
    bidir = block_causal_mask(q_pos, k_pos, valid, None, valid)
    assert torch.equal(bidir[0, 0], torch.ones(4, 4, dtype=torch.bool))
    assert torch.equal(bidir[1, 0], expected[1])


def test_block_causal_mask_all_allowed_is_none():
    """Queries in the last block over a full history, or nothing to mask: ``None`` (SDPA's fast path)."""
    assert block_causal_mask(torch.tensor([[4, 5]]), torch.arange(6)[None], None, 2) is None
    assert block_causal_mask(torch.arange(4)[None], torch.arange(4)[None], None, None) is None
    assert block_causal_mask(torch.tensor([[2, 3]]), torch.arange(6)[None], None, 2) is not None


# --------------------------------------------------------------------------- init


def test_dit_init_is_adaln_zero():
    torch.manual_seed(0)
    dit = ColaDiT(**DIT_BASE).eval()
    x, t = dit_inputs(dit, 2 * BLOCK)
    with torch.no_grad():
        assert torch.count_nonzero(dit(x, t).sample) == 0
        perturb(dit)
        assert torch.count_nonzero(dit(x, t).sample) > 0
        dit.init_weights()  # re-init restores v = 0
        assert torch.count_nonzero(dit(x, t).sample) == 0
    assert torch.count_nonzero(dit.txt_in.proj.weight) > 0  # only modulation/output layers are zeroed


def test_vae_init():
    torch.manual_seed(0)
    vae = ColaTextVAE(**{**VAE_BASE, "init_std": 0.05, "init_cutoff_factor": 2})
    perturb(vae)
    vae.init_weights()
    for name, m in vae.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d)):
            assert m.weight.abs().max() <= 0.1 + 1e-6, name  # truncated at cutoff·std
            if getattr(m, "bias", None) is not None:
                assert torch.count_nonzero(m.bias) == 0, name
        elif isinstance(m, torch.nn.LayerNorm) and m.weight is not None:
            assert torch.equal(m.weight, torch.ones_like(m.weight)), name
            assert torch.count_nonzero(m.bias) == 0, name
    assert 0.03 < vae.encoder.wte.weight.std() < 0.05
    ids = torch.randint(0, VAE_BASE["vocab_size"], (2, BLOCK))
    with torch.no_grad():
        assert torch.isfinite(vae(ids)).all()


# --------------------------------------------------------------------------- config validation


@pytest.mark.parametrize(
    "cls, overrides, pattern",
    [
        (ColaTextVAE, dict(shared_heads_kv=2), r"shared_heads_kv=2 is not supported.*num_heads=4"),
        (ColaDiT, dict(emb_dim=48), r"emb_dim=48 must equal txt_dim=32"),
        (ColaDiT, dict(rope_dim=7), r"rope_dim=7 must be even"),
        (ColaDiT, dict(rope_dim=18), r"rope_dim=18 .*head_dim=16"),
    ],
)
def test_config_validation(cls, overrides, pattern):
    base = VAE_BASE if cls is ColaTextVAE else DIT_BASE
    with pytest.raises(ValueError, match=pattern):
        cls(**{**base, **overrides})


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TOKENIZER)


def test_pipeline_accepts_matching_components(tokenizer):
    pipe = ColaPipeline(make_vae(vocab_size=len(tokenizer)), make_dit(), FlowMatchEulerDiscreteScheduler(), tokenizer)
    assert pipe.block_size == BLOCK


@pytest.mark.parametrize(
    "vae_kw, dit_kw, pattern",
    [
        (dict(latent_dim=6), {}, r"latent_dim=6 must equal the transformer's txt_in_channels=4"),
        ({}, dict(txt_in_channels=6, txt_out_channels=6), r"latent_dim=4 must equal .*txt_in_channels=6"),
        ({}, dict(block_size=4), r"VAE block_size=8 != transformer block_size=4"),
    ],
)
def test_pipeline_rejects_mismatched_components(tokenizer, vae_kw, dit_kw, pattern):
    vae = ColaTextVAE(**{**VAE_BASE, "vocab_size": len(tokenizer), **vae_kw})
    dit = ColaDiT(**{**DIT_BASE, **dit_kw})
    with pytest.raises(ValueError, match=pattern):
        ColaPipeline(vae, dit, FlowMatchEulerDiscreteScheduler(), tokenizer)
