# The two commands a user needs: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: demo test lint docs bench bench-quick check-floor clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[data,dev,docs]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/keras-curv demo

# One pytest worker per core, each test file on one worker (its tests share module-level
# fresh-process reports; `xdist_group` marks had no effect here with pytest 9.2 and
# pytest-xdist 3.8); `pytest` alone runs serially.
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n auto --dist loadfile

docs: $(STAMP)
	$(BIN)/mkdocs build --strict

bench: $(STAMP)
	$(BIN)/python -m benchmarks

bench-quick: $(STAMP)
	$(BIN)/python -m benchmarks --quick

# Slow (downloads TensorFlow, ~5 min of tests), so not part of `test`: the package at the
# dependency floors of pyproject.toml, in a fresh venv (docs/compatibility.md).
check-floor:
	bash tools/check_floor.sh

clean:
	rm -rf $(VENV) site build *.egg-info
