"""Interventions (DESIGN.md §8): ablate any set of SPD subcomponents or components on the fly, remove them
permanently (unlearning), monitor which components are causally important per input; splice a dictionary in at
its module with any set of latents ablated.

Subcomponents are named `site/c` (as in `unmerge.analysis.grouping`); a component is a list of them. Ablating a
set S at a site replaces its weight W by `W − Σ_{c∈S} U_c V_c`: with nothing ablated the target is exactly
itself, whatever the decomposition's faithfulness. A zero ablation stops there; a mean ablation adds back each
removed subcomponent's mean contribution `U_c · E[V_c a]` (the mean inner activation over sampled inputs), so
the site's output keeps its average. Tied sites (a weight shared with another site, transposed) are edited
separately on the fly; a permanent edit of a shared weight changes every site that shares it, so `unlearned_model`
removes the union of what was asked at either site.

On a causal language model, `subcomponent_examples` monitors held-out text: every subcomponent's causal
importance at every token, its top-activating tokens, and its ablation effect on next-token CE estimated to first
order from one backward pass through the masks (`subcomponent_ablation_effects`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import Tensor, nn

from unmerge.analysis.grouping import DEFAULT_THRESHOLD, active_subcomponents, subcomponent_names
from unmerge.errors import SiteError
from unmerge.eval.examples import LatentExamples, top_positions
from unmerge.eval.spliced import frozen
from unmerge.metrics.language import counted_predictions, next_token_nll
from unmerge.sae.dictionary import Dictionary
from unmerge.spd.method import SPD
from unmerge.spd.sites import find_site
from unmerge.train.progress import progress_bar
from unmerge.train.rng import step_generator

Ablation = Literal["zero", "mean"]


def unit_index(spd: SPD, units: Iterable[str]) -> list[int]:
    """Positions of the named subcomponents `site/c` in the concatenated CI; an unknown name is an error."""
    index = {name: i for i, name in enumerate(subcomponent_names(spd))}
    units = list(units)
    unknown = [unit for unit in units if unit not in index]
    if unknown:
        raise SiteError(
            f"{unknown[0]!r} names no subcomponent; subcomponents are named SITE/INDEX with SITE one of "
            f"{', '.join(spd.model.site_names)} and INDEX below its C"
        )
    return [index[unit] for unit in units]


def subcomponent_masks(spd: SPD, units: Iterable[str]) -> dict[str, Tensor]:
    """Per site, a bool mask (C,) of the named subcomponents `site/c`."""
    chosen = torch.zeros(len(subcomponent_names(spd)), dtype=torch.bool, device=spd.device)
    chosen[unit_index(spd, units)] = True
    return {
        site: mask
        for site, mask in zip(
            spd.model.site_names, chosen.split([spd.model.site_C[s] for s in spd.model.site_names]), strict=True
        )
        if mask.any()
    }


def removed_weight(spd: SPD, site: str, mask: Tensor) -> Tensor:
    """`Σ_{c in mask} U_c V_c`, (d_out, d_in)."""
    components = spd.model.site_components(site)
    return (components.U * mask) @ components.V


@torch.no_grad()
def mean_inner_activations(
    spd: SPD, n_inputs: int = 16_384, batch_size: int = 1024, seed: int = 0
) -> dict[str, Tensor]:
    """Per site, the mean inner activation `E[V a]` (C,) over rows of sampled inputs (for mean ablations), on the
    decomposition's device; the inputs are drawn on the CPU, so they are the same on every device."""
    totals = {name: torch.zeros(C, device=spd.device) for name, C in spd.model.site_C.items()}
    rows, batch = 0, 0
    while rows < n_inputs:
        x = spd.target.sample_inputs(batch_size, step_generator(seed, "mean-ablation", batch)).to(spd.device)
        inner = spd.model.inner_acts(spd.model.clean_pass(x))
        for name, h in inner.items():
            flat = h.reshape(-1, h.shape[-1])
            totals[name] += flat.sum(0)
        rows, batch = rows + flat.shape[0], batch + 1
    return {name: total / rows for name, total in totals.items()}


@contextmanager
def ablated(
    spd: SPD, units: Iterable[str], mode: Ablation = "zero", means: dict[str, Tensor] | None = None
) -> Iterator[None]:
    """While active, the target runs with the named subcomponents ablated (zero, or mean with `means` from
    `mean_inner_activations`)."""
    masks = subcomponent_masks(spd, units)
    if mode == "mean" and means is None:
        raise ValueError("a mean ablation needs the mean inner activations (mean_inner_activations)")
    removed = {site: removed_weight(spd, site, mask) for site, mask in masks.items()}
    shift = {}
    if mode == "mean":
        for site, mask in masks.items():
            shift[site] = spd.model.site_components(site).U @ (means[site] * mask)
    with torch.no_grad(), spd.model.edited_weights(removed, shift):
        yield


@torch.no_grad()
def component_activity(spd: SPD, x: Tensor, components: list[list[str]], threshold: float = 0.1) -> Tensor:
    """Monitoring: (rows, components) bool, True where any subcomponent of the component has CI > threshold (rows
    are inputs, or token positions of a language model), on the CPU."""
    active = active_subcomponents(spd.importances(spd.model.clean_pass(x.to(spd.device))), threshold).cpu()
    membership = torch.zeros(active.shape[1], len(components))
    for j, members in enumerate(components):
        membership[unit_index(spd, members), j] = 1.0
    return (active.float() @ membership) > 0


@torch.no_grad()
def unlearned_model(spd: SPD, units: Iterable[str]) -> nn.Module:
    """A copy of the target with the named subcomponents' weights removed permanently (a shared, tied weight loses
    the union of what was asked at the sites that share it)."""
    masks = subcomponent_masks(spd, units)
    for tied, source in spd.model.tied.items():
        if tied in masks:
            masks[source] = masks.get(source, torch.zeros_like(masks[tied])) | masks.pop(tied)
    model = copy.deepcopy(spd.target.model)
    for site, mask in masks.items():
        find_site(model, site).subtract_(removed_weight(spd, site, mask))
    return model


@contextmanager
def dictionary_spliced(
    module: nn.Module,
    dictionary: Dictionary,
    latents: Iterable[int] = (),
    mode: Ablation = "zero",
    latent_means: Tensor | None = None,
) -> Iterator[None]:
    """While active, `module`'s output is the dictionary's reconstruction — a transcoder's from the module's input,
    an autoencoder's from its output — with the given latents ablated (set to zero, or to their mean activation
    `latent_means` (width,) in the dictionary's working units)."""
    ablate = torch.tensor(sorted(set(latents)), dtype=torch.long)
    if mode == "mean" and latent_means is None:
        raise ValueError("a mean ablation of latents needs their mean activations (latent_means)")

    def hook(_: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        x = dictionary.normalise(inputs[0] if dictionary.transcoder else output)
        _, f, _ = dictionary.forward_normalised(x)
        f = f.clone()
        f[..., ablate] = 0.0 if mode == "zero" else latent_means[ablate]
        return dictionary.decode(f, x) / float(dictionary.target_scale())

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            yield
    finally:
        handle.remove()


def _importance_and_mask_gradients(spd: SPD, ids: Tensor) -> tuple[Tensor, Tensor, int]:
    """One batch of token windows of a causal LM, one clean pass: the causal importances clipped to [0, 1]
    (batch, seq, ΣC), `Σ_t ∂CE/∂m_c(t)` of the decomposed model with every mask 1 (ΣC,), summed CE rather than
    its mean, and the number of counted predictions; on the CPU, wherever the model runs."""
    names = spd.model.site_names
    ids = ids.to(spd.device)
    with torch.no_grad():
        clean = spd.model.clean_pass(ids)
        importances = spd.importances(clean)
    masks = {name: torch.ones_like(importances.inner[name], requires_grad=True) for name in names}
    with frozen(spd.module):
        loss, predictions = next_token_nll(
            spd.model.masked_pass(ids, masks, clean, importances.inner),
            ids,
            counted_predictions(spd.target.model.ordinary_positions(ids)),
        )
        gradients = torch.autograd.grad(loss, [masks[name] for name in names])
    summed = torch.cat([g.flatten(0, -2).sum(0) for g in gradients]).double().cpu()
    return importances.lower_all.clamp(0.0, 1.0).cpu(), summed, int(predictions)


def _importances_and_effects(spd: SPD, windows: Tensor, batch_windows: int) -> tuple[Tensor, Tensor]:
    """Over `windows` in batches: the clipped causal importances (windows, seq, ΣC) and the first-order ablation
    effects `−Σ_t ∂CE/∂m_c(t)` per counted prediction (ΣC,)."""
    importances: list[Tensor] = []
    effects = torch.zeros(sum(spd.model.site_C[name] for name in spd.model.site_names), dtype=torch.float64)
    count = 0
    for start in progress_bar(
        range(0, windows.shape[0], batch_windows),
        desc="subcomponent importances and effects",
        unit="batch",
        leave=False,
    ):
        ids = windows[start : start + batch_windows]
        importance, gradient, predictions = _importance_and_mask_gradients(spd, ids)
        importances.append(importance)
        effects -= gradient
        count += predictions
    return torch.cat(importances), (effects / max(count, 1)).float()


def subcomponent_ablation_effects(spd: SPD, windows: Tensor, batch_windows: int = 8) -> Tensor:
    """(ΣC,), sites in `subcomponent_names` order: for a causal LM, how much next-token CE (nats per counted
    prediction) of the decomposed model (every mask 1) would rise with the subcomponent's mask at 0 at every
    position, to first order: `−Σ_t ∂CE/∂m_c(t)` (attribution patching)."""
    return _importances_and_effects(spd, windows, batch_windows)[1]


def subcomponent_examples(
    spd: SPD, windows: Tensor, tokens: list[list[str]], per_unit: int, batch_windows: int = 8
) -> LatentExamples:
    """Monitoring on held-out text of a causal LM: every subcomponent's causal importance (clipped to [0, 1]) at
    every position of `windows` (special tokens get 0), its `per_unit` most important positions, `tokens` (each
    window's token texts) and the first-order ablation effects, for the report's subcomponent list."""
    importance, effects = _importances_and_effects(spd, windows, batch_windows)
    ordinary = spd.target.model.ordinary_positions(windows)
    importance[~ordinary] = 0.0
    return LatentExamples(
        tokens,
        importance,
        top_positions(importance, per_unit),
        ordinary,
        effects,
        "ΔCE",
        subcomponent_names(spd),
        DEFAULT_THRESHOLD,
    )


@torch.no_grad()
def output_change(spd: SPD, edited: nn.Module, n_inputs: int = 4096) -> float:
    """The mean squared change of the target's output when `edited` replaces it, on `n_inputs` sampled inputs,
    relative to the output's mean square."""
    x = spd.target.sample_inputs(n_inputs, step_generator(0, "unlearn-check")).to(spd.device)
    original = spd.target.model(x)
    return float((edited(x) - original).square().mean() / original.square().mean())
