"""Benchmarks for keras-curv: run one with ``python -m benchmarks.<name>`` from the repo root."""
