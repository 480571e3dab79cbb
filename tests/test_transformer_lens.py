"""The TransformerLens adapter on a tiny random `HookedTransformer` built from its config (nothing downloaded): the
same interface as the Hugging Face adapter, hook points as splice sites, `Embed` / `Unembed` as SPD sites."""

from __future__ import annotations

import warnings

import pytest
import torch

from tests.conftest import set_exact_factorisation
from unmerge.config import SiteConfig, SPDConfig
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
