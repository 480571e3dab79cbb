"""Feature splitting across dictionaries of growing width on the same activations (DESIGN.md §8).

For a smaller ("parent") and a larger ("child") dictionary:

* **children** of parent latent p: the child latents whose decoder direction has cosine > `threshold` with p's;
* **reconstruction** of the parent by its children: the parent's activation predicted from what its children
  write, projected on the parent's decoder, `f̂_p = (Σ_{c ∈ children(p)} f_c d_c) · d_p / ‖d_p‖²`, scored by R²
  against the parent's own activation `f_p` on the same inputs (1: the children carry exactly what p did);
* **shared splitting directions**: each child's split vector, its unit decoder direction minus its projection on
  the parent's, `d̂_c − (d̂_c · d̂_p) d̂_p` normalised, taken over parents with at least two children, is fitted by
  a dictionary with one active atom per vector (spherical k-means). An atom is shared when split vectors of at
  least two different parents use it at cosine above 0.5: the same direction splitting different features.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from unmerge.errors import ConfigError
from unmerge.sae.dictionary import Dictionary

SHARED_COSINE = 0.5


@dataclass(frozen=True)
class Splits:
    """Children of every parent latent and how well they reconstruct it."""

    cosine: Tensor  # (parent width, child width) decoder cosines
    children: list[list[int]]
    reconstruction_r2: Tensor  # (parent width,), NaN for parents without children or never active
    parent_frequency: Tensor  # (parent width,) fraction of inputs on which the parent latent fires

    def table(self) -> list[dict[str, object]]:
        """One row per parent latent: children, their cosines, R²."""
        return [
            {
                "parent": p,
                "frequency": float(self.parent_frequency[p]),
                "children": kids,
                "cosines": [round(float(self.cosine[p, c]), 3) for c in kids],
                "r2": float(self.reconstruction_r2[p]),
            }
            for p, kids in enumerate(self.children)
        ]


@dataclass(frozen=True)
class SharedDirections:
    """Split vectors, the atoms fitted to them, and which parents use each atom."""

    split_vectors: Tensor  # (n, d)
    split_parents: Tensor  # (n,) the parent latent each split vector belongs to
    atoms: Tensor  # (k, d) unit directions
    assignment: Tensor  # (n,) atom of each split vector
    assignment_cosine: Tensor  # (n,)

    def atom_parents(self) -> list[list[int]]:
        """Distinct parents whose split vectors use each atom at cosine above 0.5."""
        close = self.assignment_cosine > SHARED_COSINE
        return [
            sorted(set(self.split_parents[close & (self.assignment == a)].tolist())) for a in range(self.atoms.shape[0])
        ]

    def shared_fraction(self) -> float:
        """Fraction of split vectors on an atom shared by at least two parents (at cosine above 0.5)."""
        shared = torch.tensor([len(parents) >= 2 for parents in self.atom_parents()], dtype=torch.bool)
        if self.assignment.numel() == 0:
            return float("nan")
        return float((shared[self.assignment] & (self.assignment_cosine > SHARED_COSINE)).float().mean())


def unit_decoder(dictionary: Dictionary) -> Tensor:
    """Decoder directions, one unit row per latent."""
    return F.normalize(dictionary.W_d.detach(), dim=1)


@torch.no_grad()
def feature_splits(parent: Dictionary, child: Dictionary, activations: Tensor, threshold: float = 0.5) -> Splits:
    """Children of each parent latent (decoder cosine > threshold) and the R² of its reconstruction from them, on
    `activations` (rows of the data both dictionaries encode)."""
    if parent.W_d.shape[1] != child.W_d.shape[1]:
        raise ValueError(
            f"the dictionaries decode to different sizes ({parent.W_d.shape[1]} and "
            f"{child.W_d.shape[1]}); feature splitting compares dictionaries of the same activations"
        )
    cosine = unit_decoder(parent) @ unit_decoder(child).T
    is_child = cosine > threshold
    f_parent, f_child = parent(activations)[1], child(activations)[1]
    parent_decoder = parent.W_d.detach()
    weights = (child.W_d.detach() @ parent_decoder.T) / parent_decoder.square().sum(1)  # (child, parent)
    predicted = f_child @ (weights * is_child.T)
    residual = (f_parent - predicted).square().sum(0)
    variance = (f_parent - f_parent.mean(0)).square().sum(0)
    r2 = torch.where(is_child.any(1) & (variance > 0), 1 - residual / variance, torch.nan)
    children = [torch.nonzero(row).flatten().tolist() for row in is_child]
    return Splits(cosine, children, r2, (f_parent > 0).float().mean(0))


def _spherical_kmeans(vectors: Tensor, k: int, iterations: int, generator: torch.Generator) -> Tensor:
    """k unit atoms: each vector assigned to its most similar atom, each atom the normalised mean of its vectors."""
    atoms = vectors[torch.randperm(vectors.shape[0], generator=generator)[:k]].clone()
    for _ in range(iterations):
        assignment = (vectors @ atoms.T).argmax(1)
        sums = torch.zeros_like(atoms).index_add_(0, assignment, vectors)
        empty = sums.norm(dim=1) == 0
        atoms = torch.where(empty[:, None], atoms, F.normalize(sums, dim=1))
    return atoms


@torch.no_grad()
def shared_split_directions(
    parent: Dictionary,
    child: Dictionary,
    splits: Splits,
    n_atoms: int | None = None,
    iterations: int = 50,
    seed: int = 0,
) -> SharedDirections:
    """Fit atoms to the split vectors of parents with at least two children (module docstring); by default one
    atom per two split vectors."""
    parent_dirs, child_dirs = unit_decoder(parent), unit_decoder(child)
    pairs = [(p, c) for p, kids in enumerate(splits.children) if len(kids) >= 2 for c in kids]
    dim = parent_dirs.shape[1]
    if not pairs:
        empty = torch.zeros(0, dim)
        return SharedDirections(
            empty, torch.zeros(0, dtype=torch.long), empty, torch.zeros(0, dtype=torch.long), torch.zeros(0)
        )
    p_index = torch.tensor([p for p, _ in pairs])
    c_index = torch.tensor([c for _, c in pairs])
    d_p, d_c = parent_dirs[p_index], child_dirs[c_index]
    split = F.normalize(d_c - (d_c * d_p).sum(1, keepdim=True) * d_p, dim=1)
    k = min(len(pairs), n_atoms or max(1, len(pairs) // 2))
    atoms = _spherical_kmeans(split, k, iterations, torch.Generator().manual_seed(seed))
    similarity = split @ atoms.T
    cosine, assignment = similarity.max(1)
    return SharedDirections(split, p_index, atoms, assignment, cosine)


def truth_names(true_features: Tensor, parents: Tensor | None) -> list[str]:
    """`f<i>` for each true feature, with its role in a hierarchy: `(parent)`, `(child of f<j>)` or nothing."""
    has_children = set() if parents is None else set(parents[parents >= 0].tolist())
    names = []
    for i in range(true_features.shape[0]):
        parent = -1 if parents is None else int(parents[i])
        role = f" (child of f{parent})" if parent >= 0 else " (parent)" if i in has_children else ""
        names.append(f"f{i}{role}")
    return names


def best_matches(dictionary: Dictionary, true_features: Tensor, names: list[str]) -> list[str]:
    """Per latent, the true feature its decoder direction is closest to, with the cosine: `f3 (parent) 0.99`."""
    cosine, index = (unit_decoder(dictionary) @ F.normalize(true_features, dim=1).T).max(1)
    return [f"{names[i]} {c:.2f}" for i, c in zip(index.tolist(), cosine.tolist(), strict=True)]


@dataclass(frozen=True)
class SplitPair:
    """A smaller dictionary against the next larger one: their names, the splits and the shared-direction fit."""

    small: str
    large: str
    splits: Splits
    shared: SharedDirections


def splitting_pairs(
    dictionaries: list[tuple[str, Dictionary]], activations: Tensor, threshold: float = 0.5
) -> list[SplitPair]:
    """Each dictionary (named, smallest first) against the next larger one on the same `activations`."""
    if activations.shape[0] == 0:
        raise ConfigError("feature splitting needs sampled inputs; give --inputs 1 or more")
    widths = [dictionary.W_d.shape[0] for _, dictionary in dictionaries]
    if any(small >= large for small, large in zip(widths, widths[1:], strict=False)):
        raise ConfigError(
            f"feature splitting compares dictionaries of growing width; these have widths {widths}: give runs of "
            "different widths, each once"
        )
    pairs = []
    for (small_name, small), (large_name, large) in zip(dictionaries, dictionaries[1:], strict=False):
        splits = feature_splits(small, large, activations, threshold)
        pairs.append(SplitPair(small_name, large_name, splits, shared_split_directions(small, large, splits)))
    return pairs
