"""Reading the mechanisms of an SPD of a causal LM: densities and top tokens follow the causal importance, an
ablation's CE change is the exact effect of removing the component's weights, components span the right sites,
and the report and `mechanisms.json` show them, for a grouped run or each alive subcomponent alone."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.conftest import set_exact_factorisation
from unmerge import api
from unmerge.analysis.interventions import subcomponent_examples, unlearned_model
from unmerge.analysis.mechanisms import next_token_ce, read_mechanisms
from unmerge.config import SiteConfig, SPDConfig
from unmerge.eval.examples import LatentExamples, top_positions
from unmerge.report.html import write_run_report
from unmerge.report.mechanisms import MECHANISMS_FILE, mechanism_rows, mechanisms_section
from unmerge.spd.method import SPD
from unmerge.targets.base import Target
from unmerge.targets.language import from_module

VOCAB, BOS, C = 16, 0, 8
WINDOWS = torch.tensor([[BOS, 3, 5, 7, 9], [BOS, 4, 6, 8, 10]])
TOKENS = [[f"<t{int(i)}>" for i in window] for window in WINDOWS]


def _spd() -> SPD:
    """SPD of a tiny random LM (embedding, two linear sites), U V = W exactly."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(VOCAB, 8), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, VOCAB))
    lm = from_module(model, VOCAB, bos_id=BOS)
    target = Target(
        name="tiny", model=lm, sample_inputs=lambda n, g: torch.randint(1, VOCAB, (n, 5), generator=g, device=g.device)
    )
    sites = [SiteConfig(pattern="1", C=C), SiteConfig(pattern="3", C=C)]
    spd = SPD(target, SPDConfig(sites=sites, output_loss="kl", importance_minimality_coeff=1e-3), seed=0)
    set_exact_factorisation(spd.model)
    return spd


def _constructed() -> LatentExamples:
    """Subcomponent CI on WINDOWS (units 1/0..1/7, then 3/0..3/7): 0 everywhere but a few tokens."""
    ci = torch.zeros(2, 5, 2 * C)
    ci[0, 1, 0] = ci[1, 2, 0] = 0.5  # 1/0
    ci[0, 1, C + 2], ci[0, 3, C + 2], ci[1, 4, C + 2] = 0.9, 0.05, 0.3  # 3/2: a peak, one below threshold
    ci[0, 2, 1] = 0.2  # 1/1
    ordinary = WINDOWS != BOS
    return LatentExamples(TOKENS, ci, top_positions(ci, 3), ordinary, threshold=0.1)


def test_density_and_top_tokens_follow_a_constructed_importance_pattern(tmp_path: Path) -> None:
    spd = _spd()
    mechanisms = read_mechanisms(spd, WINDOWS, _constructed(), [["1/0", "3/2"], ["1/1"], ["1/2"]])
    # 8 ordinary tokens: the first component fires at (0,1), (1,2), (1,4); the second at (0,2); the third never
    assert mechanisms.density.tolist() == [3 / 8, 1 / 8, 0.0]
    assert torch.equal(mechanisms.examples.activations[0, 1:3], torch.tensor([[0.9, 0.0, 0.0], [0.0, 0.2, 0.0]]))
    first = mechanism_rows(mechanisms)[0]
    assert first["component"] == "0" and first["max_ci"] == pytest.approx(0.9)
    assert [(top["window"], top["position"]) for top in first["top"]] == [(0, 1), (1, 2), (1, 4)]
    peak = [token for token in first["top"][0]["snippet"] if token["strongest"]]
    assert [token["text"] for token in peak] == [TOKENS[0][1]]
    (tmp_path / "grouping.json").write_text(json.dumps({"components": [["1/0", "3/2"], ["1/1"], ["1/2"]]}))
    section = mechanisms_section(spd, WINDOWS, _constructed(), tmp_path)
    assert '<span class="tok max" data-activation="0.9" title="0.9"' in section
    assert "the components of grouping.json" in section
    saved = json.loads((tmp_path / MECHANISMS_FILE).read_text())
    assert [c["density"] for c in saved["components"]] == [3 / 8, 1 / 8, 0.0]
    assert saved["components"][0]["top"][0]["snippet"] == "<t0>[[<t3>]]<t5><t7><t9>"  # the whole window


def test_ablation_is_the_exact_effect_of_removing_the_weights_and_zero_weights_change_nothing() -> None:
    spd = _spd()
    with torch.no_grad():
        for site, c in (("1", 1), ("3", 3)):
            spd.model.site_components(site).U[:, c] = 0.0
    components = [["1/0", "3/2"], ["1/1", "3/3"]]
    examples = LatentExamples(
        TOKENS, torch.full((2, 5, 2 * C), 0.5), torch.zeros(1, 2 * C, dtype=torch.long), WINDOWS != BOS
    )
    mechanisms = read_mechanisms(spd, WINDOWS, examples, components)
    original = next_token_ce(spd.target.model, WINDOWS)
    removed = next_token_ce(unlearned_model(spd, components[0]), WINDOWS) - original
    assert mechanisms.ce_original == original
    assert mechanisms.examples.ablation_effect[0] == pytest.approx(removed) and abs(removed) > 1e-3
    assert mechanisms.examples.ablation_effect[1] == 0.0
    assert math.isnan(read_mechanisms(spd, WINDOWS, examples, components, n_ablated=1).examples.ablation_effect[1])


def test_components_span_their_sites_and_an_ungrouped_run_lists_alive_subcomponents() -> None:
    spd = _spd()
    mechanisms = read_mechanisms(spd, WINDOWS, _constructed(), [["1/0", "1/3", "3/2"], ["3/1"]])
    assert mechanisms.sites(0) == {"1": 2, "3": 1} and mechanisms.sites(1) == {"3": 1}
    alone = read_mechanisms(spd, WINDOWS, _constructed())
    assert not alone.grouped and alone.components == [["1/0"], ["1/1"], ["3/2"]]  # 3/2 fires, 3/0 never does
    assert alone.examples.names == ["1/0", "1/1", "3/2"] and alone.density.tolist() == [2 / 8, 1 / 8, 2 / 8]


def test_the_report_of_a_language_model_run_lists_its_mechanisms(tmp_path: Path) -> None:
    spd = _spd()
    examples = subcomponent_examples(spd, WINDOWS, TOKENS, per_unit=2)
    (tmp_path / "config.yaml").write_text("name: tiny\n")
    section = mechanisms_section(spd, WINDOWS, examples, tmp_path)
    page = write_run_report(tmp_path, "SPD: tiny", {}, [], sections=section).read_text()
    assert "<h2>Mechanisms</h2>" in page and '<table id="mechanisms" class="sortable">' in page
    saved = json.loads((tmp_path / MECHANISMS_FILE).read_text())
    assert saved["components_from"].startswith("every alive subcomponent alone")
    assert saved["ce_original"] == pytest.approx(next_token_ce(spd.target.model, WINDOWS))
    assert {c["component"] for c in saved["components"]} <= {f"{s}/{c}" for s in "13" for c in range(C)}
    assert all(c["ce_change"] is not None for c in saved["components"])  # fewer than 32: every one ablated


@pytest.mark.slow  # decompose, group and evaluate a tiny Llama end to end: about 15 s
def test_a_language_model_runs_report_lists_its_mechanisms_from_its_grouping_once_grouped(
    tmp_path: Path, isolated_cache: Path
) -> None:
    from tests.test_language import _tiny_language_run  # needs transformers

    sites = "method.sites=[{pattern: 'model.layers.*.mlp.up_proj', C: 4}, {pattern: 'model.layers.0.*.o_proj', C: 4}]"
    config = _tiny_language_run(
        tmp_path, isolated_cache, ["target.module=null", "method.output_loss=kl", sites, "train.steps=2"]
    )
    run = tmp_path / "run"
    report = api.decompose(config, run).report.read_text()
    assert "<h2>Mechanisms</h2>" in report and 'data-component="model.layers.' in report
    assert json.loads((run / MECHANISMS_FILE).read_text())["components_from"].startswith("every alive subcomponent")
    grouping = api.group_components(run, n_inputs=256, min_active=1, batch_size=64)
    report = api.evaluate(run).report.read_text()
    saved = json.loads((run / MECHANISMS_FILE).read_text())
    assert saved["components_from"].startswith("the components of grouping.json")
    assert sorted(c["members"] for c in saved["components"]) == sorted(grouping.components())
    assert '<tr data-component="0">' in report
