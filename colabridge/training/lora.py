"""LoRA adapters on the Cola DiT prior, in the PEFT folder format.

``transformer.add_adapter(LoraConfig(...))`` (diffusers' ``PeftAdapterMixin``) injects the layers;
the base stays frozen. An adapter folder holds ``adapter_config.json`` (the ``LoraConfig``) and
``adapter_model.safetensors`` (keys ``blocks.0.msa.proj_qkv.lora_A.weight`` …, no adapter name), as
``PeftModel.save_pretrained`` writes them. Enabling, disabling, fusing and unfusing are the
``PeftAdapterMixin`` methods (``enable_adapters``, ``disable_adapters``, ``fuse_lora``, ``unfuse_lora``).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# attention and MLP linears of every DiT block (not the timestep MLP, the AdaLN modulations or in/out layers)
DIT_LORA_TARGETS = r".*blocks\.\d+\.(msa\.proj_qkv|msa\.proj_out|mlp\.proj_in|mlp\.proj_out)"


def lora_config(r: int = 8, alpha: float | None = None, target_modules=DIT_LORA_TARGETS, dropout: float = 0.0,
                init_lora_weights=True):
    """A ``peft.LoraConfig`` for the DiT; ``alpha`` defaults to ``r`` (scale 1)."""
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha if alpha is not None else r, target_modules=target_modules,
                      lora_dropout=dropout, init_lora_weights=init_lora_weights)


def add_lora(transformer, config=None, adapter_name: str = "default"):
    """Freeze ``transformer`` and inject a trainable LoRA adapter; returns the trainable parameters."""
    transformer.requires_grad_(False)
    transformer.add_adapter(config or lora_config(), adapter_name=adapter_name)
    params = [p for n, p in transformer.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    return params


def save_adapter(transformer, folder: str | os.PathLike, adapter_name: str = "default") -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` of ``adapter_name``."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    if adapter_name not in getattr(transformer, "peft_config", {}):
        raise ValueError(f"transformer has no adapter {adapter_name!r}; add one with add_lora() first.")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(transformer, adapter_name=adapter_name)
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = transformer.peft_config[adapter_name].to_dict()
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
    return folder


def load_adapter(transformer, folder: str | os.PathLike, adapter_name: str = "default") -> None:
    """Inject and load an adapter folder into ``transformer``.

    Raises ``ValueError`` if none of the file's keys match the model (a wrong base model); warns
    when only some do.
    """
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    folder = Path(folder)
    check_adapter_folder(folder)
    raw = json.loads((folder / ADAPTER_CONFIG).read_text())
    if raw.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{folder}: peft_type={raw['peft_type']!r}; only LoRA adapters (peft_type 'LORA') are supported.")
    fields = LoraConfig.__dataclass_fields__
    config = LoraConfig(**{k: v for k, v in raw.items() if k in fields and k not in ("peft_type", "task_type")})
    state = load_file(str(folder / ADAPTER_WEIGHTS))
    transformer.add_adapter(config, adapter_name=adapter_name)
    result = set_peft_model_state_dict(transformer, state, adapter_name=adapter_name)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if len(unexpected) == len(state):
        transformer.delete_adapters(adapter_name)
        raise ValueError(f"{folder}: none of the {len(state)} adapter keys match this transformer "
                         f"(e.g. {unexpected[:2]}); the adapter was trained for another base model. Load it "
                         "into the model named in its card, or train one for this model (`colabridge train lora`).")
    if unexpected:
        warnings.warn(f"{folder}: {len(unexpected)} adapter keys did not match and were ignored: {unexpected[:3]}")
    transformer.requires_grad_(False)


def check_adapter_folder(folder: Path) -> None:
    """Raise ``FileNotFoundError`` naming ``folder`` and the fix unless it is a PEFT LoRA folder."""
    fix = ("pass a folder written by save_adapter() / pipe.save_lora_weights() or `colabridge train lora` "
           f"({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS}).")
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such adapter folder; {fix}")
    missing = [name for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) if not (folder / name).is_file()]
    if missing:
        found = sorted(p.name for p in folder.iterdir())[:5]
        raise FileNotFoundError(f"{folder}: not a PEFT adapter folder (missing {', '.join(missing)}; found {found}); {fix}")


def lora_parameters(transformer) -> dict[str, torch.Tensor]:
    """The adapter's parameters by name (to check that training touched nothing else)."""
    return {n: p for n, p in transformer.named_parameters() if "lora_" in n}
