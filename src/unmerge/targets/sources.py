"""Every activation source a dictionary run's `data` section can describe, behind one function."""

from __future__ import annotations

from unmerge.config import HierarchyConfig, LanguageActivationsConfig, OwnActivationsConfig, TargetActivationsConfig
from unmerge.config.data import DictionaryDataConfig
from unmerge.data import hierarchy_source, sparse_feature_source
from unmerge.data.source import ActivationSource
from unmerge.errors import ConfigError
from unmerge.targets.activations import target_activation_source
from unmerge.targets.language_activations import language_activations
from unmerge.targets.toys import cached_target


def activation_source(config: DictionaryDataConfig) -> ActivationSource:
    """The activation source a dictionary run's `data` section describes (toy targets are trained on first use;
    a language model's activation cache is built, or resumed, on first use). Activations passed from Python
    cannot be rebuilt here."""
    if isinstance(config, OwnActivationsConfig):
        raise ConfigError(
            "this dictionary was trained on activations passed from Python (data.kind: own_activations), which "
            "only Python holds: load it with unmerge.Dictionary.load(RUN_DIR) and train it with "
            "unmerge.train_dictionary(...)"
        )
    if isinstance(config, LanguageActivationsConfig):
        return language_activations(config).source
    if isinstance(config, HierarchyConfig):
        return hierarchy_source(config)
    if isinstance(config, TargetActivationsConfig):
        return target_activation_source(cached_target(config.target), config.hook, config.transcoder)
    return sparse_feature_source(config)
