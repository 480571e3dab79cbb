"""The base of every config: a strict, frozen pydantic model; YAML in and out; `key.path=value` overrides parsed
once into typed values; validation errors turned into one readable `ConfigError` naming the source."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from unmerge.errors import ConfigError

Probability = Annotated[float, Field(gt=0.0, le=1.0)]
NonNegativeFloat = Annotated[float, Field(ge=0.0)]
DIGEST_CONTEXT = "digest"  # serialisation context of `StrictModel.digest`


class StrictModel(BaseModel):
    """Base of every config: unknown keys are errors and instances are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def digest(self) -> str:
        """Short stable hash of the config's content (used to key caches of trained targets)."""
        data = self.model_dump(mode="json", exclude_none=True, context=DIGEST_CONTEXT)
        text = json.dumps(data, sort_keys=True)  # unset options add nothing
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    @classmethod
    def upgrade_saved(cls, data: dict[str, Any]) -> dict[str, Any]:
        """A config saved by an earlier version, in this version's layout (unchanged unless a subclass moved keys).
        Only saved run directories go through this; configs a user writes are validated as they are."""
        return data


def _path(loc: tuple) -> tuple[str, str]:
    """A validation error's location as a dotted key, and the tag of the union member it lies in (e.g.
    `activation=topk`; empty if none): tags are left out of the key."""
    parts = [str(part) for part in loc if not (isinstance(part, str) and "=" in part)]
    tags = [part for part in loc if isinstance(part, str) and "=" in part]
    return ".".join(parts) or "<root>", tags[-1] if tags else ""


def _format_validation_error(error: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for item in error.errors():
        where, member = _path(item["loc"])
        if item["type"] == "extra_forbidden" and member:
            choice = member.split("=")[0]
            lines.append(f"  {where}: unknown key for {member} (set the {choice} that has it, or check the spelling)")
        elif item["type"] == "extra_forbidden":
            lines.append(f"  {where}: unknown key (check the spelling; `unmerge decompose --help` lists presets)")
        else:
            lines.append(f"  {where}: {item['msg']} (got {item.get('input')!r})")
    return "\n".join(lines)


def validate(model_cls: type[StrictModel], data: Any, source: str) -> Any:
    """Build `model_cls` from plain data, turning validation failures into one readable `ConfigError`."""
    try:
        return model_cls.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_format_validation_error(error, source)) from None


def load_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping, with errors that name the file."""
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys, not {type(data).__name__}")
    return data


def save_yaml(config: StrictModel, path: Path) -> None:
    """Write the fully resolved config (defaults included) as YAML."""
    path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True))


@dataclass(frozen=True)
class Override:
    """One `key.path=value` change to a config: the dotted key, the typed value, and how the user wrote it."""

    key: str
    value: Any
    text: str

    @classmethod
    def of(cls, key: str, value: Any) -> Override:
        """An override from a typed value (no text to parse)."""
        return cls(key, value, f"{key}={value}")


def parse_override(text: str) -> Override:
    """`key.path=value` (value read as YAML) → an `Override`."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {text!r} must look like key.path=value, e.g. train.steps=2000")
    try:
        return Override(key, yaml.safe_load(raw), text)
    except yaml.YAMLError as error:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({error})") from None


def parse_overrides(overrides: Iterable[str | Override]) -> list[Override]:
    """Overrides as typed values: `key=value` strings are parsed once here; `Override`s pass through."""
    return [item if isinstance(item, Override) else parse_override(item) for item in overrides]


def apply_overrides(data: dict[str, Any], overrides: Iterable[str | Override]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides in order to nested plain data; returns a new dict. A number indexes a list,
    so `method.sites.0.C=150` changes the first site's C and keeps the others."""
    result = json.loads(json.dumps(data))
    for override in parse_overrides(overrides):
        node: Any = result
        *parents, leaf = override.key.split(".")
        for part in parents:
            node = _override_child(node, part, override.text)
        if isinstance(node, list):
            node[_list_index(node, leaf, override.text)] = override.value
        else:
            node[leaf] = override.value
    return result


def _override_child(node: Any, part: str, override: str) -> Any:
    """The section or list item `part` of `node`, which an override descends into."""
    if isinstance(node, list):
        child = node[_list_index(node, part, override)]
    else:
        child = node.get(part) if isinstance(node, dict) else None
    if not isinstance(child, (dict, list)):
        raise ConfigError(f"override {override!r}: {part!r} is not a config section or list")
    return child


def _list_index(items: list[Any], part: str, override: str) -> int:
    """`part` as an index into `items`, or an error naming the valid range."""
    if not part.isdigit() or int(part) >= len(items):
        raise ConfigError(
            f"override {override!r}: {part!r} must index the list, which has {len(items)} item(s): "
            f"use 0 to {len(items) - 1}, or give the whole list"
        )
    return int(part)
