"""Grouping subcomponents into components: the ARI metric's closed forms, the description length by hand, greedy
merging recovering a planted grouping, and `unmerge group` on a tiny TMS run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_TMS
from unmerge import api
from unmerge.analysis.grouping import Grouping, MergeHistory, greedy_merge
from unmerge.cli import main
from unmerge.metrics.clustering import adjusted_rand_index
from unmerge.metrics.description import activity_description_length, description_length
from unmerge.targets import load_target


def test_adjusted_rand_index_closed_forms() -> None:
    assert adjusted_rand_index(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0, 1, 2])) == pytest.approx(4 / 7)
    assert adjusted_rand_index(torch.tensor([3, 3, 5, 5, 7]), torch.tensor([0, 0, 1, 1, 2])) == pytest.approx(1.0)
    assert adjusted_rand_index(torch.arange(6), torch.arange(6)) == 1.0
    assert adjusted_rand_index(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1])) == pytest.approx(-0.5)


def test_description_length_by_hand() -> None:
    frequency, sizes = torch.tensor([0.5, 0.25, 1.0, 0.25]), torch.tensor([1.0, 2.0, 3.0, 1.0])
    expected = 0.5 * (2 + 8) + 0.25 * (2 + 16) + 1.0 * (2 + 24) + 0.25 * (2 + 8)  # log2 4 = 2, α = 8
    assert description_length(frequency, sizes, alpha=8.0) == pytest.approx(expected)


def test_activity_description_length_of_singletons_and_groups_by_hand() -> None:
    active = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1], [0, 0, 0]], dtype=torch.bool)
    # singletons: s = (1/2, 1/2, 1/4), log2 3 naming bits each, α = 4 per unit
    expected = (0.5 + 0.5 + 0.25) * (math.log2(3) + 4)
    assert activity_description_length(active, alpha=4.0) == pytest.approx(expected)
    # units 0 and 1 grouped: s = (1/2, 1/4), r = (2, 1), log2 2 = 1 naming bit
    grouped = 0.5 * (1 + 8) + 0.25 * (1 + 4)
    assert activity_description_length(active, 4.0, torch.tensor([7, 7, 3])) == pytest.approx(grouped)
    assert activity_description_length(torch.zeros(3, 2, dtype=torch.bool), 4.0) == 0.0


def _planted_activity(n_inputs: int = 20_000) -> tuple[torch.Tensor, torch.Tensor]:
    """Units 0–4 always fire together (p 0.3), units 5–7 together (p 0.1), units 8–17 alone (p 0.02 each)."""
    generator = torch.Generator().manual_seed(0)
    group_a = torch.rand(n_inputs, 1, generator=generator) < 0.3
    group_b = torch.rand(n_inputs, 1, generator=generator) < 0.1
    singles = torch.rand(n_inputs, 10, generator=generator) < 0.02
    active = torch.cat([group_a.expand(-1, 5), group_b.expand(-1, 3), singles], dim=1)
    truth = torch.tensor([0] * 5 + [1] * 3 + list(range(2, 12)))
    order = torch.randperm(18, generator=generator)  # the groups' units are not adjacent
    return active[:, order], truth[order]


def test_greedy_merging_recovers_a_planted_grouping_and_its_history_is_exact() -> None:
    active, truth = _planted_activity()
    history = greedy_merge(active, alpha=8.0)
    assert len(history.merges) == 17 and history.best_step == 4 + 2
    assert adjusted_rand_index(history.labels(18), truth) == 1.0
    for step in (0, 3, history.best_step, 12):  # each recorded cost is the cost of the grouping it leaves
        labels = history.labels(18, step)
        groups = [active[:, labels == g].any(1).float() for g in labels.unique()]
        frequency = torch.stack([g.mean() for g in groups])
        sizes = torch.stack([(labels == g).sum().float() for g in labels.unique()])
        assert history.costs[step] == pytest.approx(description_length(frequency, sizes, 8.0), rel=1e-5)


def _grouping(labels: list[int], truth: list[str]) -> Grouping:
    units = [f"site/{i}" for i in range(len(labels))]
    return Grouping(units, torch.tensor(labels), MergeHistory(0.0, []), [], {}, truth)


def test_the_feature_ari_leaves_out_the_dense_group_that_props_up_the_whole_ari() -> None:
    """Four dense units grouped right and two features' units (two each) left apart: the whole ARI counts the six
    dense pairs found, the features' ARI only the feature units, among which no pair was joined."""
    truth = ["dense:W_out"] * 4 + ["feature:0", "feature:0", "feature:1", "feature:1"]
    grouping = _grouping([0, 0, 0, 0, 1, 2, 3, 4], truth)
    whole = adjusted_rand_index(grouping.labels, torch.tensor([0, 0, 0, 0, 1, 1, 2, 2]))
    assert grouping.ari() == pytest.approx(whole) and whole > 0.5
    assert grouping.ari(features_only=True) == pytest.approx(0.0)  # singletons against pairs: no agreement
    assert grouping.pure_features() == (0, 2)
    joined = _grouping([0, 0, 0, 0, 1, 1, 2, 2], truth)
    assert joined.ari(features_only=True) == 1.0 and joined.pure_features() == (2, 2)
    merged = _grouping([0, 0, 0, 0, 1, 1, 1, 1], truth)  # both features in one component: neither is pure
    assert merged.pure_features() == (0, 2)
    assert _grouping([0, 1], ["dense:W_out", "unit:x"]).ari(features_only=True) is None


def test_group_then_unlearn_commands_on_a_tiny_tms_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    api.decompose(api.load_run_config("tms-5-2-id", TINY_TMS), tmp_path / "run")
    assert main(["group", str(tmp_path / "run"), "--inputs", "2048"]) == 0
    printed = capsys.readouterr().out
    assert "components; description length" in printed and "adjusted Rand index" in printed
    assert "features came out as one component of their own" in printed
    saved = json.loads((tmp_path / "run" / api.GROUPING_FILE).read_text())
    units = [unit for members in saved["components"] for unit in members]
    assert len(units) == saved["active_units"] == len(set(units))
    assert len(saved["history"]) == saved["active_units"] - 1
    assert saved["description_length_bits"] <= saved["description_length_unmerged_bits"]
    assert math.isfinite(saved["adjusted_rand_index"]) and saved["settings"]["alpha"] == 2.0
    assert "grouping" in (tmp_path / "run" / "report.html").read_text()  # the merge-history figure joined it
    assert main(["unlearn", str(tmp_path / "run"), "--component", "0", "--out", str(tmp_path / "edited")]) == 0
    assert "edited model saved" in capsys.readouterr().out
    edited, _ = load_target(tmp_path / "edited")
    original = api.load_run(tmp_path / "run")[1].target.model
    removed = set(saved["components"][0])
    changed = {name for name, p in edited.model.named_parameters() if not torch.equal(p, original.get_parameter(name))}
    sites = {unit.rsplit("/", 1)[0] for unit in removed}
    assert changed == {f"{'linear1' if site == 'linear2' else site}.weight" for site in sites}  # tied: W = W₂ᵀ
    assert main(["unlearn", str(tmp_path / "run"), "--component", "99", "--out", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
