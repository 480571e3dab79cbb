"""A small GPT-style language model trained here on the corpus: the SPD target for language (issue #4).

Every projection (q, k, v, o, MLP in/out, unembedding) is its own `nn.Linear`, called once per forward pass, so
SPD can decompose any of them by pattern (`blocks.*.attn.*_proj`, `blocks.*.mlp.fc_in`, `unembed`). Training runs
through the one training loop; next-token losses count a prediction only when neither the token nor its successor
is special (judged by id, never by position), so BOS and padding teach the model nothing.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from unmerge.config import SmallLMConfig
from unmerge.errors import CheckpointError
from unmerge.io import save_tensors_atomic
from unmerge.metrics import language
from unmerge.train.loop import ModelTraining, train
from unmerge.train.rng import derive_seed, draw_rows

MODEL_FILE = "model.safetensors"
INIT_STD = 0.02


class Attention(nn.Module):
    """Causal multi-head self-attention with separate q, k, v, o projections."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.o_proj = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        batch, seq, width = x.shape
        q, k, v = (
            proj(x).view(batch, seq, self.n_heads, -1).transpose(1, 2)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        mixed = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(mixed.transpose(1, 2).reshape(batch, seq, width))


class MLP(nn.Module):
    """`fc_out(GELU(fc_in(x)))`."""

    def __init__(self, d_model: int, d_mlp: int) -> None:
        super().__init__()
        self.fc_in = nn.Linear(d_model, d_mlp)
        self.fc_out = nn.Linear(d_mlp, d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc_out(F.gelu(self.fc_in(x)))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: `x + attn(ln1(x))`, then `+ mlp(ln2(·))`."""

    def __init__(self, config: SmallLMConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(config.d_model)
        self.attn = Attention(config.d_model, config.n_heads)
        self.ln2 = nn.LayerNorm(config.d_model)
        self.mlp = MLP(config.d_model, config.d_mlp)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class SmallLM(nn.Module):
    """Token ids (batch, seq) int64 → logits (batch, seq, vocab_size); GPT-2 style initialisation from the global
    RNG (seed it, or fork it, around construction)."""

    def __init__(self, config: SmallLMConfig, vocab_size: int, max_seq_len: int) -> None:
        super().__init__()
        self.max_seq_len = max_seq_len
        self.embed = nn.Embedding(vocab_size, config.d_model)
        self.pos_embed = nn.Embedding(max_seq_len, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.ln_final = nn.LayerNorm(config.d_model)
        self.unembed = nn.Linear(config.d_model, vocab_size, bias=False)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=INIT_STD)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for block in self.blocks:  # residual writes shrink with depth so the stream's variance stays bounded
            for projection in (block.attn.o_proj, block.mlp.fc_out):
                nn.init.normal_(projection.weight, std=INIT_STD / math.sqrt(2 * config.n_layers))

    def forward(self, ids: Tensor) -> Tensor:
        if ids.shape[1] > self.max_seq_len:
            raise ValueError(f"windows of {ids.shape[1]} tokens exceed the model's max_seq_len {self.max_seq_len}")
        x = self.embed(ids) + self.pos_embed(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.unembed(self.ln_final(x))


def next_token_nll(model: nn.Module, ids: Tensor, ignore_ids: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """Summed next-token cross-entropy (nats) over the counted predictions of `ids` (batch, seq), and their count:
    the prediction at t counts only when tokens t and t+1 are both ordinary (not in `ignore_ids`)."""
    ordinary = ~torch.isin(ids, torch.tensor(ignore_ids, dtype=ids.dtype, device=ids.device))
    return language.next_token_nll(model(ids), ids, language.counted_predictions(ordinary))


def next_token_loss(model: nn.Module, ids: Tensor, ignore_ids: tuple[int, ...]) -> Tensor:
    """Mean next-token cross-entropy (nats per counted prediction); 0 when nothing counts."""
    total, count = next_token_nll(model, ids, ignore_ids)
    return total / count.clamp(min=1)


@torch.no_grad()
def heldout_cross_entropy(model: nn.Module, windows: Tensor, ignore_ids: tuple[int, ...], batch_size: int) -> float:
    """Next-token cross-entropy over all of `windows`, in batches, weighting every counted prediction equally."""
    sums = [next_token_nll(model, chunk, ignore_ids) for chunk in windows.split(batch_size)]
    total, count = (torch.stack(values).sum() for values in zip(*sums, strict=True))
    return float(total / count.clamp(min=1))


def train_small_lm(
    config: SmallLMConfig, train_windows: Tensor, heldout_windows: Tensor, vocab_size: int, ignore_ids: tuple[int, ...]
) -> tuple[SmallLM, dict[str, float]]:
    """Train a seeded `SmallLM` on rows of `train_windows` (batch_size rows drawn with replacement per step).

    Returns the frozen model (eval mode, no gradients) and {"train_loss": last logged training loss, "heldout_ce":
    cross-entropy on all of `heldout_windows`, "parameters": parameter count}."""
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    with torch.random.fork_rng():
        torch.manual_seed(derive_seed(config.train.seed, "small-lm-init"))
        model = SmallLM(config, vocab_size, train_windows.shape[1])
    result = train(
        ModelTraining(model, lambda m, batch: next_token_loss(m, batch, ignore_ids)),
        lambda batch_size, generator: draw_rows(train_windows, batch_size, generator),
        config.train,
        description=f"train small LM ({config.n_layers} layers, d_model {config.d_model})",
    )
    model.eval().requires_grad_(False)
    return model, {
        "train_loss": result.last_terms["loss"],
        "heldout_ce": heldout_cross_entropy(model, heldout_windows, ignore_ids, config.train.batch_size),
        "parameters": float(sum(p.numel() for p in model.parameters())),
    }


def save_small_lm(model: SmallLM, directory: Path) -> None:
    """Write the weights atomically to `directory/model.safetensors`."""
    directory.mkdir(parents=True, exist_ok=True)
    save_tensors_atomic(directory / MODEL_FILE, model.state_dict())


def load_small_lm(config: SmallLMConfig, vocab_size: int, max_seq_len: int, directory: Path) -> SmallLM:
    """Load a saved `SmallLM` (eval mode, no gradients); a missing or damaged file is a `CheckpointError`."""
    path = directory / MODEL_FILE
    with torch.random.fork_rng():  # the initialisation is overwritten: leave the caller's RNG untouched
        model = SmallLM(config, vocab_size, max_seq_len)
    try:
        model.load_state_dict(load_file(str(path)), strict=True)
    except Exception as error:
        raise CheckpointError(
            f"cannot load small LM weights from {path}: {error}; delete {directory} to retrain it"
        ) from None
    return model.eval().requires_grad_(False)
