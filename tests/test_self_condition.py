"""Self-conditioning of the prior: zero-init start, train/inference consistency, the sampler's estimate."""

import copy

import pytest
import torch

from colabridge import ColaDiT, ColaPipeline
from colabridge.sampling.engine import SelfCondition
from colabridge.training.losses import FlowMatchingConfig, flow_matching_loss, two_l_velocity
from colabridge.training.trainer import load_dit

LATENT, BLOCK = 8, 4
CALL = dict(prompt=["The farmer wakes up early", "Rain"], max_new_tokens=12, noise_seed=5, stop_token_ids=[],
            prior_input_rounding=None)


def tiny_sc_dit(seed=0, randomize=True):
    torch.manual_seed(seed)
    dit = ColaDiT(txt_in_channels=LATENT, txt_out_channels=LATENT, txt_dim=32, emb_dim=32, heads=2, head_dim=16,
                  num_layers=2, rope_dim=8, block_size=BLOCK, self_condition=True)
    if randomize:
        with torch.no_grad():
            for p in dit.parameters():
                p.add_(0.2 * torch.randn_like(p))
    return dit


@pytest.fixture(scope="module")
def sc_pipe(official_pipe, tmp_path_factory):
    """The fixture pipeline with a self-conditioned copy of its prior, ``sc_in`` randomised."""
    folder = tmp_path_factory.mktemp("dit")
    official_pipe.transformer.save_pretrained(folder)
    dit = load_dit(str(folder), {"self_condition": True})
    with torch.no_grad():
        dit.sc_in.proj.weight.normal_(std=0.5)
    pipe = ColaPipeline(vae=official_pipe.vae, transformer=dit, tokenizer=official_pipe.tokenizer,
                        scheduler=copy.deepcopy(official_pipe.scheduler))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_zero_initialised_self_conditioning_keeps_the_outputs(official_pipe, tmp_path):
    official_pipe.transformer.save_pretrained(tmp_path)
    dit = load_dit(str(tmp_path), {"self_condition": True})
    assert dit.config.self_condition and (dit.sc_in.proj.weight == 0).all()
    pipe = ColaPipeline(vae=official_pipe.vae, transformer=dit, tokenizer=official_pipe.tokenizer,
                        scheduler=copy.deepcopy(official_pipe.scheduler))
    pipe.set_progress_bar_config(disable=True)
    assert pipe.self_conditioned and not official_pipe.self_conditioned
    assert torch.equal(pipe(**CALL).block_ids, official_pipe(**CALL).block_ids)


def test_self_cond_needs_a_self_conditioned_model(official_pipe):
    dit = official_pipe.transformer
    x = torch.zeros(1, BLOCK, dit.config.txt_in_channels)
    with pytest.raises(ValueError, match="self_condition=False"):
        dit(x, 500.0, self_cond=x)


def test_overrides_that_change_weights_are_rejected(official_pipe, tmp_path):
    official_pipe.transformer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="do not fit the weights"):
        load_dit(str(tmp_path), {"heads": official_pipe.transformer.config.heads * 2})
    with pytest.raises(ValueError, match="multiple of the stored depth"):
        load_dit(str(tmp_path), {"num_layers": official_pipe.transformer.config.num_layers + 1})


def test_a_grown_prior_computes_the_same_velocities(tmp_path):
    """num_layers = 3 × stored: stored block i lands at 3i, the new blocks pass their input through."""
    dit = tiny_sc_dit().eval()
    dit.save_pretrained(tmp_path)
    grown = load_dit(str(tmp_path), {"num_layers": 3 * dit.config.num_layers, "self_condition": True}).eval()
    assert grown.config.num_layers == 3 * dit.config.num_layers
    assert torch.equal(grown.blocks[3].msa.proj_qkv.weight, dit.blocks[1].msa.proj_qkv.weight)
    x, sc = torch.randn(2, 2 * BLOCK, LATENT), torch.randn(2, 2 * BLOCK, LATENT)
    t = torch.rand(2, 2 * BLOCK) * 1000
    assert torch.allclose(grown(x, t, self_cond=sc).sample, dit(x, t, self_cond=sc).sample, atol=1e-6)
    grown.blocks[1].ada.msa_out[1].bias.data.fill_(0.5)  # opening a new block's gate changes the output
    assert not torch.allclose(grown(x, t, self_cond=sc).sample, dit(x, t, self_cond=sc).sample, atol=1e-3)


def test_two_l_self_conditioning_equals_the_cached_sampler_layout():
    """Training's noisy copy reads ``self_cond``, its clean copy itself; the sampler commits history with
    its own values. Both layouts must give the same velocities."""
    dit = tiny_sc_dit().eval()
    g = torch.Generator().manual_seed(3)
    bsz, n_blocks = 2, 3
    z0, zt, sc = (torch.randn(bsz, n_blocks * BLOCK, LATENT, generator=g) for _ in range(3))
    t = torch.rand(bsz, generator=g)[:, None].expand(bsz, n_blocks * BLOCK) * 1000
    with torch.no_grad():
        full = two_l_velocity(dit, z0, zt, t, BLOCK, self_cond=sc)
        without = two_l_velocity(dit, z0, zt, t, BLOCK)
        cache, outs = dit.new_cache(), []
        for b in range(n_blocks):
            sl = slice(b * BLOCK, (b + 1) * BLOCK)
            outs.append(dit(zt[:, sl], t[:, sl], kv_cache=cache, self_cond=sc[:, sl]).sample)
            dit(z0[:, sl], torch.zeros(bsz, BLOCK), kv_cache=cache, commit=True, self_cond=z0[:, sl])
    torch.testing.assert_close(full, torch.cat(outs, 1), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(full, without, atol=1e-3)  # the estimate is read


def test_self_conditioned_flow_matching_trains_the_new_projection():
    dit = tiny_sc_dit(randomize=False)
    z0 = torch.randn(3, 12, LATENT, generator=torch.Generator().manual_seed(0))
    cfg = FlowMatchingConfig(self_condition_prob=1.0)
    opt = torch.optim.Adam(dit.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        loss, _ = flow_matching_loss(dit, z0, cfg=cfg, generator=torch.Generator().manual_seed(1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert dit.sc_in.proj.weight.abs().sum() > 0  # zero-initialised, moved by the loss


def test_self_condition_state_is_the_clean_estimate():
    sc = SelfCondition(True)
    x, v = torch.randn(2, BLOCK, LATENT), torch.randn(2, BLOCK, LATENT)
    t = torch.full((2, BLOCK), 750.0)
    t[0, 0] = 0.0  # a pinned token reads its own value
    assert (sc.kwargs(x, torch.float32)["self_cond"] == 0).all()  # first call: zeros
    sc.update(x, t, v)
    est = sc.kwargs(x, torch.float32, copies=2)["self_cond"]
    torch.testing.assert_close(est[:, :BLOCK], x - 0.75 * v * (t[..., None] > 0))
    assert torch.equal(est[:, BLOCK:], est[:, :BLOCK])
    assert SelfCondition(False).kwargs(x, torch.float32) == {}


def test_sampler_feeds_the_estimate_and_packed_equals_two_pass(sc_pipe, official_pipe):
    packed = sc_pipe(**CALL, packed_cfg=True)
    two_pass = sc_pipe(**CALL, packed_cfg=False)
    assert torch.equal(packed.block_ids, two_pass.block_ids)
    torch.testing.assert_close(packed.latents, two_pass.latents, atol=1e-5, rtol=0)
    base = official_pipe(**CALL)
    assert not torch.allclose(packed.latents, base.latents, atol=1e-3)  # the randomised sc_in is read
