"""Bad inputs and broken checkpoint folders fail early, with errors that name what is wrong, and
leave the disk as it was."""

import hashlib
import shutil
from pathlib import Path

import pytest
import torch

from colabridge import checkpoints, convert
from colabridge.checkpoints import CheckpointError
from colabridge.models import ColaDiT, ColaTextVAE
from colabridge.pipelines import ColaPipeline

FIXTURE = Path(__file__).parent / "fixtures" / "cola-official-tiny"
DIT_DIR = Path("cola_dlm") / "cola_dit"
VAE_DIR = Path("cola_dlm") / "cola_vae"
OFFICIAL_FILES = ["cola_dlm/cola_vae/config.json", "cola_dlm/cola_dit/config.json", "tokenizer.json"]
FAST = dict(num_inference_steps=2)


@pytest.fixture(scope="module")
def pipe():
    pipe = ColaPipeline.from_pretrained(FIXTURE)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def snapshot(root: Path) -> list[tuple[str, str]]:
    """Sorted (relative path, sha256 or '<dir>') of everything under ``root``."""
    entries = []
    for path in sorted(root.rglob("*")):
        digest = "<dir>" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
        entries.append((path.relative_to(root).as_posix(), digest))
    return entries


@pytest.fixture
def official(tmp_path) -> Path:
    """A writable copy of the official-layout fixture (without the reference outputs)."""
    dst = tmp_path / "official"
    shutil.copytree(FIXTURE, dst, ignore=shutil.ignore_patterns("reference.*", "README.md"))
    return dst


def _dit_copy(official: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(official / DIT_DIR, tmp_path / "dit"))


# --------------------------------------------------------------------------- call arguments


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        (dict(prompt=123), TypeError, r"`prompt` must be a str .* got int"),
        (dict(prompt=[1, 2]), TypeError, r"`prompt` must be a str .* containing int"),
        (dict(prompt=["ok", None]), TypeError, r"`prompt` .* containing NoneType"),
        (dict(prompt=[]), TypeError, r"`prompt` must be a str or a non-empty list"),
        (dict(prompt=None), ValueError, r"exactly one of `prompt`"),
        (dict(max_new_tokens=0), ValueError, r"`max_new_tokens` must be a positive int, got 0"),
        (dict(max_new_tokens=-1), ValueError, r"`max_new_tokens` must be a positive int, got -1"),
        (dict(max_new_tokens=4.0), ValueError, r"`max_new_tokens`"),
        (dict(num_inference_steps=0), ValueError, r"`num_inference_steps` must be an int >= 1, got 0"),
        (dict(guidance_scale=-1.0), ValueError, r"`guidance_scale` must be a number >= 0"),
        (dict(temperature=-0.5), ValueError, r"`temperature` must be a number >= 0"),
        (dict(top_p=0), ValueError, r"`top_p` must be in \(0, 1\]"),
        (dict(top_p=1.5), ValueError, r"`top_p` must be in \(0, 1\]"),
        (dict(top_k=-1), ValueError, r"`top_k` must be an int >= 0"),
        (dict(output_type="pil"), ValueError, r"`output_type` must be one of .*'pil'"),
        (dict(prompt=["a", "b"], sample_ids=[0]), ValueError, r"`sample_ids` has 1 entries for 2 prompts"),
    ],
)
def test_bad_call_argument(pipe, kwargs, error, pattern):
    kwargs = {"prompt": "Hello", **FAST, **kwargs}
    with pytest.raises(error, match=pattern):
        pipe(**kwargs)


def test_bad_argument_rejected_by_stream_too(pipe):
    with pytest.raises(ValueError, match=r"`top_p`"):
        next(iter(pipe.stream("Hello", top_p=2.0, **FAST)))


def test_empty_prompt_generates_unconditionally(pipe):
    # stop_token_ids=[]: a random tiny model may emit eos; with no stop ids every block is generated
    out = pipe("", max_new_tokens=8, stop_token_ids=[], output_type="ids", noise_seed=7, **FAST)
    assert pipe.block_size == 4
    assert len(out.sequences) == 1 and len(out.sequences[0]) == 8
    assert out.block_ids.shape == (1, 8)
    assert out.latents.shape == (1, 8, pipe.vae.config.latent_dim)
    assert all(0 <= i < pipe.vae.config.vocab_size for i in out.sequences[0])


def test_empty_prompt_in_a_batch(pipe):
    alone = pipe("", max_new_tokens=8, stop_token_ids=[], noise_seed=7, **FAST)
    batch = pipe(["", "Hello world"], max_new_tokens=8, stop_token_ids=[], noise_seed=7, **FAST)
    assert len(batch.sequences[0]) == 8
    assert batch.block_ids.shape == (2, 8)
    trim = len(pipe.tokenize("Hello world")[0]) % pipe.block_size
    assert len(batch.sequences[1]) == 8 - trim
    assert isinstance(batch.texts[0], str) and isinstance(batch.texts[1], str)
    # per-sample noise seeding makes the empty sample independent of its batch mate
    torch.testing.assert_close(batch.latents[0], alone.latents[0], atol=1e-5, rtol=1e-5)
    assert batch.sequences[0] == alone.sequences[0]


# --------------------------------------------------------------------------- missing files


@pytest.mark.parametrize("missing", OFFICIAL_FILES)
def test_official_folder_missing_file_lists_expected(official, missing):
    (official / missing).unlink()
    before = snapshot(official)
    with pytest.raises(CheckpointError) as err:
        ColaPipeline.from_pretrained(official)
    message = str(err.value)
    assert str(official) in message
    for name in OFFICIAL_FILES:
        assert name in message
    assert snapshot(official) == before


@pytest.mark.parametrize("model_dir", [VAE_DIR, DIT_DIR])
def test_official_folder_missing_weights(official, model_dir):
    (official / model_dir / "model.safetensors").unlink()
    before = snapshot(official)
    with pytest.raises(CheckpointError, match=r"no weights found; expected model\.safetensors or "
                                               r"model\.safetensors\.index\.json") as err:
        ColaPipeline.from_pretrained(official)
    assert str(official / model_dir) in str(err.value)
    assert snapshot(official) == before


def test_model_from_official_missing_config(official, tmp_path):
    folder = _dit_copy(official, tmp_path)
    (folder / "config.json").unlink()
    before = snapshot(folder)
    with pytest.raises(CheckpointError, match=r"missing config\.json"):
        checkpoints.model_from_official(ColaDiT, folder)
    assert snapshot(folder) == before


def test_model_from_official_missing_weights(official, tmp_path):
    folder = _dit_copy(official, tmp_path)
    (folder / "model.safetensors").unlink()
    before = snapshot(folder)
    with pytest.raises(CheckpointError, match=r"model\.safetensors or model\.safetensors\.index\.json"):
        checkpoints.model_from_official(ColaDiT, folder)
    assert snapshot(folder) == before


def test_plain_folder_is_neither_layout(tmp_path):
    (tmp_path / "stuff").mkdir()
    with pytest.raises(FileNotFoundError, match=r"model_index\.json.*cola_dlm/cola_vae"):
        ColaPipeline.from_pretrained(tmp_path / "stuff")


# --------------------------------------------------------------------------- corrupt files


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_safetensors_names_file(official, tmp_path):
    folder = _dit_copy(official, tmp_path)
    _truncate(folder / "model.safetensors")
    before = snapshot(folder)
    with pytest.raises(CheckpointError, match="truncated or corrupt") as err:
        checkpoints.model_from_official(ColaDiT, folder)
    assert str(folder / "model.safetensors") in str(err.value)
    assert snapshot(folder) == before


def test_truncated_safetensors_through_pipeline(official):
    target = official / VAE_DIR / "model.safetensors"
    _truncate(target)
    before = snapshot(official)
    with pytest.raises(CheckpointError) as err:
        ColaPipeline.from_pretrained(official)
    assert str(target) in str(err.value)
    assert snapshot(official) == before


def test_corrupt_config_json(official, tmp_path):
    folder = _dit_copy(official, tmp_path)
    (folder / "config.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        checkpoints.model_from_official(ColaDiT, folder)


def test_wrong_model_type(official, tmp_path):
    folder = _dit_copy(official, tmp_path)
    with pytest.raises(CheckpointError, match=r"model_type is 'cola_dit', expected 'cola_text_vae'"):
        checkpoints.model_from_official(ColaTextVAE, folder)


def test_weights_not_matching_config(official, tmp_path):
    folder = _dit_copy(official, tmp_path)
    config = (folder / "config.json").read_text().replace('"num_layers": 2', '"num_layers": 1')
    (folder / "config.json").write_text(config)
    with pytest.raises(CheckpointError, match=r"weights do not match the config.*unexpected \['blocks\.1\."):
        checkpoints.model_from_official(ColaDiT, folder)


# --------------------------------------------------------------------------- pickle and shards


def test_pickle_checkpoint_needs_opt_in(official, tmp_path):
    reference = checkpoints.model_from_official(ColaDiT, official / DIT_DIR)
    folder = _dit_copy(official, tmp_path)
    (folder / "model.safetensors").unlink()
    torch.save(reference.state_dict(), folder / "pytorch_model.bin")
    before = snapshot(folder)
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*allow_pickle=True"):
        checkpoints.model_from_official(ColaDiT, folder)
    assert snapshot(folder) == before
    loaded = checkpoints.model_from_official(ColaDiT, folder, allow_pickle=True)
    _assert_same_state(reference, loaded)
    assert snapshot(folder) == before


def test_sharded_weights_load_equal(official, tmp_path):
    reference = checkpoints.model_from_official(ColaDiT, official / DIT_DIR)
    folder = tmp_path / "sharded"
    checkpoints.save_official(reference, folder, max_shard_bytes=200_000)
    shards = sorted(p.name for p in folder.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 2
    assert (folder / "model.safetensors.index.json").is_file() and not (folder / "model.safetensors").exists()
    _assert_same_state(reference, checkpoints.model_from_official(ColaDiT, folder))

    (folder / shards[-1]).unlink()
    before = snapshot(folder)
    with pytest.raises(CheckpointError, match=rf"shard {shards[-1]} listed in model\.safetensors\.index\.json is missing"):
        checkpoints.model_from_official(ColaDiT, folder)
    assert snapshot(folder) == before


def test_truncated_shard_index_names_file(official, tmp_path):
    reference = checkpoints.model_from_official(ColaDiT, official / DIT_DIR)
    folder = tmp_path / "sharded"
    checkpoints.save_official(reference, folder, max_shard_bytes=200_000)
    _truncate(folder / "model.safetensors.index.json")
    with pytest.raises(CheckpointError, match="not a valid safetensors index") as err:
        checkpoints.model_from_official(ColaDiT, folder)
    assert str(folder / "model.safetensors.index.json") in str(err.value)


def test_truncated_pickle_names_file(official, tmp_path):
    folder = _dit_copy(official, tmp_path)
    (folder / "model.safetensors").unlink()
    torch.save(checkpoints.model_from_official(ColaDiT, official / DIT_DIR).state_dict(), folder / "pytorch_model.bin")
    _truncate(folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="truncated or corrupt") as err:
        checkpoints.model_from_official(ColaDiT, folder, allow_pickle=True)
    assert str(folder / "pytorch_model.bin") in str(err.value)


def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


# --------------------------------------------------------------------------- conversion


def _leftovers(parent: Path, name: str) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")] if parent.exists() else []


def test_convert_roundtrip_succeeds(official, tmp_path):
    """Positive control for the failure tests below."""
    dst = tmp_path / "out" / "diffusers"
    convert.official_to_diffusers(official, dst)
    assert (dst / "model_index.json").is_file()
    assert _leftovers(dst.parent, dst.name) == []
    pipe = ColaPipeline.from_pretrained(dst)
    _assert_same_state(pipe.transformer, checkpoints.model_from_official(ColaDiT, official / DIT_DIR))


def test_convert_broken_source_leaves_no_trace(official, tmp_path):
    (official / DIT_DIR / "model.safetensors").unlink()
    before = snapshot(official)
    dst = tmp_path / "out" / "diffusers"
    with pytest.raises(CheckpointError):
        convert.official_to_diffusers(official, dst)
    assert not dst.exists()
    assert _leftovers(dst.parent, dst.name) == []
    assert snapshot(official) == before


def test_convert_failing_midway_leaves_no_trace(official, tmp_path, monkeypatch):
    """A failure while writing (disk full, crash in save) removes the half-written staging folder."""

    def broken_save(self, folder, *args, **kwargs):
        (Path(folder) / "vae").mkdir(parents=True)
        (Path(folder) / "vae" / "partial.bin").write_bytes(b"x" * 10)
        raise OSError("disk full")

    monkeypatch.setattr(ColaPipeline, "save_pretrained", broken_save)
    dst = tmp_path / "out" / "diffusers"
    with pytest.raises(OSError, match="disk full"):
        convert.official_to_diffusers(official, dst)
    assert not dst.exists()
    assert _leftovers(dst.parent, dst.name) == []


def test_convert_into_non_empty_destination(official, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("user data")
    before = snapshot(tmp_path)
    with pytest.raises(FileExistsError, match=r"exists and is not empty.*overwrite=True"):
        convert.official_to_diffusers(official, dst)
    assert snapshot(tmp_path) == before  # dst untouched, nothing staged beside it


@pytest.mark.parametrize("kwargs, name", [
    (dict(guidance_scale=None), "guidance_scale"),
    (dict(temperature=None), "temperature"),
    (dict(max_new_tokens=True), "max_new_tokens"),
    (dict(top_p="0.9"), "top_p"),
])
def test_wrong_types_name_the_argument(pipe, kwargs, name):
    with pytest.raises(ValueError, match=name):
        pipe("Hello", **kwargs)


def test_tokenizer_larger_than_vae_vocab_is_rejected(pipe):
    from colabridge import ColaPipeline
    from colabridge.models import ColaTextVAE

    small = ColaTextVAE(**{**pipe.vae.config, "vocab_size": 100})
    with pytest.raises(ValueError, match="vocab_size"):
        ColaPipeline(small, pipe.transformer, pipe.scheduler, pipe.tokenizer)
