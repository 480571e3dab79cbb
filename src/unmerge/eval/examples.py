"""Top-activating examples: every unit's activation (a dictionary latent's, or an SPD subcomponent's causal
importance) at every position of held-out text, and each unit's most activating positions, for reports."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class LatentExamples:
    """Unit activations on held-out text, for showing top-activating snippets: the windows' token texts,
    `activations` (windows, seq, width) with 0 at special tokens, `top` (k, width): each unit's k most activating
    positions as flat indices into windows × seq, strongest first, and which positions are ordinary."""

    tokens: list[list[str]]
    activations: Tensor
    top: Tensor
    ordinary: Tensor  # (windows, seq) bool: the positions that hold ordinary tokens
    ablation_effect: Tensor | None = None  # (width,): first-order rise of the spliced loss with the unit zeroed
    effect_name: str = "ΔCE"  # what ablation_effect measures, for the report's column
    names: list[str] | None = None  # a label per unit (SPD's `site/c`); None: the latent's index
    threshold: float = 0.0  # a unit counts as active above this (0 for latents, e.g. 0.1 for causal importance)


def top_positions(activations: Tensor, per_unit: int) -> Tensor:
    """(k, width): each unit's `per_unit` most activating positions of `activations` (windows, seq, width), as
    flat indices into windows × seq, strongest first."""
    flat = activations.reshape(-1, activations.shape[-1])
    return flat.topk(min(per_unit, flat.shape[0]), dim=0).indices
