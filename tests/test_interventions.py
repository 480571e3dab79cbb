"""Interventions: an ablation of nothing changes nothing, of everything equals the model without those weights,
mean ablation keeps the site's mean output, permanent removal equals the on-the-fly ablation, monitoring."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import set_exact_factorisation
from unmerge.analysis.interventions import (
    ablated,
    component_activity,
    mean_inner_activations,
    subcomponent_masks,
    unlearned_model,
)
from unmerge.config import ResidMLPConfig, SiteConfig, SPDConfig, TMSConfig, dictionary_config
from unmerge.errors import SiteError
from unmerge.sae.arch import build_dictionary
from unmerge.spd.method import SPD
from unmerge.targets.base import Target
from unmerge.targets.resid_mlp import ResidMLP, resid_mlp_inputs
from unmerge.targets.tms import TMSModel

CONFIG = ResidMLPConfig(n_features=6, d_embed=10, n_layers=2, d_mlp=3)
C = 5


def _spd() -> SPD:
    torch.manual_seed(0)
    model = ResidMLP(CONFIG, embedding_seed=0)
    target = Target(name="resid", model=model, sample_inputs=lambda n, g: resid_mlp_inputs(CONFIG, n, g))
    config = SPDConfig(sites=[SiteConfig(pattern="layers.*.mlp_*", C=C)], importance_minimality_coeff=1e-3)
    spd = SPD(target, config, seed=0)
    set_exact_factorisation(spd.model)
    return spd


def _x() -> torch.Tensor:
    return torch.randn(8, CONFIG.n_features, generator=torch.Generator().manual_seed(1))


def _all_units(spd: SPD) -> list[str]:
    return [f"{site}/{c}" for site in spd.model.site_names for c in range(C)]


def test_an_ablation_of_nothing_changes_nothing() -> None:
    spd, x = _spd(), _x()
    original = spd.target.model(x)
    with ablated(spd, []):
        assert torch.equal(spd.target.model(x), original)
    with ablated(spd, [], mode="mean", means=mean_inner_activations(spd, 256, 128)):
        assert torch.equal(spd.target.model(x), original)


def test_an_ablation_of_everything_equals_the_model_without_those_weights() -> None:
    spd, x = _spd(), _x()
    model = spd.target.model
    with ablated(spd, _all_units(spd)):
        ablated_output = model(x)
    torch.testing.assert_close(ablated_output, x @ model.W_E @ model.W_E.T, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(unlearned_model(spd, _all_units(spd))(x), ablated_output, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(model(x), ablated_output)  # the target itself is untouched


def test_mean_ablation_of_a_whole_site_outputs_its_mean() -> None:
    spd, x = _spd(), _x()
    means = mean_inner_activations(spd, 512, 128)
    site = "layers.0.mlp_in"
    outputs = []
    handle = dict(spd.target.model.named_modules())[site].register_forward_hook(lambda m, i, o: outputs.append(o))
    with ablated(spd, [f"{site}/{c}" for c in range(C)], mode="mean", means=means):
        spd.target.model(x)
    handle.remove()
    expected = spd.model.site_components(site).U @ means[site]
    torch.testing.assert_close(outputs[0], expected.expand(8, -1), atol=1e-5, rtol=1e-5)


def test_removing_one_subcomponent_permanently_matches_the_ablation_and_tied_sites_share_it() -> None:
    spd, x = _spd(), _x()
    with ablated(spd, ["layers.1.mlp_out/2"]):
        expected = spd.target.model(x)
    torch.testing.assert_close(unlearned_model(spd, ["layers.1.mlp_out/2"])(x), expected)
    tms = TMSModel(TMSConfig(n_features=5, n_hidden=2))
    tms_spd = SPD(
        Target(name="tms", model=tms, sample_inputs=lambda n, g: torch.rand(n, 5, generator=g)),
        SPDConfig(sites=[SiteConfig(pattern="linear*", C=4)], importance_minimality_coeff=1e-3),
        seed=0,
    )
    edited = unlearned_model(tms_spd, ["linear2/1"])
    removed = tms_spd.model.site_components("linear1")
    torch.testing.assert_close(edited.linear1.weight, tms.linear1.weight - removed.U[:, 1:2] @ removed.V[1:2])


def test_monitoring_marks_components_with_an_important_subcomponent() -> None:
    spd, x = _spd(), _x()
    components = [["layers.0.mlp_in/0", "layers.1.mlp_in/3"], ["layers.0.mlp_out/1"]]
    activity = component_activity(spd, x, components, threshold=0.1)
    importance = spd.importances(spd.model.clean_pass(x)).clipped()
    expected_first = (importance["layers.0.mlp_in"][:, 0] > 0.1) | (importance["layers.1.mlp_in"][:, 3] > 0.1)
    assert activity.shape == (8, 2) and torch.equal(activity[:, 0], expected_first)
    assert torch.equal(activity[:, 1], importance["layers.0.mlp_out"][:, 1] > 0.1)


def test_a_bad_subcomponent_name_is_refused() -> None:
    spd = _spd()
    with pytest.raises(SiteError, match="names no subcomponent"):
        subcomponent_masks(spd, ["layers.0.mlp_in/99"])
    with pytest.raises(SiteError, match="names no subcomponent"):
        subcomponent_masks(spd, ["nowhere/1"])


def test_dictionary_splice_of_an_exact_transcoder_with_nothing_ablated_changes_nothing() -> None:
    from unmerge.analysis.interventions import dictionary_spliced

    model, x = _spd().target.model, _x()
    block = model.layers[0]
    transcoder = build_dictionary(
        CONFIG.d_embed,
        dictionary_config(width=CONFIG.d_mlp, unit_norm_decoder=False),
        torch.Generator(),
        output_dim=CONFIG.d_embed,
    )
    with torch.no_grad():  # latents = the block's ReLU neurons, decoder = W_out: exact
        transcoder.W_e.copy_(block.mlp_in.weight.T)
        transcoder.W_d.copy_(block.mlp_out.weight.T)
        transcoder.b_e.zero_()
        transcoder.b_d.zero_()
    original = model(x)
    with dictionary_spliced(block, transcoder):
        torch.testing.assert_close(model(x), original, atol=1e-5, rtol=1e-5)
    with dictionary_spliced(block, transcoder, latents=range(CONFIG.d_mlp)):
        ablated_all = model(x)
    resid = x @ model.W_E
    resid = resid + model.layers[1](resid)
    torch.testing.assert_close(ablated_all, resid @ model.W_E.T, atol=1e-5, rtol=1e-5)
