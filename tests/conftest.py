"""Test environment: offline, quiet, and one dense-model cache shared by the session."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_DISABLE_GIT", "true")


@pytest.fixture(autouse=True, scope="session")
def _dense_cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("dense-cache")
    previous = os.environ.get("CONSTRAINEDSPARSE_CACHE")
    os.environ["CONSTRAINEDSPARSE_CACHE"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("CONSTRAINEDSPARSE_CACHE", None)
    else:
        os.environ["CONSTRAINEDSPARSE_CACHE"] = previous
