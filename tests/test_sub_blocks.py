"""Sequential sub-blocks (``sub_block_size``): the engine's multi-pass transport and the text
pipeline's pinning of re-encoded tokens between passes."""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from colabridge import ColaPipeline
from colabridge.sampling import transport_block, transport_in_passes
from colabridge.sampling.engine import num_passes

CALL = dict(prompt=["The farmer wakes up early", "Rain"], max_new_tokens=12, noise_seed=5, stop_token_ids=[],
            prior_input_rounding=None, num_inference_steps=3)
SCHEDULE = {"sigmas": [1.0, 0.6, 0.3]}


def toy_velocity(seen):
    """Flows every token toward the mean of the pinned tokens (so pins change the result); records which
    tokens each call sees as pinned (timestep 0)."""

    def fn(latents, timesteps):
        pinned = timesteps == 0
        seen.append(pinned.clone())
        w = pinned.float()[..., None]
        anchor = (latents * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp(min=1)
        return latents - anchor  # z1 - z0 with z0 = anchor
    return fn


def test_one_pass_is_plain_transport():
    noise, seen = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(0)), []
    sched = FlowMatchEulerDiscreteScheduler()
    plain = transport_block(toy_velocity(seen), noise, sched, SCHEDULE)
    passes = transport_in_passes(toy_velocity(seen), noise, sched, SCHEDULE, lambda z: z * 0, tokens_per_pass=4)
    assert torch.equal(plain, passes)


def test_each_pass_pins_the_next_free_tokens_at_their_projection():
    noise, seen, projected = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(1)), [], []
    pinned = torch.tensor([[True, True, True, False], [False] * 4])  # sample 0: a prompt's 3 pinned tokens
    values = torch.randn(2, 4, 3)

    def project(z):
        projected.append(z + 10.0)  # far from anything the flow produces
        return projected[-1]

    steps = []
    out = transport_in_passes(toy_velocity(seen), noise, FlowMatchEulerDiscreteScheduler(), SCHEDULE, project,
                              tokens_per_pass=1, pinned=pinned, pinned_values=values,
                              on_step=lambda i, t, z: steps.append(i) or z)
    assert num_passes(pinned, 4, 1) == 4 and len(projected) == 3
    assert steps == list(range(4 * 3))  # model calls counted across passes
    for k in range(4):  # pass k: sample 1 has its first k tokens pinned; sample 0 only its prompt,
        assert seen[3 * k][1].tolist() == [j < k for j in range(4)]  # its last free token is never pinned
        assert seen[3 * k][0].tolist() == [True, True, True, False]
    assert torch.equal(out[0, :3], values[0, :3])
    alone = transport_block(toy_velocity([]), noise[:1], FlowMatchEulerDiscreteScheduler(), SCHEDULE, pinned[:1], values[:1])
    assert torch.allclose(out[0], alone[0])  # as if it were alone: its single pass
    for j in range(3):  # sample 1: token j keeps the projection of pass j
        assert torch.equal(out[1, j], projected[j][1, j])
    assert not torch.equal(out[1, 3], projected[-1][1, 3])  # the last token comes from the last pass


def test_sub_block_size_equal_to_block_size_is_the_official_sampler(official_pipe):
    assert official_pipe.config.sub_block_size is None
    assert torch.equal(official_pipe(**CALL, sub_block_size=official_pipe.block_size).latents, official_pipe(**CALL).latents)


def test_fixed_tokens_are_the_re_encoding_of_their_tokens_in_context(official_pipe, encode_calls):
    pipe, calls = official_pipe, encode_calls
    out = pipe(**CALL, sub_block_size=1)
    prompts = pipe.tokenize(CALL["prompt"])
    bs, trim = pipe.block_size, [len(p) % pipe.block_size for p in prompts]
    fixes = calls[1:]  # calls[0] encodes the prompts; then one re-encoding per pass but the last
    first = bs - 1 - min(trim)  # block 0: fewer passes, its prompt tokens are pinned already
    assert len(fixes) == first + (bs - 1) * (out.block_ids.shape[1] // bs - 1)
    for b in range(1, out.block_ids.shape[1] // bs):
        for j in range(bs - 1):
            ids, mask, mode = fixes[first + (bs - 1) * (b - 1) + j]
            for i, prompt in enumerate(prompts):
                n = int(mask[i].sum())
                assert ids[i, : n - bs].tolist() == prompt + out.block_ids[i, trim[i]: b * bs].tolist()
                expected = pipe.vae.normalize(mode[i, n - bs + j])
                assert torch.allclose(out.latents[i, b * bs + j], expected, atol=1e-5)


def test_sub_blocks_change_generation_and_are_batch_independent(official_pipe):
    batch = official_pipe(**CALL, sub_block_size=2)
    assert not torch.equal(batch.latents, official_pipe(**CALL).latents)
    alone = [official_pipe(**{**CALL, "prompt": [p]}, sub_block_size=2, sample_ids=[i]).sequences[0]
             for i, p in enumerate(CALL["prompt"])]
    assert batch.sequences == alone


def test_progress_and_callbacks_count_every_pass(official_pipe):
    steps = []
    out = official_pipe(**CALL, sub_block_size=1, solver="heun",
                        callback_on_step_end=lambda pipe, i, t, kw: steps.append(i) or {})
    n_blocks, calls = out.block_ids.shape[1] // official_pipe.block_size, 2 * 3 - 1  # Heun: 2N − 1 calls
    per_block = 4 * calls
    trims = [len(p) % 4 for p in official_pipe.tokenize(CALL["prompt"])]
    first = num_passes(torch.tensor([[j < t for j in range(4)] for t in trims]), 4, 1) * calls
    assert steps == list(range(first)) + [i for b in range(1, n_blocks) for i in range(b * per_block, (b + 1) * per_block)]


@pytest.mark.parametrize("value", [0, 5, 1.5, "2"])
def test_bad_sub_block_size_is_rejected(official_pipe, value):
    with pytest.raises(ValueError, match="sub_block_size"):
        official_pipe(**CALL, sub_block_size=value)
    with pytest.raises(ValueError, match="sub_block_size"):
        ColaPipeline(**official_pipe.components, sub_block_size=value)


def test_pipeline_config_sets_the_default_and_round_trips(official_pipe, tmp_path):
    pipe = ColaPipeline(**official_pipe.components, sub_block_size=2)
    pipe.save_pretrained(tmp_path)
    loaded = ColaPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.config.sub_block_size == 2
    assert torch.equal(loaded(**CALL).latents, official_pipe(**CALL, sub_block_size=2).latents)
    assert torch.equal(loaded(**CALL, sub_block_size=4).latents, official_pipe(**CALL).latents)


def test_cli_generate_sub_block_size(capsys):
    from colabridge.cli import main

    args = ["generate", "The old house", "--max-new-tokens", "8", "--steps", "4", "--noise-seed", "0"]
    main(args + ["--sub-block-size", "4"])
    one_pass = capsys.readouterr().out
    main(args + ["--sub-block-size", "1"])
    sequential = capsys.readouterr().out
    assert sequential.startswith("The old house") and sequential != one_pass
    main(args)  # the embedded model's config sets sub_block_size=1
    assert capsys.readouterr().out == sequential
