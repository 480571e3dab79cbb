"""Reports are rendered from autoescaped templates: text from runs, configs and models is escaped wherever it
appears, markup the templates rendered is kept, and a template missing a value is an error, not a blank."""

from __future__ import annotations

from pathlib import Path

import jinja2
import pytest
import torch

from unmerge.eval.examples import LatentExamples
from unmerge.report.html import render, write_index, write_run_report
from unmerge.report.latents import latents_section

SCRIPT = "<script>alert(1)</script>"
ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"


def _examples() -> LatentExamples:
    activations = torch.tensor([[[0.0], [2.0], [1.0]]])  # one window of 3 tokens, one latent
    return LatentExamples(
        tokens=[["<bos>", SCRIPT, "x"]],
        activations=activations,
        top=torch.tensor([[1]]),
        ordinary=torch.tensor([[False, True, True]]),
        names=[f"site{SCRIPT}/0"],
    )


def test_user_text_is_escaped_in_a_run_report_and_its_latents(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text(f"name: {SCRIPT}\n")
    section = latents_section(_examples())
    path = write_run_report(tmp_path, f"SPD: {SCRIPT}", {f"mmcs/{SCRIPT}": 0.5}, [], sections=section)
    page = path.read_text()
    assert SCRIPT not in page
    assert page.count(ESCAPED) == 7  # title ×2, metric, config, the token, the unit name (cell and data attribute)
    assert '<table id="latents" class="sortable">' in page  # the section's own markup is kept


def test_plain_text_as_a_section_is_escaped(tmp_path: Path) -> None:
    page = write_run_report(tmp_path, "run", {}, [], sections=SCRIPT).read_text()
    assert SCRIPT not in page and ESCAPED in page


def test_user_text_is_escaped_in_the_index(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "report.html").write_text("")
    page = write_index(tmp_path / "index", [(run, f"name {SCRIPT}", {"fvu": 0.25})], ["fvu", SCRIPT]).read_text()
    assert SCRIPT not in page and page.count(ESCAPED) == 3  # the run's name (link text and sort key), a column


def test_a_missing_template_value_is_an_error() -> None:
    with pytest.raises(jinja2.UndefinedError, match="title"):
        render("index.html", runs=[], columns=[])
