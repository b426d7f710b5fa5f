"""Pipeline-level LoRA methods in the diffusers style, over the DiT's ``PeftAdapterMixin``.

Adapters are PEFT folders (``adapter_config.json`` + ``adapter_model.safetensors``, see
:mod:`colabridge.training.lora`). Every method delegates to PEFT / diffusers on the pipeline's
``transformer``; none touches LoRA weights itself.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..training.lora import load_adapter, save_adapter


class ColaLoraLoaderMixin:
    r"""LoRA on a pipeline's DiT prior: load, save, select, enable/disable, fuse/unfuse, unload.

    Mix into any ``DiffusionPipeline`` whose ``transformer`` component is a ``PeftAdapterMixin``
    model (:class:`ColaPipeline`, the image bridge pipelines).

    Example::

        pipe.load_lora_weights("adapters/cola-tiny-en-austen-lora", adapter_name="austen")
        pipe.fuse_lora(lora_scale=0.8)  # merged into the weights: no extra cost per step
        pipe.unfuse_lora()
        pipe.unload_lora_weights()      # the base model again
    """

    lora_component_name = "transformer"

    @property
    def _lora_model(self):
        return getattr(self, self.lora_component_name)

    def get_list_adapters(self) -> dict[str, list[str]]:
        """Loaded adapter names per component, as diffusers: ``{"transformer": [...]}``."""
        return {self.lora_component_name: list(getattr(self._lora_model, "peft_config", {}))}

    def get_active_adapters(self) -> list[str]:
        """Names of the adapters the forward pass uses (empty when none is loaded)."""
        return self._lora_model.active_adapters() if self._adapter_names() else []

    def _adapter_names(self) -> list[str]:
        return self.get_list_adapters()[self.lora_component_name]

    def _require_lora(self, method: str) -> None:
        if not self._adapter_names():
            raise ValueError(f"{method}(): no LoRA adapter is loaded; call load_lora_weights(path) first.")

    # ------------------------------------------------------------------ load / save
    def load_lora_weights(self, path: str | os.PathLike, adapter_name: str = "default") -> None:
        """Load a PEFT LoRA folder into the ``transformer`` as ``adapter_name`` and make it the active one.

        Raises:
            FileNotFoundError: ``path`` is not a PEFT adapter folder.
            ValueError: ``adapter_name`` is already loaded, LoRA is fused, or none of the file's keys
                match this transformer (an adapter of another base model).
        """
        loaded = self._adapter_names()
        if adapter_name in loaded:
            raise ValueError(f"load_lora_weights({str(path)!r}): an adapter named {adapter_name!r} is already loaded "
                             f"(loaded: {loaded}); pass another adapter_name=..., or call "
                             f"delete_adapters({adapter_name!r}) or unload_lora_weights() first.")
        if self._is_fused():
            raise ValueError(f"load_lora_weights({str(path)!r}): LoRA is fused into the weights; call unfuse_lora() first.")
        load_adapter(self._lora_model, Path(path), adapter_name)

    def save_lora_weights(self, folder: str | os.PathLike, adapter_name: str = "default") -> Path:
        """Write ``adapter_name`` as a PEFT folder that :meth:`load_lora_weights` reads back."""
        self._require_lora("save_lora_weights")
        if adapter_name not in self._adapter_names():
            raise ValueError(f"save_lora_weights: no adapter named {adapter_name!r}; loaded: {self._adapter_names()}.")
        return save_adapter(self._lora_model, folder, adapter_name)

    # ------------------------------------------------------------------ select / toggle
    def set_adapters(self, adapter_names: str | list[str], weights: float | list[float] | None = None) -> None:
        """Activate ``adapter_names`` (their LoRA outputs are summed), each scaled by its weight (default 1)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        unknown = sorted(set(names) - set(self._adapter_names()))
        if unknown:
            raise ValueError(f"set_adapters: adapters {unknown} are not loaded; loaded: {self._adapter_names()}.")
        self._lora_model.set_adapters(names, weights)

    def enable_lora(self) -> None:
        """Use the active adapters again after :meth:`disable_lora`."""
        self._require_lora("enable_lora")
        self._lora_model.enable_adapters()

    def disable_lora(self) -> None:
        """Run the base model; the adapters stay loaded (a fused LoRA is unmerged by PEFT on the next forward)."""
        self._require_lora("disable_lora")
        self._lora_model.disable_adapters()

    def delete_adapters(self, adapter_names: str | list[str]) -> None:
        """Remove the named adapters' layers and configs."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        unknown = sorted(set(names) - set(self._adapter_names()))
        if unknown:
            raise ValueError(f"delete_adapters: adapters {unknown} are not loaded; loaded: {self._adapter_names()}.")
        self._lora_model.delete_adapters(names)

    # ------------------------------------------------------------------ fuse / unload
    def fuse_lora(self, lora_scale: float = 1.0) -> None:
        """Merge the active adapters, scaled by ``lora_scale``, into the base weights (faster steps).

        Equal to the unfused forward up to float round-off; :meth:`unfuse_lora` undoes it.
        """
        self._require_lora("fuse_lora")
        if lora_scale == 0:
            raise ValueError("fuse_lora(lora_scale=0) would fuse nothing and cannot be undone; use disable_lora().")
        if self._is_fused():
            raise ValueError("fuse_lora(): LoRA is already fused; call unfuse_lora() first.")
        self._lora_model.fuse_lora(lora_scale=lora_scale)

    def unfuse_lora(self) -> None:
        """Subtract the fused deltas again and restore the adapters' scale from before :meth:`fuse_lora`."""
        self._require_lora("unfuse_lora")
        model = self._lora_model
        model.unfuse_lora()
        scale = getattr(model, "lora_scale", 1.0)
        if scale != 1.0:  # diffusers' fuse_lora scaled the layers in place; PEFT's unmerge does not undo that
            for layer in _tuner_layers(model):
                layer.unscale_layer(scale)
        model.lora_scale = 1.0

    def unload_lora_weights(self) -> None:
        """Remove every adapter and its layers: the ``transformer`` is the base model again.

        Without fusing the base weights are untouched (exact); after :meth:`fuse_lora` they are first
        unfused (restored up to float round-off).
        """
        if not self._adapter_names():
            return
        if self._is_fused():
            self.unfuse_lora()
        self._lora_model.unload_lora()

    def _is_fused(self) -> bool:
        model = self._lora_model
        merged = any(layer.merged for layer in _tuner_layers(model))
        return merged or getattr(model, "lora_scale", 1.0) != 1.0


def _tuner_layers(model):
    """The PEFT-injected layers of ``model``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
