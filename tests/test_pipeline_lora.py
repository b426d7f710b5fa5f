"""Pipeline-level LoRA (``ColaLoraLoaderMixin`` on ``ColaPipeline``): PEFT property tests on a tiny pipeline.

Each test checks both the raw DiT output and what the pipeline generates (latents and token ids).
"""

import copy
import json

import pytest
import torch

from colabridge import ColaPipeline
from colabridge.paths import artifact_root
from colabridge.training.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, add_lora, lora_config, lora_parameters, save_adapter

PROMPT = "The quick brown fox"
# no bf16 rounding of prior inputs: fused vs unfused differ by float round-off, which bf16 could amplify
GENERATE = dict(max_new_tokens=8, num_inference_steps=4, noise_seed=0, prior_input_rounding=None, output_type="ids")


@pytest.fixture
def pipe(official_pipe):
    """A pipeline on the official tiny fixture with its own copy of the DiT (the session fixture stays clean)."""
    torch.set_num_threads(1)
    fresh = ColaPipeline(vae=official_pipe.vae, transformer=copy.deepcopy(official_pipe.transformer),
                         scheduler=official_pipe.scheduler, tokenizer=official_pipe.tokenizer)
    fresh.set_progress_bar_config(disable=True)
    return fresh


@pytest.fixture
def adapter(pipe, tmp_path):
    """A saved random LoRA for the fixture DiT (B is zero at init; randomised so it changes outputs)."""
    trainee = copy.deepcopy(pipe.transformer)
    add_lora(trainee, lora_config(r=4))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in lora_parameters(trainee).values():
            p.normal_(0, 0.2, generator=g)
    return save_adapter(trainee, tmp_path / "adapter")


def outputs(pipe):
    """``(raw DiT velocity, generated latents, generated ids)`` at fixed inputs and noise."""
    dit = pipe.transformer
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, dit.config.txt_in_channels, generator=g)
    t = torch.rand(2, 8, generator=g) * 1000
    with torch.no_grad():
        velocity = dit(x, t).sample
    out = pipe(PROMPT, **GENERATE)
    return velocity, out.latents, out.block_ids


def assert_same(a, b, exact=False):
    for x, y in zip(a[:2], b[:2]):
        if exact:
            assert torch.equal(x, y)
        else:
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    assert torch.equal(a[2], b[2])  # token ids


def assert_differ(a, b):
    assert not torch.allclose(a[0], b[0]) and not torch.allclose(a[1], b[1])


def test_fused_equals_unfused(pipe, adapter):
    pipe.load_lora_weights(adapter)
    unfused = outputs(pipe)
    pipe.fuse_lora()
    assert_same(outputs(pipe), unfused)


def test_fuse_scale_equals_adapter_weight(pipe, adapter):
    pipe.load_lora_weights(adapter)
    pipe.set_adapters("default", weights=0.5)
    half = outputs(pipe)
    pipe.set_adapters("default")
    full = outputs(pipe)
    assert_differ(half, full)
    pipe.fuse_lora(lora_scale=0.5)
    assert_same(outputs(pipe), half)
    pipe.unfuse_lora()  # the scale is restored too, not left at 0.5
    assert_same(outputs(pipe), full)


def test_disable_restores_base_exactly(pipe, adapter):
    base = outputs(pipe)
    pipe.load_lora_weights(adapter)
    tuned = outputs(pipe)
    assert_differ(tuned, base)
    pipe.disable_lora()
    assert_same(outputs(pipe), base, exact=True)
    pipe.enable_lora()
    assert_same(outputs(pipe), tuned, exact=True)


def test_unfuse_restores(pipe, adapter):
    base = outputs(pipe)
    pipe.load_lora_weights(adapter)
    tuned = outputs(pipe)
    pipe.fuse_lora()
    with pytest.raises(ValueError, match="already fused"):
        pipe.fuse_lora()
    pipe.unfuse_lora()
    assert_same(outputs(pipe), tuned)
    pipe.disable_lora()
    assert_same(outputs(pipe), base)


def test_unload_restores_base_and_removes_layers(pipe, adapter):
    base_state = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    base = outputs(pipe)
    pipe.load_lora_weights(adapter)
    pipe.unload_lora_weights()
    assert_same(outputs(pipe), base, exact=True)
    assert not any("lora_" in n for n, _ in pipe.transformer.named_parameters())
    assert pipe.get_list_adapters() == {"transformer": []}
    state = pipe.transformer.state_dict()
    assert state.keys() == base_state.keys() and all(torch.equal(state[k], base_state[k]) for k in state)


def test_unload_after_fuse_restores_base(pipe, adapter):
    base = outputs(pipe)
    pipe.load_lora_weights(adapter)
    pipe.fuse_lora(lora_scale=0.7)
    pipe.unload_lora_weights()  # unfuses first: the base weights lose the merged deltas
    assert_same(outputs(pipe), base)
    assert not any("lora_" in n for n, _ in pipe.transformer.named_parameters())


def test_save_load_round_trip(pipe, adapter, official_pipe, tmp_path):
    pipe.load_lora_weights(adapter, adapter_name="style")
    expected = outputs(pipe)
    folder = pipe.save_lora_weights(tmp_path / "saved", adapter_name="style")
    assert {p.name for p in folder.iterdir()} == {ADAPTER_CONFIG, ADAPTER_WEIGHTS}
    fresh = ColaPipeline(**{**official_pipe.components, "transformer": copy.deepcopy(official_pipe.transformer)})
    fresh.set_progress_bar_config(disable=True)
    fresh.load_lora_weights(folder, adapter_name="style")
    assert_same(outputs(fresh), expected, exact=True)
    assert fresh.get_active_adapters() == ["style"]


def test_zero_matching_keys_raises(pipe, adapter):
    from safetensors.torch import load_file, save_file

    state = load_file(str(adapter / ADAPTER_WEIGHTS))
    save_file({k.replace("blocks.", "layers."): v for k, v in state.items()}, str(adapter / ADAPTER_WEIGHTS))
    base = outputs(pipe)
    with pytest.raises(ValueError, match=f"{adapter}: none of the .* train one for this model"):
        pipe.load_lora_weights(adapter)
    assert pipe.get_list_adapters() == {"transformer": []}
    assert_same(outputs(pipe), base, exact=True)


def test_not_an_adapter_folder_raises(pipe, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such adapter folder; pass a folder written by"):
        pipe.load_lora_weights(tmp_path / "missing")
    (tmp_path / "diffusers_format").mkdir()
    (tmp_path / "diffusers_format" / "pytorch_lora_weights.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="not a PEFT adapter folder .*adapter_config.json"):
        pipe.load_lora_weights(tmp_path / "diffusers_format")


def test_other_peft_type_raises(pipe, adapter):
    config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    (adapter / ADAPTER_CONFIG).write_text(json.dumps({**config, "peft_type": "IA3"}))
    with pytest.raises(ValueError, match="only LoRA adapters"):
        pipe.load_lora_weights(adapter)


def test_second_adapter_under_same_name_raises(pipe, adapter):
    pipe.load_lora_weights(adapter)
    with pytest.raises(ValueError, match="'default' is already loaded.*adapter_name="):
        pipe.load_lora_weights(adapter)
    pipe.load_lora_weights(adapter, adapter_name="second")
    assert pipe.get_list_adapters() == {"transformer": ["default", "second"]}
    assert pipe.get_active_adapters() == ["second"]


def test_methods_without_adapter_raise(pipe):
    for method in (pipe.enable_lora, pipe.disable_lora, pipe.fuse_lora, pipe.unfuse_lora):
        with pytest.raises(ValueError, match="no LoRA adapter is loaded; call load_lora_weights"):
            method()
    with pytest.raises(ValueError, match="not loaded"):
        pipe.set_adapters(["nope"])


@pytest.fixture(scope="module")
def tiny_en():
    torch.set_num_threads(1)
    pipe = ColaPipeline.from_pretrained(artifact_root() / "pipelines" / "cola-tiny-en")
    pipe.set_progress_bar_config(disable=True)
    return pipe


AUSTEN = artifact_root() / "adapters" / "cola-tiny-en-austen-lora"


def test_shipped_austen_adapter_changes_output(tiny_en):
    base = outputs(tiny_en)
    tiny_en.load_lora_weights(AUSTEN, adapter_name="austen")
    try:
        tuned = outputs(tiny_en)
    finally:
        tiny_en.unload_lora_weights()
    assert_differ(tuned, base)
    assert_same(outputs(tiny_en), base, exact=True)


def test_cli_generate_with_lora(capsys):
    from colabridge.cli import main

    args = ["generate", "The old house", "--max-new-tokens", "8", "--steps", "4", "--noise-seed", "0"]
    main(args)
    base = capsys.readouterr().out
    main(args + ["--lora", str(AUSTEN), "--lora-scale", "1.0"])
    tuned = capsys.readouterr().out
    assert base.startswith("The old house") and tuned.startswith("The old house") and tuned != base
    with pytest.raises(FileNotFoundError, match="no such adapter folder"):
        main(args + ["--lora", str(AUSTEN.parent / "missing")])
