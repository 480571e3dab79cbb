"""Spliced-in evaluation of a language model (DESIGN.md §7): replace one module's output by a decomposition's
reconstruction (or by an ablation) and measure what the model's outputs lose.

Special tokens are excluded consistently: their activations are never replaced, and predictions count as
`unmerge.metrics.language` defines (which also holds CE, KL and loss recovered as pure functions). Loss recovered
is reported against a zero ablation (the module's output set to 0) and a mean ablation (set to its mean over
training activations). For a causal LM the loss is CE; for a sentence encoder, whose output is a unit embedding
per window, it is the cosine distance `1 − cos(original embedding, spliced embedding)`, 0 for the original model.

A dictionary latent's ablation effect is how much that loss rises, from the spliced model's, when the latent is
zeroed wherever it fires. `ablation_effects` estimates it for every latent at once to first order (attribution
patching): `ΔL_j ≈ −Σ_t f_j(t) d_j · ∂L/∂x̂_t`, from one backward pass instead of one forward pass per latent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unmerge.errors import UnmergeError
from unmerge.metrics.language import ce_and_kl, counted_predictions, next_token_nll
from unmerge.train.devices import device_of
from unmerge.train.progress import progress_bar

Replacement = Callable[[Tensor], Tensor]  # activations (n, d) at ordinary positions → replacements (n, d)


@dataclass(frozen=True)
class SplicedLosses:
    """CE of the original model and of each variant, KL(original ‖ variant) per variant, the module's original
    activations at ordinary positions (for FVU and L0) and the number of counted predictions."""

    ce_original: float
    ce: dict[str, float]
    kl: dict[str, float]
    activations: Tensor
    predictions: int


def _output_tensor(output: Tensor | tuple) -> Tensor:
    return output[0] if isinstance(output, tuple) else output


def _batch_on_model(
    model: nn.Module, windows: Tensor, ordinary: Tensor, start: int, size: int
) -> tuple[Tensor, Tensor]:
    """Windows `start : start + size` and their ordinary-position mask, on the device the model runs on."""
    device = device_of(model)
    return windows[start : start + size].to(device), ordinary[start : start + size].to(device)


@contextmanager
def spliced(
    module: nn.Module, ordinary: Tensor, replace: Replacement | None, record: list[Tensor] | None = None
) -> Iterator[None]:
    """While active, `module`'s output at the `ordinary` positions (batch, seq) is replaced by `replace` of it
    (None: left alone); with `record`, the original activations there are appended to it."""

    def hook(_: nn.Module, __: tuple, output: Tensor | tuple) -> Tensor | tuple:
        hidden = _output_tensor(output)
        if hidden.shape[:2] != ordinary.shape:
            raise UnmergeError(
                f"the spliced module's output has shape {tuple(hidden.shape)}, but the windows are "
                f"{tuple(ordinary.shape)}; choose a hook point whose output is (batch, seq, d)"
            )
        original = hidden[ordinary]
        if record is not None:
            record.append(original.detach())
        if replace is None:
            return output
        new = hidden.clone()
        new[ordinary] = replace(original).to(hidden.device, hidden.dtype)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def spliced_losses(
    lm: nn.Module,
    module: nn.Module,
    windows: Tensor,
    ordinary: Tensor,
    variants: dict[str, Replacement],
    batch_windows: int = 8,
) -> SplicedLosses:
    """Run `lm` (token ids → logits) on `windows` unchanged and with `module`'s output replaced by each variant;
    `ordinary` (windows' shape) marks the positions holding ordinary tokens."""
    sums = {name: [0.0, 0.0] for name in variants}
    ce_original, recorded, predictions = 0.0, [], 0
    for start in range(0, windows.shape[0], batch_windows):
        ids, keep = _batch_on_model(lm, windows, ordinary, start, batch_windows)
        counted = counted_predictions(keep)
        with spliced(module, keep, None, recorded):
            clean_logits = lm(ids)
        clean_log_probs = F.log_softmax(clean_logits[:, :-1][counted].float(), dim=-1)
        ce_original -= float(clean_log_probs.gather(1, ids[:, 1:][counted][:, None]).sum())
        predictions += int(counted.sum())
        for name, replace in variants.items():
            with spliced(module, keep, replace):
                ce, kl = ce_and_kl(clean_log_probs, lm(ids), ids, counted)
            sums[name][0] += ce
            sums[name][1] += kl
    if predictions == 0:
        raise UnmergeError(
            "no prediction has an ordinary token on both sides; the evaluation windows hold only special tokens"
        )
    return SplicedLosses(
        ce_original=ce_original / predictions,
        ce={name: ce / predictions for name, (ce, _) in sums.items()},
        kl={name: kl / predictions for name, (_, kl) in sums.items()},
        activations=torch.cat(recorded),
        predictions=predictions,
    )


@dataclass(frozen=True)
class SplicedEmbeddings:
    """Mean cosine distance `1 − cos` between a sentence encoder's original embedding of each window and its
    embedding with the module spliced, per variant; the module's original activations at ordinary positions."""

    cosine_distance: dict[str, float]
    activations: Tensor


@torch.no_grad()
def spliced_embeddings(
    encoder: nn.Module,
    module: nn.Module,
    windows: Tensor,
    ordinary: Tensor,
    variants: dict[str, Replacement],
    batch_windows: int = 8,
) -> SplicedEmbeddings:
    """Run `encoder` (token ids → embeddings (batch, d)) on `windows` unchanged and with `module`'s output at the
    `ordinary` positions replaced by each variant."""
    sums = dict.fromkeys(variants, 0.0)
    recorded: list[Tensor] = []
    for start in range(0, windows.shape[0], batch_windows):
        ids, keep = _batch_on_model(encoder, windows, ordinary, start, batch_windows)
        with spliced(module, keep, None, recorded):
            original = encoder(ids)
        for name, replace in variants.items():
            with spliced(module, keep, replace):
                sums[name] += float((1 - F.cosine_similarity(encoder(ids), original, dim=-1)).sum())
    return SplicedEmbeddings({name: total / windows.shape[0] for name, total in sums.items()}, torch.cat(recorded))


@dataclass(frozen=True)
class LatentAttribution:
    """One spliced pass over held-out windows: the dictionary's latents at ordinary positions (n, width) and each
    latent's first-order ablation effect (width,)."""

    latents: Tensor
    effects: Tensor


@contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """The model's parameters need no gradient while active, so a backward pass reaches only the spliced input."""
    needed = [p for p in model.parameters() if p.requires_grad]
    for parameter in needed:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter in needed:
            parameter.requires_grad_(True)


def ablation_effects(
    model: nn.Module,
    module: nn.Module,
    windows: Tensor,
    ordinary: Tensor,
    reconstruct: Callable[[Tensor], tuple[Tensor, Tensor]],
    atoms: Tensor,
    encoder: bool,
    batch_windows: int = 8,
) -> LatentAttribution:
    """Splice the dictionary in at `module` on `windows` once, recording its latents, and
    estimate each latent's ablation effect on the spliced loss to first order (see the module docstring): CE per
    counted prediction for a causal LM, cosine distance per window for a sentence `encoder`. `reconstruct` maps
    activations (n, d) to (x̂, latents); `atoms` (width, d) are the decoder rows, so x̂ = latents @ atoms + …"""
    effects = torch.zeros(atoms.shape[0], dtype=torch.float64)
    latents: list[Tensor] = []
    count = 0
    for start in progress_bar(
        range(0, windows.shape[0], batch_windows),
        desc="latent ablation effects",
        unit="batch",
        leave=False,
    ):
        ids, keep = _batch_on_model(model, windows, ordinary, start, batch_windows)
        captured: dict[str, Tensor] = {}

        def replace(activations: Tensor, captured: dict[str, Tensor] = captured) -> Tensor:
            with torch.no_grad():
                reconstruction, captured["latents"] = reconstruct(activations)
            captured["leaf"] = reconstruction.detach().requires_grad_(True)
            return captured["leaf"]

        with frozen(model):
            if encoder:
                with torch.no_grad():
                    original = model(ids)
                with spliced(module, keep, replace):
                    loss = (1 - F.cosine_similarity(model(ids), original, dim=-1)).sum()
                count += ids.shape[0]
            else:
                with spliced(module, keep, replace):
                    loss, predictions = next_token_nll(model(ids), ids, counted_predictions(keep))
                count += int(predictions)
            (gradient,) = torch.autograd.grad(loss, captured["leaf"])
        effects -= (captured["latents"] * (gradient @ atoms.T.to(gradient.device))).sum(0).double().cpu()
        latents.append(captured["latents"].cpu())
    return LatentAttribution(torch.cat(latents), (effects / max(count, 1)).float())
