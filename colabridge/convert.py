"""Official Cola-DLM release layout <-> diffusers layout.

Official: ``cola_dlm/cola_vae/{config.json, model.safetensors}``, ``cola_dlm/cola_dit/{config.json,
model.safetensors | model-0000k-of-0000n.safetensors + index}``, ``tokenizer.json``.
Diffusers: ``model_index.json`` + ``vae/``, ``transformer/``, ``scheduler/``, ``tokenizer/``.

Both directions write into a temporary folder beside the destination and move it into place only
when everything succeeded, so a failed conversion leaves the disk as it was.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path

from . import checkpoints


@contextlib.contextmanager
def staged_output(dst: Path, overwrite: bool = False):
    """Yield a temporary folder that replaces ``dst`` only if the block completes."""
    dst = Path(dst)
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise FileExistsError(f"{dst} exists and is not empty; choose another destination or pass overwrite=True.")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        yield tmp
        if dst.exists():
            shutil.rmtree(dst)
        tmp.rename(dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def official_to_diffusers(src, dst, overwrite: bool = False, allow_pickle: bool = False) -> Path:
    """Convert an official release folder to a diffusers pipeline folder (weights unchanged)."""
    from .pipelines import ColaPipeline

    pipe = ColaPipeline.from_official(src, allow_pickle=allow_pickle)
    with staged_output(dst, overwrite) as tmp:
        pipe.save_pretrained(tmp)
    return Path(dst)


def diffusers_to_official(src, dst, overwrite: bool = False, max_shard_bytes: int | None = None) -> Path:
    """Convert a diffusers pipeline folder to the official layout, loadable by the official code."""
    from .pipelines import ColaPipeline

    pipe = ColaPipeline.from_pretrained(src)
    with staged_output(dst, overwrite) as tmp:
        save_pipeline_official(pipe, tmp, max_shard_bytes)
    return Path(dst)


def save_pipeline_official(pipe, folder: Path, max_shard_bytes: int | None = None) -> None:
    """Write ``pipe``'s models and tokenizer in the official release layout."""
    folder = Path(folder)
    checkpoints.save_official(pipe.vae, folder / "cola_dlm" / "cola_vae")
    checkpoints.save_official(pipe.transformer, folder / "cola_dlm" / "cola_dit", max_shard_bytes)
    pipe.tokenizer.backend_tokenizer.save(str(folder / "tokenizer.json"))
