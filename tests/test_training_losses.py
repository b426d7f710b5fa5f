"""Training objectives: finiteness, descent on a fixed batch, the 2L mask, and train/inference consistency."""

import copy

import pytest
import torch

from colabridge import ColaDiT, ColaTextVAE
from colabridge.training.losses import (
    FlowMatchingConfig,
    JointLossConfig,
    TokenHead,
    VAELossConfig,
    block_output,
    estimate_latent_stats,
    flow_matching_loss,
    flow_matching_pass,
    gaussian_kl,
    joint_loss,
    mask_tokens,
    rounding_loss,
    sample_timesteps,
    store_latent_stats,
    two_l_mask,
    token_cross_entropy,
    two_l_velocity,
    vae_loss,
    vae_terms,
)

VOCAB, LATENT, BLOCK = 40, 8, 4


def tiny_vae(seed=0, **overrides):
    torch.manual_seed(seed)
    return ColaTextVAE(**{**dict(vocab_size=VOCAB, encoder_num_blocks=1, decoder_num_blocks=1, dim=32, ffn_dim=64,
                                 latent_dim=LATENT, num_heads=2, block_size=BLOCK), **overrides})


def tiny_dit(seed=0, randomize=False):
    torch.manual_seed(seed)
    dit = ColaDiT(txt_in_channels=LATENT, txt_out_channels=LATENT, txt_dim=32, emb_dim=32, heads=2, head_dim=16,
                  num_layers=2, rope_dim=8, block_size=BLOCK)
    if randomize:  # adaLN-Zero starts at v = 0; perturb so outputs depend on the attention pattern
        with torch.no_grad():
            for p in dit.parameters():
                p.add_(0.2 * torch.randn_like(p))
    return dit


def batch(seed=0, bsz=3, length=12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (bsz, length), generator=g)
    mask = torch.ones(bsz, length, dtype=torch.bool)
    mask[0, -3:] = False  # padding tail excluded from the loss
    return ids, mask


def descend(params, loss_fn, steps=6, lr=3e-3):
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    for _ in range(steps):
        loss, logs = loss_fn(torch.Generator().manual_seed(1))  # same noise every step: a fixed objective
        assert torch.isfinite(loss) and all(torch.isfinite(v) for v in logs.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_two_l_mask_matches_table():
    pos = torch.arange(4)[None]
    got = two_l_mask(pos, 2)[0, 0].int()
    #          c0 c1 c2 c3 n0 n1 n2 n3
    table = [[1, 1, 0, 0, 0, 0, 0, 0],  # c0
             [1, 1, 0, 0, 0, 0, 0, 0],  # c1
             [1, 1, 1, 1, 0, 0, 0, 0],  # c2
             [1, 1, 1, 1, 0, 0, 0, 0],  # c3
             [0, 0, 0, 0, 1, 1, 0, 0],  # n0
             [0, 0, 0, 0, 1, 1, 0, 0],  # n1
             [1, 1, 0, 0, 0, 0, 1, 1],  # n2
             [1, 1, 0, 0, 0, 0, 1, 1]]  # n3
    assert got.tolist() == table


def test_two_l_mask_padding_and_per_sample_block_sizes():
    pos = torch.arange(4).expand(2, 4)
    valid = torch.tensor([[True, True, True, False], [True] * 4])
    m = two_l_mask(pos, torch.tensor([2, 1]), valid)[:, 0]
    real = [0, 1, 2, 4, 5, 6]
    assert not m[0, real, 3].any() and not m[0, real, 7].any()  # padded keys hidden from real queries
    assert not m[0, 6, 3] and not m[0, 6, 7]  # real noisy query n2 sees neither padded copy
    assert m[0, 3].all() and m[0, 7].all()  # padding queries see everything (finite outputs)
    # block size 1: noisy query n2 sees clean 0,1 and only itself among noisy keys
    assert m[1, 6].int().tolist() == [1, 1, 0, 0, 0, 0, 1, 0]


def test_history_drop_gives_the_uncond_branch():
    """A dropped block sees only itself: the velocity equals the sampler's CFG *uncond* (the block alone
    at positions 0…L−1, no cache); the other blocks keep their history."""
    dit = tiny_dit(randomize=True).eval()
    g = torch.Generator().manual_seed(4)
    bsz, n_blocks = 2, 3
    z0 = torch.randn(bsz, n_blocks * BLOCK, LATENT, generator=g)
    zt = torch.randn(bsz, n_blocks * BLOCK, LATENT, generator=g)
    t = torch.full((bsz, n_blocks * BLOCK), 600.0)
    drop = torch.zeros(bsz, n_blocks * BLOCK, dtype=torch.bool)
    drop[0, BLOCK: 2 * BLOCK] = True  # sample 0, block 1
    mask = two_l_mask(torch.arange(n_blocks * BLOCK)[None].expand(bsz, -1), BLOCK, history_drop=drop)[:, 0]
    n = n_blocks * BLOCK
    assert not mask[0, n + BLOCK: n + 2 * BLOCK, :n].any() and mask[1, n + BLOCK: n + 2 * BLOCK, :BLOCK].all()
    with torch.no_grad():
        kept = two_l_velocity(dit, z0, zt, t, BLOCK)
        dropped = two_l_velocity(dit, z0, zt, t, BLOCK, history_drop=drop)
        alone = dit(zt[:1, BLOCK: 2 * BLOCK], t[:1, :BLOCK]).sample
    torch.testing.assert_close(dropped[:1, BLOCK: 2 * BLOCK], alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(kept[:1, BLOCK: 2 * BLOCK], alone, atol=1e-3)
    keep = ~drop
    torch.testing.assert_close(dropped[keep], kept[keep])


def test_two_l_forward_equals_cached_block_by_block():
    dit = tiny_dit(randomize=True).eval()
    g = torch.Generator().manual_seed(3)
    bsz, n_blocks = 2, 3
    z0 = torch.randn(bsz, n_blocks * BLOCK, LATENT, generator=g)
    zt = torch.randn(bsz, n_blocks * BLOCK, LATENT, generator=g)
    t = torch.rand(bsz, generator=g)[:, None].expand(bsz, n_blocks * BLOCK) * 1000
    with torch.no_grad():
        full = two_l_velocity(dit, z0, zt, t, BLOCK)
        cache, outs = dit.new_cache(), []
        for b in range(n_blocks):
            sl = slice(b * BLOCK, (b + 1) * BLOCK)
            outs.append(dit(zt[:, sl], t[:, sl], kv_cache=cache).sample)  # noisy block over clean history
            dit(z0[:, sl], torch.zeros(bsz, BLOCK), kv_cache=cache, commit=True)  # commit clean block
    torch.testing.assert_close(full, torch.cat(outs, 1), atol=1e-5, rtol=1e-5)


def test_mask_tokens_respects_weights():
    ids = torch.arange(20).expand(4, 20)
    weights = torch.zeros(4, 20, dtype=torch.bool)
    weights[:, :10] = True
    masked_ids, masked = mask_tokens(ids, 99, 0.5, weights, torch.Generator().manual_seed(0))
    assert masked.any() and not masked[:, 10:].any()
    assert (masked_ids[masked] == 99).all() and (masked_ids[~masked] == ids[~masked]).all()


def test_timestep_densities():
    g = torch.Generator().manual_seed(0)
    t = sample_timesteps(4000, FlowMatchingConfig(logit_loc=1.0), generator=g)
    assert 0 < t.min() and t.max() < 1 and t.median() > 0.65  # sigmoid(1) = 0.73
    u = sample_timesteps(4000, FlowMatchingConfig(timestep_density="uniform"), generator=g)
    assert abs(u.mean().item() - 0.5) < 0.03
    with pytest.raises(ValueError, match="timestep_density"):
        FlowMatchingConfig(timestep_density="cosine")


def test_timesteps_per_block_are_shared_within_a_block_only(monkeypatch):
    import colabridge.training.losses as L

    seen = {}

    def spy(dit, z0, zt, timestep, block_size, *args, **kwargs):
        seen["t"], seen["block"] = timestep, block_size
        return torch.zeros_like(zt)

    monkeypatch.setattr(L, "two_l_velocity", spy)
    z0 = torch.randn(3, 16, LATENT)
    cfg = FlowMatchingConfig(timestep_per="block", block_sizes=[2, 4], prompt_block_prob=0.0)
    flow_matching_loss(tiny_dit(), z0, cfg=cfg, generator=torch.Generator().manual_seed(1))
    for t, bs in zip(seen["t"], seen["block"].tolist()):
        blocks = t.view(-1, bs)  # (blocks, tokens of a block)
        assert (blocks == blocks[:, :1]).all() and blocks[:, 0].unique().numel() == 16 // bs
    flow_matching_loss(tiny_dit(), z0, cfg=FlowMatchingConfig(prompt_block_prob=0.0))  # official: one t per row
    assert all(row.unique().numel() == 1 for row in seen["t"])
    with pytest.raises(ValueError, match="timestep_per"):
        FlowMatchingConfig(timestep_per="token")


def test_gaussian_kl_zero_for_identical_and_positive_otherwise():
    from colabridge.models.text_vae import TextLatentPosterior

    q = TextLatentPosterior(torch.randn(2, 3, 4), torch.randn(2, 3, 4))
    assert gaussian_kl(q, q).abs().max() < 1e-6
    p = TextLatentPosterior(q.mean + 0.5, q.logvar)
    assert (gaussian_kl(q, p) > 0).all()


def test_vae_loss_decreases():
    vae = tiny_vae()
    ids, mask = batch()
    cfg = VAELossConfig(mask_weight=0.5, kl_weight=1e-3)
    losses = descend(vae.parameters(), lambda g: vae_loss(vae, ids, mask, cfg, generator=g))
    assert losses[-1] < losses[0]
    _, logs = vae_loss(vae, ids, mask, cfg)
    assert set(logs) == {"loss", "recon", "kl", "mask", "acc"}


def test_flow_matching_loss_decreases():
    dit = tiny_dit()
    z0 = torch.randn(3, 12, LATENT, generator=torch.Generator().manual_seed(0))
    cfg = FlowMatchingConfig(block_sizes=[1, 2, 4], prompt_block_prob=0.3, history_drop_prob=0.3)
    losses = descend(dit.parameters(), lambda g: flow_matching_loss(dit, z0, cfg=cfg, generator=g))
    assert losses[-1] < losses[0]


def test_joint_loss_decreases_and_reaches_encoder():
    vae, dit = tiny_vae(), tiny_dit()
    ref = copy.deepcopy(vae).requires_grad_(False)
    ids, mask = batch()
    cfg = JointLossConfig(ref_weight=0.1)
    params = list(vae.parameters()) + list(dit.parameters())
    losses = descend(params, lambda g: joint_loss(vae, dit, ids, mask, cfg, ref, generator=g))
    assert losses[-1] < losses[0]
    _, logs = joint_loss(vae, dit, ids, mask, cfg, ref)
    assert {"recon", "mask", "kl", "fm", "ref_kl", "loss"} <= set(logs)


def test_fm_gradient_reaches_encoder_unless_detached():
    vae, dit = tiny_vae(), tiny_dit(randomize=True)
    ids, mask = batch()
    only_fm = dict(vae_weight=0.0, ref_weight=0.0)
    for detach, expect in ((False, True), (True, False)):
        vae.zero_grad()
        loss, _ = joint_loss(vae, dit, ids, mask, JointLossConfig(detach_latents=detach, **only_fm))
        loss.backward()
        grad = vae.encoder.final_layer.weight.grad
        assert (grad is not None and grad.abs().sum() > 0) == expect


def test_freeze_vae_mode_trains_only_the_dit():
    vae, dit = tiny_vae(), tiny_dit()
    ids, mask = batch()
    loss, logs = joint_loss(vae, dit, ids, mask, JointLossConfig(freeze_vae=True))
    loss.backward()
    assert all(p.grad is None for p in vae.parameters())
    assert any(p.grad is not None for p in dit.parameters())
    assert "recon" not in logs and "fm" in logs


def test_rounding_of_exact_estimates_is_the_block_causal_reconstruction():
    """With v̂ = z1 − z0 every estimate is z0, and the 2L decode of ``[z0 | ẑ0]`` must then equal the
    plain block-causal decode of z0: each estimated block sees exactly its clean history."""
    vae, dit = tiny_vae(), tiny_dit()
    ids, mask = batch()
    z0 = vae.normalize(vae.encode(ids).mode()).detach()
    fm_pass = flow_matching_pass(dit, z0, mask, FlowMatchingConfig(block_sizes=[BLOCK]),
                                 generator=torch.Generator().manual_seed(0))
    fm_pass.velocity = fm_pass.target
    ce, acc = rounding_loss(vae, fm_pass, ids)
    expected = token_cross_entropy(vae.decode(z0), ids, fm_pass.weights)
    torch.testing.assert_close(ce, expected, rtol=1e-5, atol=1e-6)
    assert 0.0 <= acc <= 1.0


def test_rounding_term_trains_the_dit_through_a_frozen_decoder():
    vae, dit = tiny_vae().requires_grad_(False), tiny_dit(randomize=True)
    ids, mask = batch()
    cfg = JointLossConfig(freeze_vae=True, round_weight=0.5)
    loss, logs = joint_loss(vae, dit, ids, mask, cfg)
    assert {"fm", "round_ce", "round_acc"} <= set(logs)
    torch.testing.assert_close(loss, logs["fm"] + 0.5 * logs["round_ce"])
    losses = descend(dit.parameters(), lambda g: joint_loss(vae, dit, ids, mask, cfg, generator=g))
    assert losses[-1] < losses[0]
    assert all(p.grad is None for p in vae.parameters())


def test_token_term_trains_the_dit_and_its_head_not_the_vae():
    vae, dit = tiny_vae().requires_grad_(False), tiny_dit(randomize=True)
    head = TokenHead(32, VOCAB)
    ids, mask = batch()
    cfg = JointLossConfig(freeze_vae=True, token_weight=0.5, token_layer=0)
    loss, logs = joint_loss(vae, dit, ids, mask, cfg, token_head=head)
    assert {"fm", "token_ce", "token_acc"} <= set(logs)
    torch.testing.assert_close(loss, logs["fm"] + 0.5 * logs["token_ce"])
    loss.backward()
    assert head.proj.weight.grad.abs().sum() > 0
    assert dit.blocks[0].msa.proj_qkv.weight.grad.abs().sum() > 0  # the token term reaches the prior
    assert dit.blocks[1].msa.proj_qkv.weight.grad is not None  # (and the FM term the blocks after ℓ)
    assert all(p.grad is None for p in vae.parameters())
    params = list(dit.parameters()) + list(head.parameters())
    token_ces = []

    def step(g):
        total, step_logs = joint_loss(vae, dit, ids, mask, cfg, generator=g, token_head=head)
        token_ces.append(float(step_logs["token_ce"]))
        return total, step_logs

    descend(params, step, steps=8, lr=1e-2)
    assert token_ces[-1] < token_ces[0]


def test_token_head_keeps_the_prior_block_causal():
    """The head reads each noisy token beside its clean history only: changing the last block's tokens
    leaves the logits of the earlier blocks unchanged (and changes its own)."""
    vae, dit = tiny_vae(), tiny_dit(randomize=True)
    head = TokenHead(32, VOCAB)
    ids, mask = batch(length=12)
    cfg = FlowMatchingConfig(block_sizes=[BLOCK])

    def logits(token_ids):
        z0 = vae.normalize(vae.encode(token_ids).mode()).detach()
        with block_output(dit, -1) as hidden:
            flow_matching_pass(dit, z0, mask, cfg, generator=torch.Generator().manual_seed(0))
        return head(hidden[0][:, hidden[0].shape[1] // 2:])

    changed = ids.clone()
    changed[:, -BLOCK:] = (changed[:, -BLOCK:] + 1) % VOCAB
    a, b = logits(ids), logits(changed)
    torch.testing.assert_close(a[:, :-BLOCK], b[:, :-BLOCK])
    assert not torch.allclose(a[:, -BLOCK:], b[:, -BLOCK:])


def test_token_head_predicts_every_token_of_a_patch():
    head = TokenHead(32, VOCAB, patch_size=2)
    assert head(torch.randn(3, 5, 32)).shape == (3, 10, VOCAB)


def test_token_term_needs_its_head_and_a_real_layer():
    vae, dit = tiny_vae(), tiny_dit()
    ids, mask = batch()
    with pytest.raises(ValueError, match="token_head"):
        joint_loss(vae, dit, ids, mask, JointLossConfig(freeze_vae=True, token_weight=1.0))
    with pytest.raises(ValueError, match="token_layer=2"):
        joint_loss(vae, dit, ids, mask, JointLossConfig(freeze_vae=True, token_weight=1.0, token_layer=2),
                   token_head=TokenHead(32, VOCAB))


def test_joint_needs_reference_when_weighted():
    vae, dit = tiny_vae(), tiny_dit()
    ids, mask = batch()
    with pytest.raises(ValueError, match="ref_vae"):
        joint_loss(vae, dit, ids, mask, JointLossConfig(ref_weight=1.0))


def test_latent_stats_normalise_latents():
    vae = tiny_vae()
    batches = [batch(seed=s) for s in range(3)]
    shift, scale = estimate_latent_stats(vae, batches)
    store_latent_stats(vae, shift, scale)
    assert vae.config.shifting_factor == pytest.approx(shift) and vae.config.scaling_factor == pytest.approx(scale)
    z = torch.cat([vae.normalize(vae.encode(ids).mode())[m] for ids, m in batches])
    assert abs(z.mean().item()) < 1e-4 and abs(z.std().item() - 1) < 1e-2


# --------------------------------------------------------------------------- latent scale/shift (spec §4.2)

SCALED = dict(scaling_factor=2.0, shifting_factor=0.5)  # far from the ≈1/≈0 of the shipped models


def record_decoder_inputs(vae):
    """Every tensor ``vae.decoder.in_layer`` receives, and the hook handle."""
    seen = []
    handle = vae.decoder.in_layer.register_forward_pre_hook(lambda _module, args: seen.append(args[0].detach().clone()))
    return seen, handle


def test_training_and_pipeline_hand_the_decoder_the_same_latents():
    """The official inference decodes *normalised* latents; the training decode path must too."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from colabridge import ColaPipeline

    vae = tiny_vae(**SCALED).eval()
    ids, _ = batch(length=3 * BLOCK)  # whole blocks: the pipeline's prefill decodes every prompt latent
    seen, handle = record_decoder_inputs(vae)
    with torch.no_grad():
        vae_terms(vae, ids, None, VAELossConfig(sample_posterior=False, mask_weight=0.0))
        pipe = ColaPipeline(vae, tiny_dit(), FlowMatchEulerDiscreteScheduler(), tokenizer=None)
        pipe.set_progress_bar_config(disable=True)
        pipe(prompt_ids=ids.tolist(), max_new_tokens=BLOCK, num_inference_steps=1, pad_token_id=0,
             stop_token_ids=[], output_type="ids")
        raw = vae.encode(ids).mode()
    handle.remove()
    training, prefill, generated = seen
    torch.testing.assert_close(prefill, training, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(training, (raw - 0.5) * 2.0)
    assert generated.shape == (ids.shape[0], BLOCK, LATENT)


def test_new_latent_stats_keep_what_the_decoder_reads():
    """Stage 1 trains on scale 1 / shift 0; storing other statistics refits the decoder input layer,
    so the pipeline (which decodes normalised latents) reads the text the training decoder did."""
    vae = tiny_vae().eval()
    ids, _ = batch()
    with torch.no_grad():
        trained = vae.decode(vae.normalize(vae.encode(ids).mode()))
        store_latent_stats(vae, SCALED["shifting_factor"], SCALED["scaling_factor"])
        assert (vae.config.shifting_factor, vae.config.scaling_factor) == (0.5, 2.0)
        torch.testing.assert_close(vae(ids), trained, atol=1e-5, rtol=1e-5)
        vae.set_latent_stats(shift=-0.3, scale=0.7)  # from non-trivial statistics to others
        torch.testing.assert_close(vae(ids), trained, atol=1e-5, rtol=1e-5)


def test_latent_shift_needs_a_decoder_bias():
    vae = tiny_vae(bias=False)
    with pytest.raises(ValueError, match="no bias"):
        vae.set_latent_stats(shift=0.5, scale=1.0)
    with pytest.raises(ValueError, match="scale=0"):
        vae.set_latent_stats(shift=0.0, scale=0.0)
    vae.set_latent_stats(shift=0.0, scale=2.0)  # a scale alone folds into the weight
    assert vae.config.scaling_factor == 2.0
