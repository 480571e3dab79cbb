"""APD (issue 22, point 1): batch top-k, the Schatten proxy and the gradient attributions checked by hand, and APD
running through the one training loop, run directory, metrics and resume like SPD."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from unmerge import api, cli, runs
from unmerge.apd.method import APD, batch_top_k, schatten_proxy
from unmerge.config import APDConfig
from unmerge.errors import ConfigError
from unmerge.targets.base import Target
from unmerge.train import checkpoint

TINY = ["train.steps=60", "train.batch_size=256", "train.eval_batch_size=512", "train.checkpoint_every=30"]


def test_batch_top_k_keeps_the_largest_over_the_whole_batch() -> None:
    attributions = torch.tensor([[0.9, 0.1, 0.0], [0.5, 0.8, 0.2], [0.05, 0.0, 0.7]])
    # k = 1 over B = 3 inputs: the 3 largest of 9 entries, wherever they are (row 1 keeps two, row 0 one)
    expected = torch.tensor([[True, False, False], [False, True, False], [False, False, True]])
    assert torch.equal(batch_top_k(attributions, 1.0), expected)
    assert int(batch_top_k(attributions, 4 / 3).sum()) == 4  # round(k·B)
    assert int(batch_top_k(attributions, 0.01).sum()) == 1  # at least one


def test_the_schatten_proxy_by_hand() -> None:
    U = torch.tensor([[1.0, 0.0, 2.0, 0.0], [0.0, 3.0, 0.0, 1.0]])  # (d_out 2, C 2 × rank 2)
    V = torch.tensor([[1.0, 1.0], [0.0, 2.0], [1.0, 0.0], [0.0, 1.0]])  # (4, d_in 2)
    # piece norms² ‖U_r‖² ‖V_r‖²: 1·2, 9·4, 4·1, 1·1 → components 2^(p/2) + 36^(p/2), 4^(p/2) + 1^(p/2)
    assert torch.allclose(schatten_proxy(U, V, rank=2, pnorm=1.0), torch.tensor([2**0.5 + 6.0, 3.0]))
    assert torch.allclose(schatten_proxy(U, V, rank=2, pnorm=2.0), torch.tensor([38.0, 5.0]))


def _two_layer_target() -> Target:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3, bias=False), nn.Linear(3, 5, bias=False))
    return Target("two-layer", model, lambda size, generator: torch.randn(size, 4, generator=generator))


def test_attributions_are_the_squared_output_gradients_along_each_component() -> None:
    """f = W2 W1 x: Σ_ij ∂f_o/∂W1_ij P1_c,ij = (W2 P1_c x)_o and Σ_ij ∂f_o/∂W2_ij P2_c,ij = (P2_c W1 x)_o, so
    A_c(x) = mean_o ((W2 P1_c + P2_c W1) x)_o², at the target's own weights whatever the components."""
    target = _two_layer_target()
    apd = APD(target, APDConfig(sites=["0", "1"], C=3, rank=2, topk=1.0), seed=0)
    x = torch.randn(6, 4)
    with torch.no_grad(), apd.model.attached():
        clean = apd.model.clean_pass(x)
        attributions = apd.attributions(x, clean, apd.model.inner_acts(clean))
    W1, W2 = target.model[0].weight, target.model[1].weight

    def component(site: str, c: int) -> torch.Tensor:
        pieces = apd.model.site_components(site)
        return pieces.U[:, 2 * c : 2 * c + 2] @ pieces.V[2 * c : 2 * c + 2]

    by_hand = torch.stack(
        [((x @ (W2 @ component("0", c) + component("1", c) @ W1).T) ** 2).mean(-1) for c in range(3)], dim=-1
    )
    assert torch.allclose(attributions, by_hand.detach(), rtol=1e-5, atol=1e-7)


def test_component_shares_are_each_components_norm_over_the_weights_by_hand() -> None:
    """Site "0" has W1 (3 × 4); component 0 holds W1's first two rows, component 1 its last, component 2 nothing:
    shares ‖rows 0-1‖ / ‖W1‖, ‖row 2‖ / ‖W1‖, 0, one per component (C = 3, not one per output or input)."""
    target = _two_layer_target()
    apd = APD(target, APDConfig(sites=["0", "1"], C=3, rank=3, topk=1.0), seed=0)
    W1 = target.model[0].weight.detach()
    pieces = apd.model.site_components("0")
    with torch.no_grad():
        pieces.U.zero_()
        pieces.V.zero_()
        pieces.U[0, 0] = pieces.U[1, 1] = pieces.U[2, 3] = 1.0  # component c's pieces are columns 3c … 3c + 2
        pieces.V[0], pieces.V[1], pieces.V[3] = W1[0], W1[1], W1[2]
    expected = torch.stack([W1[:2].norm(), W1[2].norm(), torch.tensor(0.0)]) / W1.norm()
    torch.testing.assert_close(apd.component_shares("0"), expected)


def test_init_std_starts_the_factors_small_and_the_same_for_a_seed() -> None:
    def factors(config: APDConfig, seed: int = 0) -> list[torch.Tensor]:
        apd = APD(_two_layer_target(), config, seed=seed)
        apd.before_training()
        return [p.detach().clone() for p in apd.model.component_parameters()]

    aligned = factors(APDConfig(sites=["0", "1"], C=50, rank=2, topk=1.0))
    small = factors(APDConfig(sites=["0", "1"], C=50, rank=2, topk=1.0, init_std=0.01))
    assert all(0.008 < float(f.std()) < 0.012 and abs(float(f.mean())) < 0.002 for f in small)
    assert all(float(f.std()) > 0.05 for f in aligned)  # SPD's start: unit directions scaled by the overlap
    again = factors(APDConfig(sites=["0", "1"], C=50, rank=2, topk=1.0, init_std=0.01))
    other_seed = factors(APDConfig(sites=["0", "1"], C=50, rank=2, topk=1.0, init_std=0.01), seed=1)
    assert all(torch.equal(a, b) for a, b in zip(small, again, strict=True))
    assert not torch.equal(small[0], other_seed[0])


def test_apd_trains_evaluates_and_reports_like_spd(tmp_path: Path) -> None:
    config = api.load_run_config("apd-tms-5-2", TINY)
    result = api.decompose(config, tmp_path / "apd")
    metrics = result.metrics
    assert {"faithfulness", "topk_recon", "attribution_l0", "alive", "mmcs", "ml2r", "simplicity"} <= set(metrics)
    assert metrics["attribution_l0"] == pytest.approx(0.211, abs=0.01)
    report = (tmp_path / "apd" / "report.html").read_text()
    for figure in ("attributions_one_hot", "weights_linear1", "weights_linear2", "training_curves"):
        assert (tmp_path / "apd" / runs.FIGURES_DIR / f"{figure}.png").is_file()
        assert figure.replace("_", " ") in report  # embedded, named by its stem
    log = [line for line in (tmp_path / "apd" / runs.TRAIN_LOG).read_text().splitlines() if line]
    assert len(log) == 2  # steps 50 and 60
    assert cli.main(["evaluate", str(tmp_path / "apd")]) == 0
    assert cli.main(["group", str(tmp_path / "apd")]) == 2  # components are whole already
    _, apd, _ = api.load_run(tmp_path / "apd")  # the figure's attributions: each feature's over its largest
    assert isinstance(apd, APD)
    x = apd.target.one_hot_inputs()
    with apd.model.attached():
        clean = apd.model.clean_pass(x)
        raw = apd.attributions(x, clean, apd.model.inner_acts(clean))
    relative = apd.one_hot_attributions()
    assert relative.shape == (5, config.method.C)
    torch.testing.assert_close(relative * raw.amax(-1, keepdim=True), raw)
    torch.testing.assert_close(relative.amax(-1), torch.ones(5))


def test_apd_on_the_identity_variant_reports_how_the_identity_is_split(tmp_path: Path) -> None:
    config = api.load_run_config("apd-tms-5-2-id", TINY)
    metrics = api.decompose(config, tmp_path / "apd-id").metrics
    assert 0.0 < metrics["dense_largest_share/hidden"] and metrics["dense_components/hidden"] >= 1


def test_apd_resumes_to_the_same_bytes(tmp_path: Path) -> None:
    config = api.load_run_config("apd-tms-5-2", TINY)
    api.decompose(config, tmp_path / "whole")
    shutil.copytree(tmp_path / "whole", tmp_path / "resumed")
    shutil.rmtree(runs.saved_steps(tmp_path / "resumed")[-1])
    (tmp_path / "resumed" / "metrics.json").unlink()
    assert api.decompose(config, tmp_path / "resumed").resumed_from == 30
    whole, resumed = (
        load_file(str(runs.saved_steps(tmp_path / name)[-1] / checkpoint.WEIGHTS_FILE)) for name in ("whole", "resumed")
    )
    assert all(torch.equal(resumed[name], value) for name, value in whole.items())


def test_apd_config_errors_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="method.topk"):
        api.load_run_config("apd-tms-5-2", ["method.topk=0"])
    with pytest.raises(ConfigError, match="method.kind must be spd or apd"):
        api.load_run_config("apd-tms-5-2", ["method.kind=xpd"])
    with pytest.raises(ConfigError, match="dry-run plans SPD runs"):
        api.plan_decomposition(api.load_run_config("apd-tms-5-2"))


def test_the_residual_mlp_preset_runs_with_its_activation_reconstruction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("UNMERGE_CACHE_DIR", str(tmp_path / "cache"))  # a small target of its own, not the session's
    overrides = [
        "target.d_embed=64", "target.n_features=20", "target.d_mlp=8", "target.train.steps=20",
        "method.C=12", "train.steps=3", "train.batch_size=8", "train.eval_batch_size=16",
    ]  # fmt: skip
    metrics = api.decompose(api.load_run_config("apd-resid-mlp-1", overrides), tmp_path / "resid").metrics
    assert {"activation_recon", "topk_recon", "attribution_l0"} <= set(metrics)


@pytest.mark.parametrize("spd_preset", ["tms-5-2", "tms-5-2-id", "tms-40-10", "tms-40-10-id", "resid-mlp-1"])
def test_each_apd_preset_decomposes_the_target_of_its_spd_preset(spd_preset: str) -> None:
    """APD against SPD compares the two on one cached target, so `apd-X` must train exactly `X`'s target."""
    apd = api.load_run_config(f"apd-{spd_preset}").target
    assert apd == api.load_run_config(spd_preset).target, f"apd-{spd_preset}'s target differs from {spd_preset}'s"
