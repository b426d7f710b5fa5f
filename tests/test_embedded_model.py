"""The shipped default model (pipelines/cola-tiny-en) loads, generates, and the CLI uses it by default."""

import pytest
import torch

from colabridge.paths import default_text_model


@pytest.fixture(scope="module")
def pipe():
    from colabridge import ColaPipeline

    torch.set_num_threads(1)
    pipe = ColaPipeline.from_pretrained(default_text_model())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_default_model_is_small_and_complete():
    folder = default_text_model()
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size < 25 * 2**20
    for part in ("model_index.json", "README.md", "vae/config.json", "transformer/config.json", "tokenizer/tokenizer.json"):
        assert (folder / part).is_file(), part


def test_generates_eight_tokens(pipe):
    out = pipe("The old house", max_new_tokens=8, generator=torch.Generator().manual_seed(0))
    assert len(out.sequences[0]) >= 1 and isinstance(out.texts[0], str)
    assert out.block_ids.shape[1] == 8 or bool(out.finished[0])  # two blocks of four, unless it stopped


def test_shipped_sampler_uses_sequential_sub_blocks(pipe):
    assert pipe.config.sub_block_size == 1 and pipe.config.clamp_below is None
    call = dict(max_new_tokens=8, noise_seed=0, stop_token_ids=[])
    default, one_pass = pipe("The old house", **call), pipe("The old house", sub_block_size=4, **call)
    assert torch.equal(default.latents, pipe("The old house", sub_block_size=1, **call).latents)
    assert not torch.equal(default.latents, one_pass.latents)


def test_reconstructs_held_out_text(pipe):
    text = "A small house in the country where people live."
    ids = torch.tensor([pipe.tokenizer(text, add_special_tokens=False)["input_ids"]])
    ids = ids[:, : ids.shape[1] // 4 * 4]
    with torch.no_grad():
        rec = pipe.vae.decode(pipe.vae.encode(ids).mode()).argmax(-1)
    assert (rec == ids).float().mean() > 0.95


def test_shipped_austen_adapter_loads_and_toggles(pipe):
    from colabridge.paths import artifact_root
    from colabridge.training.lora import load_adapter

    dit = pipe.transformer
    x, t = torch.randn(1, 4, dit.config.txt_in_channels, generator=torch.Generator().manual_seed(0)), torch.full((1, 4), 500.0)
    with torch.no_grad():
        base = dit(x, t).sample
        load_adapter(dit, artifact_root() / "adapters" / "cola-tiny-en-austen-lora", adapter_name="austen")
        try:
            tuned = dit(x, t).sample
            dit.disable_adapters()
            restored = dit(x, t).sample
        finally:
            dit.delete_adapters("austen")
    assert not torch.allclose(tuned, base)
    torch.testing.assert_close(restored, base)
