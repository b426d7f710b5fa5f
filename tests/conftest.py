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
