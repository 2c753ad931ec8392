"""Every optimizer of the package at its defaults, one epoch on every model ([7/8]).

Run from the repository root::

    python -m benchmarks.safe_defaults [--models mlp,cnn,...] [--optimizers adam,kfac,...]

For each (optimizer, model) of ``tests/architectures.py`` (``ZOO``: digits MLP/CNN,
BatchNorm CNN, Transformer, LSTM, two-input Functional; ``LARGER``: MobileNetV2 and the
BatchNorm ResNet on upsampled digits), :func:`tests.architectures.first_epoch` at batch
32; the full-batch solvers take their one step on the whole training set (their
intended use), on the ``ZOO`` only unless asked: a full-batch step of MobileNetV2 on
1,438 images is a workload they are not meant for. A row *rises* when the epoch's mean
or last-quarter training loss is not below the training-mode loss before it (the
full-batch solvers: when the training-mode loss after the step is not below the one
before). Keras's ``Adam()`` is the reference.

Writes ``benchmarks/results/safe_defaults.json``; ``--from-json`` prints the table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

RESULTS = Path(__file__).resolve().parent / "results" / "safe_defaults.json"
FULL_BATCH = ("lbfgs", "newton_cg", "nys_newton_cg", "levenberg_marquardt")


def makers() -> dict:
    """Optimizer key -> a factory at the package's defaults."""
    import keras

    from keras_curv import optimizers as kc

    return {
        "adam": lambda: keras.optimizers.Adam(),
        "adahessian": lambda: kc.AdaHessian(),
        "sophia_h": lambda: kc.Sophia(seed=0),
        "sophia_g": lambda: kc.Sophia(estimator="gauss_newton_bartlett", seed=0),
        "class_subspace_newton": lambda: kc.ClassSubspaceNewton(),
        "kfac": lambda: kc.KFAC(),
        "shampoo": lambda: kc.Shampoo(),
        "sketchy_sgd": lambda: kc.SketchySGD(),
        "osgm": lambda: kc.OSGM(),
        "lookahead_adam": lambda: kc.Lookahead(keras.optimizers.Adam()),
        "lbfgs": lambda: kc.LBFGS(),
        "newton_cg": lambda: kc.NewtonCG(),
        "nys_newton_cg": lambda: kc.NysNewtonCG(),
        "levenberg_marquardt": lambda: kc.LevenbergMarquardt(),
    }


def measure(key: str, name: str) -> dict:
    """One (optimizer, model) row; a refusal is recorded with its message."""
    from benchmarks.architectures import REFUSALS
    from tests.architectures import entry, first_epoch

    start = time.perf_counter()
    batch_size = len(entry(name)[1]()[1]) if key in FULL_BATCH else 32
    row = {"optimizer": key, "model": name, "batch_size": batch_size}
    try:
        row.update(first_epoch(name, makers()[key](), batch_size=batch_size))
    except REFUSALS as error:
        row["refused"] = f"{type(error).__name__}: {error}"
        return row
    if key in FULL_BATCH:
        # One step, whose loss Keras reports from before the update: compare the
        # training-mode loss after it, measured like the one before.
        row["rises"] = not row["final_training"] < row["initial_training"]
    else:
        row["rises"] = not max(row["mean"], row["last"]) < row["initial_training"]
    row["finite"] = all(math.isfinite(row[k]) for k in ("mean", "last", "final", "final_training"))
    row["seconds"] = time.perf_counter() - start
    return row


def markdown(rows: list[dict]) -> str:
    """Optimizers by models: training-mode loss before → the epoch's mean (full batch:
    after the step) per cell, a ✗ where it rose."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    optimizers = list(dict.fromkeys(r["optimizer"] for r in rows))
    cells = {(r["optimizer"], r["model"]): r for r in rows}
    lines = [
        "| optimizer | " + " | ".join(models) + " |",
        "| --- " * (len(models) + 1) + "|",
    ]
    for key in optimizers:
        row = [key]
        for name in models:
            r = cells.get((key, name))
            if r is None:
                row.append("")
            elif "refused" in r:
                row.append("refused")
            else:
                after = r["final_training"] if key in FULL_BATCH else r["mean"]
                mark = " ✗" if r["rises"] or not r["finite"] else ""
                row.append(f"{r['initial_training']:.2f} → {after:.2f}{mark}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    from tests.architectures import LARGER, ZOO

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join([*ZOO, *LARGER]))
    parser.add_argument("--optimizers", default=",".join(makers()))
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--from-json", action="store_true")
    args = parser.parse_args(argv)
    if args.from_json:
        rows = json.loads(args.output.read_text())["rows"]
    else:
        rows = []
        asked = args.optimizers != parser.get_default("optimizers")
        for name in args.models.split(","):
            for key in args.optimizers.split(","):
                if key in FULL_BATCH and name in LARGER and not asked:
                    continue
                row = measure(key, name)
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "refused"}), flush=True)
                args.output.parent.mkdir(parents=True, exist_ok=True)
                args.output.write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    print(markdown(rows))
    return rows


if __name__ == "__main__":
    main()
