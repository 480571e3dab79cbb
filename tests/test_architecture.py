"""The layout of ARCHITECTURE.md holds: imports run one way (import-linter's layers contract in pyproject.toml,
which this suite runs and shows catching a violation), modules stay short, and imports sit at the top of their
module except for optional dependencies."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

PROJECT = Path(__file__).parent.parent
PACKAGE = PROJECT / "src" / "unmerge"
MAX_LINES = 400
OPTIONAL_PACKAGES = {"transformers", "tokenizers"}  # the `hf` extra: imported where a language model is loaded


def _lint_imports(config: Path, python_path: Path) -> subprocess.CompletedProcess:
    """Run import-linter with `config` on the `unmerge` package found at `python_path`."""
    command = [
        sys.executable,
        "-c",
        "import sys; from importlinter.cli import lint_imports; "
        f"sys.exit(lint_imports(config_filename={str(config)!r}, no_cache=True, no_logo=True))",
    ]
    environment = {**os.environ, "PYTHONPATH": str(python_path)}
    return subprocess.run(command, capture_output=True, text=True, cwd=python_path, env=environment, check=False)


def test_imports_follow_the_layers() -> None:
    result = _lint_imports(PROJECT / "pyproject.toml", PROJECT / "src")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


def test_the_layers_contract_catches_an_import_against_the_flow(tmp_path: Path) -> None:
    shutil.copytree(PACKAGE, tmp_path / "unmerge", ignore=shutil.ignore_patterns("__pycache__", "configs"))
    shutil.copy(PROJECT / "pyproject.toml", tmp_path / "pyproject.toml")
    metrics = tmp_path / "unmerge" / "metrics" / "clustering.py"
    metrics.write_text(metrics.read_text() + "\nfrom unmerge.report import html  # a metric importing a report\n")
    result = _lint_imports(tmp_path / "pyproject.toml", tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "unmerge.metrics.clustering -> unmerge.report.html" in result.stdout


def test_no_module_is_over_400_lines() -> None:
    long = {
        str(path.relative_to(PACKAGE)): n
        for path in PACKAGE.rglob("*.py")
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}


def test_imports_inside_functions_are_only_of_optional_dependencies() -> None:
    found = []
    for path in PACKAGE.rglob("*.py"):
        for function in ast.walk(ast.parse(path.read_text())):
            if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(function):
                if isinstance(node, ast.Import | ast.ImportFrom):
                    names = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                    found += [
                        f"{path.relative_to(PACKAGE)}: {name}"
                        for name in names
                        if name.split(".")[0] not in OPTIONAL_PACKAGES
                    ]
    assert found == []
