"""Induction heads (DESIGN.md §6, issue 24): a two-layer attention-only transformer that completes a repeated
segment, with the ground truth to check a decomposition against.

A sequence is `[BOS]`, distinct random filler tokens, a segment A of n distinct tokens (n uniform in `min_repeat`
… `max_repeat`) and A again, ending the sequence; no token but A's occurs twice, and the repeat's offset n varies,
so no positional rule predicts it. Within the repeat every next token is determined by the context: it is the
token that followed the current one at its first occurrence. The known solution has two mechanisms: a
previous-token head in layer 0 (position t attends to t − 1, writing the previous token into t) and an
induction head in layer 1 (the current token's query matches the key "my previous token is the current one",
at the position after its first occurrence, whose token the value copies). The model is trained on those
predictions only; its logits elsewhere are set to 0 (uniform), so an output divergence compares only them.

With `previous_token_share` > 0 that share of the sequences belongs to a second task, which needs the previous-token
head alone: `[BOS']` (a second BOS, id d_vocab + 1) then distinct tokens of the vocabulary's upper half, every
position from 2 on predicting the token before it (what the previous-token head writes); the induction task draws
from the lower half. Without it both heads are used at full rank on every token, and a decomposition whose causal
importance reads one position has no input on which one head is needed and the other not. With it, layer 1 is not
needed on the second task's tokens, which every site can see, so co-activation (grouping) can tell the mechanisms
apart.
Layer 1 would learn the second task itself (it can attend by position as well as layer 0 can), so such targets
use `positions: first_layer_qk`: the learned positions enter layer 0's queries and keys only, not the residual
stream, and only layer 0 can attend to the previous position. Unneeded is not idle, though: trained on the two tasks
alone, layer 1 writes more into the residual stream on the second task's tokens than on the first's (a vector the
unembedding mostly ignores), and parts of it then matter. `idle_write_coeff` adds the mean square of that write to
the training loss, so layer 1 learns to write nothing there.

Every weight is its own module (`embed`, `blocks.{0,1}.attn.{q,k,v,o}_proj`, `unembed`), so SPD decomposes the
attention of both layers by the pattern `blocks.*.attn.*`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unmerge.config import InductionConfig
from unmerge.train.rng import step_generator

EVAL_SEQUENCES = 4096


class InductionRun(NamedTuple):
    """One forward pass: logits (batch, seq, d_vocab), each layer's attention pattern (batch, heads, query, key)
    and what each layer's attention writes into the residual stream (batch, seq, d_model)."""

    logits: Tensor
    patterns: list[Tensor]
    writes: list[Tensor]


class InductionTransformer(nn.Module):
    """Token ids (batch, n_ctx) → logits (batch, n_ctx, d_vocab) at the determined predictions, 0 elsewhere."""

    def __init__(self, config: InductionConfig, n_layers: int = 2) -> None:
        super().__init__()
        d_vocab, d_model = config.d_vocab, config.d_model
        self.n_heads, self.positions = config.n_heads, config.positions
        tasks = 2 if config.previous_token_share else 1
        self.embed = nn.Embedding(d_vocab + tasks, d_model)  # ids d_vocab, d_vocab + 1: each task's BOS
        nn.init.normal_(self.embed.weight, std=d_model**-0.5)
        self.pos_embed = nn.Parameter(torch.randn(config.n_ctx, d_model) / math.sqrt(d_model))
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {
                    "attn": nn.ModuleDict(
                        {
                            name: nn.Linear(d_model, d_model, bias=False)
                            for name in ("q_proj", "k_proj", "v_proj", "o_proj")
                        }
                    )
                }
            )
            for _ in range(n_layers)
        )
        self.unembed = nn.Linear(d_model, d_vocab, bias=False)
        self.logits = nn.Identity()  # a hook point for the output
        self.idle_write_coeff = config.idle_write_coeff

    def forward(self, ids: Tensor) -> Tensor:
        return self.run(ids).logits

    def run(self, ids: Tensor) -> InductionRun:
        """The logits, each layer's attention pattern and what each layer writes into the residual stream."""
        batch, seq = ids.shape
        positions = self.pos_embed[:seq]
        x = self.embed(ids) + positions if self.positions == "residual" else self.embed(ids)
        causal = torch.ones(seq, seq, dtype=torch.bool, device=ids.device).tril()
        patterns, writes = [], []
        for layer, block in enumerate(self.blocks):
            attn = block["attn"]
            located = x + positions if self.positions == "first_layer_qk" and layer == 0 else x
            q, k, v = (
                attn[name](source).view(batch, seq, self.n_heads, -1).transpose(1, 2)
                for name, source in (("q_proj", located), ("k_proj", located), ("v_proj", x))
            )
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
            pattern = scores.masked_fill(~causal, -math.inf).softmax(-1)
            patterns.append(pattern)
            writes.append(attn["o_proj"]((pattern @ v).transpose(1, 2).reshape(batch, seq, -1)))
            x = x + writes[-1]
        predicted = determined_predictions(ids, self.unembed.out_features)[0]
        return InductionRun(self.logits(self.unembed(x) * predicted[..., None]), patterns, writes)


def induction_inputs(config: InductionConfig, batch_size: int, generator: torch.Generator) -> Tensor:
    """`[BOS] filler A A` (module docstring): the distinct tokens are the first ones of a random permutation of the
    induction vocabulary per sequence; content index k < 2·max_repeat reads token k of it, or k − n within the
    repeat. With `previous_token_share`, each sequence is instead `[BOS']` and the first 2·max_repeat tokens of a
    permutation of the upper half with that probability."""
    device = generator.device
    content = 2 * config.max_repeat
    n = torch.randint(config.min_repeat, config.max_repeat + 1, (batch_size, 1), generator=generator, device=device)
    lower = config.induction_vocabulary
    tokens = torch.rand(batch_size, lower, generator=generator, device=device).argsort(1)
    k = torch.arange(content, device=device)
    source = torch.where(k >= content - n, k - n, k)
    bos = torch.full((batch_size, 1), config.d_vocab, device=device)
    ids = torch.cat([bos, tokens.gather(1, source)], dim=1)
    if not config.previous_token_share:
        return ids
    upper = torch.rand(batch_size, config.d_vocab - lower, generator=generator, device=device).argsort(1) + lower
    second = torch.rand(batch_size, 1, generator=generator, device=device) < config.previous_token_share
    return torch.where(second, torch.cat([bos + 1, upper[:, :content]], dim=1), ids)


def repeat_positions(ids: Tensor) -> tuple[Tensor, Tensor]:
    """(predicted, earlier), both (batch, seq): `predicted` marks the positions whose next token the context
    determines (the token occurred before and is not the last), `earlier` the position of that earlier occurrence
    (0 where there is none); the answer at t is the token at `earlier[t] + 1`."""
    seq = ids.shape[1]
    before = torch.ones(seq, seq, dtype=torch.bool, device=ids.device).tril(-1)
    match = (ids[:, :, None] == ids[:, None, :]) & before
    occurred = match.any(-1)
    occurred[:, -1] = False
    return occurred, match.int().argmax(-1)


def induction_task_positions(ids: Tensor, d_vocab: int) -> Tensor:
    """(batch, seq): the positions of the induction task, every position from 1 on of a sequence that starts with
    BOS (id d_vocab)."""
    return (ids[:, :1] == d_vocab) & (torch.arange(ids.shape[1], device=ids.device) >= 1)


def previous_token_positions(ids: Tensor, d_vocab: int) -> Tensor:
    """(batch, seq): the positions of the previous-token task, every position from 2 on of a sequence that starts
    with the second BOS (id d_vocab + 1); the answer at t is the token at t − 1."""
    return (ids[:, :1] == d_vocab + 1) & (torch.arange(ids.shape[1], device=ids.device) >= 2)


def determined_predictions(ids: Tensor, d_vocab: int) -> tuple[Tensor, Tensor]:
    """(predicted, answer), both (batch, seq): the positions either task determines and their answers."""
    previous = previous_token_positions(ids, d_vocab)
    answer = torch.where(previous, ids.roll(1, 1), ids.roll(-1, 1))
    return repeat_positions(ids)[0] | previous, answer


def induction_loss(model: InductionTransformer, ids: Tensor) -> Tensor:
    """Cross-entropy of the determined predictions of both tasks, plus `idle_write_coeff` times the mean square of
    the last layer's write on the previous-token task's positions."""
    logits, _, writes = model.run(ids)
    predicted, answer = determined_predictions(ids, logits.shape[-1])
    loss = F.cross_entropy(logits[predicted], answer[predicted])
    if not model.idle_write_coeff:
        return loss
    idle = previous_token_positions(ids, logits.shape[-1])
    return loss + model.idle_write_coeff * writes[-1][idle].pow(2).mean()


def in_context_accuracy(logits: Tensor, ids: Tensor) -> float:
    """Share of the induction task's determined predictions that are right (chance: 1 / the induction vocabulary)."""
    predicted = repeat_positions(ids)[0]
    return float((logits[predicted].argmax(-1) == ids.roll(-1, 1)[predicted]).float().mean())


def previous_token_accuracy(logits: Tensor, ids: Tensor) -> float:
    """Share of the previous-token task's predictions that are right (NaN without such sequences)."""
    previous = previous_token_positions(ids, logits.shape[-1])
    return float((logits[previous].argmax(-1) == ids.roll(1, 1)[previous]).float().mean())


def copy_chance(ids: Tensor) -> float:
    """The in-context accuracy of guessing uniformly among the distinct tokens seen so far (BOS excluded): what a
    model gets that copies some earlier token without knowing which; above 1 / d_vocab."""
    predicted = repeat_positions(ids)[0]
    new = ~predicted & (torch.arange(ids.shape[1], device=ids.device) > 0)  # first occurrences (up to the last)
    return float((1 / new.cumsum(1).clamp(min=1))[predicted].mean())


def previous_token_scores(pattern: Tensor, ids: Tensor) -> Tensor:
    """Per head, the mean attention from position j to j − 1 over the positions an induction head reads (j the
    position after the earlier occurrence of each determined prediction's token): (heads,), 1 for a perfect
    previous-token head. Elsewhere the head need not attend back (the trained one does not near the end)."""
    predicted, earlier = repeat_positions(ids)
    back = pattern.diagonal(offset=-1, dim1=-2, dim2=-1)  # (batch, heads, seq − 1): j → j − 1 at index j − 1
    index = earlier.clamp(max=ids.shape[1] - 2)[:, None, :].expand(-1, pattern.shape[1], -1)
    return back.gather(-1, index).transpose(0, 1)[:, predicted].mean(-1)


def induction_scores(pattern: Tensor, ids: Tensor) -> Tensor:
    """Per head, the mean attention from each determined prediction's position t to the position after the earlier
    occurrence of its token (whose token is the answer): (heads,), 1 for a perfect induction head."""
    predicted, earlier = repeat_positions(ids)
    index = (earlier + 1).clamp(max=ids.shape[1] - 1)[:, None, :, None].expand(-1, pattern.shape[1], -1, 1)
    attended = pattern.gather(-1, index)[..., 0]  # (batch, heads, seq)
    return attended.transpose(0, 1)[:, predicted].mean(-1)


@torch.no_grad()
def induction_metrics(model: InductionTransformer, config: InductionConfig) -> dict[str, float]:
    """In-context accuracy, loss, and the layers' previous-token and induction scores per head on a fixed sample;
    with the previous-token task, its accuracy and the root mean square of the last layer's write on each task's
    determined predictions (what `idle_write_coeff` drives to 0 on the previous-token task)."""
    ids = induction_inputs(config, EVAL_SEQUENCES, step_generator(config.train.seed, "induction-eval"))
    logits, patterns, writes = model.run(ids)
    predicted = repeat_positions(ids)[0]
    results = {
        "in_context_accuracy": in_context_accuracy(logits, ids),
        "in_context_loss": float(F.cross_entropy(logits[predicted], ids.roll(-1, 1)[predicted])),
        "chance_accuracy": 1 / config.induction_vocabulary,
    }
    if config.previous_token_share:
        results["previous_token_accuracy"] = previous_token_accuracy(logits, ids)
        for task, positions in (
            ("induction_task", predicted),
            ("previous_token_task", previous_token_positions(ids, config.d_vocab)),
        ):
            results[f"last_layer_write_rms/{task}"] = float(writes[-1][positions].pow(2).mean().sqrt())
    for layer, pattern in enumerate(patterns):
        for head, score in enumerate(previous_token_scores(pattern, ids).tolist()):
            results[f"previous_token_score/{layer}.{head}"] = score
        for head, score in enumerate(induction_scores(pattern, ids).tolist()):
            results[f"induction_score/{layer}.{head}"] = score
    return results
