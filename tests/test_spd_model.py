"""The component model: batched CI vs a naive loop, masked passes vs per-example weights, tied sites, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.conftest import set_exact_factorisation
from unmerge.config import ResidMLPConfig, SiteConfig, SPDConfig, TMSConfig
from unmerge.errors import SiteError
from unmerge.kernels.cpu.ci import counter_uniform_reference
from unmerge.spd import losses
from unmerge.spd.components import ScalarMLPCI, causal_importances
from unmerge.spd.method import SPD
from unmerge.spd.model import ComponentModel
from unmerge.targets.base import Target
from unmerge.targets.resid_mlp import ResidMLP
from unmerge.targets.tms import TMSModel
from unmerge.train.rng import step_generator


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("c_kernel", [False, True])
def test_batched_ci_equals_per_subcomponent_loop(c_kernel: bool) -> None:
    functions = {"a": ScalarMLPCI(3, 4, _generator()), "b": ScalarMLPCI(2, 4, _generator())}
    for f in functions.values():
        with torch.no_grad():
            f.b1.normal_(generator=_generator(1))
            f.b2.normal_(generator=_generator(2))
    inner = {"a": torch.randn(5, 3, generator=_generator(3)), "b": torch.randn(5, 2, generator=_generator(4))}
    concatenated = causal_importances(list(functions.values()), list(inner.values()), c_kernel)
    batched = dict(zip(inner, concatenated.split([3, 2], dim=-1), strict=True))
    for key, h in inner.items():
        f = functions[key]
        for c in range(h.shape[1]):
            naive = F.gelu(h[:, c : c + 1] * f.w1[c] + f.b1[c]) @ f.w2[c] + f.b2[c]
            torch.testing.assert_close(batched[key][:, c], naive, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("identity", [False, True])
def test_all_ones_masks_with_faithful_weights_reproduce_the_target(identity: bool) -> None:
    target = TMSModel(TMSConfig(n_features=5, n_hidden=2, identity=identity))
    sites = [SiteConfig(pattern="linear*", C=4)] + ([SiteConfig(pattern="hidden", C=4)] if identity else [])
    model = ComponentModel(target, sites, ci_hidden=3, generator=_generator())
    assert model.tied == {"linear2": "linear1"}
    set_exact_factorisation(model)
    x = torch.rand(16, 5, generator=_generator(1))
    clean = model.clean_pass(x)
    inner = model.inner_acts(clean)
    ones = {name: torch.ones(16, 4) for name in model.site_names}
    torch.testing.assert_close(model.masked_pass(x, ones, clean, inner), target(x), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(clean.output, target(x))


def test_masked_pass_matches_per_example_weights() -> None:
    """Masking is equivalent to running example b with weight U diag(m_b) V, across two layers."""
    config = ResidMLPConfig(n_features=6, d_embed=10, n_layers=2, d_mlp=3)
    target = ResidMLP(config, embedding_seed=0)
    model = ComponentModel(target, [SiteConfig(pattern="layers.*.mlp_*", C=5)], ci_hidden=2, generator=_generator())
    x = torch.randn(4, 6, generator=_generator(1))
    masks = {n: torch.rand(4, 5, generator=_generator(i + 2)) for i, n in enumerate(model.site_names)}
    clean = model.clean_pass(x)
    output = model.masked_pass(x, masks, clean, model.inner_acts(clean))
    for b in range(4):
        resid = x[b] @ target.W_E
        for layer in range(2):
            weights = {}
            for kind in ("mlp_in", "mlp_out"):
                c = model.site_components(f"layers.{layer}.{kind}")
                weights[kind] = c.U @ torch.diag(masks[f"layers.{layer}.{kind}"][b]) @ c.V
            resid = resid + weights["mlp_out"] @ F.relu(weights["mlp_in"] @ resid)
        torch.testing.assert_close(output[b], resid @ target.W_E.T, atol=1e-5, rtol=1e-5)


def test_unmasked_sites_after_a_masked_one_use_the_target_weight() -> None:
    config = ResidMLPConfig(n_features=6, d_embed=10, n_layers=2, d_mlp=3)
    target = ResidMLP(config, embedding_seed=0)
    model = ComponentModel(target, [SiteConfig(pattern="layers.*.mlp_*", C=5)], ci_hidden=2, generator=_generator())
    x = torch.randn(4, 6, generator=_generator(1))
    clean = model.clean_pass(x)
    masks = {"layers.0.mlp_out": torch.rand(4, 5, generator=_generator(2))}
    output = model.masked_pass(x, masks, clean, model.inner_acts(clean))
    c = model.site_components("layers.0.mlp_out")
    resid = x @ target.W_E
    hidden = F.relu(resid @ target.layers[0].mlp_in.weight.T)
    resid = resid + ((hidden @ c.V.T) * masks["layers.0.mlp_out"]) @ c.U.T
    resid = resid + target.layers[1](resid)
    torch.testing.assert_close(output, resid @ target.W_E.T, atol=1e-5, rtol=1e-5)


class _Scale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(1, 1, bias=False)
        with torch.no_grad():
            self.linear.weight.fill_(2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def _one_weight_spd(**options: float) -> SPD:
    """SPD of f(x) = 2x (evaluated on x = 1 and 3) with C = 1, U V = 1 and a constant importance g = 0.25."""
    target = Target(name="scale", model=_Scale(), sample_inputs=lambda n, g: torch.tensor([[1.0], [3.0]]))
    config = SPDConfig(sites=[SiteConfig(pattern="linear", C=1)], importance_minimality_coeff=0.5, pnorm=2.0, **options)
    spd = SPD(target, config, seed=0, eval_batch_size=2)
    with torch.no_grad():
        spd.model.site("linear").components.U.fill_(1.0)
        spd.model.site("linear").components.V.fill_(1.0)
        spd.model.site("linear").ci.w2.zero_()
        spd.model.site("linear").ci.b2.fill_(0.25)
    return spd


def test_spd_losses_by_hand_on_a_one_weight_target() -> None:
    """f(x) = 2x, C = 1 with U V = 1 and a constant importance g = 0.25: every term in closed form."""
    spd = _one_weight_spd()
    x = torch.tensor([[1.0], [3.0]])
    output = spd.training_loss(x, _generator(7))
    keys = tuple(int(k) for k in torch.randint(0, 2**32, (2,), generator=_generator(7)))
    r = counter_uniform_reference((2, 1), keys)  # one draw, shared by the all-sites and layerwise passes
    mask_all = mask_layer = 0.25 + 0.75 * r
    expected = {
        "faithfulness": (2.0 - 1.0) ** 2 / 1,
        "importance_minimality": 0.25**2,
        "stochastic_recon": ((mask_all * x - 2 * x) ** 2).mean().item(),
        "layerwise_recon": ((mask_layer * x - 2 * x) ** 2).mean().item(),
    }
    for name, value in expected.items():
        assert output.terms[name].item() == pytest.approx(value, rel=1e-6), name
    total = expected["faithfulness"] + 0.5 * expected["importance_minimality"]
    total += expected["stochastic_recon"] + expected["layerwise_recon"]
    assert output.loss.item() == pytest.approx(total, rel=1e-6)
    assert losses.stochastic_masks(torch.full((2, 1), 0.25), _generator(7), spd.model.c_kernel).allclose(mask_all)


def test_the_delta_component_by_hand_on_a_one_weight_target() -> None:
    """f(x) = 2x with U V = 1, so the residual W − U V is 1: a site's output is m x + m_δ x, m = g + (1 − g) r from
    the CI masks' draw and m_δ ~ U[0, 1) drawn after it; with every mask 1 the target comes back exactly."""
    spd = _one_weight_spd(delta_component=True)
    x = torch.tensor([[1.0], [3.0]])
    output = spd.training_loss(x, _generator(7))
    draws = _generator(7)
    keys = tuple(int(k) for k in torch.randint(0, 2**32, (2,), generator=draws))
    mask = 0.25 + 0.75 * counter_uniform_reference((2, 1), keys)
    delta_mask = torch.rand((2, 1), generator=draws)
    expected = ((mask * x + delta_mask * x - 2 * x) ** 2).mean().item()
    assert output.terms["stochastic_recon"].item() == pytest.approx(expected, rel=1e-6)
    assert output.terms["layerwise_recon"].item() == pytest.approx(expected, rel=1e-6)
    clean = spd.model.clean_pass(x)
    ones = {"linear": torch.ones(2, 2)}
    torch.testing.assert_close(spd.model.masked_pass(x, ones, clean, spd.model.inner_acts(clean)), 2 * x)
    without = {"linear": torch.ones(2, 1)}
    torch.testing.assert_close(spd.model.masked_pass(x, without, clean, spd.model.inner_acts(clean)), x)


class _TwoScales(nn.Module):
    """f(x) = 3 · (2x), two one-weight sites."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False)
        with torch.no_grad():
            self.first.weight.fill_(2.0)
            self.second.weight.fill_(3.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))


def test_subset_routing_by_hand_on_two_one_weight_sites() -> None:
    """U V = 1 at both sites, g = 0.25. Per input, k ~ U{1, 2} sites are chosen by the lowest of two uniform
    scores; a chosen site computes m x, the other its own weight: out = m₂ m₁ x, 3 m₁ x or m₂ · 2x."""
    x = torch.tensor([[1.0], [2.0], [3.0], [4.0], [5.0], [6.0]])
    target = Target(name="scales", model=_TwoScales(), sample_inputs=lambda n, g: x)
    sites = [SiteConfig(pattern="first", C=1), SiteConfig(pattern="second", C=1)]
    config = SPDConfig(sites=sites, importance_minimality_coeff=0.5, routing="subset", layerwise_recon_coeff=0.0)
    spd = SPD(target, config, seed=0, eval_batch_size=6)
    with torch.no_grad():
        for name in ("first", "second"):
            spd.model.site(name).components.U.fill_(1.0)
            spd.model.site(name).components.V.fill_(1.0)
            spd.model.site(name).ci.w2.zero_()
            spd.model.site(name).ci.b2.fill_(0.25)
    output = spd.training_loss(x, _generator(5))
    draws = _generator(5)
    keys = tuple(int(k) for k in torch.randint(0, 2**32, (2,), generator=draws))
    m1, m2 = (0.25 + 0.75 * counter_uniform_reference((6, 2), keys)).unbind(-1)
    k = torch.randint(1, 3, (6,), generator=draws)
    scores = torch.rand((6, 2), generator=draws)
    expected = []
    for i in range(6):
        chosen = set(scores[i].argsort()[: int(k[i])].tolist())
        first = m1[i] * x[i, 0] if 0 in chosen else 2 * x[i, 0]
        second = m2[i] * first if 1 in chosen else 3 * first
        expected.append((second - 6 * x[i, 0]) ** 2)
    assert output.terms["stochastic_recon"].item() == pytest.approx(torch.stack(expected).mean().item(), rel=1e-6)
    assert {int(v) for v in k} == {1, 2}  # this draw has inputs with one site masked and inputs with both


def test_persistent_adversarial_masks_by_hand_on_a_one_weight_target() -> None:
    """f(x) = 2x, U V = 1, g = 0.25: D = mean((m x − 2x)²) with m = g + (1 − g) r falls as r grows, so each ascent
    step lowers the kept r by the step size (to 0 at most); the adversarial term uses the refined r, which the
    next step starts from, and r is a checkpointed buffer of the site."""
    spd = _one_weight_spd(adversarial_persistent=True, adversarial_steps=1, adversarial_recon_coeff=1.0)
    x = torch.tensor([[1.0], [3.0]])
    r = torch.rand(1, generator=step_generator(0, "adversarial-init"))
    for _ in range(3):
        r = (r - 0.25).clamp(0.0, 1.0)
        output = spd.training_loss(x, _generator(7))
        m = 0.25 + 0.75 * r
        assert output.terms["adversarial_recon"].item() == pytest.approx(((m * x - 2 * x) ** 2).mean().item())
        torch.testing.assert_close(spd.model.site("linear").worst_r, r)
    assert "linear.worst_r" in spd.module.state_dict()


def test_importance_count_term_joins_the_loss_with_its_coefficient() -> None:
    """g = 0.25 on both inputs, p = 2: S = 2 · 0.0625, so the term is log2(1.125)."""
    x = torch.tensor([[1.0], [3.0]])
    plain = _one_weight_spd().training_loss(x, _generator(7))
    output = _one_weight_spd(importance_count_coeff=3.0).training_loss(x, _generator(7))
    assert output.terms["importance_count"].item() == pytest.approx(math.log2(1.125), rel=1e-6)
    assert output.loss.item() == pytest.approx(plain.loss.item() + 3.0 * math.log2(1.125), rel=1e-6)


def test_importance_count_term_weighs_in_from_its_start() -> None:
    """With `importance_count_start` 0.5 of 10 steps, steps 0-4 leave the term out of the loss (it is still
    logged) and step 5 on weigh it in."""
    x = torch.tensor([[1.0], [3.0]])
    plain = _one_weight_spd().training_loss(x, _generator(7)).loss.item()
    spd = _one_weight_spd(importance_count_coeff=3.0, importance_count_start=0.5)
    spd.begin_step(4, 10)
    before = spd.training_loss(x, _generator(7))
    assert before.loss.item() == pytest.approx(plain, rel=1e-6)
    assert before.terms["importance_count"].item() == pytest.approx(math.log2(1.125), rel=1e-6)
    spd.begin_step(5, 10)
    after = spd.training_loss(x, _generator(7)).loss.item()
    assert after == pytest.approx(plain + 3.0 * math.log2(1.125), rel=1e-6)


def test_importance_frequency_term_joins_the_loss_with_its_coefficient() -> None:
    """g = 0.25 on both inputs, p = 2: S = 2 · 0.0625 and m = 0.0625, so the term is 0.0625 log2(1.125)."""
    x = torch.tensor([[1.0], [3.0]])
    plain = _one_weight_spd().training_loss(x, _generator(7))
    output = _one_weight_spd(importance_frequency_coeff=3.0).training_loss(x, _generator(7))
    assert output.terms["importance_frequency"].item() == pytest.approx(0.0625 * math.log2(1.125), rel=1e-6)
    assert output.loss.item() == pytest.approx(plain.loss.item() + 3.0 * 0.0625 * math.log2(1.125), rel=1e-6)


def test_adversarial_masks_reach_the_worst_ablation_the_importance_permits() -> None:
    """f(x) = 2x with U V = 1 and g = 0.25: the masked output m x is worst at the smallest mask, so four ascent
    steps of 0.25 take every r from its uniform draw to 0 (m = g); the loss and the metric both see D at m = g."""
    spd = _one_weight_spd(adversarial_steps=4, adversarial_recon_coeff=2.0)
    x = torch.tensor([[1.0], [3.0]])
    worst = ((0.25 * x - 2 * x) ** 2).mean().item()
    clean = spd.model.clean_pass(x)
    masks = spd.adversarial_masks(x, clean, spd.importances(clean), _generator(3))
    assert torch.allclose(masks["linear"], torch.full((2, 1), 0.25))
    output = spd.training_loss(x, _generator(7))
    assert output.terms["adversarial_recon"].item() == pytest.approx(worst, rel=1e-6)
    others = sum(output.terms[name] for name in ("faithfulness", "stochastic_recon", "layerwise_recon"))
    expected = others + 0.5 * output.terms["importance_minimality"] + 2.0 * worst
    assert output.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    output.loss.backward()
    importance_bias = spd.model.site("linear").ci.b2
    assert importance_bias.grad is not None and float(importance_bias.grad) != 0.0  # the worst masks train g too
    assert spd.evaluate()["adversarial_recon"] == pytest.approx(worst, rel=1e-6)


def test_adversarial_loss_without_ascent_steps_is_refused() -> None:
    with pytest.raises(ValueError, match="adversarial_steps"):
        SPDConfig(
            sites=[SiteConfig(pattern="linear", C=1)], importance_minimality_coeff=0.5, adversarial_recon_coeff=1.0
        )


def test_site_pattern_that_matches_nothing_names_the_candidates() -> None:
    target = TMSModel(TMSConfig(n_features=5, n_hidden=2))
    with pytest.raises(SiteError, match=r"'mlp\.\*' matches no module.*linear1, linear2"):
        ComponentModel(target, [SiteConfig(pattern="mlp.*", C=3)], ci_hidden=2, generator=_generator())


def test_site_that_is_not_linear_is_refused() -> None:
    target = ResidMLP(ResidMLPConfig(n_features=4, d_embed=6, d_mlp=2), embedding_seed=0)
    with pytest.raises(SiteError, match="not a linear map"):
        ComponentModel(target, [SiteConfig(pattern="layers.0", C=3)], ci_hidden=2, generator=_generator())


class _RowMajorLinear(nn.Module):
    """`x W + b` with W: (d_in, d_out), like GPT-2's Conv1D."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_in, d_out, generator=_generator(5)))
        self.bias = nn.Parameter(torch.randn(d_out, generator=_generator(6)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


class _TokenModel(nn.Module):
    """ids → embedding → row-major linear → ReLU → unembedding tied to the embedding."""

    def __init__(self, vocab: int = 7, d: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.mix = _RowMajorLinear(d, d)
        self.unembed = nn.Linear(d, vocab, bias=False)
        self.unembed.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.unembed(F.relu(self.mix(self.embed(ids))))


def test_embedding_and_row_major_sites_are_found_in_one_orientation_and_tied() -> None:
    target = _TokenModel()
    model = ComponentModel(target, [SiteConfig(pattern="*", C=4)], ci_hidden=2, generator=_generator())
    assert {r.name: r.site.kind for r in model.sites.values()} == {
        "embed": "embedding",
        "mix": "transposed linear",
        "unembed": "linear",
    }
    assert model.target_weight("embed").shape == (4, 7) and model.target_weight("mix").shape == (4, 4)
    assert model.tied == {"unembed": "embed"}
    torch.testing.assert_close(model.target_weight("mix"), target.mix.weight.T)


def test_masked_pass_on_token_indexed_and_row_major_sites_matches_per_example_weights() -> None:
    target = _TokenModel()
    model = ComponentModel(target, [SiteConfig(pattern="*", C=4)], ci_hidden=2, generator=_generator())
    ids = torch.randint(7, (3, 5), generator=_generator(1))
    masks = {n: torch.rand(3, 5, 4, generator=_generator(i + 2)) for i, n in enumerate(model.site_names)}
    clean = model.clean_pass(ids)
    torch.testing.assert_close(clean.output, target(ids))
    output = model.masked_pass(ids, masks, clean, model.inner_acts(clean))
    weights = {n: model.site_components(n) for n in model.site_names}
    for b in range(3):
        for t in range(5):

            def masked(name: str, b: int = b, t: int = t) -> torch.Tensor:
                c = weights[name]
                return c.U @ torch.diag(masks[name][b, t]) @ c.V

            resid = masked("embed")[:, ids[b, t]]
            hidden = F.relu(masked("mix") @ resid + target.mix.bias)
            torch.testing.assert_close(output[b, t], masked("unembed") @ hidden, atol=1e-5, rtol=1e-5)


def test_exact_factorisation_of_token_sites_reproduces_the_target() -> None:
    target = _TokenModel()
    model = ComponentModel(target, [SiteConfig(pattern="*", C=4)], ci_hidden=2, generator=_generator())
    set_exact_factorisation(model)
    ids = torch.randint(7, (2, 6), generator=_generator(1))
    clean = model.clean_pass(ids)
    ones = {n: torch.ones(2, 6, 4) for n in model.site_names}
    torch.testing.assert_close(
        model.masked_pass(ids, ones, clean, model.inner_acts(clean)), target(ids), atol=1e-5, rtol=1e-5
    )


def test_the_decomposed_model_is_one_module_tree() -> None:
    """Target and decomposition in one `nn.Module`: state_dict holds both, `.to` converts both, the masked forward
    compiles, and hooks a user put on a site's module still see what the module outputs during a pass."""
    target = TMSModel(TMSConfig(n_features=5, n_hidden=2, identity=True))
    sites = [SiteConfig(pattern="linear*", C=4), SiteConfig(pattern="hidden", C=3)]
    model = ComponentModel(target, sites, ci_hidden=3, generator=_generator())
    keys = set(model.state_dict())
    assert {"target.linear1.weight", "sites.linear1.components.U", "sites.hidden.ci.w1"} <= keys
    assert not any(key.startswith("sites.linear2.components") for key in keys)  # tied to linear1
    x = torch.rand(16, 5, generator=_generator(1))
    masks = {n: torch.rand(16, model.site_C[n], generator=_generator(2)) for n in model.site_names}
    eager = model(x, masks)
    torch.testing.assert_close(torch.compile(model, backend="aot_eager")(x, masks), eager)
    seen = []
    handle = target.hidden.register_forward_hook(lambda module, inputs, output: seen.append(output))
    model(x, {"hidden": masks["hidden"]})
    handle.remove()
    hidden = model.site_components("hidden")
    expected = F.linear(F.linear(target.linear1(x), hidden.V) * masks["hidden"], hidden.U)
    torch.testing.assert_close(seen[0], expected)  # the hook saw the masked site's output, not the original's
    model.to(torch.float64)
    assert target.linear1.weight.dtype == model.site("hidden").ci.w1.dtype == torch.float64
    assert model(x.double(), {n: m.double() for n, m in masks.items()}).dtype == torch.float64
    model.train()
    assert not target.training  # the frozen target stays in evaluation mode


def test_importance_frequency_covers_only_the_sites_that_ask_for_it() -> None:
    """With W_out left out, the term is W_in's alone: on powers [[1, 0, 0 | 1, 1], [1, 1, 0 | 1, 0]] (W_in C = 3,
    W_out C = 2), S = (2, 1, 0) and m = S / 2 over W_in's columns: 1 · log2 3 + 0.5 · log2 2 = log2 3 + 0.5."""
    target = Target(
        name="resid",
        model=ResidMLP(ResidMLPConfig(n_features=4, d_embed=6, d_mlp=2), 0),
        sample_inputs=lambda n, g: None,
    )
    sites = [
        SiteConfig(pattern="layers.*.mlp_in", C=3),
        SiteConfig(pattern="layers.*.mlp_out", C=2, importance_frequency=False),
    ]
    spd = SPD(target, SPDConfig(sites=sites, importance_minimality_coeff=1.0, importance_frequency_coeff=1.0), 0)
    powers = torch.tensor([[1.0, 0.0, 0.0, 1.0, 1.0], [1.0, 1.0, 0.0, 1.0, 0.0]])
    (w_in,) = spd.covered_powers(powers, "importance_frequency")
    torch.testing.assert_close(w_in, powers[:, :3])
    assert losses.importance_frequency_loss([w_in]).item() == pytest.approx(math.log2(3) + 0.5)
    everything = SPDConfig(sites=[SiteConfig(pattern="layers.*.mlp_in", C=3)], importance_minimality_coeff=1.0)
    w_in = powers[:, :3]
    assert SPD(target, everything, 0).covered_powers(w_in, "importance_frequency") == [w_in]  # the tensor as it is


def test_importance_count_covers_only_the_sites_that_ask_for_it() -> None:
    """With W_in left out, the term is W_out's alone: on powers [[1, 0, 0 | 1, 0.5], [1, 1, 0 | 1, 0]] (W_in C = 3,
    W_out C = 2), W_out's S = (2, 0.5): log2 3 + log2 1.5. The rarely used subcomponent pays more per unit of
    importance: the slope 1 / ((1 + S) ln 2) is 1 / (1.5 ln 2) against 1 / (3 ln 2)."""
    target = Target(
        name="resid",
        model=ResidMLP(ResidMLPConfig(n_features=4, d_embed=6, d_mlp=2), 0),
        sample_inputs=lambda n, g: None,
    )
    sites = [
        SiteConfig(pattern="layers.*.mlp_in", C=3, importance_count=False),
        SiteConfig(pattern="layers.*.mlp_out", C=2),
    ]
    spd = SPD(target, SPDConfig(sites=sites, importance_minimality_coeff=1.0, importance_count_coeff=1.0), 0)
    powers = torch.tensor([[1.0, 0.0, 0.0, 1.0, 0.5], [1.0, 1.0, 0.0, 1.0, 0.0]], requires_grad=True)
    (w_out,) = spd.covered_powers(powers, "importance_count")
    count = losses.importance_count_loss([w_out])
    assert count.item() == pytest.approx(math.log2(3) + math.log2(1.5))
    count.backward()
    slopes = torch.tensor([[0.0, 0.0, 0.0, 1 / 3, 1 / 1.5]] * 2) / math.log(2)
    torch.testing.assert_close(powers.grad, slopes)


def test_a_frequency_or_count_term_that_covers_no_site_is_an_error() -> None:
    with pytest.raises(ValueError, match="importance_frequency: false"):
        SPDConfig(
            sites=[SiteConfig(pattern="a", C=1, importance_frequency=False)],
            importance_minimality_coeff=1.0,
            importance_frequency_coeff=1e-3,
        )
    with pytest.raises(ValueError, match="importance_count: false"):
        SPDConfig(
            sites=[SiteConfig(pattern="a", C=1, importance_count=False)],
            importance_minimality_coeff=1.0,
            importance_count_coeff=1e-3,
        )
