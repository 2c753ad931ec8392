"""AdaHessian's safe default (``step_cap=1``) against the authors' rule (``step_cap=None``).

Run from the repository root: ``python -m benchmarks.adahessian_defaults [--only zoo,accuracy]``.

* ``zoo``: one epoch on every model of ``tests/architectures.py`` (digits MLP/CNN,
  BatchNorm CNN, Transformer, LSTM, two-input Functional) with ``AdaHessian()``,
  ``AdaHessian(step_cap=None)`` and ``Adam()``: the losses of
  :func:`tests.architectures.first_epoch`;
* ``accuracy``: epochs and seconds to the suite's test-accuracy targets
  (:func:`benchmarks.training.time_to_target`, 3 seeds) for both AdaHessian rules.

Writes ``benchmarks/results/adahessian_defaults.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "adahessian_defaults.json"


def makers() -> dict:
    import keras

    from keras_curv.optimizers import AdaHessian

    return {
        "adahessian": lambda: AdaHessian(),
        "adahessian_paper": lambda: AdaHessian(step_cap=None),
        "adam": lambda: keras.optimizers.Adam(),
    }


def zoo(log=print) -> list[dict]:
    """First-epoch losses per (optimizer, model)."""
    from tests.architectures import ZOO, first_epoch

    rows = []
    for key, make in makers().items():
        for name in ZOO:
            row = {"optimizer": key, "model": name, **first_epoch(name, make())}
            row["rises"] = max(row["mean"], row["last"]) >= row["initial_training"]
            rows.append(row)
            log(f"  {key} {name}: {row['initial_training']:.3f} -> mean {row['mean']:.3f}")
    return rows


def accuracy(seeds: int = 3) -> dict:
    """:func:`benchmarks.training.time_to_target` for both rules."""
    from benchmarks import training
    from keras_curv.optimizers import AdaHessian

    table = training.optimizers()
    rules = {
        "adahessian": table["adahessian"],
        "adahessian_paper": (
            "AdaHessian, the authors' rule (step_cap=None)",
            0.15,
            lambda seed: AdaHessian(0.15, step_cap=None, seed=seed),
        ),
    }
    original = training.optimizers
    training.optimizers = lambda: rules
    try:
        return training.time_to_target(
            problems=("digits_cnn", "mnist1d_logreg", "mnist1d_mlp"),
            seeds=seeds,
            epochs={"digits_cnn": 15, "mnist1d_logreg": 10, "mnist1d_mlp": 25},
            cnn_optimizers=(),
        )
    finally:
        training.optimizers = original


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="zoo,accuracy")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    sections = args.only.split(",")
    result = {}
    if "zoo" in sections:
        result["zoo"] = zoo()
    if "accuracy" in sections:
        result["accuracy"] = accuracy()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1, default=float) + "\n")
    return result


if __name__ == "__main__":
    main()
