"""Every metric against a closed-form case."""

from __future__ import annotations

import math

import pytest
import torch

from unmerge import metrics


def test_ci_l0_and_alive_count() -> None:
    ci = torch.tensor([[0.05, 0.2, 0.6], [0.0, 0.0, 0.3]])
    assert metrics.ci_l0(ci, 0.01) == (3 + 1) / 2
    assert metrics.ci_l0(ci, 0.1) == (2 + 1) / 2
    assert metrics.ci_l0(ci, 0.5) == (1 + 0) / 2
    assert metrics.alive_count(ci, 0.1) == 2
    assert metrics.alive_count(ci[None], 0.5) == 1  # leading token dimension is flattened


def test_identity_pattern_errors() -> None:
    perfect = torch.zeros(3, 5)
    perfect[[0, 1, 2], [4, 0, 2]] = 1.0
    assert metrics.identity_pattern_errors(perfect) == 0
    assert list(metrics.identity_permutation(perfect)) == [4, 0, 2]
    noisy = perfect.clone()
    noisy[1, 0] = 0.95  # within tolerance
    noisy[2, 3] = 0.5  # an unmatched column that fires: one error
    noisy[0, 4] = 0.7  # a matched entry too low: one error
    assert metrics.identity_pattern_errors(noisy) == 2
    assert metrics.identity_pattern_errors(torch.ones(2, 2)) == 2  # off-diagonal ones
    fewer_columns = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])  # feature 2 has no column of its own
    assert metrics.identity_pattern_errors(fewer_columns) == 1
    assert metrics.identity_pattern_errors(torch.tensor([[1.0], [0.9]])) == 2  # feature 1 fires feature 0's, unmatched


def test_dense_pattern_errors() -> None:
    ci = torch.zeros(4, 6)
    ci[:, [1, 3]] = 1.0
    assert metrics.dense_pattern_errors(ci, rank=2) == 0
    assert metrics.dense_pattern_errors(ci, rank=3) == 1  # the third column is not co-active
    ci[2, 5] = 0.4
    assert metrics.dense_pattern_errors(ci, rank=2) == 1  # a stray column


def test_feature_recovery_perfect_and_scaled() -> None:
    weight = torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, 0.0]])  # d_out = 2, three input features
    U = torch.tensor([[0.0, 1.0, 0.0, 2.0], [3.0, 0.0, 0.0, 0.0]])
    V = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    recovery = metrics.feature_recovery(weight, U, V, "in")
    assert recovery.mmcs == pytest.approx(1.0)
    assert recovery.ml2r == pytest.approx(1.0)
    assert recovery.matrix_cosine == pytest.approx(1.0)
    assert recovery.best.tolist() == [1, 0, 3]
    half = metrics.feature_recovery(weight, U * 0.5, V, "in")
    assert half.mmcs == pytest.approx(1.0) and half.ml2r == pytest.approx(0.5)
    out = metrics.feature_recovery(weight.T, V.T, U.T, "out")  # transposed site, features on the output axis
    assert out.mmcs == pytest.approx(1.0) and out.best.tolist() == [1, 0, 3]


def test_feature_recovery_angle_and_cross_talk() -> None:
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    angle = math.pi / 3
    U = torch.tensor([[math.cos(angle)], [math.sin(angle)]])
    V = torch.tensor([[1.0, 0.0]])
    recovery = metrics.feature_recovery(weight[:, :1], U, V[:, :1], "in")
    assert recovery.mmcs == pytest.approx(0.5)
    # One subcomponent reading both features equally: each feature's row is perfect, the whole matrix is not.
    both = metrics.feature_recovery(torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0]]), torch.tensor([[1.0, 1.0]]), "in")
    assert both.mmcs == pytest.approx(1.0)
    assert both.matrix_cosine == pytest.approx(1 / math.sqrt(2))


@pytest.mark.parametrize("axis", ["in", "out"])
def test_feature_recovery_of_rank_2_components_matches_a_loop_over_their_matrices(axis: str) -> None:
    """C = 3 components of rank 2 at a 3 × 5 site (APD's layout: component c's pieces are columns 2c, 2c + 1 of U
    and rows 2c, 2c + 1 of V), scored against a loop over each component's whole matrix."""
    generator = torch.Generator().manual_seed(0)
    weight, U, V = (torch.randn(shape, generator=generator) for shape in [(3, 5), (3, 6), (6, 5)])
    matrices = [U[:, 2 * c : 2 * c + 2] @ V[2 * c : 2 * c + 2] for c in range(3)]
    if axis == "in":  # features index the columns: read every matrix by its columns
        weight_by_feature, matrices = weight.T, [m.T for m in matrices]
    else:
        weight_by_feature = weight
    cosines, ratios, matrix_cosines = [], [], []
    for i, w in enumerate(weight_by_feature):
        rows = [m[i] for m in matrices]
        best = max(range(3), key=lambda c: float(torch.cosine_similarity(rows[c], w, 0)))
        cosines.append(float(torch.cosine_similarity(rows[best], w, 0)))
        ratios.append(float(rows[best].norm() / w.norm()))
        matrix_cosines.append(float(rows[best] @ w / (w.norm() * matrices[best].norm())))
    recovery = metrics.feature_recovery(weight, U, V, axis, rank=2)
    n = len(weight_by_feature)
    assert recovery.mmcs == pytest.approx(sum(cosines) / n)
    assert recovery.ml2r == pytest.approx(sum(ratios) / n)
    assert recovery.matrix_cosine == pytest.approx(sum(matrix_cosines) / n)


def test_feature_recovery_ignores_the_vanishing_row_of_an_antipodal_partner() -> None:
    # TMS digon: features 0 and 1 are antipodal, w_1 = −w_0. Subcomponent 0 serves feature 1 and reads feature 0
    # with weight −1e-4: its row for feature 0 points along w_0 exactly but holds 1e-4 of it. Subcomponent 1
    # serves feature 0 at 0.999 of its direction; it is feature 0's best, with norm ratio 1.
    w = torch.tensor([0.6, 0.8])
    weight = torch.stack([w, -w], dim=1)  # (d_out 2, n 2)
    tilted = torch.tensor([0.6 + 0.03, 0.8 - 0.02])
    U = torch.stack([-w, tilted / tilted.norm()], dim=1)
    V = torch.tensor([[-1e-4, 1.0], [1.0, 0.0]])
    recovery = metrics.feature_recovery(weight, U, V, "in")
    assert recovery.best.tolist() == [1, 0]
    assert recovery.ml2r == pytest.approx(1.0)
    assert recovery.mmcs == pytest.approx((torch.cosine_similarity(tilted, w, 0).item() + 1) / 2)


def test_latent_purity_closed_form() -> None:
    from unmerge.metrics.dictionary import latent_purity

    latents = torch.tensor([[1.0, 0.0, 0.0], [3.0, 2.0, 0.0], [0.0, 2.0, 0.0]])
    purity, label = latent_purity(latents, torch.tensor([0, 1, 1]), n_labels=2)
    assert purity[0].item() == pytest.approx(0.75) and label[0] == 1  # 3 of its 4 units of mass on label 1
    assert purity[1].item() == 1.0 and label[1] == 1
    assert torch.isnan(purity[2]) and label[2] == -1
