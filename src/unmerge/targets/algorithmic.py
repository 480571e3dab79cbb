"""Algorithmic toy transformers with known mechanisms (DESIGN.md §6): max-of-K and modular addition.

One model serves both: token and learned position embeddings, one layer of multi-head attention with separate
q, k, v, o projections (no biases), an optional ReLU MLP, no LayerNorm, an unembedding; the logits are read at the
last position only (the last position attends to all; the earlier positions' outputs do not matter). Every
weight is its own module (`embed`, `attn.q_proj`, …, `mlp.fc_in`, `unembed`), so SPD decomposes any of
them by name, the embedding as a token-indexed site.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unmerge.config import MaxOfKConfig, ModularAdditionConfig
from unmerge.train.rng import draw_rows, step_generator

EVAL_CHUNK = 65_536


class OneLayerTransformer(nn.Module):
    """Token ids (batch, n_ctx) → logits at the last position (batch, d_vocab_out)."""

    def __init__(
        self,
        d_vocab: int,
        d_vocab_out: int,
        n_ctx: int,
        d_model: int,
        n_heads: int,
        d_mlp: int | None,
        embed_std: float = 1.0,
    ) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        self.n_heads = n_heads
        self.embed = nn.Embedding(d_vocab, d_model)
        nn.init.normal_(self.embed.weight, std=embed_std)
        self.pos_embed = nn.Parameter(torch.randn(n_ctx, d_model) / math.sqrt(d_model))
        self.attn = nn.ModuleDict(
            {name: nn.Linear(d_model, d_model, bias=False) for name in ("q_proj", "k_proj", "v_proj", "o_proj")}
        )
        self.mlp = (
            None
            if d_mlp is None
            else nn.ModuleDict({"fc_in": nn.Linear(d_model, d_mlp), "fc_out": nn.Linear(d_mlp, d_model)})
        )
        self.unembed = nn.Linear(d_model, d_vocab_out, bias=False)
        self.logits = nn.Identity()  # a hook point for the output: the last position's logits

    def forward(self, ids: Tensor) -> Tensor:
        return self.logits(self._last_logits(ids, every_position=True))

    def last_position_logits(self, ids: Tensor) -> Tensor:
        """The same logits as `forward`, with only the last position's query, attention output, MLP and
        unembedding computed (keys and values still at every position): about half the work, for training and
        scoring the target. `forward` runs every site at every position, as SPD's per-position CI needs."""
        return self._last_logits(ids, every_position=False)

    def _last_logits(self, ids: Tensor, every_position: bool) -> Tensor:
        x = self.embed(ids) + self.pos_embed[: ids.shape[1]]
        batch, seq, width = x.shape
        queries = x if every_position else x[:, -1:]
        q = self.attn["q_proj"](queries).view(batch, queries.shape[1], self.n_heads, -1).transpose(1, 2)
        k, v = (self.attn[name](x).view(batch, seq, self.n_heads, -1).transpose(1, 2) for name in ("k_proj", "v_proj"))
        mixed = F.scaled_dot_product_attention(q, k, v, is_causal=every_position)
        resid = queries + self.attn["o_proj"](mixed.transpose(1, 2).reshape(batch, queries.shape[1], width))
        if self.mlp is not None:
            resid = resid + self.mlp["fc_out"](F.relu(self.mlp["fc_in"](resid)))
        return self.unembed(resid)[:, -1]


def max_of_k_model(config: MaxOfKConfig) -> OneLayerTransformer:
    return OneLayerTransformer(config.d_vocab, config.d_vocab, config.n_ctx, config.d_model, config.n_heads, None)


def max_of_k_inputs(config: MaxOfKConfig, batch_size: int, generator: torch.Generator) -> Tensor:
    """Uniform random tokens."""
    return torch.randint(config.d_vocab, (batch_size, config.n_ctx), generator=generator, device=generator.device)


def max_of_k_loss(model: nn.Module, ids: Tensor) -> Tensor:
    return F.cross_entropy(model(ids), ids.max(1).values)


@torch.no_grad()
def max_of_k_accuracy(model: nn.Module, config: MaxOfKConfig) -> dict[str, float]:
    """Accuracy on every one of the d_vocab^n_ctx inputs, enumerated in chunks."""
    total = config.d_vocab**config.n_ctx
    powers = config.d_vocab ** torch.arange(config.n_ctx - 1, -1, -1)
    correct = 0
    for start in range(0, total, EVAL_CHUNK):
        index = torch.arange(start, min(start + EVAL_CHUNK, total))
        ids = (index[:, None] // powers) % config.d_vocab
        correct += int((model(ids).argmax(1) == ids.max(1).values).sum())
    return {"accuracy_all_inputs": correct / total, "inputs": float(total)}


def modular_addition_model(config: ModularAdditionConfig) -> OneLayerTransformer:
    """Token embeddings at 1/√d_model (at nn.Embedding's scale 1 the memorising solution is large-norm from the
    start); with `init: nanda` every other weight is drawn as Nanda et al. draw it too (BENCHMARKS.md: the test
    loss falls faster than with PyTorch's defaults)."""
    model = OneLayerTransformer(
        config.p + 1, config.p, 3, config.d_model, config.n_heads, config.d_mlp, embed_std=config.d_model**-0.5
    )
    if config.init == "nanda":
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if name == "unembed.weight":
                    parameter.normal_(0.0, (config.p + 1) ** -0.5)
                elif parameter.dim() == 2:
                    parameter.normal_(0.0, config.d_model**-0.5)
                else:
                    parameter.zero_()
    return model


def modular_addition_split(config: ModularAdditionConfig) -> tuple[Tensor, Tensor]:
    """(training, test) inputs `a b =` of all p² pairs, split by a seeded permutation (built once per setting:
    full-batch training asks for the training set every step)."""
    return _split(config.p, config.train_fraction, config.train.seed)


@functools.lru_cache(maxsize=4)
def _split(p: int, train_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    pairs = torch.stack([a.flatten(), b.flatten(), torch.full((p**2,), p)], dim=1)
    order = torch.randperm(p**2, generator=step_generator(seed, "modular-addition-split"))
    n_train = round(train_fraction * p**2)
    return pairs[order[:n_train]], pairs[order[n_train:]]


def modular_addition_inputs(config: ModularAdditionConfig, batch_size: int, generator: torch.Generator) -> Tensor:
    """The whole training set when `batch_size` covers it (full-batch training), else a uniform draw from it."""
    train, _ = modular_addition_split(config)
    if batch_size >= train.shape[0]:
        return train.to(generator.device)
    return draw_rows(train, batch_size, generator)


def modular_addition_labels(ids: Tensor, p: int) -> Tensor:
    return (ids[:, 0] + ids[:, 1]) % p


def modular_addition_loss(model: OneLayerTransformer, ids: Tensor) -> Tensor:
    """Cross-entropy in float64, as Nanda et al. compute it: once the training set is memorised the loss falls
    below float32's resolution of the softmax, and the rounded gradients stall the slow drift to the general
    solution that grokking is."""
    logits = model.last_position_logits(ids).double()
    return F.cross_entropy(logits, modular_addition_labels(ids, model.unembed.out_features))


@torch.no_grad()
def modular_addition_accuracy(model: OneLayerTransformer, config: ModularAdditionConfig) -> dict[str, float]:
    """Accuracy and loss on the training pairs and on the held-out pairs."""
    results = {}
    for name, ids in zip(("train", "test"), modular_addition_split(config), strict=True):
        logits = model.last_position_logits(ids)
        labels = modular_addition_labels(ids, config.p)
        results[f"{name}_accuracy"] = float((logits.argmax(1) == labels).float().mean())
        results[f"{name}_loss"] = float(F.cross_entropy(logits, labels))
    return results


def key_frequencies(embedding: Tensor, p: int, share: float = 0.9) -> list[tuple[int, float]]:
    """The frequencies k (1 … p // 2) of the embedding's discrete Fourier transform over the p number tokens that
    together hold `share` of its (non-constant) power, largest first, each with its fraction of the power."""
    spectrum = torch.fft.rfft(embedding[:p].double(), dim=0).abs().square().sum(1)[1:]
    fractions = spectrum / spectrum.sum()
    order = torch.argsort(fractions, descending=True)
    kept = int((torch.cumsum(fractions[order], 0) < share).sum()) + 1
    return [(int(k) + 1, float(fractions[k])) for k in order[:kept]]
