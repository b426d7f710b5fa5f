"""Diffusion-LM clamping (``clamp_below``): the engine's projected velocity and the text pipeline's
decode → re-encode projection in context."""

import pytest
import torch

from colabridge import ColaPipeline
from colabridge.sampling.engine import projected_velocity

CALL = dict(prompt=["The farmer wakes up early", "Rain"], max_new_tokens=12, noise_seed=5, stop_token_ids=[],
            prior_input_rounding=None)


def test_projected_velocity_lands_on_the_projection_below_max_sigma():
    torch.manual_seed(0)
    z, v, target = torch.randn(2, 4, 3), torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    timesteps = torch.tensor([[0.0, 250.0, 500.0, 900.0]]).expand(2, -1)  # a pinned token, then σ = .25, .5, .9
    fn = projected_velocity(lambda latents, t: v, lambda z0: target, max_sigma=0.5)
    out = fn(z, timesteps)
    sigma = timesteps / 1000
    # where clamped, an Euler step to σ = 0 ends exactly on the projection
    assert torch.allclose(z[:, 1:3] - sigma[:, 1:3, None] * out[:, 1:3], target[:, 1:3], atol=1e-6)
    assert torch.equal(out[:, 0], v[:, 0]) and torch.equal(out[:, 3], v[:, 3])  # pinned, and σ above the threshold
    identity = projected_velocity(lambda latents, t: v, lambda z0: z0, max_sigma=1.0)(z, timesteps)
    assert torch.allclose(identity, v, atol=1e-5)


def test_clamped_blocks_end_on_the_re_encoding_of_their_tokens_in_context(official_pipe, encode_calls):
    pipe, calls = official_pipe, encode_calls
    out = pipe(**CALL, clamp_below=1.0, num_inference_steps=4)
    prompts = pipe.tokenize(CALL["prompt"])
    bs, trim = pipe.block_size, [len(p) % pipe.block_size for p in prompts]
    per_block = calls[1:]  # calls[0] encodes the prompts
    assert len(per_block) == 4 * out.block_ids.shape[1] // bs  # one re-encoding per step (every σ ≤ 1)
    for b in range(out.block_ids.shape[1] // bs):
        ids, mask, mode = per_block[4 * b + 3]  # the last step of block b
        for i, prompt in enumerate(prompts):
            n = int(mask[i].sum())
            context = prompt + out.block_ids[i, trim[i]: b * bs].tolist() if b else prompt[: len(prompt) - trim[i]]
            assert ids[i, : n - bs].tolist() == context
            if b == 0:  # the pinned prompt tokens, not their re-decoding, are the block's first ids
                assert ids[i, n - bs: n - bs + trim[i]].tolist() == prompt[len(prompt) - trim[i]:]
            free = slice(trim[i] if b == 0 else 0, bs)  # pinned prompt latents keep their own values
            expected = pipe.vae.normalize(mode[i, n - bs: n])[free]
            assert torch.allclose(out.latents[i, b * bs: (b + 1) * bs][free], expected, atol=1e-5)


def test_clamping_is_batch_independent(official_pipe):
    batch = official_pipe(**CALL, clamp_below=0.5).sequences
    alone = [official_pipe(**{**CALL, "prompt": [p]}, clamp_below=0.5, sample_ids=[i]).sequences[0]
             for i, p in enumerate(CALL["prompt"])]
    assert batch == alone


def test_clamping_changes_generation(official_pipe):
    assert not torch.equal(official_pipe(**CALL, clamp_below=1.0).latents, official_pipe(**CALL).latents)


@pytest.mark.parametrize("value", [-0.1, 1.5, "0.5"])
def test_bad_clamp_below_is_rejected(official_pipe, value):
    with pytest.raises(ValueError, match="clamp_below"):
        official_pipe(**CALL, clamp_below=value)


def test_pipeline_config_sets_the_default_and_round_trips(official_pipe, tmp_path):
    assert official_pipe.config.clamp_below is None  # the official sampler by default
    pipe = ColaPipeline(**official_pipe.components, clamp_below=0.5)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path)
    loaded = ColaPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.config.clamp_below == 0.5
    clamped = official_pipe(**CALL, clamp_below=0.5).latents
    assert torch.equal(loaded(**CALL).latents, clamped)
    assert torch.equal(loaded(**CALL, clamp_below=0).latents, official_pipe(**CALL).latents)  # 0 turns it off
    with pytest.raises(ValueError, match="clamp_below"):
        ColaPipeline(**official_pipe.components, clamp_below=2.0)


def test_clamping_needs_the_euler_solver(official_pipe):
    with pytest.raises(ValueError, match="solver='euler'"):
        official_pipe(**CALL, clamp_below=0.5, solver="heun")
    official_pipe(**CALL, clamp_below=0, solver="heun")  # off: any solver


def test_cli_generate_clamp_below(capsys):
    from colabridge.cli import main

    args = ["generate", "The old house", "--max-new-tokens", "8", "--steps", "4", "--noise-seed", "0"]
    main(args)
    plain = capsys.readouterr().out
    main(args + ["--clamp-below", "1.0"])
    clamped = capsys.readouterr().out
    assert plain.startswith("The old house") and clamped.startswith("The old house") and clamped != plain
