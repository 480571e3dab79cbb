"""Sweeps: the Pareto front by hand, grid expansion and its strict errors, and a tiny end-to-end sweep that writes
its table and figures and reuses its finished runs when rerun."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from unmerge import api, cli
from unmerge.errors import CheckpointError, ConfigError
from unmerge.sweep import SweepSpec, expand, pareto_front, parse_grid_argument, short_labels
from unmerge.sweep.runner import point_configs

TINY = {"train.steps": 50, "train.threads": 1, "train.eval_batch_size": 1024, "train.log_every": 25}
GRID = {"method.penalty.name": ["l1", "cauchy"], "method.penalty.coeff": [0.03, 0.3]}
NAMES = ["penalty=l1,coeff=0.03", "penalty=l1,coeff=0.3", "penalty=cauchy,coeff=0.03", "penalty=cauchy,coeff=0.3"]


def test_pareto_front_by_hand() -> None:
    #        A     B     C     D     E     F     G (NaN)
    xs = [1.0, 2.0, 3.0, 4.0, 2.0, 5.0, 0.5]
    ys = [0.9, 0.5, 0.6, 0.2, 0.7, 0.2, math.nan]
    # C is dominated by B (x 2 ≤ 3, y 0.5 ≤ 0.6); E by B (same x, lower y); F by D (same y, lower x); G is left out.
    assert pareto_front(xs, ys) == [0, 1, 3]
    # Higher y better (MCC): A (x 1, y 0.9) is at least as good as every other point and strictly better somewhere.
    assert pareto_front(xs, ys, maximize_y=True) == [0]
    assert pareto_front([1.0, 2.0, 3.0, 4.0], [0.5, 0.8, 0.7, 0.95], maximize_y=True) == [0, 1, 3]
    assert pareto_front([3.0, 1.0, 1.0], [1.0, 2.0, 2.0]) == [1, 2, 0]  # equal points do not dominate each other
    assert pareto_front([], []) == []


def test_grid_expands_to_the_product_with_readable_names() -> None:
    spec = SweepSpec(base="hierarchy-relu-l1", grid={**GRID, "train.seed": [0, 1]}, overrides={"train.steps": 10})
    points = expand(spec)
    assert len(points) == 8
    assert [p.name for p in points[:3]] == [
        "penalty=l1,coeff=0.03,seed=0",
        "penalty=l1,coeff=0.03,seed=1",
        "penalty=l1,coeff=0.3,seed=0",
    ]
    assert points[-1].settings == {"method.penalty.name": "cauchy", "method.penalty.coeff": 0.3, "train.seed": 1}
    assert [(o.key, o.value) for o in points[-1].overrides] == [
        ("method.penalty.name", "cauchy"),
        ("method.penalty.coeff", 0.3),
        ("train.seed", 1),
    ]
    assert len({p.name for p in points}) == 8
    assert spec.group_keys() == ["method.penalty.name"]  # strengths and seeds share a group
    assert short_labels(["method.k", "data.k", "train.seed"]) == {
        "method.k": "method.k",
        "data.k": "data.k",
        "train.seed": "seed",
    }
    assert parse_grid_argument("method.penalty.coeff=0.001,0.1") == ("method.penalty.coeff", [0.001, 0.1])
    assert api.load_sweep_spec(
        "hierarchy-relu-l1", ["method.penalty.coeff=1e-3,0.1"], ["train.optim.lr=3e-3"]
    ) == SweepSpec(
        base="hierarchy-relu-l1", grid={"method.penalty.coeff": [0.001, 0.1]}, overrides={"train.optim.lr": 0.003}
    )  # PyYAML reads 1e-3 as text; the spec reads a number
    assert parse_grid_argument("method.penalty.name=[l1, cauchy]") == ("method.penalty.name", ["l1", "cauchy"])
    config = point_configs(SweepSpec(base="hierarchy-relu-l1", grid={"method.penalty.coeff": [1e-5]}))[0][1]
    assert config.method.penalty.coeff == 1e-5  # the value survives the trip through a key=value override


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"base": "hierarchy-relu-l1", "grid": {"method.width": 20}},
            r"grid\.method\.width: Input should be a valid list",
        ),
        ({"base": "hierarchy-relu-l1", "grid": {"method.width": [20]}, "gird": {}}, r"gird: unknown key"),
        ({"base": "hierarchy-relu-l1", "grid": {}}, r"grid: .*at least 1 item"),
        ({"base": "hierarchy-relu-l1", "grid": {"method.width": [20, 20]}}, r"lists 20 more than once"),
        (
            {"base": "hierarchy-relu-l1", "grid": {"train.seed": [0]}, "overrides": {"train.seed": 1}},
            r"train\.seed is both a grid key and a fixed override",
        ),
        (
            {"base": "hierarchy-relu-l1", "grid": {"train.seed": [0]}, "group_by": ["method.width"]},
            r"group_by names method\.width",
        ),
    ],
)
def test_malformed_specs_are_named(data: dict, message: str, tmp_path: Path) -> None:
    path = tmp_path / "sweep.yaml"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=message):
        api.load_sweep_spec(str(path))


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        ({"method.widht": [20, 40]}, r"(?s)sweep grid point widht=20 \(method\.widht=20\).*method\.widht: unknown key"),
        ({"method.width": [20, 0]}, r"(?s)sweep grid point width=0 .*method\.width: Input should be greater than 0"),
    ],
)
def test_a_bad_grid_point_fails_before_any_training(grid: dict, message: str, tmp_path: Path) -> None:
    spec = SweepSpec(base="hierarchy-relu-l1", grid=grid, overrides=TINY)
    with pytest.raises(ConfigError, match=message):
        api.sweep(spec, tmp_path / "sweep")
    assert not (tmp_path / "sweep").exists()


def test_cli_form_needs_a_grid_and_a_known_preset() -> None:
    with pytest.raises(ConfigError, match=r"no grid; add --grid"):
        api.load_sweep_spec("hierarchy-relu-l1")
    with pytest.raises(ConfigError, match=r"unknown preset 'hierarchy-relu-l9'"):
        api.load_sweep_spec("hierarchy-relu-l9", ["train.seed=0,1"])
    with pytest.raises(ConfigError, match=r"--grid 'train.seed' must look like key.path=value1,value2"):
        api.load_sweep_spec("hierarchy-relu-l1", ["train.seed"])


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_tiny_sweep_writes_table_and_figures_then_reuses_finished_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sweep"
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(json.dumps({"base": "hierarchy-relu-l1", "grid": GRID, "overrides": TINY}))
    result = api.sweep(api.load_sweep_spec(str(spec_file)), out, log=None)

    assert [row.name for row in result.rows] == NAMES and not any(row.skipped for row in result.rows)
    table = _read_csv(out / "results.csv")
    assert [row["run"] for row in table] == NAMES
    assert list(table[0])[:3] == ["run", "method.penalty.name", "method.penalty.coeff"]
    for row, line in zip(result.rows, table, strict=True):
        metrics = json.loads((out / "runs" / row.name / "metrics.json").read_text())
        for key in ("l0", "fvu", "recall_mmcs", "mcc", "matched/0.9", "dead_latents", "duplicate_latents"):
            assert float(line[key]) == metrics[key]  # copied from metrics.json, at full precision
    by_name = {line["run"]: line for line in table}
    for penalty in ("l1", "cauchy"):  # a stronger penalty gives a sparser code, even after 50 steps
        strong, weak = by_name[f"penalty={penalty},coeff=0.3"], by_name[f"penalty={penalty},coeff=0.03"]
        assert float(strong["l0"]) < float(weak["l0"])
    assert (out / "results.md").read_text().count("\n") == 2 + 4
    assert [path.name for path in result.figures] == ["pareto_l0_fvu.png", "pareto_l0_mcc.png", "dead_latents.png"]
    assert all(path.stat().st_size > 5000 and path.read_bytes()[:4] == b"\x89PNG" for path in result.figures)

    # The same sweep through the CLI: every run is reused, and the table is printed.
    metrics_files = sorted(out.glob("runs/*/metrics.json"))
    written = [path.stat().st_mtime_ns for path in metrics_files]
    assert cli.main(["sweep", str(spec_file), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "[4/4] penalty=cauchy,coeff=0.3: finished earlier, reused" in printed
    assert "| method.penalty.name | method.penalty.coeff | l0 | fvu |" in printed
    assert [path.stat().st_mtime_ns for path in metrics_files] == written
    assert _read_csv(out / "results.csv") == table

    # A run that lost its metrics.json is finished again from its final checkpoint; the others stay reused.
    (out / "runs" / NAMES[1] / "metrics.json").unlink()
    again = api.sweep(api.load_sweep_spec(str(spec_file)), out, log=None)
    assert [row.skipped for row in again.rows] == [True, False, True, True]
    assert again.rows[1].metrics == result.rows[1].metrics

    # Changed fixed settings do not mix with the finished runs: refused before anything is trained or written.
    saved_spec = (out / "sweep.yaml").read_text()
    with pytest.raises(CheckpointError, match=r"train\.steps: 50 → 60.*new --out"):
        api.sweep(api.load_sweep_spec(str(spec_file), overrides=["train.steps=60"]), out, log=None)
    assert (out / "sweep.yaml").read_text() == saved_spec
