"""The fast dictionary paths (sparse TopK decoding and encoder backward, the fused ReLU dictionary) against the dense
formulas `z = (x − b_d) W_e + b_e`, `x̂ = f W_d + b_d`: finite differences in float64, and equal values and
gradients in float32 through the real training loss."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from unmerge.config import PenaltyConfig, SparseFeaturesConfig, dictionary_config
from unmerge.data import sparse_feature_source
from unmerge.sae import activations
from unmerge.sae.arch import build_dictionary
from unmerge.sae.arch.topk import aux_k_loss
from unmerge.sae.dictionary import Dictionary, squared_error
from unmerge.sae.method import DictionaryMethod
from unmerge.sae.penalties import sparsity_penalty
from unmerge.sae.sparse_decode import dense_latents, sparse_decode, topk_encode
from unmerge.train.rng import step_generator


@pytest.fixture(autouse=True)
def single_thread() -> Iterator[None]:
    """Tiny sparse ops still open a parallel region; on a busy machine each waits for a second core's time slice."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tensors(*shapes: tuple[int, ...], dtype: torch.dtype = torch.float64, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=generator, dtype=dtype).requires_grad_() for shape in shapes]


def _distinct_indices(batch: int, width: int, k: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(width, generator=generator)[:k] for _ in range(batch)])


def test_sparse_decode_passes_gradcheck_and_equals_the_dense_decoder() -> None:
    values, W_d, b_d = _tensors((6, 3), (9, 4), (4,))
    indices = _distinct_indices(6, 9, 3)
    assert torch.autograd.gradcheck(lambda v, w, b: sparse_decode(v, indices, w, b), (values, W_d, b_d))

    values, W_d, b_d = _tensors((64, 5), (48, 16), (16,), dtype=torch.float32, seed=1)
    indices = _distinct_indices(64, 48, 5, seed=1)
    upstream = torch.randn(64, 16, generator=torch.Generator().manual_seed(2))
    sparse = sparse_decode(values, indices, W_d, b_d)
    sparse_grads = torch.autograd.grad((sparse * upstream).sum(), (values, W_d, b_d))
    f = torch.zeros(64, 48).scatter(1, indices, values)
    dense = f @ W_d + b_d
    dense_grads = torch.autograd.grad((dense * upstream).sum(), (values, W_d, b_d))
    torch.testing.assert_close(sparse, dense)
    for got, expected in zip(sparse_grads, dense_grads, strict=True):
        torch.testing.assert_close(got, expected)


def test_topk_encode_passes_gradcheck_through_values_and_z() -> None:
    x, W_e, b_e, b_d = _tensors((5, 4), (4, 8), (8,), (4,))
    with torch.no_grad():
        b_e[:4] -= 3.0  # some kept pre-activations are negative, so the ReLU mask matters
    inputs = (x, W_e, b_e, b_d)
    assert torch.autograd.gradcheck(lambda *a: topk_encode(*a, 3)[0], inputs)
    assert torch.autograd.gradcheck(lambda *a: topk_encode(*a, 3)[2], inputs)  # the dense path (AuxK)
    assert torch.autograd.gradcheck(lambda *a: (lambda v, _, z: v.sum() * z)(*topk_encode(*a, 3)), inputs)


def test_topk_encode_equals_dense_topk_in_values_and_gradients() -> None:
    x, W_e, b_e, b_d = _tensors((64, 16), (16, 48), (48,), (16,), dtype=torch.float32, seed=3)
    with torch.no_grad():
        b_e[:10] -= 2.0
    inputs = (x, W_e, b_e, b_d)
    k, generator = 5, torch.Generator().manual_seed(4)
    upstream, upstream_z = torch.randn(64, 48, generator=generator), torch.randn(64, 48, generator=generator)

    values, indices, z = topk_encode(*inputs, k)
    f = dense_latents(values, indices, 48)
    sparse_grads = torch.autograd.grad((f * upstream).sum() + (z * upstream_z).sum(), inputs)
    dense_z = (x - b_d) @ W_e + b_e
    dense_f = activations.topk(dense_z, k)
    dense_grads = torch.autograd.grad((dense_f * upstream).sum() + (dense_z * upstream_z).sum(), inputs)
    torch.testing.assert_close(z, dense_z)
    torch.testing.assert_close(f, dense_f)
    assert bool((f < 0).logical_not().all()) and bool(((f != 0).sum(1) <= k).all())
    for got, expected in zip(sparse_grads, dense_grads, strict=True):
        torch.testing.assert_close(got, expected)


def _dense_forward(module: Dictionary, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The specification, with nothing fused: `Dictionary.forward` must agree with it."""
    z = (x - module.b_d) @ module.W_e + module.b_e
    f = module.activate(z)
    return f @ module.W_d + module.b_d, f, z


def _training_loss_and_grads(method: DictionaryMethod, batch: torch.Tensor, dense: bool) -> tuple[float, list]:
    parameters = [p for p in method.module.parameters() if p.requires_grad]
    for parameter in parameters:
        parameter.grad = None
    if dense:  # the method's own loss, with the module's forward replaced by the dense formula
        forward = method.module.forward_normalised
        method.module.forward_normalised = lambda x: _dense_forward(method.module, x)  # type: ignore[method-assign]
        try:
            output = method.training_loss(batch, step_generator(0, "noise"))
        finally:
            method.module.forward_normalised = forward  # type: ignore[method-assign]
    else:
        output = method.training_loss(batch, step_generator(0, "noise"))
    output.loss.backward()
    return float(output.loss.detach()), [p.grad.clone() for p in parameters]


@pytest.mark.parametrize("setting", ["topk", "topk-aux-l1", "relu"])
def test_a_training_step_gives_the_dense_formula_loss_and_gradients(setting: str) -> None:
    configs = {
        "topk": dictionary_config(width=48, activation="topk", k=4, penalty=PenaltyConfig(name="none")),
        "topk-aux-l1": dictionary_config(
            width=48,
            activation="topk",
            k=4,
            aux_k=8,
            dead_window=64,
            penalty=PenaltyConfig(name="l1", coeff=0.1, decoder_norm_weighted=True),
        ),
        "relu": dictionary_config(width=48, activation="relu", penalty=PenaltyConfig(name="l1", coeff=0.1)),
    }
    source = sparse_feature_source(SparseFeaturesConfig(n_features=32, dim=16, mean_active=3.0))
    method = DictionaryMethod(source, configs[setting], seed=0, total_steps=10)
    method.before_training()
    batch = source.sample(64, step_generator(0, "data"))
    with torch.no_grad():
        method.module.b_e.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(5))
    if getattr(configs[setting], "aux_k", None):
        method.module.samples_since_fired[::2] = 10**6  # half the latents dead, so AuxK's gradient flows through z
    state = {name: value.clone() for name, value in method.module.state_dict().items()}

    loss, grads = _training_loss_and_grads(method, batch, dense=False)
    method.module.load_state_dict(state)
    dense_loss, dense_grads = _training_loss_and_grads(method, batch, dense=True)
    assert loss == pytest.approx(dense_loss, rel=1e-5)
    for got, expected in zip(grads, dense_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    if getattr(configs[setting], "aux_k", None):
        assert "aux_k" in method.training_loss(batch, step_generator(0, "noise")).terms


def test_fused_relu_dictionary_passes_gradcheck_with_penalty_and_z_gradients() -> None:
    config = dictionary_config(width=7, activation="relu")
    module = build_dictionary(4, config, torch.Generator().manual_seed(0)).double()
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.normal_(generator=torch.Generator().manual_seed(6))
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)

    names = ("W_d", "W_e", "b_e", "b_d")

    def outputs(x: torch.Tensor, *parameters: torch.Tensor) -> torch.Tensor:
        reconstruction, f, z = torch.func.functional_call(module, dict(zip(names, parameters, strict=True)), (x,))
        return reconstruction.sum(-1, keepdim=True) * f.abs() + z.square()

    parameters = [getattr(module, name).detach().clone().requires_grad_() for name in names]
    assert torch.autograd.gradcheck(outputs, (x, *parameters))


def test_topk_dictionary_in_eval_mode_and_without_gradients_matches_dense() -> None:
    module = build_dictionary(16, dictionary_config(width=48, activation="topk", k=4), torch.Generator().manual_seed(0))
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(7))
    module.eval()
    with torch.no_grad():
        reconstruction, f, z = module(x)
        dense = _dense_forward(module, x)
    for got, expected in zip((reconstruction, f, z), dense, strict=True):
        torch.testing.assert_close(got, expected)
    assert squared_error(x, reconstruction).item() == pytest.approx(squared_error(x, dense[0]).item(), rel=1e-5)
    assert aux_k_loss is not None and sparsity_penalty is not None
