"""Named presets: `configs/<name>.yaml` (SPD runs) and `configs/dictionaries/<name>.yaml`, shipped inside the
package, loaded with overrides and strict validation."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from unmerge.config.base import Override, StrictModel, apply_overrides, load_yaml, parse_overrides, validate
from unmerge.config.dictionary import DictionaryRunConfig
from unmerge.config.recipes import RECIPES
from unmerge.config.spd import RunConfig
from unmerge.errors import ConfigError

PRESET_DIR = Path(__file__).parent.parent / "configs"  # configs/ at the repository root, linked into the package
DICTIONARY_PRESET_DIR = PRESET_DIR / "dictionaries"


def preset_names() -> list[str]:
    """Names of the shipped SPD presets (`configs/<name>.yaml`, also inside the installed package).

    Example:
        >>> "tms-5-2" in unmerge.preset_names()
        True
    """
    return sorted(path.stem for path in PRESET_DIR.glob("*.yaml"))


def dictionary_preset_names() -> list[str]:
    """Names of the shipped dictionary presets (`configs/dictionaries/<name>.yaml`).

    Example:
        >>> "sparse-512-topk" in unmerge.dictionary_preset_names()
        True
    """
    return sorted(path.stem for path in DICTIONARY_PRESET_DIR.glob("*.yaml"))


def config_source(preset_or_path: str, directory: Path = PRESET_DIR) -> Path:
    """The YAML file for a preset name (in `directory`) or a path; an unknown name lists the presets."""
    path = Path(preset_or_path)
    if path.suffix in {".yaml", ".yml"} or path.exists():
        if path.is_dir():
            raise ConfigError(f"{path} is a directory; give a preset name or a YAML config file")
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        return path
    preset = directory / f"{preset_or_path}.yaml"
    if not preset.is_file():
        names = sorted(p.stem for p in directory.glob("*.yaml"))
        raise ConfigError(
            f"unknown preset {preset_or_path!r}; available presets: {', '.join(names)} (or pass a path to a YAML file)"
        )
    return preset


def _load_config(
    model_cls: type[StrictModel],
    source: Path | str,
    overrides: Iterable[str | Override],
    data: dict[str, Any] | None = None,
) -> StrictModel:
    """`data` (else the YAML file `source`) with the overrides applied, validated; errors name `source`."""
    overrides = list(overrides)
    data = apply_overrides(load_yaml(Path(source)) if data is None else data, overrides)
    described = [item if isinstance(item, str) else item.text for item in overrides]
    return validate(model_cls, data, str(source) + (f" with overrides {described}" if overrides else ""))


def load_run_config(preset_or_path: str, overrides: Iterable[str | Override] = ()) -> RunConfig:
    """Load an SPD preset or YAML file and apply `key.path=value` overrides; strict validation.

    Args:
        preset_or_path: a preset name (`preset_names()`), the path of a YAML config file, or `tms`: TMS of the
            shape the overrides `target.n_features` and `target.n_hidden` give, with C and the coefficients set
            from it (`unmerge.config.recipes.tms_recipe`).
        overrides: `key.path=value` strings (a number indexes a list: `method.sites.0.C=150`).

    Example:
        >>> config = unmerge.load_run_config("tms-5-2", ["train.steps=3000"])
        >>> config.method.sites[0].C
        40
        >>> unmerge.load_run_config("tms", ["target.n_features=20", "target.n_hidden=5"]).method.sites[0].C
        100
    """
    if preset_or_path in RECIPES:
        overrides = parse_overrides(overrides)
        preset, build = RECIPES[preset_or_path]
        recipe = build(load_yaml(config_source(preset)), overrides)
        return _load_config(RunConfig, f"the {preset_or_path} recipe", overrides, recipe)
    return _load_config(RunConfig, config_source(preset_or_path), overrides)


def load_dictionary_config(preset_or_path: str, overrides: Iterable[str | Override] = ()) -> DictionaryRunConfig:
    """Load a dictionary preset or YAML file and apply `key.path=value` overrides; strict validation.

    Args:
        preset_or_path: a dictionary preset name (`dictionary_preset_names()`) or a YAML config file's path.
        overrides: `key.path=value` strings, e.g. `method.width=1024`.

    Example:
        >>> unmerge.load_dictionary_config("sparse-512-topk", ["method.width=1024"]).method.width
        1024
    """
    return _load_config(DictionaryRunConfig, config_source(preset_or_path, DICTIONARY_PRESET_DIR), overrides)
