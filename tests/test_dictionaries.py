"""Sparse dictionaries: activation functions, penalties, AuxK, metrics, data and training, each against a closed
form or a hand computation."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from unmerge import api, cli, runs
from unmerge.config import (
    HierarchyConfig,
    PenaltyConfig,
    ResidMLPConfig,
    SparseFeaturesConfig,
    TMSConfig,
    TrainConfig,
    dictionary_config,
)
from unmerge.data import hierarchy_source, sparse_feature_source
from unmerge.data.sparse_features import firing_probabilities
from unmerge.errors import ConfigError, UnmergeError
from unmerge.metrics import dictionary as scores
from unmerge.sae import activations, penalties
from unmerge.sae.arch import build_dictionary
from unmerge.sae.arch.gated import gated_auxiliary_loss
from unmerge.sae.arch.topk import aux_k_loss
from unmerge.sae.method import DictionaryMethod, geometric_median, misaligned, refit_magnitudes, unexplained
from unmerge.targets.activations import target_activation_source
from unmerge.targets.base import Target
from unmerge.targets.resid_mlp import ResidMLP
from unmerge.targets.tms import TMSModel
from unmerge.targets.toys import build_target
from unmerge.train.loop import train
from unmerge.train.rng import step_generator


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_jumprelu_threshold_gradient_is_the_rectangle_kernel_formula() -> None:
    z = torch.tensor([[0.10, 0.5004, 0.4990, 0.70], [0.5002, 0.20, 0.5010, 0.4996]], requires_grad=True)
    theta = torch.full((4,), 0.5, requires_grad=True)
    eps = 1e-3
    upstream = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    (activations.jumprelu(z, theta, eps) * upstream).sum().backward()
    inside = ((z.detach() - 0.5).abs() < eps / 2).float()  # K((z − θ)/ε) = 1 inside the window
    assert torch.allclose(theta.grad, (upstream * -(0.5 / eps) * inside).sum(0))
    assert torch.equal(z.grad, upstream * (z.detach() > 0.5))
    theta.grad = None
    activations.jumprelu_l0(z, theta, eps).backward()
    assert torch.allclose(theta.grad, (-(1 / eps) * inside).sum(0) / 2)


def test_jumprelu_l0_penalty_makes_the_dictionary_sparse() -> None:
    """The L0 term moves θ into the pre-activations' range within a few hundred steps (when θ was stored as log θ,
    Adam moved it by at most a factor e per 1/lr steps and the dictionary stayed dense), and θ stays ≥ 0."""
    source = sparse_feature_source(SparseFeaturesConfig(n_features=64, dim=32, mean_active=3.0, decay=1.0))
    config = dictionary_config(width=64, activation="jumprelu", l0_coeff=0.03, penalty=PenaltyConfig(name="none"))
    method = DictionaryMethod(source, config, seed=0, total_steps=300)
    train(method, source.sample, TrainConfig(steps=300, batch_size=256, log_every=100, optim={"lr": 3e-3}))
    metrics = method.evaluate()
    assert metrics["l0"] < 10 and metrics["fvu"] < 0.3  # about 3 features are active per input; width 64
    threshold = method.module.threshold.detach()
    assert float(threshold.min()) >= 0.0 and float(threshold.median()) > 0.05


def test_topk_and_batch_topk_keep_the_largest() -> None:
    z = torch.tensor([[3.0, -1.0, 2.0, 0.5], [0.1, 0.2, 5.0, 4.0]])
    assert torch.equal(activations.topk(z, 2), torch.tensor([[3.0, 0.0, 2.0, 0.0], [0.0, 0.0, 5.0, 4.0]]))
    kept, smallest = activations.batch_topk(z, 2)  # the 4 largest of the batch: 5, 4, 3, 2
    assert torch.equal(kept, torch.tensor([[3.0, 0.0, 2.0, 0.0], [0.0, 0.0, 5.0, 4.0]]))
    assert smallest.item() == 2.0


def test_aux_k_reconstructs_the_detached_residual_without_a_second_decoder_bias() -> None:
    W_d = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], requires_grad=True)
    x = torch.tensor([[2.0, 3.0]])
    reconstruction = torch.tensor([[1.5, 1.0]], requires_grad=True)  # already includes b_d
    z = torch.tensor([[0.4, 0.9, 0.2]], requires_grad=True)
    dead = torch.tensor([True, True, False])
    loss = aux_k_loss(x, reconstruction, z, W_d, dead, k=1)
    residual = torch.tensor([[0.5, 2.0]])
    expected = (residual - 0.9 * W_d.detach()[1]).square().sum() / residual.square().sum()  # latent 1 only, no b_d
    assert loss.item() == pytest.approx(expected.item())
    loss.backward()
    assert reconstruction.grad is None  # the residual is a detached target
    assert torch.count_nonzero(W_d.grad[[0, 2]]) == 0 and torch.count_nonzero(W_d.grad[1]) == 2
    assert aux_k_loss(x, reconstruction, z, W_d, torch.zeros(3, dtype=torch.bool), k=1).item() == 0.0


def test_penalties_match_their_formulas_and_are_not_divided_by_width() -> None:
    f = torch.tensor([[0.0, 0.5, 2.0]])
    config = PenaltyConfig(name="l1")
    assert penalties.sparsity_penalty(f, config).item() == pytest.approx(2.5)
    wide = torch.cat([f, f], dim=1)  # twice the latents carrying the same values: twice the penalty
    assert penalties.sparsity_penalty(wide, config).item() == pytest.approx(5.0)
    assert penalties.cauchy(torch.tensor(0.2), 0.1).item() == pytest.approx(math.log(5.0))
    assert penalties.log1p_abs(torch.tensor(1.0)).item() == pytest.approx(math.log(2.0))
    assert penalties.tanh(torch.tensor(0.5), 2.0).item() == pytest.approx(math.tanh(1.0))
    tiny = torch.full((1,), 1e-9, requires_grad=True)
    penalties.lp(tiny, 0.5, 1e-3).sum().backward()  # finite next to 0: ≈ p ε^(p−1), not (1e-9)^(−1/2)
    assert tiny.grad.item() == pytest.approx(0.5 * 1e-3**-0.5, rel=1e-5)
    assert penalties.lp(torch.tensor(0.0), 0.5, 1e-3).item() == pytest.approx(0.0, abs=1e-8)
    annealed = PenaltyConfig(name="lp", p=1.0, p_final=0.5)
    assert penalties.penalty_exponent(annealed, 0.5) == pytest.approx(0.75)
    weighted = PenaltyConfig(name="l1", decoder_norm_weighted=True)
    assert penalties.sparsity_penalty(f, weighted, torch.tensor([1.0, 2.0, 3.0])).item() == pytest.approx(7.0)


def test_fvu_cosine_and_norm_ratio_closed_forms() -> None:
    x = torch.randn(100, 8, generator=_generator())
    assert scores.fvu(x, x.mean(0).expand_as(x)) == pytest.approx(1.0)
    assert scores.fvu(x, x) == 0.0
    assert scores.reconstruction_cosine(x, 2 * x) == pytest.approx(1.0)
    assert scores.norm_ratio(x, 0.5 * x) == pytest.approx(0.5)
    assert scores.l0(torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.0, 3.0]])) == 1.5


def test_recovery_metrics_closed_forms() -> None:
    truth = torch.eye(3)
    # atom 0 = feature 0, atom 1 halfway between features 1 and 2, atom 2 = feature 0 again
    atoms = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0], [2.0, 0.0, 0.0]])
    cosines = scores.cosine_matrix(truth, atoms)
    half = 1 / math.sqrt(2)
    assert scores.recall_mmcs(cosines) == pytest.approx((1 + half + half) / 3)
    assert scores.precision_mmcs(cosines) == pytest.approx((1 + half + 1) / 3)
    assert scores.hungarian_mcc(cosines) == pytest.approx((1 + half + 0) / 3)  # atoms 0 and 2 cannot both serve 0
    assert scores.matched_fraction(cosines, 0.9) == pytest.approx(1 / 3)
    assert scores.duplicate_latents(atoms) == 2


def test_shrinkage_is_the_mean_recovered_over_true_coefficient() -> None:
    truth = torch.eye(2)
    atoms = torch.eye(2)
    coefficients = torch.tensor([[1.0, 0.0], [0.5, 2.0]])
    latents = coefficients * 0.8
    cosines = scores.cosine_matrix(truth, atoms)
    assert scores.shrinkage(coefficients, latents, cosines, atoms.norm(dim=1)) == pytest.approx(0.8)


def test_geometric_median_ignores_an_outlier() -> None:
    points = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [100.0, 100.0]])
    median = geometric_median(points)
    assert median.norm().item() < 1.5 and points.mean(0).norm().item() > 20


def test_sparse_features_are_reproducible_with_the_documented_statistics() -> None:
    config = SparseFeaturesConfig()
    source = sparse_feature_source(config)
    assert torch.allclose(source.true_features.norm(dim=1), torch.ones(512))
    assert firing_probabilities(config).sum().item() == pytest.approx(5.0, rel=1e-5)
    x, coefficients = source.sample_with_coefficients(4096, _generator(1))
    again = sparse_feature_source(config).sample(4096, _generator(1))
    assert torch.equal(x, again)
    assert (coefficients > 0).sum(1).float().mean().item() == pytest.approx(5.0, abs=0.15)
    assert torch.allclose(x, coefficients @ source.true_features, atol=1e-5)
    correlated = sparse_feature_source(SparseFeaturesConfig(correlated=True))
    _, correlated_coefficients = correlated.sample_with_coefficients(8192, _generator(2))
    rates = (correlated_coefficients[:, :5] > 0).float().mean(0)  # marginals unchanged by the copula
    assert torch.allclose(rates, firing_probabilities(config)[:5], atol=0.02)


def test_bad_dictionary_configs_and_activations_are_named() -> None:
    with pytest.raises(ValueError, match="greater than 0"):
        dictionary_config(width=0)
    with pytest.raises(ValueError, match="larger than the width"):
        dictionary_config(width=4, activation="topk", k=5)
    with pytest.raises(ValueError, match="needs k"):
        dictionary_config(width=4, activation="batchtopk")
    with pytest.raises(ConfigError, match="method.penalty.name: Input should be 'none', 'l1'"):
        api.load_dictionary_config("sparse-512-relu-l1", ["method.penalty.name=l3"])
    method = DictionaryMethod(
        sparse_feature_source(SparseFeaturesConfig(n_features=8, dim=4, mean_active=1)),
        dictionary_config(width=8),
        seed=0,
        total_steps=10,
    )
    with pytest.raises(UnmergeError, match="expects \\(batch, 4\\)"):
        method.training_loss(torch.zeros(2, 5), _generator())
    with pytest.raises(UnmergeError, match="NaN"):
        method.training_loss(torch.tensor([[0.0, float("nan"), 0.0, 0.0]]), _generator())


def test_cli_reports_a_bad_dictionary_preset_and_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["train-dictionary", "no-such-preset", "--out", "x"]) == 2
    error = capsys.readouterr().err
    listed = error.split("available presets: ")[1].split(" (or pass")[0].split(", ")
    assert set(listed) == set(api.dictionary_preset_names()) and "sparse-512-topk" in listed
    assert cli.main(["train-dictionary", "sparse-512-topk", "--out", "x", "method.widht=3"]) == 2
    assert "method.widht: unknown key" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="larger than the width"):
        api.load_dictionary_config("sparse-512-topk", ["method.k=1000"])


def _small_method(activation: str, **overrides: object) -> DictionaryMethod:
    data = SparseFeaturesConfig(n_features=32, dim=16, mean_active=2.0, decay=1.0)
    config = dictionary_config(width=32, activation=activation, init="data", **overrides)
    return DictionaryMethod(sparse_feature_source(data), config, seed=0, total_steps=1500)


def test_latent_densities_add_up_to_the_evaluation_l0() -> None:
    method = _small_method("topk", k=3, penalty=PenaltyConfig(name="none"))
    density = method.latent_density()
    assert density.shape == (32,) and bool(((density >= 0) & (density <= 1)).all())
    assert float(density.sum()) == pytest.approx(method.evaluate()["l0"], rel=1e-5)  # both on the evaluation batch


def test_unit_norm_decoder_keeps_the_optimizer_on_the_same_tensor() -> None:
    method = _small_method("relu", penalty=PenaltyConfig(coeff=0.05))
    decoder = method.module.W_d
    train(method, method.source.sample, TrainConfig(steps=5, batch_size=64, log_every=1))
    assert method.module.W_d is decoder
    assert torch.allclose(decoder.norm(dim=1), torch.ones(32), atol=1e-6)
    grad = torch.randn_like(decoder)
    rows = F.normalize(decoder.detach(), dim=1)
    assert torch.allclose((method._tangent_gradient(grad) * rows).sum(1), torch.zeros(32), atol=1e-6)


def test_topk_dictionary_recovers_small_sparse_features() -> None:
    method = _small_method("topk", k=3, penalty=PenaltyConfig(name="none"), aux_k=8, dead_window=5000)
    train(
        method,
        method.source.sample,
        TrainConfig(steps=1000, batch_size=256, log_every=100, optim={"lr": 3e-3, "schedule": "cosine"}),
    )
    metrics = method.evaluate()
    assert metrics["recall_mmcs"] > 0.9 and metrics["mcc"] > 0.85 and metrics["fvu"] < 0.2, metrics


def test_batch_topk_inference_threshold_matches_training_l0() -> None:
    method = _small_method("batchtopk", k=3, penalty=PenaltyConfig(name="none"))
    train(method, method.source.sample, TrainConfig(steps=600, batch_size=256, log_every=100, optim={"lr": 3e-3}))
    x = method.source.sample(4096, _generator(9))
    with torch.no_grad():
        training_l0 = scores.l0(activations.batch_topk(method.module.pre_activations(x), 3)[0])
        method.module.eval()
        inference_l0 = scores.l0(method.module(x)[1])
    assert training_l0 == pytest.approx(3.0)
    assert abs(inference_l0 - training_l0) <= 0.1 * training_l0


def test_hierarchy_children_fire_only_with_their_parent_one_at_a_time() -> None:
    config = HierarchyConfig()
    source = hierarchy_source(config)
    x, coefficients = source.sample_with_coefficients(20_000, _generator(3))
    assert source.dim == config.n_features == 20
    assert torch.allclose(source.true_features @ source.true_features.T, torch.eye(20), atol=1e-5)
    assert torch.allclose(x, coefficients @ source.true_features)
    assert source.parents.tolist() == [-1, -1, -1, 0, 0, 0, 1, 1, 1, 2, 2, 2] + [-1] * 8
    active = coefficients > 0
    children = active[:, 3:12].view(-1, 3, 3)
    assert not bool((children.any(2) & ~active[:, :3]).any())
    assert int(children.sum(2).max()) == 1
    assert float(active[:, :3].double().mean()) == pytest.approx(0.15, abs=0.01)
    assert float(children.any(2)[active[:, :3]].double().mean()) == pytest.approx(0.6, abs=0.02)
    assert torch.equal(source.sample(64, _generator(1)), source.sample(64, _generator(1)))


def test_parent_recall_and_absorption_closed_forms() -> None:
    parents = torch.tensor([-1, 0, 0])
    cosines = torch.eye(3, dtype=torch.float64)
    coefficients = torch.tensor([[1.0, 0, 0], [1.0, 1, 0], [1.0, 0, 1], [1.0, 1, 0]])
    latents = torch.tensor([[1.0, 0, 0], [0.0, 1, 0], [1.0, 0, 1], [1.0, 1, 0]])
    assert scores.parent_recall(coefficients, latents, cosines, parents) == pytest.approx(3 / 4)
    assert scores.absorption(coefficients, latents, cosines, parents) == pytest.approx(1 / 3)


def test_resampling_points_dead_latents_at_badly_reconstructed_inputs_and_resets_adam() -> None:
    method = _small_method("relu", penalty=PenaltyConfig(coeff=0.05), dead_window=64, resample_samples=512)
    module = method.module
    optimizer = torch.optim.Adam(module.parameters())
    method.before_training()
    loss = method.training_loss(method.source.sample(64, _generator()), _generator()).loss
    loss.backward()
    optimizer.step()
    module.samples_since_fired.zero_()
    module.samples_since_fired[[2, 5]] = 64
    before = {name: value.detach().clone() for name, value in module.named_parameters()}
    scored = method.source.sample(512, step_generator(0, "resample", 0))
    with torch.no_grad():
        residuals = F.normalize(scored - module(scored)[0], dim=1)
    assert method.resample_dead(optimizer) == 2
    assert torch.allclose((module.W_d[[2, 5]] @ residuals.T).max(1).values, torch.ones(2, dtype=torch.float32))
    live = torch.ones(32, dtype=torch.bool)
    live[[2, 5]] = False
    assert torch.equal(module.W_d[live], before["W_d"][live]) and torch.equal(module.b_e[live], before["b_e"][live])
    assert torch.allclose(module.W_d[[2, 5]].norm(dim=1), torch.ones(2))
    assert torch.allclose(F.normalize(module.W_e[:, [2, 5]].T, dim=1), module.W_d[[2, 5]], atol=1e-6)
    live_norm = before["W_e"][:, live].norm(dim=0).mean()
    assert torch.allclose(module.W_e[:, [2, 5]].norm(dim=0), 0.2 * live_norm.expand(2))
    assert module.b_e[[2, 5]].abs().sum() == 0 and int(module.samples_since_fired.sum()) == 0
    state = optimizer.state[module.W_d]
    assert state["exp_avg"][[2, 5]].abs().sum() == 0 and state["exp_avg_sq"][[2, 5]].abs().sum() == 0
    assert state["exp_avg_sq"][live].abs().sum() > 0
    assert optimizer.state[module.W_e]["exp_avg"][:, [2, 5]].abs().sum() == 0


def test_resampling_a_jumprelu_latent_resets_its_threshold_and_its_adam_moments() -> None:
    method = _small_method(
        "jumprelu", penalty=PenaltyConfig(name="none"), l0_coeff=0.01, dead_window=64, resample_samples=512
    )
    module = method.module
    optimizer = torch.optim.Adam(module.parameters())
    method.training_loss(method.source.sample(64, _generator()), _generator()).loss.backward()
    optimizer.step()
    with torch.no_grad():
        module.threshold.fill_(0.7)
    module.samples_since_fired.zero_()
    module.samples_since_fired[[1, 4]] = 64
    assert method.resample_dead(optimizer) == 2
    expected = torch.full((32,), 0.7)
    expected[[1, 4]] = method.config.jumprelu_init_threshold
    assert torch.equal(module.threshold.detach(), expected)
    assert optimizer.state[module.threshold]["exp_avg_sq"][[1, 4]].abs().sum() == 0


def test_target_activations_are_the_hooked_output_and_true_features_the_columns_of_w() -> None:
    config = TMSConfig(n_features=5, n_hidden=2)
    target = build_target(config, TMSModel(config))
    source = target_activation_source(target, "linear1")
    inputs = target.sample_inputs(16, _generator(4))
    W = target.model.linear1.weight
    assert source.dim == 2
    assert torch.equal(source.sample(16, _generator(4)), inputs @ W.T)
    assert torch.allclose(source.true_features, F.normalize(W.T, dim=1))
    with pytest.raises(UnmergeError, match="no module 'linear3'; hook points: linear1, linear2"):
        target_activation_source(target, "linear3")


def _resid_mlp_target() -> Target:
    config = ResidMLPConfig(n_features=12, d_embed=20, d_mlp=6, n_layers=1)
    return build_target(config, ResidMLP(config, embedding_seed=0))


def test_transcoder_source_pairs_a_blocks_input_with_its_output() -> None:
    target = _resid_mlp_target()
    source = target_activation_source(target, "layers.0", transcoder=True)
    assert (source.dim, source.output_dim, source.row_width) == (20, 20, 40)
    inputs = target.sample_inputs(32, _generator(1))
    x, y = source.split(source.sample(32, _generator(1)))
    block = target.model.layers[0]
    assert torch.equal(x, inputs @ target.model.W_E)
    assert torch.allclose(y, block(x))
    one_hot = target.one_hot_inputs()
    assert torch.allclose(source.true_features, F.normalize(block(one_hot @ target.model.W_E), dim=1))


@pytest.mark.parametrize("activation", ["relu", "topk", "gated"])
def test_transcoder_with_skip_path_trains_and_folds_exactly(activation: str) -> None:
    source = target_activation_source(_resid_mlp_target(), "layers.0", transcoder=True)
    config = dictionary_config(
        width=16,
        activation=activation,
        **({"k": 3} if activation == "topk" else {}),
        skip=True,
        normalise_activations=True,
        matryoshka_prefixes=[4],
        penalty=PenaltyConfig(coeff=0 if activation == "topk" else 1e-3),
    )
    method = DictionaryMethod(source, config, seed=0, total_steps=50)
    train(method, source.sample, TrainConfig(steps=50, batch_size=64, optim={"lr": 1e-2}), None)
    module = method.module
    assert module.W_skip.abs().sum() > 0 and module.W_e.shape == (20, 16) and module.W_d.shape == (16, 20)
    assert float(module.input_scale) != 1.0 or float(module.output_scale) != 1.0
    x, y = source.split(source.sample(256, _generator(2)))
    module.eval()
    with torch.no_grad():
        before = module(x)[0]
        module.fold_input_scale()
        assert float(module.input_scale) == float(module.output_scale) == 1.0
        assert torch.equal(module(x)[0], before)
    assert scores.fvu(y, before) < 1.0


def test_skip_path_needs_transcoder_data() -> None:
    with pytest.raises(ConfigError, match="method.skip .* needs transcoder data"):
        api.load_dictionary_config("sparse-512-relu-l1", ["method.skip=true"])


def test_gated_auxiliary_loss_trains_the_gate_but_not_the_decoder() -> None:
    method = _small_method("gated", penalty=PenaltyConfig(coeff=0.05))
    module = method.module
    x = method.source.sample(64, _generator())
    gate = module.forward_normalised(x)[2]
    gated_auxiliary_loss(x, gate, module.W_d, module.b_d).backward()
    assert module.W_d.grad is None and module.b_d.grad is not None  # b_d reaches the gate through the encoder
    assert module.W_e.grad is not None and module.W_e.grad.abs().sum() > 0
    assert module.r_mag.grad is None and module.b_mag.grad is None
    module.zero_grad(set_to_none=True)
    with torch.no_grad():
        z = (x - module.b_d) @ module.W_e + module.b_e
        magnitude = (x - module.b_d) @ module.W_e * module.r_mag.exp() + module.b_mag
        assert torch.allclose(module(x)[1], F.relu(magnitude) * (z > 0))
    output = method.training_loss(x, _generator())
    assert set(output.terms) == {"reconstruction", "sparsity", "gate_reconstruction"}
    expected_sparsity = F.relu(z).sum(1).mean()  # on the gate's ReLU, not on the magnitudes
    assert torch.allclose(output.terms["sparsity"], expected_sparsity)


def test_matryoshka_sums_the_reconstruction_errors_of_nested_prefixes() -> None:
    method = _small_method("relu", penalty=PenaltyConfig(name="none"), matryoshka_prefixes=[4, 16])
    module = method.module
    x = method.source.sample(32, _generator())
    with torch.no_grad():
        f = module(x)[1]
        expected = sum((x - f[:, :m] @ module.W_d[:m] - module.b_d).square().sum(1).mean() for m in (4, 16, 32))
        assert torch.allclose(method.training_loss(x, _generator()).terms["reconstruction"], expected)
    for bad in ([16, 4], [4, 32], [4, 4]):
        with pytest.raises(ValueError, match="must increase strictly and stay below the width 32"):
            dictionary_config(width=32, matryoshka_prefixes=bad)


@pytest.mark.parametrize(
    ("activation", "extra"),
    [("relu", {}), ("topk", {"k": 3}), ("batchtopk", {"k": 3}), ("gated", {}), ("jumprelu", {"l0_coeff": 0.01})],
)
def test_normalisation_folds_back_into_the_weights(activation: str, extra: dict[str, object]) -> None:
    data = SparseFeaturesConfig(n_features=32, dim=16, mean_active=2.0, decay=1.0)
    raw = sparse_feature_source(data)
    source = dataclasses.replace(raw, sample=lambda size, generator: 37.0 * raw.sample(size, generator))
    config = dictionary_config(
        width=32, activation=activation, normalise_activations=True, penalty=PenaltyConfig(coeff=0.01), **extra
    )
    method = DictionaryMethod(source, config, seed=0, total_steps=50)
    train(method, source.sample, TrainConfig(steps=50, batch_size=64, log_every=10, optim={"lr": 3e-3}))
    module = method.module.eval()
    scale = float(module.input_scale)
    assert scale == 2.0 ** round(math.log2(4.0 / float(source.sample(8192, _generator(5)).norm(dim=1).mean())))
    assert scale != 1.0
    x = source.sample(512, _generator(7))
    with torch.no_grad():
        before, latents_before, _ = module(x)
        module.fold_input_scale()
        after, latents_after, _ = module(x)
    assert float(module.input_scale) == 1.0 and scores.l0(latents_after) > 0
    assert torch.equal(after, before) and torch.equal(latents_after, latents_before / scale)


def test_later_duplicates_keep_one_atom_of_each_group() -> None:
    atoms = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.01], [1.0, 0.0], [0.0, -1.0]])
    assert scores.later_duplicates(atoms).tolist() == [False, False, True, True, False]
    assert scores.duplicate_latents(atoms) == 3


def test_refit_recovers_the_true_magnitudes_on_the_support() -> None:
    atoms = F.normalize(torch.randn(6, 4, generator=_generator(2)), dim=1)
    b_d = torch.tensor([0.1, -0.2, 0.0, 0.3])
    true = torch.tensor([[0.5, 0.0, 1.2, 0.0, 0.0, 0.0], [0.0, 0.7, 0.0, 0.0, 0.0, 0.0], [0.0] * 6])
    x = true @ atoms + b_d
    shrunk = 0.6 * true + 0.1 * (true > 0)  # the right support, wrong magnitudes
    refitted = refit_magnitudes(x, shrunk, atoms, b_d)
    assert torch.allclose(refitted, true, atol=1e-5)
    method = _small_method("relu", penalty=PenaltyConfig(coeff=0.3), refit_magnitudes=True)
    train(method, method.source.sample, TrainConfig(steps=300, batch_size=256, log_every=100, optim={"lr": 3e-3}))
    metrics = method.evaluate()
    assert metrics["shrinkage"] < 0.9 and abs(metrics["shrinkage_refit"] - 1) < abs(metrics["shrinkage"] - 1)
    assert metrics["fvu_refit"] < metrics["fvu"]


def test_train_dictionary_writes_the_folded_dictionary_and_the_ground_truth(tmp_path: Path) -> None:
    config = api.load_dictionary_config("hierarchy-matryoshka", ["train.steps=20", "method.normalise_activations=true"])
    result = api.train_dictionary(config, tmp_path / "run")
    source = hierarchy_source(config.data)
    truth = load_file(str(tmp_path / "run" / runs.GROUND_TRUTH_FILE))
    assert torch.equal(truth["true_features"], source.true_features) and torch.equal(truth["parents"], source.parents)
    weights = load_file(str(tmp_path / "run" / runs.DICTIONARY_FILE))
    assert float(weights["input_scale"]) == 1.0
    module = build_dictionary(source.dim, config.method, _generator())
    module.load_state_dict(weights)
    x = source.sample(config.train.eval_batch_size, step_generator(config.train.seed, "eval"))
    module.eval()
    with torch.no_grad():
        assert scores.fvu(x, module(x)[0]) == pytest.approx(result.metrics["fvu"], rel=1e-6)
    weights["log_threshold"] = weights.pop("b_e")
    save_file(weights, str(tmp_path / "run" / runs.DICTIONARY_FILE))
    with pytest.raises(UnmergeError, match="does not fit the dictionary.*train it again"):
        api.load_dictionary(tmp_path / "run")


def test_atom_alignment_is_one_on_a_feature_and_low_between_features() -> None:
    e1, e2, e3 = torch.eye(3)
    atoms = torch.stack([e1, (e1 + e2) / math.sqrt(2), e3])  # on a feature, between two, never used
    x = torch.stack([2 * e1, e1, e2])
    latents = torch.tensor([[1.5, 0.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.5, 0.0]])
    residual = x - latents @ atoms  # the mixed atom is asked to explain e1 and e2 in turn
    alignment = scores.atom_alignment(residual, latents, atoms)
    assert torch.allclose(alignment, torch.tensor([1.0, 1 / math.sqrt(2), 0.0]), atol=1e-6)


def test_misaligned_is_relative_to_the_median_live_latent() -> None:
    alignment = torch.tensor([0.9, 0.95, 1.0, 0.5, 0.0, 0.2])  # the 0.0 never fired; the 0.2 is dead
    dead = torch.tensor([False, False, False, False, False, True])
    # live and fired: 0.9, 0.95, 1.0, 0.5 → median (lower middle) 0.9 → bar 0.7 × 0.9 = 0.63
    expected = torch.tensor([False, False, False, True, True, True])
    assert torch.equal(misaligned(alignment, dead, 0.7), expected)
    assert torch.equal(misaligned(alignment / 2, dead, 0.7), expected)  # noisier residuals: the same latents


def test_unexplained_is_what_the_atoms_cannot_make_after_refitting() -> None:
    atoms = torch.eye(4)[:3]  # orthonormal atoms e0, e1, e2; e3 has no atom
    offset = torch.tensor([0.5, 0.0, 0.0, 0.0])
    coefficients = torch.tensor([[2.0, 1.0, 0.0, 0.0], [0.0, 3.0, 1.0, 0.7]])
    target = coefficients + offset
    shrunk = torch.tensor([[1.0, 0.2, 0.0], [0.0, 1.5, 0.1]])  # the right supports, magnitudes shrunk
    # the refit restores every magnitude on the support, so only e3's 0.7 (no atom) is left; rows in chunks of 1
    expected = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.7]])
    assert torch.allclose(unexplained(target, shrunk, atoms, offset, chunk=1), expected, atol=1e-5)
    plain = target - (shrunk @ atoms + offset)
    assert plain.norm(dim=1)[0] > 1.0  # the plain residual holds the shrinkage


@pytest.mark.parametrize("refit", [True, False])
def test_a_dead_latent_is_resampled_onto_the_feature_no_atom_makes(refit: bool) -> None:
    source = hierarchy_source(HierarchyConfig())  # orthonormal true features
    truth = source.true_features
    config = dictionary_config(width=truth.shape[0], resample_refit=refit, resample_samples=4096)
    method = DictionaryMethod(source, config, seed=0, total_steps=100)
    module = method.module
    missing = truth.shape[0] - 1
    with torch.no_grad():  # every other feature has its exact atom, read at half its size (an L1's shrinkage)
        module.W_d.copy_(truth)
        module.W_e.copy_(0.5 * truth.T)
        module.W_d[missing] = F.normalize(truth[0] + truth[1], dim=0)
        module.W_e[:, missing] = 0.0
        module.b_e.zero_()
        module.b_d.zero_()
        module.samples_since_fired[missing] = config.dead_window  # the one dead latent
    assert method.resample_dead(torch.optim.Adam(module.parameters())) == 1
    cosine = float(F.normalize(module.W_d[missing].detach(), dim=0) @ truth[missing])
    # from what the atoms cannot explain, the new atom is the missing feature; from the plain residual, a mixture
    assert cosine > 0.999 if refit else cosine < 0.95


def test_init_truth_starts_every_atom_on_its_true_feature_and_says_when_it_cannot() -> None:
    source = hierarchy_source(HierarchyConfig())
    truth = source.true_features
    method = DictionaryMethod(source, dictionary_config(width=truth.shape[0], init="truth"), seed=0, total_steps=1)
    method.before_training()
    assert torch.allclose(method.module.W_d, truth) and torch.allclose(method.module.W_e, truth.T)
    with pytest.raises(ConfigError, match=f"set method.width={truth.shape[0]}"):
        DictionaryMethod(source, dictionary_config(width=truth.shape[0] + 1, init="truth"), seed=0, total_steps=1)
    unknown = dataclasses.replace(source, true_features=None)
    with pytest.raises(ConfigError, match="use method.init=random or data"):
        DictionaryMethod(unknown, dictionary_config(width=truth.shape[0], init="truth"), seed=0, total_steps=1)


def test_misaligned_latents_are_resampled_and_aligned_ones_kept() -> None:
    source = hierarchy_source(HierarchyConfig())  # orthonormal true features
    truth = source.true_features
    n = truth.shape[0]
    config = dictionary_config(width=n + 4, resample_misaligned=0.5, resample_samples=4096)
    method = DictionaryMethod(source, config, seed=0, total_steps=100)
    module = method.module
    between = F.normalize(truth[:4] + truth[4:8], dim=1)
    with torch.no_grad():  # one exact atom per feature, and four atoms each halfway between two features
        module.W_d.copy_(torch.cat([truth, between]))
        module.W_e.copy_(torch.cat([truth, 0.01 * between]).T)
        module.b_e.zero_()
    assert method.resample_dead(torch.optim.Adam(module.parameters())) == 4
    assert torch.equal(module.W_d[:n], truth)
    assert (F.normalize(module.W_d[n:], dim=1) * between).sum(1).abs().max() < 0.99
