"""Atomic, resumable training checkpoints with accelerate ``save_state`` / ``load_state``.

Shared by every training script (the ``colabridge train`` trainer, the shapes autoencoder, the AR
baseline). A checkpoint is ``<output_dir>/checkpoints/checkpoint-<step>/``: what ``save_state`` writes
(weights as ``model.safetensors``, optimizer, registered objects, the RNG states of every process)
plus :data:`STATE_FILE` (``{"step": step, ...}``). It is written into a temporary folder and renamed
only when complete, so a run killed at any moment resumes from its last complete checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

import torch

CHECKPOINT_PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-"
STATE_FILE = "trainer_state.json"


def checkpoint_dir(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def _step_of(path: Path) -> int:
    return int(path.name[len(CHECKPOINT_PREFIX):])


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The complete ``checkpoint-<step>`` with the highest step (temporary folders are ignored)."""
    root = checkpoint_dir(output_dir)
    done = [p for p in root.glob(CHECKPOINT_PREFIX + "*") if (p / STATE_FILE).is_file()] if root.is_dir() else []
    return max(done, key=_step_of, default=None)


def read_state(checkpoint: Path) -> dict:
    """The checkpoint's :data:`STATE_FILE`: ``{"step": ..., **extra}``."""
    return json.loads((Path(checkpoint) / STATE_FILE).read_text())


def save_checkpoint(accelerator, output_dir: Path, step: int, keep: int, extra: dict | None = None,
                    write_files: Callable[[Path], object] | None = None) -> Path:
    """``save_state`` into a temporary folder, then an atomic rename to ``checkpoint-<step>``; keeps
    the newest ``keep`` checkpoints (all when ``keep <= 0``). ``extra`` (JSON) is stored beside the step;
    ``write_files(folder)`` (main process) adds files of its own, e.g. EMA weights, before the rename."""
    root = checkpoint_dir(output_dir)
    final, tmp = root / f"{CHECKPOINT_PREFIX}{step}", root / f"{TMP_PREFIX}{CHECKPOINT_PREFIX}{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)  # before the other ranks write their RNG states into it
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if write_files is not None:
            write_files(tmp)
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, **(extra or {})}))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        done = sorted(root.glob(CHECKPOINT_PREFIX + "*"), key=_step_of)
        for old in done[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_latest_checkpoint(accelerator, output_dir: Path) -> dict | None:
    """``load_state`` of the latest complete checkpoint; returns its :func:`read_state` plus ``"path"``
    (the checkpoint folder), or None if there is none."""
    checkpoint = latest_checkpoint(output_dir)
    if checkpoint is None:
        return None
    accelerator.load_state(str(checkpoint))
    return {**read_state(checkpoint), "path": checkpoint}


class GeneratorState:
    """A ``torch.Generator`` as an object ``accelerator.register_for_checkpointing`` accepts, so a
    script's private random stream resumes exactly where it stopped."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def state_dict(self) -> dict:
        return {"state": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["state"])


def load_model_weights(checkpoint: Path, index: int = 0) -> dict[str, torch.Tensor]:
    """The state dict ``save_state`` wrote for the ``index``-th prepared model of a checkpoint."""
    from safetensors.torch import load_file

    name = "model.safetensors" if index == 0 else f"model_{index}.safetensors"
    return load_file(str(Path(checkpoint) / name))
