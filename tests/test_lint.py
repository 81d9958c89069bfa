"""Lint and types, as part of the suite (so the README's test command and CI run them):
ruff's pyflakes, pycodestyle and import-order rules and its formatter, mypy over the package
(settings in pyproject.toml)."""

import pathlib
import shutil
import subprocess
import sys

CHECKOUT = pathlib.Path(__file__).resolve().parent.parent


def test_ruff_finds_nothing():
    ruff = shutil.which("ruff")
    assert ruff, "ruff is not installed: pip install -e '.[test]'"
    done = subprocess.run(
        [ruff, "check", "l4router", "tests", "bench", "twisted"],
        cwd=CHECKOUT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_ruff_format_changes_nothing():
    ruff = shutil.which("ruff")
    assert ruff, "ruff is not installed: pip install -e '.[test]'"
    done = subprocess.run(
        [ruff, "format", "--check", "--diff", "l4router", "tests", "bench", "twisted"],
        cwd=CHECKOUT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, "run `ruff format`:\n" + done.stdout + done.stderr


def test_mypy_finds_nothing():
    done = subprocess.run(
        [sys.executable, "-m", "mypy"], cwd=CHECKOUT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr
