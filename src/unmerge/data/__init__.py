"""Data sources only: synthetic activations with known features, the text corpus, and the on-disk activation
cache. Activations of models are the targets' (`unmerge.targets.sources`)."""

from unmerge.data.hierarchy import hierarchy_source
from unmerge.data.source import ActivationSource
from unmerge.data.sparse_features import sparse_feature_source

__all__ = ["ActivationSource", "hierarchy_source", "sparse_feature_source"]
