"""Spliced-in evaluation of a dictionary on a language model's held-out windows, and its latents' top-activating
snippets: the dictionary's reconstruction replaces the hook's output, and FVU and L0 there, CE and KL of the
spliced model, and CE recovered against zero and mean ablation are reported (`unmerge.eval.spliced`); for a
sentence encoder, the cosine distance of its embeddings to the original's and the embedding distance recovered."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from unmerge.data.source import Reconstruct
from unmerge.eval.examples import LatentExamples, top_positions
from unmerge.eval.spliced import Replacement, ablation_effects, spliced_embeddings, spliced_losses
from unmerge.metrics import dictionary as dictionary_scores
from unmerge.metrics.language import loss_recovered
from unmerge.targets.language import LanguageModel, SentenceEncoder
from unmerge.targets.language_activations import LanguageActivations
from unmerge.targets.language_data import LanguageData, evaluation_windows, report_windows
from unmerge.train.rng import step_generator

MEAN_SAMPLE = 16_384  # training rows averaged for the mean ablation


def _next_token_scores(
    lm: LanguageModel, module: nn.Module, windows: Tensor, ordinary: Tensor, variants: dict[str, Replacement]
) -> tuple[dict[str, float], Tensor]:
    losses = spliced_losses(lm, module, windows, ordinary, variants)
    scores = {
        "ce_original": losses.ce_original,
        "ce_spliced": losses.ce["spliced"],
        "ce_zero_ablation": losses.ce["zero_ablation"],
        "ce_mean_ablation": losses.ce["mean_ablation"],
        "kl_spliced": losses.kl["spliced"],
        "ce_recovered_zero": loss_recovered(losses.ce["zero_ablation"], losses.ce["spliced"], losses.ce_original),
        "ce_recovered_mean": loss_recovered(losses.ce["mean_ablation"], losses.ce["spliced"], losses.ce_original),
    }
    return scores, losses.activations


def _embedding_scores(
    encoder: LanguageModel, module: nn.Module, windows: Tensor, ordinary: Tensor, variants: dict[str, Replacement]
) -> tuple[dict[str, float], Tensor]:
    result = spliced_embeddings(encoder, module, windows, ordinary, variants)
    distance = result.cosine_distance
    scores = {f"cosine_distance_{name}": value for name, value in distance.items()}
    for ablation in ("zero", "mean"):
        scores[f"embedding_recovered_{ablation}"] = loss_recovered(
            distance[f"{ablation}_ablation"], distance["spliced"], 0.0
        )
    return scores, result.activations


def spliced_evaluator(recorded: LanguageActivations, tokens: int) -> Callable[[Reconstruct], dict[str, float]]:
    """The evaluation of a dictionary spliced in at the recorded module on about `tokens` held-out tokens (see the
    module docstring): next-token CE and KL for a causal LM, cosine distance of the sentence embeddings for an
    encoder; the mean ablation uses the mean of the recorded training activations."""
    data, module = recorded.data, recorded.module
    windows = evaluation_windows(data.heldout_windows, tokens, data.tokens_per_window)
    ordinary = data.lm.ordinary_positions(windows)
    model_scores = _embedding_scores if isinstance(data.lm, SentenceEncoder) else _next_token_scores

    def evaluate(reconstruct: Reconstruct) -> dict[str, float]:
        mean = recorded.source.sample(MEAN_SAMPLE, step_generator(0, "ablation-mean")).mean(0)
        variants = {
            "spliced": lambda a: reconstruct(a)[0],
            "zero_ablation": torch.zeros_like,
            "mean_ablation": lambda a: mean.expand_as(a),
        }
        scores, activations = model_scores(data.lm, module, windows, ordinary, variants)
        reconstruction, latents = reconstruct(activations)
        return {
            "heldout/fvu": dictionary_scores.fvu(activations, reconstruction),
            "heldout/l0": dictionary_scores.l0(latents),
            "heldout/tokens": float(activations.shape[0]),
        } | scores

    return evaluate


def latent_examples(
    data: LanguageData, module: nn.Module, tokens: int, reconstruct: Reconstruct, atoms: Tensor, per_latent: int
) -> LatentExamples:
    """A dictionary spliced in at `module` on held-out windows of up to `tokens` (at most `REPORT_TOKENS`): every
    latent's activation at every position (special tokens get 0), its `per_latent` most activating positions, the
    windows' token texts, and each latent's estimated ablation effect on the spliced loss
    (`unmerge.eval.spliced.ablation_effects`). `reconstruct` maps activations to (x̂, latents); `atoms` are the
    decoder rows."""
    windows, texts = report_windows(data, tokens)
    ordinary = data.lm.ordinary_positions(windows)
    encoder = isinstance(data.lm, SentenceEncoder)
    attribution = ablation_effects(data.lm, module, windows, ordinary, reconstruct, atoms.detach(), encoder)
    full = torch.zeros(*windows.shape, attribution.latents.shape[-1])
    full[ordinary] = attribution.latents
    return LatentExamples(
        texts,
        full,
        top_positions(full, per_latent),
        ordinary,
        attribution.effects,
        "Δ cosine distance" if encoder else "ΔCE",
    )
