"""What a method needs from a target: a frozen model, a batch sampler, and (for toys) the ground truth."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

BatchSampler = Callable[[int, torch.Generator], Tensor]
Divergence = Callable[[Tensor, Tensor], Tensor]  # (masked output, target output) → a scalar to minimise


@dataclass(frozen=True)
class GroundTruth:
    """The known mechanisms of a toy target, named by site.

    * `feature_sites`: sites whose subcomponents should each serve one input feature, grouped (a group may span
      layers, e.g. every `W_in` of a residual MLP); one-hot inputs should give an identity CI pattern over a group.
    * `dense_sites`: groups that implement one dense mechanism of the given rank (all its subcomponents co-active).
    * `feature_directions`: for sites whose weight stores one direction per feature, `(site, axis)` where axis
      says whether features index the weight's input columns ("in") or output rows ("out"); used by MMCS/ML2R.
    """

    n_features: int
    feature_sites: dict[str, list[str]] = field(default_factory=dict)
    dense_sites: dict[str, tuple[list[str], int]] = field(default_factory=dict)
    feature_directions: dict[str, str] = field(default_factory=dict)
    one_hot_value: float = 0.75


@dataclass
class Target:
    """A trained model to decompose, with its data distribution and, when it has its own, its output divergence
    (otherwise the method's config names one)."""

    name: str
    model: nn.Module
    sample_inputs: BatchSampler
    ground_truth: GroundTruth | None = None
    divergence: Divergence | None = None

    def __post_init__(self) -> None:
        self.model.eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)

    def one_hot_inputs(self, device: torch.device | str = "cpu") -> Tensor:
        """One input per feature with only that feature active (value from the ground truth), on `device`."""
        if self.ground_truth is None:
            raise ValueError(f"target {self.name} has no ground truth, so no one-hot inputs")
        truth = self.ground_truth
        return torch.eye(truth.n_features, device=device) * truth.one_hot_value


def sparse_uniform(
    batch_size: int, n_features: int, probability: float, low: float, high: float, generator: torch.Generator
) -> Tensor:
    """Each feature independently active with `probability`, its value drawn from U[low, high], else 0."""
    device = generator.device
    active = torch.rand(batch_size, n_features, generator=generator, device=device) < probability
    values = torch.rand(batch_size, n_features, generator=generator, device=device) * (high - low) + low
    return torch.where(active, values, torch.zeros((), device=device))
