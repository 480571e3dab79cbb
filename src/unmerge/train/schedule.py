"""Learning rate as a pure function of the step (no scheduler state to checkpoint)."""

from __future__ import annotations

import math
from collections.abc import Callable

from unmerge.config import OptimConfig

DECAYS: dict[str, Callable[[float], float]] = {  # the share of the decay left at progress t ∈ [0, 1]
    "cosine": lambda t: 0.5 * (1 + math.cos(math.pi * t)),
    "quarter_cosine": lambda t: math.cos(0.5 * math.pi * t),
    "linear": lambda t: 1 - t,
}


def learning_rate(optim: OptimConfig, step: int, total_steps: int) -> float:
    """Linear warm-up to `optim.lr`, then constant or a decay to `final_lr_fraction · lr` at `total_steps`: `cosine`
    is half a period, `½(1 + cos πt)`; `quarter_cosine` is a quarter, `cos(πt/2)`, what the APD reference code calls
    cosine (it keeps more of the peak late: 0.71 of it halfway, against 0.5); `linear` is `1 − t`, how the APD
    reference trains its TMS targets."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return optim.lr
    decay_steps = max(total_steps - optim.warmup_steps, 1)
    progress = min((step - optim.warmup_steps) / decay_steps, 1.0)
    remaining = DECAYS[optim.schedule](progress)
    return optim.lr * (optim.final_lr_fraction + (1 - optim.final_lr_fraction) * remaining)
