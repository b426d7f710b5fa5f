import json
from pathlib import Path

import pytest
import torch

FIXTURE = Path(__file__).parent / "fixtures" / "cola-official-tiny"


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    return FIXTURE


@pytest.fixture(scope="session")
def reference() -> dict:
    return json.loads((FIXTURE / "reference.json").read_text())


@pytest.fixture(scope="session")
def reference_tensors() -> dict:
    return torch.load(FIXTURE / "reference.pt", weights_only=True)["scenarios"]


@pytest.fixture(scope="session")
def official_pipe():
    from colabridge import ColaPipeline

    pipe = ColaPipeline.from_pretrained(FIXTURE)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def encode_calls(official_pipe, monkeypatch) -> list:
    """``(input_ids, attention_mask, posterior mode)`` of every ``official_pipe.vae.encode`` call in the test."""
    calls, encode = [], official_pipe.vae.encode

    def spy(input_ids, attention_mask=None):
        out = encode(input_ids, attention_mask)
        calls.append((input_ids.clone(), attention_mask.clone(), out.mode().float()))
        return out

    monkeypatch.setattr(official_pipe.vae, "encode", spy)
    return calls


class SimulatedCrash(Exception):
    """Raised by :func:`crash_after_checkpoint` in place of a kill."""


@pytest.fixture()
def crash_after_checkpoint(monkeypatch):
    """``crash_after_checkpoint(module, step)``: ``module.save_checkpoint`` raises :class:`SimulatedCrash`
    right after writing checkpoint ``step``; returns a function that restores it (for the resumed run)."""

    def install(module, step: int):
        original = module.save_checkpoint

        def save_then_crash(accelerator, output_dir, at_step, **kw):
            original(accelerator, output_dir, at_step, **kw)
            if at_step == step:
                raise SimulatedCrash(f"simulated kill after checkpoint-{step}")

        monkeypatch.setattr(module, "save_checkpoint", save_then_crash)
        return lambda: monkeypatch.setattr(module, "save_checkpoint", original)

    return install
