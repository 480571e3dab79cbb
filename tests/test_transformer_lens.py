"""The TransformerLens adapter on a tiny random `HookedTransformer` built from its config (nothing downloaded): the
same interface as the Hugging Face adapter, hook points as splice sites, `Embed` / `Unembed` as SPD sites."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from tests.conftest import set_exact_factorisation
from unmerge.analysis.interventions import ablated, unlearned_model
from unmerge.config import SiteConfig, SPDConfig
from unmerge.errors import SiteError
from unmerge.eval.spliced import spliced
from unmerge.spd.method import SPD
from unmerge.spd.model import ComponentModel
from unmerge.targets.base import Target
from unmerge.targets.language import from_transformer_lens

transformer_lens = pytest.importorskip("transformer_lens", reason="transformer-lens is in the test extra")

VOCAB, C = 40, 16  # C = d_model, so an exact factorisation fits
SITES = [SiteConfig(pattern="embed", C=C), SiteConfig(pattern="unembed", C=C)]


@pytest.fixture(scope="module")
def hooked() -> torch.nn.Module:
    config = transformer_lens.HookedTransformerConfig(
        n_layers=2,
        d_model=16,
        n_ctx=32,
        d_head=4,
        n_heads=4,
        d_mlp=32,
        d_vocab=VOCAB,
        act_fn="gelu",
        normalization_type="LN",
        seed=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # 3.x announces TransformerBridge
        return transformer_lens.HookedTransformer(config).eval()


def _ids(batch: int = 3, seq: int = 10) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(2))


def test_adapter_matches_plain_forward_and_hook_points_splice(hooked: torch.nn.Module) -> None:
    lm = from_transformer_lens(hooked)
    ids = _ids()
    assert lm.vocab_size == VOCAB and not any(p.requires_grad for p in lm.parameters())
    hook = dict(lm.named_modules())["blocks.0.hook_resid_post"]
    everywhere = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        clean = lm(ids)
        assert torch.equal(clean, hooked(ids, return_type="logits"))
        recorded: list[torch.Tensor] = []
        with spliced(hook, everywhere, lambda a: a.clone(), record=recorded):
            assert torch.equal(lm(ids), clean)
        assert recorded[0].shape == (ids.numel(), 16)
        with spliced(hook, everywhere, torch.zeros_like):
            assert not torch.allclose(lm(ids), clean)


def test_embed_and_unembed_are_spd_sites_that_reproduce_the_model(hooked: torch.nn.Module) -> None:
    lm = from_transformer_lens(hooked)
    model = ComponentModel(lm, SITES, ci_hidden=2, generator=torch.Generator().manual_seed(0))
    assert {record.name: record.site.kind for record in model.sites.values()} == {
        "embed": "embedding",
        "unembed": "transposed linear",
    }
    ids = _ids()
    clean = model.clean_pass(ids)
    torch.testing.assert_close(clean.output, lm(ids))
    set_exact_factorisation(model)
    ones = {name: torch.ones(*ids.shape, C) for name in model.site_names}
    torch.testing.assert_close(
        model.masked_pass(ids, ones, clean, model.inner_acts(clean)), lm(ids), atol=1e-4, rtol=1e-4
    )


def test_spd_training_loss_reaches_both_sites(hooked: torch.nn.Module) -> None:
    lm = from_transformer_lens(hooked)
    target = Target(name="tl", model=lm, sample_inputs=lambda n, g: _ids(n))
    spd = SPD(target, SPDConfig(sites=SITES, output_loss="kl", importance_minimality_coeff=1e-3), seed=0)
    output = spd.training_loss(_ids(), torch.Generator().manual_seed(1))
    output.loss.backward()
    assert torch.isfinite(output.loss)
    for component in (record.components for record in spd.model.sites.values()):
        assert component.U.grad.abs().sum() > 0 and component.V.grad.abs().sum() > 0
    assert not any(p.grad is not None for p in lm.parameters())


def _hooked(**overrides: object) -> torch.nn.Module:
    settings = dict(n_layers=2, d_model=16, n_ctx=32, d_head=4, n_heads=4, d_mlp=32, d_vocab=VOCAB, act_fn="gelu")
    config = transformer_lens.HookedTransformerConfig(
        **(settings | {"normalization_type": "LN", "seed": 0} | overrides)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model = transformer_lens.HookedTransformer(config).eval()
    with torch.no_grad():  # TransformerLens starts biases at zero; nonzero ones check they are added once
        for name, parameter in model.named_parameters():
            if ".b_" in name:
                parameter.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    return model


def _with_zeroed(model: torch.nn.Module, parameter: str, head: int | None) -> torch.Tensor:
    """The logits of a copy of the model with one parameter (or one head of it) set to zero."""
    edited = copy.deepcopy(model)
    with torch.no_grad():
        weight = edited.get_parameter(parameter)
        (weight if head is None else weight[head]).zero_()
        return edited(_ids(), return_type="logits")


EINSUM_SITES = [
    SiteConfig(pattern="blocks.0.attn.W_[QKVO]", C=16),
    SiteConfig(pattern="blocks.1.attn.W_[QKVO].*", C=4),
    SiteConfig(pattern="blocks.*.mlp.W_*", C=16),
]


@pytest.mark.parametrize("gated", [False, True])
def test_einsum_parameters_are_sites_per_matrix_and_per_head(gated: bool) -> None:
    """Every attention and MLP weight of a HookedTransformer (per matrix in layer 0, per head in layer 1) is a site:
    with U V = W and all masks 1 the decomposed model is the model; a zero mask on one site is the model with that
    weight (or that head of it) zeroed."""
    hooked = _hooked(gated_mlp=True, act_fn="silu", normalization_type="RMS") if gated else _hooked()
    lm = from_transformer_lens(hooked)
    model = ComponentModel(lm, EINSUM_SITES, ci_hidden=2, generator=torch.Generator().manual_seed(0))
    mlp = ["W_gate", "W_in", "W_out"] if gated else ["W_in", "W_out"]
    expected = [f"blocks.0.attn.W_{m}" for m in "QKVO"] + [f"blocks.1.attn.W_{m}.{h}" for m in "QKVO" for h in range(4)]
    assert model.site_names == expected + [f"blocks.{layer}.mlp.{w}" for layer in (0, 1) for w in mlp]
    ids = _ids()
    clean = model.clean_pass(ids)
    logits, cache = hooked.run_with_cache(ids, return_type="logits")
    torch.testing.assert_close(clean.output, logits)
    torch.testing.assert_close(clean.site_outputs["blocks.0.attn.W_Q"], cache["blocks.0.attn.hook_q"].flatten(-2))
    torch.testing.assert_close(clean.site_outputs["blocks.1.attn.W_K.2"], cache["blocks.1.attn.hook_k"][..., 2, :])
    for name in model.site_names:
        site = model.site(name).site
        torch.testing.assert_close(
            site.apply(clean.site_inputs[name], site.weight, site.bias), clean.site_outputs[name]
        )
    set_exact_factorisation(model)
    ones = {name: torch.ones(*ids.shape, C) for name, C in model.site_C.items()}
    torch.testing.assert_close(model.masked_pass(ids, ones, clean, model.inner_acts(clean)), logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(model(ids, ones), logits, atol=1e-4, rtol=0)
    for name in ["blocks.0.attn.W_Q", "blocks.0.attn.W_O", "blocks.1.attn.W_V.2", "blocks.1.attn.W_O.1"] + [
        f"blocks.1.mlp.{w}" for w in mlp
    ]:
        zero = ones | {name: torch.zeros(*ids.shape, model.site_C[name])}
        parameter, _, head = name.partition(".W_")[2].partition(".")
        expected_logits = _with_zeroed(hooked, name.rsplit(".", 1)[0] if head else name, int(head) if head else None)
        torch.testing.assert_close(model(ids, zero), expected_logits, atol=1e-4, rtol=0, msg=name)


def test_einsum_site_chosen_whole_and_per_head_is_refused() -> None:
    lm = from_transformer_lens(_hooked())
    both = [SiteConfig(pattern="blocks.0.attn.W_Q", C=4), SiteConfig(pattern="blocks.0.attn.W_Q.1", C=4)]
    with pytest.raises(SiteError, match="per matrix or per head"):
        ComponentModel(lm, both, ci_hidden=2, generator=torch.Generator().manual_seed(0))
    with pytest.raises(SiteError, match=r"blocks.0.attn.W_Q.*each head as NAME.HEAD"):
        ComponentModel(lm, [SiteConfig(pattern="blocks.0.attn.W_X", C=4)], 2, torch.Generator().manual_seed(0))


def test_unlearning_an_einsum_site_edits_the_parameter() -> None:
    """The unlearned copy (weights removed permanently) computes what the on-the-fly ablation computes."""
    hooked = _hooked()
    lm = from_transformer_lens(hooked)
    target = Target(name="tl", model=lm, sample_inputs=lambda n, g: _ids(n))
    sites = [SiteConfig(pattern="blocks.*.attn.W_[QO]", C=16), SiteConfig(pattern="blocks.1.attn.W_K.3", C=4)]
    spd = SPD(target, SPDConfig(sites=sites, output_loss="kl", importance_minimality_coeff=1e-3), seed=0)
    units = ["blocks.0.attn.W_Q/3", "blocks.1.attn.W_O/5", "blocks.1.attn.W_K.3/1"]
    with ablated(spd, units):
        on_the_fly = lm(_ids())
    edited = unlearned_model(spd, units)
    torch.testing.assert_close(edited(_ids()), on_the_fly, atol=1e-5, rtol=0)
    assert not torch.allclose(on_the_fly, lm(_ids()), atol=1e-5)
