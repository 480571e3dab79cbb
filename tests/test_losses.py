"""SPD's losses, sigmoids and masks against hand computations on tiny cases."""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import TINY_TMS
from unmerge import api
from unmerge.spd import losses
from unmerge.spd.components import lower_leaky_hard_sigmoid, upper_leaky_hard_sigmoid
from unmerge.spd.method import SPD
from unmerge.targets.toys import cached_target


def test_faithfulness_by_hand() -> None:
    # W = [[1, 2]], UV = [[1, 0]]: squared error 4 over N = 2 entries; second site [[3]] vs [[1]]: 4 over 1.
    w = [torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0]])]
    r = [torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0]])]
    assert losses.faithfulness_loss(w, r).item() == pytest.approx((4 + 4) / 3)


def _powers(importances: list[torch.Tensor], pnorm: float) -> list[torch.Tensor]:
    return [losses.importance_powers(g, pnorm) for g in importances]


def test_importance_minimality_by_hand() -> None:
    # B = 2 inputs; site a: |g|^p summed over C = 2, site b over C = 1; p = 2.
    a = torch.tensor([[0.5, 1.0], [0.0, 2.0]])
    b = torch.tensor([[3.0], [1.0]])
    expected = (0.25 + 1 + 0 + 4 + 9 + 1) / 2
    assert losses.importance_minimality_loss(_powers([a, b], 2.0)).item() == expected
    # p = 1 on token-shaped (B=1, T=2, C=2) importances divides by B·T = 2.
    assert losses.importance_minimality_loss(_powers([torch.tensor([[[1.0, 2.0], [3.0, 0.0]]])], 1.0)).item() == 3.0


def test_importance_frequency_by_hand() -> None:
    # B = 2, p = 2; column sums of g² are S = (1, 2): Σ_c (S_c / B) log2(1 + S_c) = 0.5·1 + 1·log2(3).
    g = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    assert losses.importance_frequency_loss(_powers([g], 2.0)).item() == pytest.approx(0.5 + math.log2(3))
    # one subcomponent on both inputs costs more than two that take one input each
    shared, split = torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert losses.importance_frequency_loss([shared]) > losses.importance_frequency_loss([split])  # p = 1
    # token-shaped (B=1, T=2, C=1) importances count every position: S = 2, mean 1
    assert losses.importance_frequency_loss([torch.ones(1, 2, 1)]).item() == pytest.approx(math.log2(3))


def test_output_divergences_by_hand() -> None:
    prediction, target = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 0.0]])
    assert losses.output_divergence(prediction, target, "mse").item() == (1 + 4) / 2
    same = torch.tensor([[0.3, -1.0, 2.0]])
    assert losses.output_divergence(same, same, "kl").item() == 0.0
    # KL(p‖q) with p = softmax([0, 0]) = (½, ½), q = softmax([ln 3, 0]) = (¾, ¼): ½ ln(⅔) + ½ ln 2.
    kl = losses.output_divergence(torch.tensor([[torch.log(torch.tensor(3.0)), 0.0]]), torch.zeros(1, 2), "kl")
    expected = 0.5 * torch.log(torch.tensor(2 / 3)) + 0.5 * torch.log(torch.tensor(2.0))
    torch.testing.assert_close(kl, expected)


def test_sigmoids_forward_and_backward() -> None:
    x = torch.tensor([-2.0, -0.5, 0.25, 0.75, 1.5, 3.0], requires_grad=True)
    lower = lower_leaky_hard_sigmoid(x, 0.01)
    torch.testing.assert_close(lower, torch.tensor([-0.02, -0.005, 0.25, 0.75, 1.0, 1.0]))
    (grad,) = torch.autograd.grad(lower.sum(), x)
    torch.testing.assert_close(grad, torch.tensor([0.01, 0.01, 1.0, 1.0, 0.0, 0.0]))
    upper = upper_leaky_hard_sigmoid(x, 0.01)
    torch.testing.assert_close(upper, torch.tensor([0.0, 0.0, 0.25, 0.75, 1.005, 1.02]))
    (grad,) = torch.autograd.grad(upper.sum(), x)
    torch.testing.assert_close(grad, torch.tensor([0.0, 0.0, 1.0, 1.0, 0.01, 0.01]))


@pytest.mark.parametrize("c_kernel", [False, True])
def test_masks_lie_between_importance_and_one_and_carry_its_gradient(c_kernel: bool) -> None:
    g = torch.rand(1000, 7, generator=torch.Generator().manual_seed(0)).requires_grad_()
    masks = losses.stochastic_masks(g, torch.Generator().manual_seed(1), c_kernel)
    assert bool((masks >= g).all()) and bool((masks <= 1).all())
    assert masks.min() < 0.05 and masks.max() > 0.95
    (grad,) = torch.autograd.grad(masks.sum(), g)
    assert bool((grad >= 0).all()) and bool((grad <= 1).all())  # ∂m/∂g = 1 − r ∈ [0, 1]
    ones = losses.stochastic_masks(torch.ones(3, 2), torch.Generator().manual_seed(2), c_kernel)
    assert bool((ones == 1).all())


def test_annealed_pnorm_by_hand() -> None:
    """p = 2 until 20 % of training, then linearly to 0.4 at 60 %, then 0.4; fixed without a final p."""
    at = [losses.annealed_pnorm(2.0, 0.4, 0.2, 0.6, progress) for progress in (0.0, 0.2, 0.3, 0.4, 0.6, 0.9, 1.0)]
    assert at == pytest.approx([2.0, 2.0, 1.6, 1.2, 0.4, 0.4, 0.4])
    assert losses.annealed_pnorm(1.0, None, 0.0, 1.0, 0.7) == 1.0


def test_the_importance_penalty_uses_this_steps_p() -> None:
    """Half-way through a 2 → 0.4 anneal over the whole run, the penalty is Σ g⁺^1.2 of that step."""
    config = api.load_run_config("tms-5-2", [*TINY_TMS, "method.pnorm=2", "method.pnorm_final=0.4"])
    spd = SPD(cached_target(config.target), config.method, seed=0)
    spd.begin_step(30, 60)
    assert spd.pnorm == pytest.approx(1.2)
    batch = spd.target.sample_inputs(64, torch.Generator().manual_seed(0))
    terms = spd.training_loss(batch, torch.Generator().manual_seed(1)).terms
    with torch.no_grad():
        upper = spd.importances(spd.model.clean_pass(batch)).upper_all
    expected = upper.pow(1.2).sum() / 64
    torch.testing.assert_close(terms["importance_minimality"].detach(), expected)


def test_a_p_below_one_keeps_gradients_finite_where_importance_is_zero() -> None:
    x = torch.tensor([-0.5, 0.0, 0.3, 2.0], requires_grad=True)
    upper = upper_leaky_hard_sigmoid(x, 0.01)
    losses.importance_minimality_loss([losses.importance_powers(upper, 0.4)]).backward()
    assert torch.isfinite(x.grad).all() and x.grad[0] == 0.0
    assert losses.importance_powers(upper, 0.4)[2].item() == pytest.approx(0.3**0.4)
