"""The documentation builds with ``mkdocs build --strict`` (broken links, bad API refs fail)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _mkdocs_command() -> list[str] | None:
    # Prefer the mkdocs next to this interpreter, so a venv's own copy is used.
    local = Path(sys.executable).with_name("mkdocs")
    if local.exists():
        return [str(local)]
    found = shutil.which("mkdocs")
    return [found] if found else None


@pytest.mark.slow
def test_mkdocs_build_strict(tmp_path):
    command = _mkdocs_command()
    if command is None:
        pytest.skip("mkdocs is not installed; install the docs extra: pip install -e '.[docs]'")
    pytest.importorskip("mkdocstrings_handlers.python", reason="mkdocstrings-python is missing")
    env = dict(os.environ, PYTHONPATH=str(ROOT), NO_MKDOCS_2_WARNING="1")
    site = tmp_path / "site"
    result = subprocess.run(
        [*command, "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    api = (site / "api" / "index.html").read_text()
    for name in ("HessianOperator", "GGNOperator", "load_dataset", "DatasetUnavailableError"):
        assert name in api, f"{name} is missing from the rendered API reference"
    assert (site / "curvature" / "index.html").exists()
