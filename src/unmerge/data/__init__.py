"""Data sources for dictionaries: synthetic activations with known features (and, later, activation caches)."""

from unmerge.data.sparse_features import ActivationSource, sparse_feature_source

__all__ = ["ActivationSource", "sparse_feature_source"]
