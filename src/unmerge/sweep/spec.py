"""Sweeps of dictionary runs over a grid of config values, their results table and the Pareto front.

A sweep is a base dictionary config (a preset or YAML file), a grid (dotted config key → list of values, expanded
as a Cartesian product) and fixed overrides. Each grid point becomes one ordinary run directory,
`DIR/runs/<name>`, with a name made from the grid values (`penalty=l1,coeff=0.03,seed=0`). As YAML::

    base: sparse-512-relu-l1            # a dictionary preset name, or a path (relative to this file)
    grid:
      method.penalty.name: [l1, cauchy]
      method.penalty.coeff: [0.03, 0.1, 0.3]
      method.width: [512, 1024]
      train.seed: [0, 1]
    overrides: {train.steps: 5000, train.threads: 1}
    group_by: [method.penalty.name, method.width]   # optional; see `SweepSpec.group_keys`

This module holds the spec and its expansion into grid points; `table` the results table, `figures` the Pareto
figures and `runner` the training of every point.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import Field, field_validator, model_validator

from unmerge.config import Override, StrictModel
from unmerge.errors import ConfigError

STRENGTH_KEYS = ("method.penalty.coeff", "method.k", "method.l0_coeff")
"""Keys that trade sparsity against reconstruction: they move a run along its group's Pareto front."""

_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_UNSAFE = re.compile(r"[^A-Za-z0-9.+_-]+")
_GENERIC_LEAVES = ("name", "kind")
_EXPONENT_ONLY = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")  # 1e-3: a float that PyYAML reads as text


def yaml_text(value: Any) -> str:
    """`value` as one line of YAML that `yaml.safe_load` reads back as the same value (for `key=value` overrides)."""
    return yaml.safe_dump(value, default_flow_style=True, width=1_000_000).removesuffix("...\n").strip()


def _is_seed(key: str) -> bool:
    return key.rsplit(".", 1)[-1] == "seed"


class SweepSpec(StrictModel):
    """A grid of dictionary runs: `base` config, `grid` values (Cartesian product) and fixed `overrides`."""

    base: str = Field(min_length=1, description="dictionary preset name or path to a dictionary YAML config")
    grid: dict[str, list[Any]] = Field(
        min_length=1, description="dotted config key → the values it takes; runs are the Cartesian product"
    )
    overrides: dict[str, Any] = Field(default_factory=dict, description="dotted config key → value, for every run")
    group_by: list[str] | None = Field(
        None, description="grid keys whose values colour the figures (default: all but strengths and seeds)"
    )

    @field_validator("grid", "overrides", mode="before")
    @classmethod
    def _exponent_numbers_are_floats(cls, value: Any) -> Any:
        """`1e-3` is a string to PyYAML (YAML 1.1 wants `1.0e-3`); read it as the number everyone means."""

        def number(item: Any) -> Any:
            return float(item) if isinstance(item, str) and _EXPONENT_ONLY.fullmatch(item) else item

        if not isinstance(value, dict):
            return value
        return {
            key: [number(v) for v in values] if isinstance(values, list) else number(values)
            for key, values in value.items()
        }

    @model_validator(mode="after")
    def _well_formed_grid(self) -> SweepSpec:
        for key, values in self.grid.items():
            if not _KEY.fullmatch(key):
                raise ValueError(f"grid key {key!r} must be a dotted config key such as method.penalty.coeff")
            if not values:
                raise ValueError(f"grid key {key!r} has no values; give at least one")
            texts = [yaml_text(value) for value in values]
            repeated = sorted({text for text in texts if texts.count(text) > 1})
            if repeated:
                raise ValueError(f"grid key {key!r} lists {', '.join(repeated)} more than once")
        for key in self.overrides:
            if not _KEY.fullmatch(key):
                raise ValueError(f"override key {key!r} must be a dotted config key such as train.steps")
        both = sorted(set(self.grid) & set(self.overrides))
        if both:
            raise ValueError(f"{', '.join(both)} is both a grid key and a fixed override; keep one of them")
        unknown = sorted(set(self.group_by or ()) - set(self.grid))
        if unknown:
            raise ValueError(f"group_by names {', '.join(unknown)}, which is not a grid key")
        return self

    def group_keys(self) -> list[str]:
        """Grid keys whose combinations are drawn as separate groups (colours, one Pareto front each): `group_by`,
        or every grid key except the strengths (`STRENGTH_KEYS`) and seeds, whose runs share their group."""
        if self.group_by is not None:
            return list(self.group_by)
        return [key for key in self.grid if key not in STRENGTH_KEYS and not _is_seed(key)]

    def fixed_overrides(self) -> list[Override]:
        """The fixed overrides, typed, for `unmerge.config.apply_overrides`."""
        return [Override.of(key, value) for key, value in self.overrides.items()]


@dataclass(frozen=True)
class SweepPoint:
    """One grid point: its run name, the grid values that define it, and those values as overrides (applied after
    the spec's fixed overrides)."""

    name: str
    settings: dict[str, Any]
    overrides: list[Override]


def short_labels(keys: Sequence[str]) -> dict[str, str]:
    """The shortest dotted suffix of each key that tells it apart from the others (`method.penalty.coeff` →
    `coeff`); a generic leaf (`name`, `kind`) is named by its section instead (`method.penalty.name` → `penalty`)."""
    trimmed = {
        key: key.split(".")[:-1] if key.split(".")[-1] in _GENERIC_LEAVES and "." in key else key.split(".")
        for key in keys
    }
    labels = {}
    for key, parts in trimmed.items():
        for n in range(1, len(parts) + 1):
            label = ".".join(parts[-n:])
            if all(other == key or ".".join(o[-n:]) != label for other, o in trimmed.items()):
                break
        labels[key] = label
    return labels


def format_value(value: Any) -> str:
    """A grid value as short text for run names, legends and tables (`0.03`, `l1`, `true`)."""
    if isinstance(value, bool) or value is None:
        return yaml_text(value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, int | str):
        return str(value)
    return yaml_text(value)


def expand(spec: SweepSpec) -> list[SweepPoint]:
    """The grid's points in product order (the last grid key varies fastest), each with a distinct run name."""
    labels = short_labels(list(spec.grid))
    points, seen = [], set()
    for index, values in enumerate(itertools.product(*spec.grid.values())):
        settings = dict(zip(spec.grid, values, strict=True))
        name = ",".join(f"{labels[key]}={_UNSAFE.sub('-', format_value(value))}" for key, value in settings.items())
        if name in seen:  # two values that only differ in characters a file name cannot hold
            name = f"{name},{index}"
        seen.add(name)
        points.append(SweepPoint(name, settings, [Override.of(key, value) for key, value in settings.items()]))
    return points


def parse_grid_argument(text: str) -> tuple[str, list[Any]]:
    """`key=v1,v2,v3` (each value read as YAML) or `key=[v1, v2]` (a YAML list) → (key, values)."""
    key, sep, raw = text.partition("=")
    if not sep or not key or not raw:
        raise ConfigError(f"--grid {text!r} must look like key.path=value1,value2, e.g. method.penalty.coeff=0.03,0.1")
    try:
        parsed = yaml.safe_load(raw)
        values = parsed if isinstance(parsed, list) else [yaml.safe_load(item) for item in raw.split(",")]
    except yaml.YAMLError as error:
        raise ConfigError(f"--grid {text!r}: the values are not valid YAML ({error})") from None
    return key, values
