"""The package's layering, as `make test` enforces it with import-linter (pyproject.toml).

The contract must pass on the tree as it is, and must fail — naming the offending import — when a
core module imports ``noisyseg.storage``: that proves the contract is wired to the real package and
not vacuous.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint(tree: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", str(tree / "pyproject.toml")],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _copy_tree(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    shutil.copytree(
        ROOT / "noisyseg", tree / "noisyseg", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")
    return tree


def test_contracts_hold_on_the_package(tmp_path: Path) -> None:
    result = _lint(_copy_tree(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "BROKEN" not in result.stdout


def test_core_importing_storage_breaks_the_contract(tmp_path: Path) -> None:
    tree = _copy_tree(tmp_path)
    metrics = tree / "noisyseg" / "metrics.py"
    metrics.write_text(metrics.read_text() + "\nimport noisyseg.storage  # injected by the test\n")
    result = _lint(tree)
    assert result.returncode != 0
    assert "noisyseg.metrics is not allowed to import noisyseg.storage" in result.stdout


def test_library_importing_a_cli_module_breaks_the_contract(tmp_path: Path) -> None:
    tree = _copy_tree(tmp_path)
    patches = tree / "noisyseg" / "storage" / "patches.py"
    patches.write_text(patches.read_text() + "\nimport noisyseg.storage.commands  # injected\n")
    result = _lint(tree)
    assert result.returncode != 0
    assert "is not allowed to import noisyseg.storage.commands" in result.stdout
