"""Learning rate as a pure function of the step (no scheduler state to checkpoint)."""

from __future__ import annotations

import math

from unmerge.config import OptimConfig


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
    floor = optim.final_lr_fraction
    if optim.schedule == "quarter_cosine":
        return optim.lr * (floor + (1 - floor) * math.cos(0.5 * math.pi * progress))
    if optim.schedule == "linear":
        return optim.lr * (floor + (1 - floor) * (1 - progress))
    return optim.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))
