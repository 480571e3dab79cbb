"""Feature splitting on hand-built dictionaries: children by decoder cosine, exact reconstruction of a parent
from its children, and split directions shared across parents or not."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from unmerge.analysis.splitting import feature_splits, shared_split_directions
from unmerge.config import dictionary_config
from unmerge.sae.arch import build_dictionary
from unmerge.sae.dictionary import Dictionary

E = torch.eye(5)


def _tied_relu(directions: torch.Tensor) -> Dictionary:
    """A ReLU dictionary whose encoder reads and decoder writes the given unit directions, no biases."""
    rows = F.normalize(directions, dim=1)
    dictionary = build_dictionary(5, dictionary_config(width=rows.shape[0], unit_norm_decoder=False), torch.Generator())
    with torch.no_grad():
        dictionary.W_d.copy_(rows)
        dictionary.W_e.copy_(rows.T)
        dictionary.b_e.zero_()
        dictionary.b_d.zero_()
    return dictionary.eval()


def _data() -> torch.Tensor:
    """Feature 1 (with +e3, −e3 or nothing) or feature 2 (with +e4, −e4 or nothing), at a random amplitude."""
    generator = torch.Generator().manual_seed(0)
    amplitude = torch.rand(600, 1, generator=generator) + 0.5
    feature = torch.randint(1, 3, (600,), generator=generator)
    sign = torch.randint(-1, 2, (600, 1), generator=generator).float()
    return amplitude * (E[feature] + sign * E[feature + 2])


def test_children_by_cosine_and_exact_reconstruction_of_each_parent() -> None:
    parent = _tied_relu(torch.stack([E[1], E[2], E[0]]))
    child = _tied_relu(torch.stack([E[1] + E[3], E[1] - E[3], E[2] + E[4], E[2] - E[4], E[0]]))
    splits = feature_splits(parent, child, _data(), threshold=0.5)
    assert splits.children == [[0, 1], [2, 3], [4]]
    assert splits.cosine[0, 0] == pytest.approx(1 / math.sqrt(2), abs=1e-6)
    torch.testing.assert_close(splits.reconstruction_r2[:2], torch.ones(2), atol=1e-5, rtol=0)
    assert math.isnan(float(splits.reconstruction_r2[2]))  # parent 2 never fires on this data
    assert splits.table()[0]["children"] == [0, 1]


def test_a_direction_that_splits_two_parents_is_shared_and_one_that_splits_one_is_not() -> None:
    parent = _tied_relu(torch.stack([E[1], E[2]]))
    shared_child = _tied_relu(torch.stack([E[1] + E[3], E[1] - E[3], E[2] + E[3], E[2] - E[3]]))
    splits = feature_splits(parent, shared_child, _data())
    shared = shared_split_directions(parent, shared_child, splits, n_atoms=2)
    assert shared.shared_fraction() == 1.0 and sorted(map(len, shared.atom_parents())) == [2, 2]
    own_child = _tied_relu(torch.stack([E[1] + E[3], E[1] - E[3], E[2] + E[4], E[2] - E[4]]))
    splits = feature_splits(parent, own_child, _data())
    assert shared_split_directions(parent, own_child, splits, n_atoms=4).shared_fraction() == 0.0


def test_splits_command_on_two_hierarchy_dictionaries(tmp_path, capsys) -> None:
    import json

    from unmerge import api
    from unmerge.cli import main

    tiny = ["train.steps=150", "train.batch_size=128", "train.eval_batch_size=512", "train.checkpoint_every=150"]
    for width in (11, 20):
        config = api.load_dictionary_config("hierarchy-relu-l1", [*tiny, f"method.width={width}"])
        result = api.train_dictionary(config, tmp_path / f"w{width}")
        assert result.report is not None and "training curves" in result.report.read_text()
    assert (
        main(
            [
                "splits",
                str(tmp_path / "w20"),
                str(tmp_path / "w11"),
                "--out",
                str(tmp_path / "splits"),
                "--inputs",
                "2048",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "w11 (11) → w20 (20)" in printed and "report section" in printed
    saved = json.loads((tmp_path / "splits" / "splitting.json").read_text())
    assert len(saved) == 1 and len(saved[0]["parents"]) == 11
    assert (tmp_path / "splits" / "cosine-11-to-20.png").stat().st_size > 0
    assert "| parent | fires | children (cosine) | R² |" in (tmp_path / "splits" / "splitting.md").read_text()
    other = api.load_dictionary_config(
        "sparse-512-topk", ["train.steps=2", "train.checkpoint_every=2", "train.eval_batch_size=256"]
    )
    api.train_dictionary(other, tmp_path / "other")
    assert main(["splits", str(tmp_path / "w11"), str(tmp_path / "other"), "--out", str(tmp_path / "x")]) == 2
    assert "other data" in capsys.readouterr().err
