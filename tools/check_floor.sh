#!/usr/bin/env bash
# Check that keras-curv works at its declared dependency floors.
#
# Builds a fresh virtual environment in which every runtime dependency of
# pyproject.toml sits exactly at its `>=` floor (keras, tensorflow, numpy, scipy,
# matplotlib, tensorboard; pip fills in their own dependencies), installs this
# checkout into it, and runs a smoke subset of the tests that covers both
# optimizers through `fit`, save/load and resume, the Keras privates relied on,
# the curvature engine and the diagnostic callbacks. Exits non-zero if the
# install or any test fails.
#
# Not part of `make test`: every run downloads TensorFlow (~600 MB) and the
# subset takes about 5 minutes on 2 idle cores.
#
# Usage: tools/check_floor.sh [VENV_DIR] [-- extra pytest arguments]
#   VENV_DIR  where to build the environment (default: /tmp/keras-curv-floor);
#             it is removed and rebuilt on every run.
#   FLOOR_OVERRIDES="keras==3.11.0"  replaces a pin, e.g. to try a higher floor.
#             A pin below pyproject.toml's floor fails `pip check` and the import
#             check by design: to try a lower floor, lower it in pyproject.toml and
#             keras_curv/_internal/versions.py.
#   PYTHON=python3.12                the interpreter the environment is built on.
set -euo pipefail

# The smoke subset: each module names what it exercises.
SMOKE=(
    tests/_internal/test_versions.py                 # declared floors, required APIs
    tests/test_keras_privates.py                     # every Keras / TF private relied on
    tests/curvature                                  # operators, Lanczos, estimators
    tests/optimizers/test_contract.py                # the batch reaching the optimizers
    tests/optimizers/test_adahessian.py              # golden values through fit, save/load
    tests/optimizers/test_class_subspace_newton.py   # golden values, resume, XLA
    tests/callbacks/test_hessian_spectrum.py         # callbacks, TensorBoard summaries
    tests/test_resume.py                             # BackupAndRestore mid-fit
)

# `name==floor` for every runtime dependency of pyproject.toml ($1) with a `>=` bound.
floor_pins() {
    "$PYTHON" - "$1" <<'EOF'
import re
import sys
import tomllib

with open(sys.argv[1], "rb") as f:
    dependencies = tomllib.load(f)["project"]["dependencies"]
for dependency in dependencies:
    match = re.match(r"\s*([A-Za-z0-9_.\-]+)\s*(?:\[[^\]]*\])?\s*>=\s*([0-9][0-9A-Za-z.]*)", dependency)
    if match is None:
        sys.exit(f"check_floor.sh: no `>=` floor in dependency {dependency!r}")
    print(f"{match.group(1)}=={match.group(2)}")
EOF
}

report_versions() {
    "$1/bin/python" - <<'EOF'
import keras, numpy, scipy, tensorflow
import keras_curv

print(f"check_floor: keras {keras.__version__}, tensorflow {tensorflow.__version__}, "
      f"numpy {numpy.__version__}, scipy {scipy.__version__}; keras_curv from {keras_curv.__file__}")
EOF
}

# One function, read whole before it runs, so that editing this file mid-run is harmless.
main() {
    local root venv=/tmp/keras-curv-floor start override name pin
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    if [[ $# -gt 0 && "$1" != "--" ]]; then
        venv="$1"
        shift
    fi
    if [[ "${1:-}" == "--" ]]; then
        shift
    fi
    PYTHON="${PYTHON:-python3}"
    export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"

    local pins=() kept
    mapfile -t pins < <(floor_pins "$root/pyproject.toml")
    for override in ${FLOOR_OVERRIDES:-}; do
        name="${override%%[=<>!~]*}"
        kept=()
        for pin in "${pins[@]}"; do
            [[ "${pin%%==*}" == "$name" ]] || kept+=("$pin")
        done
        pins=("${kept[@]}" "$override")
    done

    echo "check_floor: building $venv with ${pins[*]}"
    start=$(date +%s)
    if [[ -e "$venv" && ! -f "$venv/pyvenv.cfg" ]]; then
        echo "check_floor: $venv exists and is not a virtual environment; not removing it" >&2
        exit 2
    fi
    rm -rf "$venv"
    "$PYTHON" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    # Wheels only, so that a floor without one for this Python fails here instead of
    # compiling; then the test tools the subset needs (the extras' floors are not what
    # is checked) and the checkout itself.
    "$venv/bin/python" -m pip install --quiet --only-binary=:all: "${pins[@]}" \
        "pytest>=8" "pytest-timeout>=2.2" "scikit-learn>=1.2"
    "$venv/bin/python" -m pip install --quiet --no-deps -e "$root"
    "$venv/bin/python" -m pip check
    report_versions "$venv"
    echo "check_floor: installed in $(( $(date +%s) - start )) s; running the smoke subset"

    cd "$root"
    "$venv/bin/python" -m pytest -q -p no:cacheprovider "${SMOKE[@]}" "$@"
    echo "check_floor: passed in $(( $(date +%s) - start )) s"
}

main "$@"; exit
