"""The layering contracts of pyproject.toml ([tool.importlinter]) hold, and would catch a breach."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"


def _lint_imports(src: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    tool = Path(sys.executable).with_name("lint-imports")
    assert tool.exists(), "import-linter is a dev dependency: pip install -e '.[dev]'"
    env = {**os.environ, "PYTHONPATH": str(src)}
    return subprocess.run([str(tool), "--no-cache", "--config", str(ROOT / "pyproject.toml")],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_the_layering_contracts_hold(tmp_path: Path) -> None:
    proc = _lint_imports(SRC, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert " broken" in proc.stdout and "0 broken" in proc.stdout
    assert "BROKEN" not in proc.stdout


def test_an_upward_import_is_caught(tmp_path: Path) -> None:
    """A copy of the package where the control plane imports the worker fails the check."""
    copy = tmp_path / "src"
    shutil.copytree(SRC / "forkyard", copy / "forkyard",
                    ignore=shutil.ignore_patterns("__pycache__"))
    records = copy / "forkyard" / "control" / "_records.py"
    records.write_text(records.read_text() + "\nimport forkyard.worker  # noqa\n")
    proc = _lint_imports(copy, tmp_path)
    assert proc.returncode != 0
    assert "the control plane does not import the worker BROKEN" in proc.stdout
    assert "forkyard.control._records -> forkyard.worker" in proc.stdout
