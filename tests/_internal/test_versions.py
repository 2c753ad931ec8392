"""The declared Keras / TensorFlow floors: one set of numbers, installed, and enforced at import."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import keras
import pytest
import tensorflow as tf
from packaging.requirements import Requirement

from keras_curv._internal import versions
from keras_curv._internal.versions import check_versions, release

ROOT = Path(__file__).resolve().parents[2]
FLOOR = {"keras_version": "3.10.0", "tensorflow_version": "2.16.1", "backend": "tensorflow"}


def _declared(name: str) -> dict[str, str]:
    tomllib = pytest.importorskip("tomllib")
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (requirement,) = [Requirement(d) for d in dependencies if Requirement(d).name == name]
    return {spec.operator: spec.version for spec in requirement.specifier}


def test_pyproject_declares_the_checked_floors():
    assert _declared("keras") == {">=": "3.10", "<": versions.KERAS_CEILING}
    assert release(_declared("tensorflow")[">="]) == release(versions.TENSORFLOW_FLOOR)
    assert release(versions.KERAS_FLOOR) == (3, 10, 0)


def test_compatibility_page_states_the_floors():
    page = (ROOT / "docs" / "compatibility.md").read_text()
    assert "keras>=3.10,<4" in page and f"tensorflow>={versions.TENSORFLOW_FLOOR}" in page
    assert "compatibility.md" in (ROOT / "mkdocs.yml").read_text()


def test_installed_releases_satisfy_the_floors():
    assert release(keras.__version__) >= release(versions.KERAS_FLOOR)
    assert release(keras.__version__) < release(versions.KERAS_CEILING)
    assert release(tf.__version__) >= release(versions.TENSORFLOW_FLOOR)
    check_versions()


@pytest.mark.parametrize("name", sorted(versions.REQUIRED_APIS))
def test_required_api_exists(name):
    head, *path = name.split(".")
    value = {"keras": keras, "tf": tf}[head]
    for part in path:
        assert hasattr(value, part), (
            f"{name} ({versions.REQUIRED_APIS[name]}) is missing from keras {keras.__version__} / "
            f"tensorflow {tf.__version__}: keras-curv relies on it."
        )
        value = getattr(value, part)


@pytest.mark.parametrize(
    ("version", "expected"),
    [("2.16.0rc1", (2, 16, 0)), ("3.10", (3, 10)), ("2.22.0.dev20261201", (2, 22, 0))],
)
def test_release_reads_the_numeric_part(version, expected):
    assert release(version) == expected


def test_release_rejects_an_unreadable_version():
    with pytest.raises(ValueError, match="release number"):
        release("nightly")


@pytest.mark.parametrize(
    "accepted",
    [
        FLOOR,
        {**FLOOR, "keras_version": "3.15.1", "tensorflow_version": "2.21.0"},
        {**FLOOR, "keras_version": "3.99", "tensorflow_version": "2.30.0rc0"},
    ],
)
def test_supported_releases_pass(accepted):
    check_versions(**accepted)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"keras_version": "3.9.2"}, r"add_optimizer_variables.*keras 3\.9\.2"),
        ({"keras_version": "3.3.3"}, r"pip install -U 'keras>=3\.10\.0,<4'"),
        ({"keras_version": "4.0.0"}, r"keras>=3\.10\.0,<4 .*keras 4\.0\.0"),
        ({"tensorflow_version": "2.15.1"}, r"tensorflow>=2\.16\.1 .*tensorflow 2\.15\.1"),
        ({"backend": "jax"}, r"TensorFlow backend.*'jax'.*KERAS_BACKEND=tensorflow"),
    ],
)
def test_unsupported_releases_raise_a_clear_import_error(override, message):
    with pytest.raises(ImportError, match=message):
        check_versions(**{**FLOOR, **override})


def test_importing_keras_curv_on_an_old_keras_names_the_fix():
    # A fresh process whose Keras reports 3.9.2 runs the real `import keras_curv` path.
    code = "import keras; keras.__version__ = '3.9.2'; import keras_curv"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode != 0
    last_line = done.stderr.strip().splitlines()[-1]
    assert last_line.startswith("ImportError: keras-curv needs keras>=3.10.0,<4"), done.stderr
    assert "keras 3.9.2 is installed" in last_line
