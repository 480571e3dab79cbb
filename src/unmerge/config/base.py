"""The base of every config: a strict, frozen pydantic model; YAML in and out; `key.path=value` overrides parsed
once into typed values; validation errors turned into one readable `ConfigError` naming the source."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from unmerge.errors import ConfigError

Probability = Annotated[float, Field(gt=0.0, le=1.0)]
NonNegativeFloat = Annotated[float, Field(ge=0.0)]
Seed = Annotated[int, Field(ge=0, lt=2**63)]  # what torch's generators take
DIGEST_CONTEXT = "digest"  # serialisation context of `StrictModel.digest`


def _takes(annotation: Any, kinds: tuple[Any, ...]) -> bool:
    """Whether a field's type is one of `kinds`, or a union or alias holding one."""
    return annotation in kinds or any(_takes(arg, kinds) for arg in get_args(annotation))


def _admits_bool(annotation: Any) -> bool:
    """Whether a field's type takes a boolean (bool itself, Any, or a union or alias holding one)."""
    return _takes(annotation, (bool, Any))


class StrictModel(BaseModel):
    """Base of every config: unknown keys are errors, instances are immutable, numbers are finite, and a boolean
    is not a number (pydantic would read `train.steps=true` as 1)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key, value in data.items():
                field = cls.model_fields.get(key) if isinstance(key, str) else None
                if isinstance(value, bool) and field is not None and not _admits_bool(field.annotation):
                    wanted = "a number" if _takes(field.annotation, (int, float)) else "a value of its type"
                    raise FieldValueError(key, f"a boolean ({value}) is not valid here; give {wanted}")
        return data

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


class FieldValueError(ValueError):
    """A model validator's complaint about one of the model's own keys (reported at `section.key`)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def other_commands_config(data: Any, present: str, absent: str, message: str) -> Any:
    """Before validation: a mapping with section `present` and without `absent` is another command's config; say
    so (`message`) instead of listing every key that does not fit."""
    if isinstance(data, dict) and present in data and absent not in data:
        raise ValueError(message)
    return data


def _path(loc: tuple, data: Any) -> tuple[str, str]:
    """A validation error's location as the dotted key the user wrote, and the tag of the union member it lies in
    (e.g. `activation=topk`, or a target's `kind`; empty if none): tags are left out of the key."""
    parts: list[str] = []
    tags: list[str] = []
    node = data
    for part in loc:
        if isinstance(node, dict) and part not in node and (part == node.get("kind") or "=" in str(part)):
            tags.append(str(part) if "=" in str(part) else f"kind={part}")
            continue
        parts.append(str(part))
        node = node[part] if isinstance(node, (dict, list)) and _holds(node, part) else None
    return ".".join(parts) or "<root>", tags[-1] if tags else ""


def _holds(node: dict | list, part: Any) -> bool:
    return part in node if isinstance(node, dict) else isinstance(part, int) and 0 <= part < len(node)


def _format_validation_error(error: ValidationError, source: str, data: Any) -> str:
    lines = [f"invalid config ({source}):"]
    for item in error.errors():
        where, member = _path(item["loc"], data)
        complaint = item.get("ctx", {}).get("error")
        if isinstance(complaint, FieldValueError):
            lines.append(f"  {where.removeprefix('<root>')}{'.' if item['loc'] else ''}{complaint.key}: {complaint}")
        elif item["type"] == "extra_forbidden" and member:
            choice = member.split("=")[0]
            lines.append(f"  {where}: unknown key for {member} (set the {choice} that has it, or check the spelling)")
        elif item["type"] == "extra_forbidden":
            lines.append(f"  {where}: unknown key (check the spelling; `unmerge decompose --help` lists presets)")
        else:
            given = item.get("input")
            shown = "" if isinstance(given, (dict, list)) else f" (got {given!r})"  # a section: the message names it
            lines.append(f"  {where}: {item['msg'].removeprefix('Value error, ')}{shown}")
    return "\n".join(lines)


def validate(model_cls: type[StrictModel], data: Any, source: str) -> Any:
    """Build `model_cls` from plain data, turning validation failures into one readable `ConfigError`."""
    try:
        return model_cls.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_format_validation_error(error, source, data)) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error (YAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(text: str) -> Any:
    """YAML text as plain data, refusing duplicate keys."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: builds plain data only


def load_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping, with errors that name the file and say what to fix."""
    try:
        data = read_yaml(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"{path} is a directory; give a YAML config file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a UTF-8 text file; a config is YAML text") from None
    except OSError as error:
        raise ConfigError(f"cannot read {path}: {error.strerror}") from None
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
        return Override(key, read_yaml(raw), text)
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
