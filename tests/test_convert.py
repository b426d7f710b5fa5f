"""save_pretrained / from_pretrained and official <-> diffusers conversions are exact."""

import json

import torch
from safetensors.torch import load_file

from colabridge import ColaPipeline
from colabridge.cli import main as cli_main
from colabridge.convert import diffusers_to_official, official_to_diffusers

CALL = dict(prompt=["The quick brown fox", "Rain"], max_new_tokens=8, noise_seed=66)


def _official_tensors(folder):
    return load_file(str(folder / "cola_dlm/cola_vae/model.safetensors")), load_file(str(folder / "cola_dlm/cola_dit/model.safetensors"))


def test_save_pretrained_round_trip(official_pipe, tmp_path):
    official_pipe.save_pretrained(tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe/model_index.json").read_text())
    assert index["vae"] == ["colabridge.models.text_vae", "ColaTextVAE"]  # module paths are a load contract
    assert index["transformer"] == ["colabridge.models.dit", "ColaDiT"]
    loaded = ColaPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    for a, b in ((official_pipe.vae, loaded.vae), (official_pipe.transformer, loaded.transformer)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    before, after = official_pipe(**CALL), loaded(**CALL)
    assert torch.equal(before.block_ids, after.block_ids) and torch.equal(before.latents, after.latents)


def test_official_diffusers_official_is_exact(fixture_dir, tmp_path):
    official_to_diffusers(fixture_dir, tmp_path / "diff")
    diffusers_to_official(tmp_path / "diff", tmp_path / "back")
    for part in ("cola_vae", "cola_dit"):
        src = json.loads((fixture_dir / "cola_dlm" / part / "config.json").read_text())
        out = json.loads((tmp_path / "back/cola_dlm" / part / "config.json").read_text())
        assert {k: out[k] for k in src} == src  # every official key, same value
    for src, out in zip(_official_tensors(fixture_dir), _official_tensors(tmp_path / "back")):
        assert src.keys() == out.keys()
        assert all(torch.equal(src[k], out[k]) and src[k].dtype == out[k].dtype for k in src)
    a, b = ColaPipeline.from_pretrained(fixture_dir), ColaPipeline.from_pretrained(tmp_path / "back")
    assert a.tokenizer.get_vocab() == b.tokenizer.get_vocab()
    for p in (a, b):
        p.set_progress_bar_config(disable=True)
    assert torch.equal(a(**CALL).block_ids, b(**CALL).block_ids)


def test_sharded_official_export_loads(official_pipe, tmp_path):
    from colabridge.convert import save_pipeline_official

    save_pipeline_official(official_pipe, tmp_path / "sharded", max_shard_bytes=200_000)
    index = json.loads((tmp_path / "sharded/cola_dlm/cola_dit/model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    loaded = ColaPipeline.from_pretrained(tmp_path / "sharded")
    sd = loaded.transformer.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in official_pipe.transformer.state_dict().items())


def test_cli_convert_and_generate(fixture_dir, tmp_path, capsys):
    cli_main(["convert", str(fixture_dir), str(tmp_path / "diff"), "--to", "diffusers"])
    assert (tmp_path / "diff/model_index.json").is_file()
    assert "wrote" in capsys.readouterr().out
    cli_main(["generate", "--model", str(tmp_path / "diff"), "--max-new-tokens", "8", "The quick brown fox"])
    printed = capsys.readouterr().out
    assert printed.startswith("The quick brown fox") and len(printed) > len("The quick brown fox\n")
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text('{"id": 0, "question": "Rain"}\n{"id": 1, "question": "Hello there"}\n')
    cli_main(["generate", "--model", str(fixture_dir), "--file", str(jsonl), "--max-new-tokens", "8"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["id"] for r in rows] == [0, 1] and all(r["generate"] for r in rows)
