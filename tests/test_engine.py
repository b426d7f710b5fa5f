"""The shared engine's fast paths equal the plain ones; streaming, callbacks, solvers, precision."""

import pytest
import torch

from colabridge import ColaPipeline

PROMPTS = ["The quick brown fox jumps over the lazy dog.", "Rain", "The farmer wakes up early to feed the cows"]
CALL = dict(prompt=PROMPTS, max_new_tokens=12, noise_seed=66, stop_token_ids=[])


def test_packed_cfg_equals_two_pass(official_pipe):
    packed = official_pipe(**CALL, packed_cfg=True)
    two_pass = official_pipe(**CALL, packed_cfg=False)
    assert torch.equal(packed.block_ids, two_pass.block_ids)
    # Latents are compared without the default bf16 rounding of the prior's inputs: the batched and the
    # separate matmuls differ in float32 summation order (CPU-dependent), and bf16 rounding turns such
    # ulp-level differences into bf16 steps (~1e-3 here) that CFG then amplifies.
    packed = official_pipe(**CALL, packed_cfg=True, prior_input_rounding=None)
    two_pass = official_pipe(**CALL, packed_cfg=False, prior_input_rounding=None)
    assert torch.equal(packed.block_ids, two_pass.block_ids)
    torch.testing.assert_close(packed.latents, two_pass.latents, atol=1e-5, rtol=0)


def early_stop_id(block_ids: torch.Tensor, bs: int) -> tuple[int, int]:
    """A (sample, id) such that only that sample produces ``id``, first in its block 1."""
    for s, row in enumerate(block_ids.tolist()):
        for tok in row[bs : 2 * bs]:
            others = [r for i, r in enumerate(block_ids.tolist()) if i != s]
            if tok not in row[:bs] and all(tok not in r for r in others):
                return s, tok
    raise AssertionError("no token that stops exactly one sample early")


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_drop_finished_keeps_other_samples(official_pipe, temperature):
    """Dropping a finished sample changes neither the others' tokens nor (in sampling mode) the RNG streams."""
    kw = dict(CALL, temperature=temperature)
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    full = official_pipe(**kw, generator=gen(), drop_finished=False)
    s, stop_id = early_stop_id(full.block_ids, official_pipe.block_size)
    kw["stop_token_ids"] = [stop_id]
    kept = official_pipe(**kw, generator=gen(), drop_finished=False)
    dropped = official_pipe(**kw, generator=gen(), drop_finished=True)
    assert bool(dropped.finished[s]) and not bool(dropped.finished.all())
    for i in range(len(PROMPTS)):
        if i != s:
            assert dropped.sequences[i] == kept.sequences[i] == full.sequences[i]
    assert kept.sequences[s][: len(dropped.sequences[s])] == dropped.sequences[s]
    assert len(dropped.sequences[s]) < len(kept.sequences[s])


def test_stream_yields_the_same_tokens(official_pipe):
    out = official_pipe(**CALL)
    chunks = list(official_pipe.stream(**CALL))
    assert [c.block_index for c in chunks] == list(range(len(chunks)))
    ids = [sum((c.ids[i] for c in chunks), []) for i in range(len(PROMPTS))]
    texts = ["".join(c.texts[i] for c in chunks) for i in range(len(PROMPTS))]
    assert ids == out.sequences
    assert texts == out.texts


def test_callback_reads_and_replaces_latents(official_pipe):
    seen = []

    def zero_last_step(pipe, step, timestep, kwargs):
        seen.append(step)
        return {"latents": torch.zeros_like(kwargs["latents"])} if step % 16 == 15 else {}

    out = official_pipe(**CALL, callback_on_step_end=zero_last_step, output_type="latent")
    n_blocks = out.latents.shape[1] // official_pipe.block_size
    assert seen == list(range(16 * n_blocks))
    assert out.latents.abs().max() == 0  # the replaced latents are what was decoded and returned


def test_user_latents_replace_noise(official_pipe):
    bs, c = official_pipe.block_size, official_pipe.vae.config.latent_dim
    noise = torch.randn(len(PROMPTS), 3, bs, c, generator=torch.Generator().manual_seed(0))
    a = official_pipe(**CALL, latents=noise)
    b = official_pipe(**CALL, latents=noise.clone())
    c_ = official_pipe(**CALL)
    assert torch.equal(a.latents, b.latents) and not torch.equal(a.latents, c_.latents)
    with pytest.raises(ValueError, match="latents"):
        official_pipe(**CALL, latents=noise[:, :2])


def smooth_in_time(pipe: ColaPipeline) -> ColaPipeline:
    """Zero the timestep-MLP inputs of high-frequency sinusoids (periods < ~1000 τ units).

    A random DiT reacts to sin(τ·1) terms whose period is 0.006 in σ, so its ODE is too rough for any
    solver to converge at a few dozen steps; trained priors are smooth in t. This keeps the test about
    the solver, not the random field.
    """
    with torch.no_grad():
        w = pipe.transformer.emb_in.proj_in.weight  # (D, 256) = [sin | cos] over 128 frequencies
        w[:, :100] = 0
        w[:, 128:228] = 0
    return pipe


@pytest.mark.parametrize("guidance_scale", [1.0, 7.0])
def test_heun_converges_to_euler(fixture_dir, guidance_scale):
    pipe = smooth_in_time(ColaPipeline.from_pretrained(fixture_dir))
    pipe.set_progress_bar_config(disable=True)
    kw = dict(CALL, max_new_tokens=4, guidance_scale=guidance_scale, output_type="latent", prior_input_rounding=None)
    reference = pipe(**kw, num_inference_steps=1024).latents
    err = lambda solver, n: (pipe(**kw, num_inference_steps=n, solver=solver).latents - reference).abs().max()  # noqa: E731
    assert err("heun", 64) < 0.01  # many Heun steps reach many Euler steps
    assert err("heun", 16) < err("euler", 16) / 5  # second order beats first order at equal steps
    assert err("heun", 8) < err("heun", 4)


def test_unknown_solver_is_rejected(official_pipe):
    with pytest.raises(ValueError, match="solver"):
        official_pipe(**CALL, solver="dpm")


def test_bfloat16_runs_on_cpu(fixture_dir):
    pipe = ColaPipeline.from_pretrained(fixture_dir, dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.transformer.dtype == torch.bfloat16 and pipe.vae.dtype == torch.bfloat16
    out = pipe(**CALL)
    assert out.block_ids.shape == (3, 12) and torch.isfinite(out.latents).all()


def test_autocast_mode_runs(official_pipe):
    out = official_pipe(**CALL, autocast_dtype=torch.bfloat16)
    assert out.block_ids.shape == (3, 12) and torch.isfinite(out.latents).all()


def test_cache_growth_keeps_history(official_pipe):
    """A cache that must grow past its capacity gives the same outputs as a large one."""
    from colabridge.models import KVCache

    dit = official_pipe.transformer
    x = torch.randn(2, 12, dit.config.txt_in_channels, generator=torch.Generator().manual_seed(0))
    outs = []
    for capacity in (1, 256):
        cache = KVCache(dit.config.num_layers, capacity)
        outs.append(torch.cat([dit(x[:, i:i + 4], 0.0, kv_cache=cache, commit=True).sample for i in (0, 4, 8)], 1))
        assert cache.length == 12 and cache.keys[0].shape[2] >= 12
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)
