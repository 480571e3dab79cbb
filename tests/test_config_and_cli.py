"""Presets, strict configs and overrides; user errors as one clear message without a traceback."""

from __future__ import annotations

import doctest
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import unmerge
from unmerge import api, runs
from unmerge.cli import main
from unmerge.config import RunConfig
from unmerge.errors import ConfigError

PRESETS = ["tms-5-2", "tms-5-2-id", "tms-40-10", "tms-40-10-id", "resid-mlp-1", "resid-mlp-2", "resid-mlp-3"]


def test_every_preset_loads_and_validates() -> None:
    assert set(PRESETS) <= set(api.preset_names())
    for name in api.preset_names():
        config = api.load_run_config(name)
        assert isinstance(config, RunConfig) and config.name == name


def test_overrides_reach_nested_keys() -> None:
    config = api.load_run_config("tms-5-2", ["train.steps=123", "method.importance_minimality_coeff=1e-2"])
    assert config.train.steps == 123
    assert config.method.importance_minimality_coeff == 0.01


def test_a_number_in_an_override_indexes_a_list() -> None:
    config = api.load_run_config("resid-mlp-2", ["method.sites.1.C=7"])
    assert [site.C for site in config.method.sites] == [150, 7]
    assert config.method.sites[1].pattern == "layers.*.mlp_out"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.stepz=5"], r"train\.stepz: unknown key"),
        (["method.sites=[{pattern: linear1, C: 0}]"], r"method\.sites\.0\.C: Input should be greater than 0"),
        (["method.pnorm=-1"], r"method\.pnorm"),
        (["nonsense"], r"must look like key\.path=value"),
        (["method.sites.5.C=3"], r"'5' must index the list, which has 2 item\(s\): use 0 to 1"),
        (["method.sites.first.C=3"], r"'first' must index the list"),
        (["train.steps.x=3"], r"'steps' is not a config section or list"),
    ],
)
def test_bad_configs_name_the_problem(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        api.load_run_config("tms-5-2", overrides)


def test_unknown_preset_lists_the_presets() -> None:
    with pytest.raises(ConfigError, match=r"unknown preset 'tms-9-9'.*tms-5-2"):
        api.load_run_config("tms-9-9")


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "unmerge.cli", *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["decompose", "tms-5-2", "--out", "r", "train.bogus=1"], "train.bogus: unknown key"),
        (
            ["decompose", "tms-5-2", "--out", "r", "method.sites=[{pattern: nope, C: 3}]", "target.train.steps=20"],
            "site pattern 'nope' matches no module",
        ),
        (["decompose", "tms-5-2", "--out", "r", "method.sites=[{pattern: linear1, C: -2}]"], "greater than 0"),
        (["decompose", "no-such-preset", "--out", "r"], "unknown preset 'no-such-preset'"),
        (["evaluate", "missing-dir"], "is not a run directory"),
    ],
)
def test_cli_user_errors_are_one_message(args: list[str], message: str, tmp_path: Path) -> None:
    result = _cli(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ")


def test_every_command_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("train-target", "decompose", "evaluate", "demo"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert "usage: unmerge " + command in capsys.readouterr().out


def test_decompose_writes_config_metrics_figures_and_evaluate_reproduces_them(tmp_path: Path) -> None:
    from tests.conftest import TINY_TMS

    run = tmp_path / "run"
    result = _cli("decompose", "tms-5-2-id", "--out", str(run), *TINY_TMS, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for line in ("mmcs", "ml2r", "ci_l0/linear1/0.1", f"run directory: {run}"):
        assert line in result.stdout
    metrics = json.loads((run / "metrics.json").read_text())
    for key in (
        "mmcs",
        "ml2r",
        "matrix_cosine",
        "ci_pattern_errors",
        "ci_pattern_errors/hidden",
        "alive/hidden",
        "ci_l0/linear1/0.01",
        "ci_l0/hidden/0.5",
        "faithfulness",
        "stochastic_recon",
        "layerwise_recon",
        "ci_masked_recon",
        "unmasked_recon",
    ):
        assert key in metrics, key
    for figure in ("ci_one_hot.png", "ci_histograms.png", "weights_linear1.png", "training_curves.png"):
        assert (run / "figures" / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result.stdout.rstrip().endswith(f"report: {run / 'report.html'}")
    report = (run / "report.html").read_text()
    assert report.count('<img src="data:image/png;base64,') == 5  # self-contained: figures embedded,
    assert 'src="http' not in report and "<script" not in report  # nothing fetched, nothing run
    assert f"{metrics['mmcs']:.6g}" in report and "importance_minimality_coeff" in report  # metrics and config
    assert api.load_run_config(str(run / "config.yaml")).train.steps == 60
    again = _cli("evaluate", str(run), cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert json.loads((run / "metrics.json").read_text()) == metrics
    index = api.runs_index([run], tmp_path / "index", columns=["mmcs", "ml2r", "absent"])
    page = index.read_text()
    assert '<a href="../run/report.html">' in page and "<th>mmcs</th>" in page and "table.sortable th" in page
    assert f'data-sort="{metrics["ml2r"]:.6g}"' in page and page.count("—") == 1  # a missing metric is a dash


def test_evaluate_of_an_unfinished_dictionary_run_says_so(tmp_path, capsys) -> None:
    from unmerge import api
    from unmerge.cli import main

    config = api.load_dictionary_config("hierarchy-relu-l1", ["train.steps=20", "train.checkpoint_every=10"])
    api.train_dictionary(config, tmp_path / "run")
    (tmp_path / "run" / runs.DICTIONARY_FILE).unlink()  # as if interrupted before the end
    assert main(["evaluate", str(tmp_path / "run")]) == 2
    assert "has not finished" in capsys.readouterr().err


def test_the_targets_own_seed_is_set_from_the_command_line() -> None:
    from unmerge.cli.commands import _overrides
    from unmerge.cli.parser import build_parser

    args = build_parser().parse_args(["decompose", "tms-5-2", "--target-seed", "3", "--seed", "5"])
    config = api.load_run_config(args.config, _overrides(args))
    assert (config.target.train.seed, config.train.seed) == (3, 5)


def test_the_tms_recipe_sets_c_and_the_importance_coefficient_from_the_shape() -> None:
    from unmerge.cli.commands import _overrides
    from unmerge.cli.parser import build_parser

    args = build_parser().parse_args(["decompose", "tms", "--n-features", "30", "--n-hidden", "10", "--identity"])
    config = api.load_run_config(args.config, _overrides(args))
    assert (config.target.n_features, config.target.n_hidden, config.target.identity) == (30, 10, True)
    assert [(site.pattern, site.C) for site in config.method.sites] == [
        ("linear1", 150),
        ("hidden", 150),
        ("linear2", 150),
    ]
    assert config.method.importance_minimality_coeff == pytest.approx(0.015 / 300)
    assert config.method.importance_frequency_coeff == pytest.approx(0.0015 / 300)
    assert (config.train.optim.schedule, config.train.optim.final_lr_fraction) == ("cosine", 0.1)  # the lr floor
    keys = ["target.n_features", "target.n_hidden", "target.identity"]
    for name, shape in [("tms-5-2", [5, 2, False]), ("tms-5-2-id", [5, 2, True]), ("tms-40-10-id", [40, 10, True])]:
        rule = api.load_run_config("tms", [f"{key}={value}" for key, value in zip(keys, shape, strict=True)])
        preset = api.load_run_config(name)
        assert rule.train == preset.train and rule.target == preset.target, name  # the presets are the rule
        assert rule.method.sites == preset.method.sites, name  # at 5-2: C = 40, the floor
        assert rule.method.importance_minimality_coeff == preset.method.importance_minimality_coeff, name
        assert rule.method.importance_frequency_coeff == pytest.approx(preset.method.importance_frequency_coeff), name
    overridden = api.load_run_config("tms", ["target.n_features=8", "target.n_hidden=3", "method.sites.0.C=7"])
    assert [site.C for site in overridden.method.sites] == [7, 40]  # the user's overrides win over the rule


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["target.n_features=8"], "needs the model's shape: --n-features F --n-hidden H"),
        (["target.n_features=eight", "target.n_hidden=2"], "target.n_features must be a positive whole number"),
        (["target.n_features=8", "target.n_hidden=0"], "target.n_hidden must be a positive whole number"),
        (["target.n_features=8", "target.n_hidden=2", "target.identity=3"], "target.identity must be true or false"),
        (["target.n_features=8", "target.n_hidden=2", "method.pnorm=-1"], "the tms recipe with overrides"),
    ],
)
def test_the_tms_recipe_names_a_missing_or_bad_shape(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        api.load_run_config("tms", overrides)


def test_the_config_loaders_examples_print_what_the_presets_hold() -> None:
    """The example in `load_run_config`'s docstring names preset values; it runs, so it cannot drift from them."""
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner()
    for test in finder.find(unmerge.load_run_config, globs={"unmerge": unmerge}):
        runner.run(test)
    results = runner.summarize(verbose=False)
    assert results.attempted >= 3
    assert results.failed == 0
