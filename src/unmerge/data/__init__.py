"""Data sources for dictionaries: synthetic activations with known features, activations of toy targets (and,
later, activation caches)."""

from unmerge.config import HierarchyConfig, SparseFeaturesConfig, TargetActivationsConfig
from unmerge.data.hierarchy import hierarchy_source
from unmerge.data.sparse_features import ActivationSource, sparse_feature_source
from unmerge.data.target_activations import target_activation_source
from unmerge.targets.toys import cached_target


def activation_source(config: SparseFeaturesConfig | HierarchyConfig | TargetActivationsConfig) -> ActivationSource:
    """The activation source a dictionary run's `data` section describes (toy targets are trained on first use)."""
    if isinstance(config, HierarchyConfig):
        return hierarchy_source(config)
    if isinstance(config, TargetActivationsConfig):
        return target_activation_source(cached_target(config.target), config.hook, config.transcoder)
    return sparse_feature_source(config)


__all__ = ["ActivationSource", "activation_source", "hierarchy_source", "sparse_feature_source",
           "target_activation_source"]
