"""`benchmarks/identity_shares.py`: SPD's loss with the TMS+ID identity's pieces forced dense, at the same weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from identity_shares import SITE, identity_shares, loss_terms

from tests.conftest import TINY_TMS
from unmerge import api


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("identity")
    return api.decompose(api.load_run_config("tms-5-2-id", TINY_TMS), root / "spd").run_dir


def test_forcing_the_identity_dense_adds_its_missing_importance_and_changes_nothing_else(run_dir: Path) -> None:
    config, spd, _ = api.load_run(run_dir)
    steps = config.train.steps
    pieces = spd.model.sites[SITE].C
    learned = loss_terms(spd, steps, dense=None)
    untouched = loss_terms(spd, steps, dense=torch.zeros(pieces, dtype=torch.bool))
    dense = loss_terms(spd, steps, dense=torch.ones(pieces, dtype=torch.bool))
    assert untouched == learned
    assert dense["faithfulness"] == learned["faithfulness"]

    x = spd.evaluation_batch()
    with torch.no_grad(), spd.model.attached():
        upper = spd.model.split_sites(spd.importances(spd.model.clean_pass(x)).upper_all)[SITE]
    used = (x != 0).any(-1, keepdim=True)
    missing = torch.where(used, 1.0 - upper.pow(spd.pnorm), torch.zeros_like(upper)).sum() / len(x)
    added = config.method.importance_minimality_coeff * float(missing)
    assert dense["importance_minimality"] - learned["importance_minimality"] == pytest.approx(added, rel=1e-3)


def test_a_run_is_summarised_with_both_losses(run_dir: Path) -> None:
    summary = identity_shares(run_dir)
    assert summary["entries"] == 5 * summary["live"]
    assert set(summary["loss_dense"]) == set(summary["loss_learned"])
    assert summary["loss_learned"]["total"] == pytest.approx(
        sum(value for name, value in summary["loss_learned"].items() if name != "total"), rel=1e-3
    )
