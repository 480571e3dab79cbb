"""Whole-model SPD of a causal LM (issue 24): every MLP and attention matrix of every layer by pattern, the global
CI function, and the memory a step keeps (no per-site copies of activations the losses do not read)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.conftest import set_exact_factorisation
from unmerge.config import SiteConfig, SPDConfig, TrainConfig, load_run_config
from unmerge.errors import ConfigError
from unmerge.spd import components
from unmerge.spd import plan as spd_plan_module
from unmerge.spd.components import causal_importances
from unmerge.spd.method import SPD
from unmerge.spd.model import ComponentModel
from unmerge.spd.plan import spd_plan
from unmerge.targets.base import Target
from unmerge.targets.language import from_hf

transformers = pytest.importorskip("transformers")

VOCAB = 64
EVERY_MATRIX = [
    SiteConfig(pattern="model.layers.*.mlp.*_proj", C=16),  # the weights' full rank, so U V can equal W
    SiteConfig(pattern="model.layers.*.self_attn.[qkvo]_proj", C=16),
]


def _tiny_llama(layers: int = 3) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config).eval()


def _ids(batch: int = 4, seq: int = 12) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(1))


def _spd(lm: nn.Module, **method: object) -> SPD:
    target = Target(name="llama", model=lm, sample_inputs=lambda n, g: _ids(n))
    config = SPDConfig(sites=EVERY_MATRIX, output_loss="kl", importance_minimality_coeff=1e-3, **method)
    return SPD(target, config, seed=0, eval_batch_size=4)


def test_every_mlp_and_attention_matrix_of_every_layer_is_a_site() -> None:
    lm = from_hf(_tiny_llama())
    model = ComponentModel(lm, EVERY_MATRIX, ci_hidden=2, generator=torch.Generator().manual_seed(0))
    assert len(model.site_names) == 3 * (3 + 4)
    assert model.target_weight("model.layers.2.self_attn.k_proj").shape == (8, 16)  # one key-value head
    set_exact_factorisation(model)
    ids = _ids()
    clean = model.clean_pass(ids)
    ones = {name: torch.ones(*ids.shape, C) for name, C in model.site_C.items()}
    torch.testing.assert_close(model.masked_pass(ids, ones, clean, model.inner_acts(clean)), lm(ids), atol=1e-4, rtol=0)


def test_global_ci_function_is_one_mlp_over_every_sites_inner_activations() -> None:
    lm = from_hf(_tiny_llama(layers=1))
    spd = _spd(lm, ci_function="global_mlp", global_ci_hidden=[5, 3])
    model = spd.model
    assert all(record.ci is None for record in model.sites.values())
    assert sorted(spd.module.state_dict()) == sorted(
        [f"sites.{key}.components.{p}" for key in model.sites for p in ("U", "V")]
        + [f"global_ci.{kind}.{i}" for kind in ("weights", "biases") for i in range(3)]
    )
    inner = model.inner_acts(model.clean_pass(_ids()))
    h = torch.cat([inner[name] for name in model.site_names], dim=-1)
    (w1, w2, w3), (b1, b2, b3) = model.global_ci.weights, model.global_ci.biases
    expected = F.gelu(F.gelu(h @ w1.T + b1) @ w2.T + b2) @ w3.T + b3
    torch.testing.assert_close(model.causal_importance(inner), expected)
    assert expected.shape[-1] == 7 * 16
    output = spd.training_loss(_ids(), torch.Generator().manual_seed(1))
    output.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.global_ci.parameters())


def test_a_step_without_layerwise_terms_records_no_site_outputs() -> None:
    """The site outputs a clean pass records serve only passes that mask some sites but not all; without them the
    all-sites pass computes the same loss."""
    spd = _spd(from_hf(_tiny_llama()), layerwise_recon_coeff=0.0)
    seen: list[int] = []
    original = spd.model.clean_pass

    def counting(x: torch.Tensor, outputs: bool = True):
        clean = original(x, outputs)
        seen.append(len(clean.site_outputs))
        return clean

    spd.model.clean_pass = counting
    loss = spd.training_loss(_ids(), torch.Generator().manual_seed(1)).terms["stochastic_recon"]
    assert seen == [0]
    spd.model.clean_pass = original
    with_outputs = spd.model.clean_pass(_ids())
    ci = spd.importances(with_outputs)
    masks = spd.stochastic_masks(ci, torch.Generator().manual_seed(1))
    torch.testing.assert_close(loss, spd.stochastic_recon(_ids(), with_outputs, ci, masks), atol=1e-6, rtol=0)


def test_ci_backward_keeps_inner_activations_not_the_hidden_layer() -> None:
    """On the torch path, the per-subcomponent CI MLPs keep (rows, ΣC) for backward, not (rows, ΣC, hidden): the
    hidden layer is recomputed, with the same gradients."""
    rows, C, hidden = 256, 64, 16
    generator = torch.Generator().manual_seed(0)
    h = torch.randn(rows, C, generator=generator, requires_grad=True)
    weights = [torch.randn(C, hidden, generator=generator, requires_grad=True) for _ in range(3)]
    b2 = torch.zeros(C, requires_grad=True)
    function = SimpleNamespace(w1=weights[0], b1=weights[1], w2=weights[2], b2=b2)
    saved: list[int] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        gamma = causal_importances([function], [h], c_kernel=False)
    assert max(saved) < rows * C * hidden
    gamma.square().sum().backward()
    recomputed = h.grad.clone()
    h.grad = None
    z = h.unsqueeze(-1) * weights[0] + weights[1]
    ((F.gelu(z) * weights[2]).sum(-1) + b2).square().sum().backward()
    torch.testing.assert_close(recomputed, h.grad)


def test_ci_over_blocks_of_rows_equals_one_call_and_bounds_the_hidden_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Torch's CI runs over blocks of rows of at most CI_BLOCK_ELEMENTS (rows × ΣC × hidden), so evaluating a
    whole language model's 97,920 subcomponents on 4,096 tokens does not materialise 26 GB: the values and the
    inputs' gradients are those of one call, the weights' up to rounding, and no block exceeds the bound."""
    rows, C, hidden = 100, 8, 4
    generator = torch.Generator().manual_seed(0)
    h = torch.randn(rows, C, generator=generator, requires_grad=True)
    params = [torch.randn(C, hidden, generator=generator, requires_grad=True) for _ in range(3)]
    function = SimpleNamespace(w1=params[0], b1=params[1], w2=params[2], b2=torch.randn(C, generator=generator))
    whole = causal_importances([function], [h], c_kernel=False)
    whole_grad, *whole_weight_grads = torch.autograd.grad(whole.square().sum(), [h, *params])
    monkeypatch.setattr(components, "CI_BLOCK_ELEMENTS", 7 * C * hidden)  # 15 blocks, the last of 2 rows
    largest: list[int] = []
    reference = components.scalar_mlp_ci_reference

    def recorded(block: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
        largest.append(block.numel() * hidden)
        return reference(block, *weights)

    monkeypatch.setattr(components, "scalar_mlp_ci_reference", recorded)
    blocked = causal_importances([function], [h.view(10, 10, C)], c_kernel=False)
    blocked_grad, *blocked_weight_grads = torch.autograd.grad(blocked.square().sum(), [h, *params])
    assert blocked.shape == (10, 10, C) and max(largest) <= 7 * C * hidden and len(largest) >= 15
    assert torch.equal(blocked.reshape(rows, C), whole) and torch.equal(blocked_grad, whole_grad)
    for blocked_weight_grad, whole_weight_grad in zip(blocked_weight_grads, whole_weight_grads, strict=True):
        torch.testing.assert_close(blocked_weight_grad, whole_weight_grad)  # summed block by block
    with torch.no_grad():
        assert torch.equal(causal_importances([function], [h], c_kernel=False), whole)


def test_the_dry_run_counts_the_ci_hidden_layer_one_block_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """The plan's transient CI term is 3 × rows × ΣC × hidden fp32 values, at most 3 blocks' worth."""
    target = Target(name="llama", model=from_hf(_tiny_llama(layers=1)), sample_inputs=lambda n, g: _ids(n))
    config = SPDConfig(sites=EVERY_MATRIX, output_loss="kl", importance_minimality_coeff=1e-3, ci_hidden=4)
    train = TrainConfig(steps=1, batch_size=2)
    rows, total_C = 2 * 12, 7 * 16  # two windows of 12 tokens; seven matrices of C = 16
    assert spd_plan(target, config).memory(train)["CI blocks (transient)"] == 3 * rows * total_C * 4 * 4
    monkeypatch.setattr(spd_plan_module, "CI_BLOCK_ELEMENTS", 100)
    assert spd_plan(target, config).memory(train)["CI blocks (transient)"] == 3 * 100 * 4
    global_ci = config.model_copy(update={"ci_function": "global_mlp"})
    assert "CI blocks (transient)" not in spd_plan(target, global_ci).memory(train)


def test_a_target_stored_in_bf16_runs_every_pass_in_bf16_against_fp32_subcomponents() -> None:
    """`target.dtype: bf16`: the frozen weights are bf16, U, V and the CI functions fp32; passes outside a training
    step's autocast (evaluation, analysis) still run, close to the fp32 model's."""
    fp32 = _spd(from_hf(_tiny_llama()))
    bf16 = _spd(from_hf(_tiny_llama()).to(torch.bfloat16))
    assert bf16.model.site_components("model.layers.0.mlp.up_proj").U.dtype == torch.float32
    ids = _ids()
    reference, clean = fp32.model.clean_pass(ids), bf16.model.clean_pass(ids)
    assert clean.output.dtype == torch.float32
    torch.testing.assert_close(clean.output, reference.output, atol=0.05, rtol=0.05)
    metrics = bf16.evaluate()
    assert abs(metrics["ce_ci_masked"] - fp32.evaluate()["ce_ci_masked"]) < 0.05
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = bf16.training_loss(ids, torch.Generator().manual_seed(1)).loss
    loss.backward()
    assert loss.dtype == torch.float32 and bf16.model.site_components("model.layers.0.mlp.up_proj").U.grad is not None


def test_bf16_weights_need_bf16_precision() -> None:
    with pytest.raises(ConfigError, match="target.dtype=bf16 needs train.precision=bf16"):
        load_run_config("smollm2-all", ["train.precision=fp32"])


def test_faithfulness_is_fp32_inside_a_bf16_step() -> None:
    """bf16 would round W − U V (small beside W) away: the term is the same inside autocast as outside."""
    spd = _spd(from_hf(_tiny_llama(layers=1)).to(torch.bfloat16))
    with torch.no_grad():
        for name in spd.model.site_names:
            spd.model.site_components(name).U.mul_(1.001)
    outside = spd.faithfulness()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = spd.faithfulness()
    assert inside.dtype == torch.float32 and float(outside.detach()) > 0
    torch.testing.assert_close(inside, outside, rtol=1e-6, atol=0)
