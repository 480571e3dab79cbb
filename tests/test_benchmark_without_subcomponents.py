"""`benchmarks/without_subcomponents.py`: which weights a removal zeroes, and its errors (before OUT is written)."""

from __future__ import annotations

import argparse

import pytest
import torch
from without_subcomponents import main, parse_removal, remove_subcomponents

from unmerge.train.checkpoint import load_checkpoint, save_checkpoint


def test_removal_zeroes_the_column_of_u_and_its_moments_and_nothing_else(tmp_path) -> None:
    U = torch.arange(1.0, 13.0).reshape(4, 3)
    tensors = {
        "layers--1--mlp_out.components.U": U.clone(),
        "layers--1--mlp_out.components.V": torch.ones(3, 2),
        "optimizer.layers--1--mlp_out.components.U.exp_avg": U.clone(),
        "optimizer.layers--1--mlp_out.components.U.exp_avg_sq": U.clone(),
        "layers--0--mlp_out.components.U": U.clone(),
    }
    save_checkpoint(tmp_path, 7, tensors, {"lr": 0.1}, keep=2)
    loaded, state = load_checkpoint(tmp_path / "checkpoints" / "step-0000007")
    remove_subcomponents(loaded, [("layers.1.mlp_out", 1)])
    expected = U.clone()
    expected[:, 1] = 0.0
    assert torch.equal(loaded["layers--1--mlp_out.components.U"], expected)
    assert torch.equal(loaded["optimizer.layers--1--mlp_out.components.U.exp_avg"], expected)
    assert torch.equal(loaded["optimizer.layers--1--mlp_out.components.U.exp_avg_sq"], expected)
    assert torch.equal(loaded["layers--1--mlp_out.components.V"], torch.ones(3, 2))
    assert torch.equal(loaded["layers--0--mlp_out.components.U"], U)
    assert state["lr"] == 0.1


def test_removal_of_a_site_without_its_own_subcomponents_names_it() -> None:
    with pytest.raises(SystemExit, match="layers--2--mlp_out.components.U"):
        remove_subcomponents({}, [("layers.2.mlp_out", 0)])


def test_removal_of_a_subcomponent_the_site_lacks_names_its_range() -> None:
    with pytest.raises(SystemExit, match="subcomponents 0 to 2, not 3"):
        remove_subcomponents({"layers--1--mlp_out.components.U": torch.zeros(4, 3)}, [("layers.1.mlp_out", 3)])


def test_a_bad_removal_stops_before_out_is_written(tmp_path, monkeypatch) -> None:
    save_checkpoint(tmp_path / "run", 7, {"layers--1--mlp_out.components.U": torch.zeros(4, 3)}, {}, keep=2)
    out = tmp_path / "out"
    argv = ["without_subcomponents.py", str(tmp_path / "run"), "7", str(out), "--remove", "layers.1.mlp_out:3"]
    monkeypatch.setattr("sys.argv", [*argv, "--steps", "9"])
    with pytest.raises(SystemExit, match="subcomponents 0 to 2, not 3"):
        main()
    assert not out.exists()


def test_removal_argument() -> None:
    assert parse_removal("layers.1.mlp_out:83") == ("layers.1.mlp_out", 83)
    for bad in ("layers.1.mlp_out", ":3", "layers.1.mlp_out:x"):
        with pytest.raises(argparse.ArgumentTypeError, match="SITE:INDEX"):
            parse_removal(bad)
