"""Every optimizer of the package at its defaults, one epoch on every model ([7/8]).

Run from the repository root::

    python -m benchmarks.safe_defaults [--models mlp,cnn,...] [--optimizers adam,kfac,...]
        [--seeds 0,1,2]

For each (optimizer, model) of ``tests/architectures.py`` (``ZOO``: digits MLP/CNN,
BatchNorm CNN, Transformer, LSTM, two-input Functional; ``LARGER``: MobileNetV2 and the
BatchNorm ResNet on upsampled digits), :func:`tests.architectures.first_epoch` at batch
32; the full-batch solvers take their one step on the whole training set (their
intended use), on the ``ZOO`` only unless asked: a full-batch step of MobileNetV2 on
1,438 images is a workload they are not meant for. A row *rises* when the epoch's mean
or last-quarter training loss is not below the training-mode loss before it (the
full-batch solvers: when the training-mode loss after the step is not below the one
before). Keras's ``Adam()`` is the reference. With several ``--seeds`` (model
initialisation and shuffling; the probes' seeds stay fixed) a cell averages its seeds and
rises when the averages do; it also counts the seeds whose own run rose.

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


def measure(key: str, name: str, seed: int = 0) -> dict:
    """One (optimizer, model, seed) row; a refusal is recorded with its message."""
    from benchmarks.architectures import REFUSALS
    from tests.architectures import entry, first_epoch

    start = time.perf_counter()
    batch_size = len(entry(name)[1]()[1]) if key in FULL_BATCH else 32
    row = {"optimizer": key, "model": name, "batch_size": batch_size, "seed": seed}
    try:
        row.update(first_epoch(name, makers()[key](), batch_size=batch_size, seed=seed))
    except REFUSALS as error:
        row["refused"] = f"{type(error).__name__}: {error}"
        return row
    row["rises"] = rises(key, row)
    row["finite"] = all(math.isfinite(row[k]) for k in ("mean", "last", "final", "final_training"))
    row["seconds"] = time.perf_counter() - start
    return row


def rises(key: str, row: dict) -> bool:
    """Whether a run (or a cell's seed averages) did not bring the loss below the start."""
    if key in FULL_BATCH:
        # One step, whose loss Keras reports from before the update: compare the
        # training-mode loss after it, measured like the one before.
        return not row["final_training"] < row["initial_training"]
    return not max(row["mean"], row["last"]) < row["initial_training"]


def cell(runs: list[dict]) -> dict:
    """One (optimizer, model) cell from its runs: the seed averages, or the refusal."""
    if any("refused" in r for r in runs):
        return next(r for r in runs if "refused" in r)
    keys = ("initial_training", "mean", "last", "final", "final_training")
    merged = dict(runs[0], **{k: float(sum(r[k] for r in runs) / len(runs)) for k in keys})
    merged["rises"] = rises(merged["optimizer"], merged)
    merged["finite"] = all(r["finite"] for r in runs)
    merged["risen_seeds"] = sum(bool(r["rises"]) for r in runs)
    merged["seeds"] = len(runs)
    return merged


def markdown(rows: list[dict]) -> str:
    """Optimizers by models: training-mode loss before → the epoch's mean (full batch:
    after the step) per cell, a ✗ where it rose; with several seeds, their averages and
    the number of seeds that rose."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    optimizers = list(dict.fromkeys(r["optimizer"] for r in rows))
    runs: dict[tuple, list] = {}
    for r in rows:
        runs.setdefault((r["optimizer"], r["model"]), []).append(r)
    cells = {k: cell(v) for k, v in runs.items()}
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
                counted = f" ({r['risen_seeds']}/{r['seeds']} rose)" if r["seeds"] > 1 else ""
                row.append(f"{r['initial_training']:.2f} → {after:.2f}{mark}{counted}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    from tests.architectures import LARGER, ZOO

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join([*ZOO, *LARGER]))
    parser.add_argument("--optimizers", default=",".join(makers()))
    parser.add_argument("--seeds", default="0", help="comma-separated, e.g. 0,1,2")
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
                for seed in (int(s) for s in args.seeds.split(",")):
                    row = measure(key, name, seed)
                    rows.append(row)
                    print(json.dumps({k: v for k, v in row.items() if k != "refused"}), flush=True)
                    args.output.parent.mkdir(parents=True, exist_ok=True)
                    args.output.write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    print(markdown(rows))
    return rows


if __name__ == "__main__":
    main()
