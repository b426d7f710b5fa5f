"""Reading and writing Cola model folders in the official release format (spec §3).

Official folder = ``config.json`` (transformers ``PretrainedConfig.to_dict()``) + ``model.safetensors``
or shards listed in ``model.safetensors.index.json``. Tensor names are identical to colabridge's, so
loading is a strict ``load_state_dict`` with no key conversion. Pickle checkpoints are refused unless
the caller passes ``allow_pickle=True``.
"""

from __future__ import annotations

import inspect
import json
import os
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .models import ColaDiT, ColaTextVAE

CONFIG_NAME = "config.json"
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLE_WEIGHTS = "pytorch_model.bin"
OFFICIAL_TYPES = {ColaTextVAE: ("cola_text_vae", "ColaTextVAEModel"), ColaDiT: ("cola_dit", "ColaDiTModel")}
TRANSFORMERS_VERSION = "5.25.0"  # written into exported configs, as the official save_pretrained does


class CheckpointError(ValueError):
    """A checkpoint folder or file is missing, unreadable or inconsistent."""


def read_config(folder: Path) -> dict:
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{folder}: missing {CONFIG_NAME} (expected {CONFIG_NAME} beside the weights).")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err}).") from err


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot read safetensors file (truncated or corrupt?): {err}") from err


def load_official_state_dict(folder: Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Weights of an official folder: single file, sharded index, or (opt-in) a pickle."""
    folder = Path(folder)
    if (folder / SAFE_WEIGHTS).is_file():
        return _load_safetensors(folder / SAFE_WEIGHTS)
    if (folder / SAFE_INDEX).is_file():
        try:
            shards = sorted(set(json.loads((folder / SAFE_INDEX).read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise CheckpointError(f"{folder / SAFE_INDEX}: not a valid safetensors index ({err!r}).") from err
        state = {}
        for shard in shards:
            if not (folder / shard).is_file():
                raise CheckpointError(f"{folder}: shard {shard} listed in {SAFE_INDEX} is missing.")
            state.update(_load_safetensors(folder / shard))
        return state
    if (folder / PICKLE_WEIGHTS).is_file():
        if not allow_pickle:
            raise CheckpointError(
                f"{folder}: only {PICKLE_WEIGHTS} (a pickle, which can run code) was found. Convert it to "
                f"safetensors, or pass allow_pickle=True if you trust its source."
            )
        try:
            return torch.load(folder / PICKLE_WEIGHTS, map_location="cpu", weights_only=True)
        except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as err:
            raise CheckpointError(f"{folder / PICKLE_WEIGHTS}: cannot read pickle checkpoint (truncated or corrupt?): {err}") from err
    raise CheckpointError(
        f"{folder}: no weights found; expected {SAFE_WEIGHTS} or {SAFE_INDEX} (+ shards) beside {CONFIG_NAME}."
    )


def model_from_official(cls, folder: Path, allow_pickle: bool = False, dtype: torch.dtype | None = None):
    """Build ``ColaTextVAE`` / ``ColaDiT`` from an official folder with a strict state-dict load."""
    config = read_config(folder)
    expected_type = OFFICIAL_TYPES[cls][0]
    if config.get("model_type", expected_type) != expected_type:
        raise CheckpointError(f"{folder}: model_type is {config.get('model_type')!r}, expected {expected_type!r}.")
    params = inspect.signature(cls.__init__).parameters
    fields = {k: v for k, v in config.items() if k in params and k != "self"}
    state = load_official_state_dict(folder, allow_pickle)
    with torch.device("meta"):  # no random init, no second copy of the weights: tensors are assigned
        model = cls.from_config(fields)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise CheckpointError(f"{folder}: weights do not match the config (missing {missing[:5]}, unexpected {unexpected[:5]}).")
    model.eval()
    return model.to(dtype) if dtype is not None else model


def official_config(model) -> dict:
    """The official ``config.json`` content for ``model``: its fields + transformers metadata."""
    model_type, arch = OFFICIAL_TYPES[type(model)]
    fields = {k: v for k, v in model.config.items() if not k.startswith("_")}
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return {"architectures": [arch], **fields, "dtype": dtype, "model_type": model_type,
            "transformers_version": TRANSFORMERS_VERSION}


def save_official(model, folder: Path, max_shard_bytes: int | None = None) -> None:
    """Write ``model`` as an official folder (optionally sharded like the release's 2-shard DiT)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_NAME).write_text(json.dumps(official_config(model), indent=2, sort_keys=True) + "\n")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    shards = _split_shards(state, max_shard_bytes)
    if len(shards) == 1:
        save_file(state, str(folder / SAFE_WEIGHTS), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def _split_shards(state: dict, max_bytes: int | None) -> list[dict]:
    if not max_bytes:
        return [state]
    shards, current, size = [], {}, 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key], size = tensor, size + nbytes
    return shards + [current]


def is_official_layout(path: os.PathLike) -> bool:
    """True for a release folder: ``cola_dlm/cola_vae`` + ``cola_dlm/cola_dit`` + ``tokenizer.json``."""
    path = Path(path)
    return (path / "cola_dlm" / "cola_vae").is_dir() or (path / "cola_dlm" / "cola_dit").is_dir()


def check_official_layout(path: Path) -> None:
    expected = ["cola_dlm/cola_vae/config.json", "cola_dlm/cola_dit/config.json", "tokenizer.json"]
    missing = [p for p in expected if not (Path(path) / p).is_file()]
    if missing:
        raise CheckpointError(f"{path}: official layout is missing {missing}; expected {expected} plus weights.")
