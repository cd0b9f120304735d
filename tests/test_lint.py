"""The code-size rules, as ruff rules (pyproject's [tool.ruff.lint]): lines within 110 columns (E501) and
functions within McCabe complexity 12 (C901). No line cap per file: files are split by responsibility."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ruff() -> list[str]:
    if shutil.which("ruff"):
        return ["ruff"]
    pytest.importorskip("ruff")
    return [sys.executable, "-m", "ruff"]


def test_ruff_is_clean_with_the_size_rules() -> None:
    done = subprocess.run(
        [*_ruff(), "check", "--output-format", "concise", "."],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


def test_the_tree_is_formatted() -> None:
    """`ruff format`: one layout for every file, so that no change carries reformatting of lines it did not
    touch."""
    done = subprocess.run(
        [*_ruff(), "format", "--check", "."], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


def test_the_size_rules_are_on() -> None:
    """A config that lost the rules would pass the check above trivially."""
    done = subprocess.run(
        [*_ruff(), "check", "--show-settings", "vlexport/pipeline.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    enabled = done.stdout.split("linter.rules.enabled", 1)[1].split("]", 1)[0]
    assert "line-too-long (E501)" in enabled and "complex-structure (C901)" in enabled
    assert "max_complexity = 12" in done.stdout
