"""Activations of a language model at one hook point, for dictionaries: from an on-disk cache (built once,
resumable, integrity-checked; `unmerge.data.activation_cache`) or recorded straight from the model for every batch,
special tokens excluded by id."""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from unmerge.config import DictionaryRunConfig, LanguageActivationsConfig
from unmerge.data.activation_cache import ActivationCache, build_activation_cache
from unmerge.data.cache_stream import StreamedCache
from unmerge.data.source import ActivationSource, Sampler
from unmerge.errors import ConfigError
from unmerge.io import cache_lock, cache_root
from unmerge.targets.activations import capture_module, find_module
from unmerge.targets.language import LanguageModel
from unmerge.targets.language_data import LanguageData, language_data
from unmerge.train import distributed
from unmerge.train.devices import device_of
from unmerge.train.rng import draw_rows, step_generator


@dataclass(frozen=True)
class LanguageActivations:
    """A language model's activations at one module: the model and its windows, the module, and the source that
    samples rows of the module's output at ordinary positions of training windows."""

    data: LanguageData
    module: nn.Module
    source: ActivationSource


def activation_cache_dir(config: LanguageActivationsConfig) -> Path:
    """The cache's directory: `cache_dir`, or one keyed by every setting that changes what is cached."""
    if config.cache_dir is not None:
        return Path(config.cache_dir)
    safe_hook = config.hook.replace("/", "_")
    return cache_root() / "activations" / f"{config.model.kind}-{safe_hook}-{cache_settings_digest(config)}"


def cache_settings(config: LanguageActivationsConfig) -> dict:
    """What determines a cache's contents (stored in its manifest and checked on resume); unset options are left
    out, so adding an option to the configs does not orphan existing caches."""
    return config.model_dump(
        mode="json", include={"model", "text", "hook", "cache_tokens", "cache_dtype"}, exclude_none=True
    )


def cache_settings_digest(config: LanguageActivationsConfig) -> str:
    text = json.dumps(cache_settings(config), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _recorder(lm: LanguageModel, module: nn.Module) -> Callable[[Tensor], Tensor]:
    """Windows → the module's output, computed where the model is and returned where the windows were."""

    def record(windows: Tensor) -> Tensor:
        return capture_module(lm, module, windows.to(device_of(lm)), lm.name)[1].to(windows.device)

    return record


def activation_cache(config: LanguageActivationsConfig, data: LanguageData, module: nn.Module) -> ActivationCache:
    """The activation cache of `config`, built (or resumed, or opened) from a seeded choice of training
    windows holding at least `cache_tokens` ordinary tokens. The model records on the device it is on. Under
    torchrun rank 0 builds the cache while the other ranks wait, then they open it."""
    directory = activation_cache_dir(config)
    count = min(math.ceil(config.cache_tokens / data.tokens_per_window), data.train_windows.shape[0])
    chosen = torch.randperm(data.train_windows.shape[0], generator=step_generator(0, "cache-windows"))[:count]

    def build() -> ActivationCache:
        return build_activation_cache(
            directory,
            data.train_windows[chosen.sort().values],
            _recorder(data.lm, module),
            data.lm.ordinary_positions,
            shard_tokens=config.shard_tokens,
            batch_sequences=config.record_batch,
            dtype=getattr(torch, config.cache_dtype),
            description=cache_settings(config),
        )

    if distributed.is_main_process():
        with cache_lock(directory):  # another job building the same cache: wait for it, then open what it built
            cache = build()
        distributed.barrier()
        return cache
    distributed.barrier()
    return build()


def _live_sampler(data: LanguageData, module: nn.Module, record_batch: int) -> Sampler:
    """Rows of activations at ordinary positions of uniformly drawn training windows, recorded on demand."""
    record = _recorder(data.lm, module)

    def sample(size: int, generator: torch.Generator) -> Tensor:
        rows, have = [], 0
        while have < size:
            windows = draw_rows(data.train_windows, record_batch, generator).to(device_of(data.lm))
            kept = record(windows)[data.lm.ordinary_positions(windows)].to(generator.device)
            rows.append(kept)
            have += kept.shape[0]
        return torch.cat(rows)[:size]

    return sample


def hook_point(config: LanguageActivationsConfig) -> tuple[LanguageData, nn.Module]:
    """The configured model with its windows, and its module named `hook`."""
    data = language_data(config.model, config.text)
    return data, find_module(data.lm, config.hook, data.lm.name)


def _output_width(data: LanguageData, module: nn.Module) -> int:
    """The width of the module's output (the model runs on one window)."""
    return int(_recorder(data.lm, module)(data.train_windows[:1]).shape[-1])


def hook_width(config: LanguageActivationsConfig) -> tuple[str, int]:
    """The hook point's name and the width of its output."""
    data, module = hook_point(config)
    return f"{data.lm.name}/{config.hook}", _output_width(data, module)


def language_activations(
    config: LanguageActivationsConfig, seed: int = 0, device: torch.device | str = "cpu"
) -> LanguageActivations:
    """Activations of the configured model, moved to `device`, at `hook` on the training windows: cached (built or
    resumed on first use; read into memory, or streamed from disk with `stream_shards`, its epochs shuffled by
    `seed`) or recorded live."""
    data, module = hook_point(config)
    data.lm.to(device)
    if config.cache_tokens is None:
        sample = _live_sampler(data, module, config.record_batch)
        dim = _output_width(data, module)
    else:
        cache = activation_cache(config, data, module)
        if config.stream_shards is None:
            sample, dim = cache.source(config.hook).sample, cache.dim
        else:
            sample, dim = StreamedCache(cache, seed, config.stream_shards), cache.dim
    return LanguageActivations(
        data, module, ActivationSource(name=f"{data.lm.name}/{config.hook}", dim=dim, sample=sample)
    )


@dataclass(frozen=True)
class CacheResult:
    """An activation cache and the seconds spent building it (a finished cache is only opened and verified)."""

    cache: ActivationCache
    seconds: float
    model_load_seconds: float


def cache_activations(config: DictionaryRunConfig) -> CacheResult:
    """Build (or resume, or reuse) the activation cache a language-model dictionary config trains from."""
    data = config.data
    if not isinstance(data, LanguageActivationsConfig) or data.cache_tokens is None:
        raise ConfigError(
            "cache-activations needs a dictionary config with data.kind: lm_activations and data.cache_tokens set"
        )
    device = distributed.start(config.train)
    language, module = hook_point(data)
    start = time.perf_counter()
    language.lm.to(device)  # record on the run's device
    try:
        cache = activation_cache(data, language, module)
    finally:
        language.lm.to("cpu")
    return CacheResult(cache, time.perf_counter() - start, language.loaded.seconds)
