"""Exponential moving average of the trained weights, with diffusers' ``EMAModel``.

:class:`EMAWeights` ties an ``EMAModel`` to the *named* trainable parameters of a module, so its shadow
weights can be written into a training checkpoint as safetensors (``ema.safetensors``, keyed by
parameter name, the EMA step count in the file's metadata) and swapped into the module for evaluation
or export (:meth:`EMAWeights.applied`).
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from pathlib import Path

import torch.nn as nn

EMA_FILE = "ema.safetensors"


def ema_options() -> set[str]:
    """The keyword arguments of ``EMAModel`` a run config may set (``decay``, ``update_after_step``, ...)."""
    from diffusers.training_utils import EMAModel

    skip = {"self", "parameters", "model_cls", "model_config", "kwargs", "foreach"}
    return set(inspect.signature(EMAModel.__init__).parameters) - skip


def check_ema_options(options: dict) -> None:
    unknown = sorted(set(options) - ema_options())
    if unknown:
        raise ValueError(f"ema: unknown option(s) {unknown}; use EMAModel's {sorted(ema_options())} "
                         "(e.g. {\"decay\": 0.999}), or {} for no EMA.")


class EMAWeights:
    """EMA of ``module``'s trainable parameters (those with ``requires_grad`` when created)."""

    def __init__(self, module: nn.Module, **options):
        from diffusers.training_utils import EMAModel

        check_ema_options(options)
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.model = EMAModel(self.params, **options)

    def step(self) -> None:
        """Fold the current weights into the average (once per optimizer step)."""
        self.model.step(self.params)

    @contextmanager
    def applied(self):
        """Inside the block the module holds the EMA weights; its own weights come back after."""
        self.model.store(self.params)
        self.model.copy_to(self.params)
        try:
            yield
        finally:
            self.model.restore(self.params)

    def save(self, folder: Path) -> Path:
        from safetensors.torch import save_file

        path = Path(folder) / EMA_FILE
        tensors = {n: s.detach().contiguous() for n, s in zip(self.names, self.model.shadow_params)}
        save_file(tensors, str(path), metadata={"optimization_step": str(self.model.optimization_step)})
        return path

    def load(self, folder: Path) -> None:
        """Read :data:`EMA_FILE` from a checkpoint folder; the parameter names must match exactly."""
        from safetensors import safe_open

        path = Path(folder) / EMA_FILE
        with safe_open(str(path), framework="pt") as fh:
            keys, step = set(fh.keys()), int(fh.metadata()["optimization_step"])
            if keys != set(self.names):
                raise ValueError(f"{path}: EMA weights for {sorted(keys ^ set(self.names))[:4]} do not match the "
                                 "trained parameters; was the run's config changed?")
            for i, n in enumerate(self.names):
                self.model.shadow_params[i].copy_(fh.get_tensor(n))
        self.model.optimization_step = step


def has_ema(checkpoint: Path) -> bool:
    return (Path(checkpoint) / EMA_FILE).is_file()


def load_ema_into(module: nn.Module, checkpoint: Path) -> None:
    """Overwrite ``module``'s trainable parameters with a checkpoint's EMA weights."""
    ema = EMAWeights(module)
    ema.load(checkpoint)
    ema.model.copy_to(ema.params)


__all__ = ["EMA_FILE", "EMAWeights", "check_ema_options", "has_ema", "load_ema_into"]
