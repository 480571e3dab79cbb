"""Shared fixtures: an isolated target cache, offline hub settings, tiny configs that train in seconds, and an
exact factorisation of SPD sites."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from unmerge.spd.model import ComponentModel

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked `cuda` are skipped where torch sees no CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test session trains its toy targets into its own cache directory."""
    cache = tmp_path_factory.getbasetemp() / "unmerge-cache"
    monkeypatch.setenv("UNMERGE_CACHE_DIR", str(cache))
    return cache


def torchrun(ranks: int) -> list[str]:
    """The command that runs a script (or `-m module`) that follows it as `ranks` torchrun processes on this machine
    (gloo on the CPU)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]


TINY_TMS = [
    "target.train.steps=300",
    "train.steps=60",
    "train.batch_size=256",
    "train.eval_batch_size=256",
    "train.checkpoint_every=20",
    "train.log_every=10",
]


def set_exact_factorisation(model: ComponentModel) -> None:
    """Put each untied site's SVD into its first rank(W) subcomponents and zero the rest: U V = W exactly."""
    with torch.no_grad():
        for name in model.site_names:
            if name in model.tied:
                continue
            components = model.site_components(name)
            u, s, vh = torch.linalg.svd(model.target_weight(name))
            rank = len(s)
            components.U.zero_()
            components.V.zero_()
            components.U[:, :rank] = u[:, :rank] * s
            components.V[:rank] = vh[:rank]


def poison_loss_after(monkeypatch: pytest.MonkeyPatch, steps: int) -> None:
    """From step `steps` on, SPD's training loss is NaN (as a diverging run's would be)."""
    from unmerge.spd.method import SPD

    original, calls = SPD.training_loss, []

    def poisoned(self: SPD, batch: torch.Tensor, generator: torch.Generator) -> object:
        output = original(self, batch, generator)
        calls.append(1)
        if len(calls) > steps:
            output.loss = output.loss * float("nan")
        return output

    monkeypatch.setattr(SPD, "training_loss", poisoned)
