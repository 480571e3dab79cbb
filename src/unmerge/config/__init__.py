"""Typed, strict, frozen configs for targets, methods and training, loadable from YAML (DESIGN.md §3).

Unknown keys are errors; values are validated on construction. A run is described by one `RunConfig` (SPD) or
`DictionaryRunConfig` (target or data + method + training), saved as `config.yaml` in its run directory.
"""

from unmerge.config.base import (
    NonNegativeFloat,
    Override,
    Probability,
    StrictModel,
    apply_overrides,
    load_yaml,
    parse_override,
    parse_overrides,
    save_yaml,
    validate,
    yaml_dump,
)
from unmerge.config.dictionary import (
    Activation,
    DictionaryConfig,
    DictionaryRunConfig,
    HierarchyConfig,
    LanguageActivationsConfig,
    PenaltyConfig,
    SparseFeaturesConfig,
    TargetActivationsConfig,
)
from unmerge.config.presets import (
    DICTIONARY_PRESET_DIR,
    PRESET_DIR,
    config_source,
    dictionary_preset_names,
    load_dictionary_config,
    load_run_config,
    preset_names,
)
from unmerge.config.spd import RunConfig, SiteConfig, SPDConfig
from unmerge.config.targets import (
    LanguageModelConfig,
    LanguageTargetConfig,
    MaxOfKConfig,
    ModularAdditionConfig,
    ResidMLPConfig,
    SmallLMConfig,
    TargetConfig,
    TextConfig,
    TMSConfig,
)
from unmerge.config.training import OptimConfig, TrainConfig

__all__ = [
    "DICTIONARY_PRESET_DIR",
    "PRESET_DIR",
    "Activation",
    "DictionaryConfig",
    "DictionaryRunConfig",
    "HierarchyConfig",
    "LanguageActivationsConfig",
    "LanguageModelConfig",
    "LanguageTargetConfig",
    "MaxOfKConfig",
    "ModularAdditionConfig",
    "NonNegativeFloat",
    "OptimConfig",
    "Override",
    "PenaltyConfig",
    "Probability",
    "ResidMLPConfig",
    "RunConfig",
    "SPDConfig",
    "SiteConfig",
    "SmallLMConfig",
    "SparseFeaturesConfig",
    "StrictModel",
    "TMSConfig",
    "TargetActivationsConfig",
    "TargetConfig",
    "TextConfig",
    "TrainConfig",
    "apply_overrides",
    "config_source",
    "dictionary_preset_names",
    "load_dictionary_config",
    "load_run_config",
    "load_yaml",
    "parse_override",
    "parse_overrides",
    "preset_names",
    "save_yaml",
    "validate",
    "yaml_dump",
]
