"""Write `docs/api.md`, the Python API reference, from the docstrings and signatures of what `unmerge` exports.

    .venv/bin/python docs/generate_api.py

`tests/test_api_docs.py` fails when the file is not what this writes, so the reference stays in step with the
code; it also checks that every exported function and class, and every public method, has a docstring with an
example (and its arguments, where it takes any).
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel

import unmerge

API_FILE = Path(__file__).with_name("api.md")
HEADER = """# Python API reference

Generated from the docstrings by `.venv/bin/python docs/generate_api.py` (a test keeps it in step). Everything
here is importable from `unmerge`; the command line is a shell over `unmerge.api`, one function per command.
"""


def _signature(name: str, obj: Any) -> str:
    try:
        signature = str(inspect.signature(obj))
    except (TypeError, ValueError):
        return name
    return name + re.sub(r" at 0x[0-9a-f]+", "", signature)


def _doc(obj: Any) -> str:
    """The docstring as a text block (its Args / Example layout is indentation, which markdown would reflow)."""
    return f"```text\n{inspect.cleandoc(obj.__doc__ or '')}\n```"


def public_members(cls: type) -> list[tuple[str, Any]]:
    """A class's own public methods, class methods and properties, in definition order."""
    members = []
    for name, value in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(value, (classmethod, staticmethod)):
            value = value.__func__
        if inspect.isfunction(value) or isinstance(value, property):
            members.append((name, value))
    return members


def _fields_table(cls: type[BaseModel]) -> str:
    rows = ["| field | type | default | what |", "|---|---|---|---|"]
    for name, field in cls.model_fields.items():
        annotation = str(field.annotation).replace("typing.", "").replace("|", "\\|")
        default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
        rows.append(f"| `{name}` | `{annotation}` | `{default}` | {field.description or ''} |")
    return "\n".join(rows)


def _class_section(name: str, cls: type) -> list[str]:
    lines = [f"## class `{name}`", "", _doc(cls), ""]
    if issubclass(cls, BaseModel):
        return [*lines, _fields_table(cls), ""]
    for member_name, member in public_members(cls):
        if isinstance(member, property):
            lines += [f"### `{name}.{member_name}` (property)", "", _doc(member.fget), ""]
        else:
            shown = _signature(member_name, member).replace("(self, ", "(").replace("(self)", "()")
            shown = shown.replace("(cls, ", "(").replace("(cls)", "()")
            lines += [f"### `{name}.{shown}`", "", _doc(member), ""]
    return lines


def render() -> str:
    """The whole reference, in the order of `unmerge.__all__` (functions first, then classes)."""
    exported = [(name, getattr(unmerge, name)) for name in unmerge.__all__]
    lines = [HEADER]
    for name, obj in exported:
        if inspect.isfunction(obj):
            lines += [f"## `unmerge.{_signature(name, obj)}`", "", _doc(obj), ""]
    for name, obj in exported:
        if inspect.isclass(obj):
            lines += _class_section(name, obj)
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    API_FILE.write_text(render())
    print(f"wrote {API_FILE}")
