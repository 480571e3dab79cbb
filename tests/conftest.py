"""Shared fixtures: an isolated target cache, offline hub settings, and tiny configs that train in seconds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test session trains its toy targets into its own cache directory."""
    cache = tmp_path_factory.getbasetemp() / "unmerge-cache"
    monkeypatch.setenv("UNMERGE_CACHE_DIR", str(cache))
    return cache


TINY_TMS = [
    "target.train.steps=300",
    "train.steps=60",
    "train.batch_size=256",
    "train.eval_batch_size=256",
    "train.checkpoint_every=20",
    "train.log_every=10",
]
