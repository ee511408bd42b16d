"""Shared fixtures: one embedded default model per test session, in a private cache directory."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def pytest_configure(config):
    # Every test, and every process a test starts, uses the session's own cache, never the user's.
    cache = Path(config.rootpath) / ".pytest-cache-flashtile"
    os.environ["FLASHTILE_CACHE"] = str(os.environ.get("FLASHTILE_TEST_CACHE", cache))


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    from stages.models import ensure_default_model

    return ensure_default_model()


@pytest.fixture(scope="session")
def default_model(default_model_dir):
    from stages.models import resolve_model

    return resolve_model(None)


@pytest.fixture(scope="session")
def flashtile(default_model):
    from stages.pipeline import Flashtile

    return Flashtile.from_pretrained(None)


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except Exception:
        has_gpu = False
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip)
