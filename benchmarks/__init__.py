"""Benchmarks of keras-curv (run as scripts: python -m benchmarks.<name>)."""
