"""The documentation builds with ``mkdocs build --strict`` (broken links, bad API refs fail)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
# The pages the site must have; each must be in the nav and build to <page>/index.html.
REQUIRED_PAGES = (
    "index.md",
    "quickstart.md",
    "optimizers.md",
    "adahessian.md",
    "shampoo.md",
    "class_subspace_newton.md",
    "kfac.md",
    "sketchy_sgd.md",
    "sophia.md",
    "full_batch.md",
    "integration.md",
    "callbacks.md",
    "tensorboard.md",
    "curvature.md",
    "math.md",
    "datasets.md",
    "compatibility.md",
    "api.md",
    "benchmarks.md",
    "arena.md",
    "changelog.md",
)


def _nav_pages() -> list[str]:
    # The nav's leaves are "- Title: page.md"; no YAML parser needed (mkdocs.yml has
    # python tags elsewhere in some set-ups, which yaml.safe_load rejects).
    text = (ROOT / "mkdocs.yml").read_text()
    nav = text[text.index("\nnav:") : text.index("\nmarkdown_extensions:")]
    return re.findall(r":\s*([\w/.-]+\.md)\s*$", nav, flags=re.MULTILINE)


def _image_references(page: Path) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)\s]+)", page.read_text())


def test_nav_lists_every_required_page_and_nothing_missing():
    pages = _nav_pages()
    assert sorted(set(pages)) == sorted(pages), "a page is listed twice in the nav"
    for page in REQUIRED_PAGES:
        assert page in pages, f"{page} is not in the mkdocs.yml nav"
    for page in pages:
        assert (DOCS / page).is_file(), f"the nav names {page}, which does not exist"
    on_disk = {p.name for p in DOCS.glob("*.md")}
    assert on_disk <= set(pages), f"pages outside the nav: {on_disk - set(pages)}"


def test_tensorboard_screenshots_exist_and_are_small_pngs():
    references = _image_references(DOCS / "tensorboard.md")
    assert len(references) >= 3, "the TensorBoard guide must show the dashboards"
    for page in DOCS.glob("*.md"):
        for ref in _image_references(page):
            image = (page.parent / ref).resolve()
            assert image.is_file(), f"{page.name} shows {ref}, which does not exist"
            data = image.read_bytes()
            if image.suffix == ".png":
                assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{ref} is not a PNG"
                width = int.from_bytes(data[16:20], "big")
                assert width >= 600, f"{ref} is only {width} pixels wide"
            assert len(data) < 500_000, f"{ref} is {len(data)} bytes (keep images < 500 KB)"
    assert (DOCS / "screenshots" / "make_screenshots.py").is_file()


def test_math_page_numbers_the_class_subspace_equations():
    text = (DOCS / "math.md").read_text()
    tags = [int(n) for n in re.findall(r"\\tag\{(\d+)\}", text)]
    assert sorted(tags) == list(range(1, 19)), tags


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
    for page in _nav_pages():
        built = site / ("index.html" if page == "index.md" else page[:-3] + "/index.html")
        assert built.is_file(), f"{page} did not build to {built}"
    for page in ("optimizers", "class_subspace_newton"):
        assert "ClassSubspaceNewton" in (site / page / "index.html").read_text()
    assert "AdaHessian" in api and "ClassSubspaceNewton" in api
    tensorboard = (site / "tensorboard" / "index.html").read_text()
    for ref in _image_references(DOCS / "tensorboard.md"):
        assert (site / ref).is_file(), f"{ref} was not copied into the site"
        assert ref in tensorboard
