"""Where the embedded artifacts (``pipelines/``, ``adapters/``) live, in a checkout or an installed package."""

from __future__ import annotations

from pathlib import Path

DEFAULT_TEXT_MODEL = "cola-tiny-en"


def artifact_root() -> Path:
    """The folder holding ``pipelines/`` and ``adapters/``: the repo root in a checkout, or the copy
    installed as ``colabridge/_artifacts`` by a non-editable install."""
    package = Path(__file__).resolve().parent
    for root in (package / "_artifacts", package.parent):
        if (root / "pipelines").is_dir():
            return root
    raise FileNotFoundError("colabridge artifacts (pipelines/, adapters/) not found; pass an explicit --model path.")


def default_text_model() -> Path:
    path = artifact_root() / "pipelines" / DEFAULT_TEXT_MODEL
    if not path.is_dir():
        raise FileNotFoundError(f"embedded default model {path} is missing; pass --model PATH.")
    return path
