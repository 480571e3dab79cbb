"""Data sources for dictionaries: synthetic activations with known features, activations of toy targets, and
activations of language models (cached on disk or recorded live)."""

from unmerge.config import HierarchyConfig, LanguageActivationsConfig, SparseFeaturesConfig, TargetActivationsConfig
from unmerge.data.hierarchy import hierarchy_source
from unmerge.data.language_activations import language_activation_source
from unmerge.data.sparse_features import ActivationSource, sparse_feature_source
from unmerge.data.target_activations import target_activation_source
from unmerge.targets.toys import cached_target


def activation_source(
    config: SparseFeaturesConfig | HierarchyConfig | TargetActivationsConfig | LanguageActivationsConfig,
) -> ActivationSource:
    """The activation source a dictionary run's `data` section describes (toy targets are trained on first use;
    a language model's activation cache is built, or resumed, on first use)."""
    if isinstance(config, LanguageActivationsConfig):
        return language_activation_source(config)
    if isinstance(config, HierarchyConfig):
        return hierarchy_source(config)
    if isinstance(config, TargetActivationsConfig):
        return target_activation_source(cached_target(config.target), config.hook, config.transcoder)
    return sparse_feature_source(config)


__all__ = ["ActivationSource", "activation_source", "hierarchy_source", "sparse_feature_source",
           "target_activation_source"]
