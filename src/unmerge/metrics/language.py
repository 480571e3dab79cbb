"""Language-model losses as pure functions (DESIGN.md §7): which predictions count, next-token cross-entropy, KL
to the original, and the fraction of an ablation's loss that a splice recovers.

Positions are the model's own: a window's position t predicts token t + 1. A prediction counts only when both the
token at t and the token at t + 1 are ordinary (not special: BOS, EOS, CLS, SEP, padding, judged by id). CE is in
nats per counted prediction; KL is KL(original ‖ spliced), averaged over the same predictions.

`loss recovered = (L_ablated − L_spliced) / (L_ablated − L_original)`: 1 means splicing costs nothing, 0 means it
is as bad as the ablation; a denominator below 1e-6 gives NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

MIN_DENOMINATOR = 1e-6


def loss_recovered(ablated: float, spliced: float, original: float) -> float:
    """Fraction of the ablation's loss increase that the splice avoids (NaN when the ablation costs nothing)."""
    denominator = ablated - original
    if abs(denominator) < MIN_DENOMINATOR:
        return float("nan")
    return (ablated - spliced) / denominator


def counted_predictions(ordinary: Tensor) -> Tensor:
    """(batch, seq − 1): the prediction at t counts when tokens t and t + 1 are both ordinary."""
    return ordinary[:, :-1] & ordinary[:, 1:]


def next_token_nll(logits: Tensor, ids: Tensor, counted: Tensor) -> tuple[Tensor, Tensor]:
    """Summed next-token cross-entropy (nats) of `logits` (batch, seq, vocab) over the `counted` predictions
    (batch, seq − 1), and their count. Uncounted targets get the ignore index, so no logits-sized copy is made."""
    targets = F.pad(torch.where(counted, ids[:, 1:], -100), (0, 1), value=-100)
    total = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
    return total, counted.sum()


def ce_and_kl(clean_log_probs: Tensor, logits: Tensor, ids: Tensor, counted: Tensor) -> tuple[float, float]:
    """Summed CE of `logits` on the next tokens and summed KL(clean ‖ logits), over counted predictions."""
    log_probs = F.log_softmax(logits[:, :-1][counted].float(), dim=-1)
    targets = ids[:, 1:][counted]
    ce = -log_probs.gather(1, targets[:, None]).sum()
    kl = (clean_log_probs.exp() * (clean_log_probs - log_probs)).sum()
    return float(ce), float(kl)
