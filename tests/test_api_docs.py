"""The public Python surface is documented (issue 25): every exported function and class has a docstring with an
example that names its arguments, every public method names its own, and `docs/api.md` is what
`docs/generate_api.py` writes from them."""

from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path

import pytest

import unmerge

ROOT = Path(__file__).resolve().parents[1]


def _generator():
    spec = importlib.util.spec_from_file_location("generate_api", ROOT / "docs" / "generate_api.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _parameters(function) -> list[str]:
    return [
        name
        for name, parameter in inspect.signature(function).parameters.items()
        if name not in ("self", "cls") and parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)
    ]


EXPORTED = [(name, getattr(unmerge, name)) for name in unmerge.__all__]


@pytest.mark.parametrize(("name", "obj"), EXPORTED, ids=[name for name, _ in EXPORTED])
def test_every_export_has_a_docstring_with_an_example_and_its_arguments(name, obj) -> None:
    doc = inspect.getdoc(obj) or ""
    assert "Example" in doc, f"unmerge.{name} has no example in its docstring"
    if inspect.isfunction(obj):
        missing = [p for p in _parameters(obj) if p not in doc]
        assert not missing, f"unmerge.{name}'s docstring does not describe {missing}"


def test_every_public_method_describes_its_arguments() -> None:
    generator = _generator()
    undocumented = []
    for name, obj in EXPORTED:
        if not inspect.isclass(obj) or obj.__module__.startswith("unmerge.config"):
            continue
        for member_name, member in generator.public_members(obj):
            function = member.fget if isinstance(member, property) else member
            doc = inspect.getdoc(function) or ""
            missing = [] if isinstance(member, property) else [p for p in _parameters(function) if p not in doc]
            if not doc or missing:
                undocumented.append(f"{name}.{member_name} {missing or '(no docstring)'}")
    assert not undocumented


def test_the_api_reference_is_in_step_with_the_docstrings() -> None:
    generator = _generator()
    assert generator.API_FILE.read_text() == generator.render(), (
        "docs/api.md is out of date: run .venv/bin/python docs/generate_api.py"
    )


def test_the_package_says_it_is_typed() -> None:
    assert (Path(unmerge.__file__).parent / "py.typed").is_file()
