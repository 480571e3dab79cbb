"""Tests for the fused scalar-MLP causal-importance kernel (unmerge.kernels.cpu.ci) and the choice between it and
the torch path (`method.ci_kernel`).

The fused path is checked against a float64 evaluation of the eager reference,
so the tolerances measure the kernel's own float32 error.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from unmerge.config import SiteConfig, SPDConfig, TMSConfig
from unmerge.errors import ConfigError
from unmerge.kernels.cpu import ci as ck
from unmerge.kernels.cpu.build import compile_library
from unmerge.spd.components import lower_leaky_hard_sigmoid, upper_leaky_hard_sigmoid, uses_c_kernel
from unmerge.spd.losses import stochastic_masks
from unmerge.spd.method import SPD
from unmerge.targets.base import Target
from unmerge.targets.tms import TMSModel

Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@pytest.fixture
def fused() -> None:
    """Skip (with the reason) when the compiled kernel cannot be used here."""
    lib, reason = ck._load_kernel()
    if lib is None:
        pytest.skip(f"fused kernel not available, fused-path checks skipped: {reason}")


def make_inputs(lead: tuple[int, ...], c: int, h: int, seed: int = 0) -> Inputs:
    """Random float32 inputs; 4-8% of the pre-activations z have |z| > 10 (up to ~40),
    and z = 0 and |z| ~ 1e-4 occur."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, c, generator=gen) * 2.0
    w1 = torch.randn(c, h, generator=gen) * 2.0
    b1 = torch.randn(c, h, generator=gen)
    w2 = torch.randn(c, h, generator=gen)
    b2 = torch.randn(c, generator=gen)
    flat = x.view(-1, c)
    flat[0] = 0.0  # z = b1 exactly
    b1[:, 0] = 0.0  # with row 0: z = 0 exactly
    if flat.shape[0] > 1:
        flat[1] = 1e-4  # z ~ 1e-4 * w1 + b1
    if flat.shape[0] > 2:
        flat[2] = 5.0  # large |z|: up to ~5 * |w1| + |b1|
    return x, w1, b1, w2, b2


def reference64(inputs: Inputs, grad: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Float64 reference output and gradients of ``(out * grad).sum()``."""
    leaves = [t.detach().double().requires_grad_(True) for t in inputs]
    out = ck.scalar_mlp_ci_reference(*leaves)
    grads = torch.autograd.grad(out, leaves, grad.double())
    return out.detach(), list(grads)


def fused_with_grads(inputs: Inputs, grad: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Fused output and gradients of ``(out * grad).sum()`` wrt all five inputs."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = ck.scalar_mlp_ci(*leaves)
    grads = torch.autograd.grad(out, leaves, grad)
    return out.detach(), list(grads)


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    """|actual - expected| <= rel * (max |expected| + 1), elementwise."""
    scale = expected.abs().max().item() + 1.0
    err = (actual.double() - expected).abs().max().item()
    assert err <= rel * scale, f"max abs error {err:.3g} > {rel:g} * scale {scale:.3g}"


def assert_grad_close(actual: torch.Tensor, expected: torch.Tensor, name: str = "") -> None:
    """Gradient check: rtol 1e-4, atol 1e-4 * (max |expected| + 1)."""
    atol = 1e-4 * (expected.abs().max().item() + 1.0)
    torch.testing.assert_close(actual.double(), expected, rtol=1e-4, atol=atol, msg=name or None)


SHAPES = [
    ((7,), 5, 16),  # odd row count: the kernel pairs rows
    ((2, 3), 12, 16),  # leading dims
    ((64,), 1, 16),  # C = 1
    ((33,), 17, 1),  # H = 1
    ((19,), 9, 128),  # H = 128
    ((300,), 60, 16),
    ((130,), 200, 16),
]


@pytest.mark.parametrize(("lead", "c", "h"), SHAPES)
def test_forward_matches_reference(fused: None, lead: tuple[int, ...], c: int, h: int) -> None:
    inputs = make_inputs(lead, c, h)
    assert ck._fallback_reason(inputs) is None
    out = ck.scalar_mlp_ci(*inputs)
    expected, _ = reference64(inputs, torch.ones(*lead, c))
    assert out.shape == expected.shape and out.dtype == torch.float32
    assert_close_scaled(out, expected, 1e-5)
    # and the float32 eager reference agrees to the same tolerance
    assert_close_scaled(ck.scalar_mlp_ci_reference(*inputs).double(), expected, 1e-5)


@pytest.mark.parametrize(("lead", "c", "h"), SHAPES)
def test_gradients_match_reference(fused: None, lead: tuple[int, ...], c: int, h: int) -> None:
    inputs = make_inputs(lead, c, h, seed=1)
    grad = torch.randn(*lead, c, generator=torch.Generator().manual_seed(2))
    _, grads = fused_with_grads(inputs, grad)
    _, expected = reference64(inputs, grad)
    for name, g, e in zip(("h", "w1", "b1", "w2", "b2"), grads, expected, strict=True):
        assert g.shape == e.shape, name
        assert_grad_close(g, e, name)


def test_gelu_accuracy_over_z_range(fused: None) -> None:
    """One unit with w1 = 1, b1 = 0, w2 = 1: out = GELU(h) directly, grad = GELU'(h)."""
    z = torch.linspace(-14.0, 14.0, 20001).unsqueeze(1)
    ones, zeros = torch.ones(1, 1), torch.zeros(1, 1)
    inputs = (z, ones, zeros, ones, torch.zeros(1))
    out, grads = fused_with_grads(inputs, torch.ones_like(z))
    z64 = z.double()
    cdf = 0.5 * torch.special.erfc(-z64 / 2**0.5)
    pdf = torch.exp(-0.5 * z64**2) / (2 * torch.pi) ** 0.5
    assert (out.double() - z64 * cdf).abs().max().item() < 2e-6  # |z| * Phi error, |z| <= 14
    assert (grads[0].double() - (cdf + z64 * pdf)).abs().max().item() < 1e-6


def test_bitwise_deterministic(fused: None) -> None:
    inputs = make_inputs((1000,), 37, 16, seed=3)
    grad = torch.randn(1000, 37, generator=torch.Generator().manual_seed(4))
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            out1, g1 = fused_with_grads(inputs, grad)
            out2, g2 = fused_with_grads(inputs, grad)
            assert torch.equal(out1, out2)
            for a, b in zip(g1, g2, strict=True):
                assert torch.equal(a, b)
            # the n row chunks are reduced correctly too
            expected_out, expected = reference64(inputs, grad)
            assert_close_scaled(out1, expected_out, 1e-5)
            for a, e in zip(g1, expected, strict=True):
                assert_grad_close(a, e)
    finally:
        torch.set_num_threads(threads)


def test_non_contiguous_inputs(fused: None) -> None:
    x, w1, b1, w2, b2 = make_inputs((40,), 11, 16, seed=5)
    out = ck.scalar_mlp_ci(x, w1, b1, w2, b2)
    x_nc = x.t().contiguous().t()
    w1_nc, b1_nc, w2_nc = (t.t().contiguous().t() for t in (w1, b1, w2))
    b2_nc = torch.stack([b2, b2], 1)[:, 0]
    assert not any(t.is_contiguous() for t in (x_nc, w1_nc, b1_nc, w2_nc, b2_nc))
    assert torch.equal(ck.scalar_mlp_ci(x_nc, w1_nc, b1_nc, w2_nc, b2_nc), out)


def test_no_grad_and_partial_requires_grad(fused: None) -> None:
    x, w1, b1, w2, b2 = make_inputs((50,), 8, 16, seed=6)
    expected = ck.scalar_mlp_ci(x, w1, b1, w2, b2)
    assert expected.grad_fn is None
    x.requires_grad_(True)
    with torch.no_grad():
        out = ck.scalar_mlp_ci(x, w1, b1, w2, b2)
    assert out.grad_fn is None and torch.equal(out, expected)

    # only h requires grad; out.sum() gives an expanded (stride-0) upstream gradient
    ck.scalar_mlp_ci(x, w1, b1, w2, b2).sum().backward()
    _, ref_grads = reference64((x, w1, b1, w2, b2), torch.ones(50, 8))
    torch.testing.assert_close(x.grad.double(), ref_grads[0], rtol=1e-4, atol=1e-4)
    assert w1.grad is None and b2.grad is None

    # only the weights require grad
    x = x.detach()
    w2.requires_grad_(True)
    b1.requires_grad_(True)
    ck.scalar_mlp_ci(x, w1, b1, w2, b2).sum().backward()
    torch.testing.assert_close(w2.grad.double(), ref_grads[3], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(b1.grad.double(), ref_grads[2], rtol=1e-4, atol=1e-4)


def test_the_kernel_choice_is_explicit() -> None:
    cpu, meta = torch.device("cpu"), torch.device("meta")
    assert not uses_c_kernel("torch", cpu) and not uses_c_kernel("auto", meta)
    assert uses_c_kernel("auto", cpu) == ck.fused_kernel_available()
    with pytest.raises(ConfigError, match="CPU only"):
        uses_c_kernel("c", meta)
    if ck.fused_kernel_available():
        assert uses_c_kernel("c", cpu)
    else:
        with pytest.raises(ConfigError, match="cannot be used here"):
            uses_c_kernel("c", cpu)


def test_spd_losses_and_gradients_agree_between_the_c_and_torch_paths(fused: None) -> None:
    """The same SPD step through `method.ci_kernel=c` and `=torch`: every loss term and every gradient agree."""
    target = Target(
        name="tms",
        model=TMSModel(TMSConfig(n_features=5, n_hidden=2)),
        sample_inputs=lambda n, g: torch.rand(n, 5, generator=g),
    )
    x = torch.rand(64, 5, generator=torch.Generator().manual_seed(0))
    runs = {}
    for choice in ("c", "torch"):
        config = SPDConfig(
            sites=[SiteConfig(pattern="linear*", C=6)], importance_minimality_coeff=1e-2, ci_kernel=choice
        )
        spd = SPD(target, config, seed=0)
        assert spd.model.c_kernel == (choice == "c")
        output = spd.training_loss(x, torch.Generator().manual_seed(3))
        output.loss.backward()
        runs[choice] = (output.terms, {n: p.grad for n, p in spd.module.named_parameters()})
    (c_terms, c_grads), (torch_terms, torch_grads) = runs["c"], runs["torch"]
    for name, value in c_terms.items():
        torch.testing.assert_close(value, torch_terms[name], rtol=1e-5, atol=1e-7, msg=name)
    for name, grad in c_grads.items():
        assert_grad_close(grad, torch_grads[name].double(), name)


def test_float64_inputs_fall_back_with_one_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ck, "_warned", False)
    inputs = tuple(t.double() for t in make_inputs((10,), 4, 16, seed=8))
    with pytest.warns(UserWarning, match="float32"):
        out, grads = fused_with_grads(inputs, torch.ones(10, 4, dtype=torch.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = ck.scalar_mlp_ci(*inputs)
    assert out.dtype == torch.float64
    ref_out = ck.scalar_mlp_ci_reference(*inputs)
    assert torch.equal(out, ref_out) and torch.equal(again, ref_out)
    _, expected = reference64(inputs, torch.ones(10, 4))
    for g, e in zip(grads, expected, strict=True):
        assert_grad_close(g, e)


def test_shape_errors() -> None:
    x, w1, b1, w2, b2 = make_inputs((4,), 3, 5)
    with pytest.raises(ValueError):
        ck.scalar_mlp_ci(x[:, :2], w1, b1, w2, b2)
    with pytest.raises(ValueError):
        ck.scalar_mlp_ci(x, w1, b1[:, :4], w2, b2)


def test_empty_input() -> None:
    _, w1, b1, w2, b2 = make_inputs((1,), 3, 5)
    assert ck.scalar_mlp_ci(torch.zeros(0, 3), w1, b1, w2, b2).shape == (0, 3)


def test_fused_kernel_available() -> None:
    if not ck.fused_kernel_available():
        pytest.skip(f"no usable C compiler here; speed-dependent checks skipped: {ck._load_kernel()[1]}")
    assert ck._fallback_reason(make_inputs((2,), 2, 2)) is None


def test_compile_failure_is_reported(tmp_path: Path) -> None:
    if shutil.which(os.environ.get("CC") or "gcc") is None:
        pytest.skip("no C compiler to fail")
    with pytest.raises(RuntimeError, match="kernel compilation failed"):
        compile_library("this is not C", "ci_kernel", tmp_path)
    assert list(tmp_path.iterdir()) == []  # no partial library left behind


def test_compile_cache_is_reused(fused: None, tmp_path: Path) -> None:
    source = ck.C_SOURCE.read_text()
    path = compile_library(source, "ci_kernel", tmp_path)
    mtime = path.stat().st_mtime_ns
    assert compile_library(source, "ci_kernel", tmp_path) == path and path.stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary files left


def test_fused_hard_sigmoids_match_the_eager_formulas_and_gradients(fused: None) -> None:
    x = torch.cat([torch.randn(5000, generator=torch.Generator().manual_seed(0)) * 2, torch.tensor([0.0, 1.0, -1.0])])
    fused_x, eager_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    lower, upper = ck.fused_hard_sigmoids(fused_x, 0.01)
    eager_lower, eager_upper = lower_leaky_hard_sigmoid(eager_x, 0.01), upper_leaky_hard_sigmoid(eager_x, 0.01)
    assert torch.equal(lower, eager_lower)
    torch.testing.assert_close(upper, eager_upper, rtol=0, atol=2.4e-7)  # one ulp: the kernel may fuse a*b+c
    weights = torch.randn(2, x.numel(), generator=torch.Generator().manual_seed(1))
    (lower * weights[0] + upper * weights[1]).sum().backward()
    (eager_lower * weights[0] + eager_upper * weights[1]).sum().backward()
    assert torch.equal(fused_x.grad, eager_x.grad)
    fused_x.grad = None
    ck.fused_hard_sigmoids(fused_x, 0.01)[1].sum().backward()  # only one output used: the other gradient is None
    assert torch.equal(fused_x.grad, ((x >= 0) & (x <= 1)).float() + 0.01 * (x > 1).float())


def _mix32(word: int) -> int:
    """lowbias32 in plain Python integers: the closed form the kernel and the torch reference implement."""
    word ^= word >> 16
    word = (word * 0x7FEB352D) & 0xFFFFFFFF
    word ^= word >> 15
    word = (word * 0x846CA68B) & 0xFFFFFFFF
    return word ^ (word >> 16)


def test_counter_uniform_is_the_documented_hash_and_uniform() -> None:
    keys = (0xDEADBEEF, 12345)
    r = ck.counter_uniform_reference((1000, 100), keys)
    flat = r.flatten()
    for i in (0, 1, 99, 54321, 99999):
        assert flat[i].item() == (_mix32(_mix32((i + keys[0]) & 0xFFFFFFFF) ^ keys[1]) >> 8) / 2**24
    assert 0.0 <= flat.min() and flat.max() < 1.0
    assert flat.mean().item() == pytest.approx(0.5, abs=3e-3)  # 5 standard errors of 1e5 uniforms
    assert flat.var().item() == pytest.approx(1 / 12, abs=2e-3)
    counts = torch.histc(flat, bins=10, min=0.0, max=1.0)
    assert ((counts - 1e4).abs() < 500).all()  # each decile within 5 standard deviations


def test_fused_masks_draw_the_reference_noise_and_gradient(fused: None) -> None:
    g = torch.rand(300, 70, generator=torch.Generator().manual_seed(0)).requires_grad_()
    fused_masks = stochastic_masks(g, torch.Generator().manual_seed(5), c_kernel=True)
    eager_g = g.detach().clone().requires_grad_()
    eager_masks = stochastic_masks(eager_g, torch.Generator().manual_seed(5), c_kernel=False)
    torch.testing.assert_close(fused_masks, eager_masks, rtol=0, atol=1.2e-7)
    upstream = torch.randn(300, 70, generator=torch.Generator().manual_seed(2))
    (fused_masks * upstream).sum().backward()
    (eager_masks * upstream).sum().backward()
    torch.testing.assert_close(g.grad, eager_g.grad, rtol=0, atol=1e-6)
