"""Issue 23's cases, one test each: what a user types gets one clear error (never a traceback, never silently
accepted), and no run directory is left in a state that blocks or misleads the next run."""

from __future__ import annotations

from pathlib import Path

import pytest

from unmerge import api
from unmerge.cli import main
from unmerge.errors import ConfigError


def _error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run the CLI, expecting it to refuse with one message and no traceback; the message."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.steps=true", r"steps: a boolean \(True\) is not valid here"),
        ("method.sites.0.C=false", r"C: a boolean \(False\) is not valid here"),
        ("train.seed=9223372036854775808", r"train\.seed: Input should be less than 9223372036854775808"),
        ("train.optim.lr=.nan", r"train\.optim\.lr: Input should be a finite number"),
        ("train.optim.weight_decay=.inf", r"train\.optim\.weight_decay: Input should be a finite number"),
        ("method.importance_minimality_coeff=-.inf", r"importance_minimality_coeff: Input should be a finite number"),
        ("method.sites.1={pattern: linear1, C: 3}", r"the site pattern\(s\) 'linear1' are listed more than once"),
    ],
)
def test_values_that_were_silently_accepted_are_refused(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        api.load_run_config("tms-5-2", [override])


def test_a_key_given_twice_in_a_yaml_mapping_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "twice.yaml"
    config.write_text("name: x\ntrain:\n  steps: 5\n  steps: 6\n")
    assert "the key 'steps' is given twice in one mapping" in _error(capsys, ["decompose", str(config)])
    assert "given twice" in _error(capsys, ["decompose", "tms-5-2", "train.optim={lr: 1, lr: 2}"])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\xff\xfe\x00garbage\x80", "is not a UTF-8 text file"),
        (b"{{{ not: [yaml", "is not valid YAML"),
        (b"- a list\n- not a mapping\n", "must hold a mapping of config keys"),
    ],
)
def test_a_config_file_that_is_not_yaml_text_is_one_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes, message: str
) -> None:
    config = tmp_path / "config.yaml"
    config.write_bytes(content)
    assert message in _error(capsys, ["decompose", str(config)])
    assert "is a directory" in _error(capsys, ["decompose", str(tmp_path)])


def test_group_refuses_a_negative_alpha_before_loading_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert "alpha -1.0 must be a finite number ≥ 0" in _error(capsys, ["group", str(tmp_path), "--alpha", "-1"])
    assert "threshold 1.5 must lie in [0, 1)" in _error(capsys, ["group", str(tmp_path), "--threshold", "1.5"])
