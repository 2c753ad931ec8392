"""ClassSubspaceNewton: which variant trains, and why the paper's method diverges here.

``python -m benchmarks.csn_science [--quick | --small] [--only default,momentum,batchnorm,eigen]``
writes ``benchmarks/results/csn_science.json`` (every run, per seed) and plots under
``docs/images/``; ``docs/class_subspace_newton.md`` ("What we found") reads them.

Four studies, each a function the optimizer arena can call on its own:

* :func:`default_study`: every variant on the test suite's model zoo (digits MLP, CNN,
  BatchNorm CNN, Transformer, LSTM, two-input Functional) and an MNIST-1D MLP, on a
  learning-rate grid (seed 0), the best rate rerun with more seeds.
* :func:`momentum_study`: heavy ball on the whole step against heavy ball on the SGD
  part only (``momentum_on="complement"``).
* :func:`batchnorm_study`: the paper's settings (eq. 17, η 0.1, momentum 0.9) on ResNet9
  with and without BatchNorm: the weight norms of the BatchNorm-preceded kernels, the
  overlap of the class directions, and λ_k against the Gauss–Newton quotient.
* :func:`eigen_study`: Newton in the top-C Gauss–Newton eigenspace
  (``directions="eigen"``) against the class-gradient version, SGD and Adam.

Runs of one (workload, optimizer) pair share one compiled model: its weights and the
optimizer's state are reset between runs, so the train step is traced once.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("MPLBACKEND", "Agg")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_curv import models  # noqa: E402
from keras_curv.data import load_dataset, motif_sequences, split_halves  # noqa: E402
from keras_curv.optimizers import ClassSubspaceNewton  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "csn_science.json"
IMAGES = ROOT / "docs" / "images"
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
BATCH = 32


# ------------------------------------------------------------------- workloads


@dataclass(frozen=True)
class Workload:
    """A model builder and its data ``(x_train, y_train, x_test, y_test)``."""

    build: Callable[[], keras.Model]
    data: Callable[[], tuple]


def _digits(limit: int = 512):
    d = load_dataset("digits", max_train=limit, seed=0)
    return d.x_train, d.y_train, d.x_test, d.y_test


def _sequences():
    x, y = motif_sequences(768, sequence_length=12, vocabulary=24, num_classes=4, seed=0)
    return x[:512], y[:512], x[512:], y[512:]


def _two_inputs():
    x, y, xt, yt = _digits()
    return split_halves(x), y, split_halves(xt), yt


def _mnist1d():
    d = load_dataset("mnist1d", seed=0, max_train=2000)
    return d.x_train, d.y_train, d.x_test, d.y_test


# The architectures of tests/architectures.py (what "the default trains" means), plus
# MNIST-1D and the ResNet9 of the paper at CPU size.
WORKLOADS: dict[str, Workload] = {
    "mlp": Workload(lambda: models.mlp((8, 8, 1), 10), _digits),
    "cnn": Workload(lambda: models.small_cnn((8, 8, 1), 10), _digits),
    "batchnorm_cnn": Workload(lambda: models.batchnorm_cnn((8, 8, 1), 10, depthwise=True), _digits),
    "transformer": Workload(lambda: models.transformer_classifier(12, 24, 4, dim=16), _sequences),
    "lstm": Workload(lambda: models.lstm_classifier(12, 24, 4, units=16), _sequences),
    "two_input": Workload(
        lambda: models.two_input_classifier((4, 8, 1), (4, 8, 1), 10), _two_inputs
    ),
    "mnist1d_mlp": Workload(lambda: models.mlp((40, 1), 10, widths=(100, 100)), _mnist1d),
    "resnet9_bn": Workload(lambda: models.resnet9((8, 8, 1), 10, width=4), _digits),
    "resnet9_nobn": Workload(
        lambda: models.resnet9((8, 8, 1), 10, width=4, batchnorm=False), _digits
    ),
}
ZOO = ("mlp", "cnn", "batchnorm_cnn", "transformer", "lstm", "two_input", "mnist1d_mlp")


# ------------------------------------------------------------------ optimizers


def _csn(**kwargs) -> Callable[[float], keras.optimizers.Optimizer]:
    return lambda lr: ClassSubspaceNewton(lr, **kwargs)


# name -> (build(lr), learning-rate grid). Every CSN variant is named by its arguments.
SGD_GRID = (0.03, 0.1, 0.3, 1.0)
ADAM_GRID = (1e-3, 3e-3, 1e-2, 3e-2)
VARIANTS: dict[str, tuple[Callable[[float], keras.optimizers.Optimizer], tuple]] = {
    "sgd": (lambda lr: keras.optimizers.SGD(lr), SGD_GRID),
    "sgd_momentum": (
        lambda lr: keras.optimizers.SGD(lr, momentum=0.9),
        (0.01, 0.03, 0.1, 0.3),
    ),
    "adam": (lambda lr: keras.optimizers.Adam(lr), ADAM_GRID),
    "paper": (_csn(curvature="paper"), SGD_GRID),
    "paper_damped": (_csn(curvature="paper", damping=1.0), SGD_GRID),
    "gauss_newton": (_csn(curvature="gauss_newton"), SGD_GRID),
    "gauss_newton_exact_d1": (
        _csn(curvature="gauss_newton", inverse="exact", damping=1.0),
        SGD_GRID,
    ),
    "projected_newton": (_csn(curvature="projected_newton"), SGD_GRID),
    # Newton with the exact Rayleigh quotients along converged Ritz vectors only.
    "eigen": (_csn(directions="eigen", damping=0.0, eigen_iterations=3), SGD_GRID),
    # Levenberg-Marquardt: 1/(theta + 1/lr), Newton only where theta > 1/lr.
    "eigen_proximal": (
        _csn(directions="eigen", eigen_iterations=2, eigen_tolerance=None),
        SGD_GRID,
    ),
}


# -------------------------------------------------------------------- training


def _reset_optimizer(optimizer: keras.optimizers.Optimizer, lr: float, seed: int) -> None:
    """Every state variable back to its start (zeros; the eigen block random), at ``lr``."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    rate = getattr(inner, "_learning_rate", None)
    rng = np.random.default_rng(seed)
    basis = {id(v) for v in getattr(inner, "_eigen_basis", [])}
    for variable in inner.variables:
        if variable is rate:
            variable.assign(lr)
        elif id(variable) in basis:
            variable.assign(rng.standard_normal(variable.shape).astype(variable.dtype))
        else:
            variable.assign(tf.zeros(variable.shape, variable.dtype))


class Trainer:
    """One compiled model for one (workload, optimizer), retrained from seeded starts."""

    def __init__(self, workload: Workload, make: Callable[[float], keras.optimizers.Optimizer]):
        self.workload = workload
        self.x, self.y, self.x_test, self.y_test = workload.data()
        keras.utils.set_random_seed(0)
        self.model = workload.build()
        self.optimizer = make(0.1)
        self.model.compile(optimizer=self.optimizer, loss=LOSS, metrics=["accuracy"])

    def run(
        self,
        lr: float,
        seed: int,
        epochs: int,
        *,
        callbacks: Sequence[keras.callbacks.Callback] = (),
    ) -> dict:
        """Trains from the seed's initial weights; returns the curves and final numbers."""
        keras.utils.set_random_seed(seed)
        self.model.set_weights(self.workload.build().get_weights())
        if self.optimizer.built:
            _reset_optimizer(self.optimizer, lr, seed)
        else:
            self.optimizer.learning_rate = lr
        keras.utils.set_random_seed(seed)
        initial = self._evaluate()
        start = time.perf_counter()
        history = self.model.fit(
            self.x,
            self.y,
            batch_size=BATCH,
            epochs=epochs,
            verbose=0,
            validation_data=(self.x_test, self.y_test),
            callbacks=list(callbacks),
        ).history
        seconds = time.perf_counter() - start
        final = self._evaluate()
        return {
            "lr": lr,
            "seed": seed,
            "initial_loss": initial[0],
            "train_loss": [_num(v) for v in history["loss"]],
            "test_loss": [_num(v) for v in history["val_loss"]],
            "test_accuracy": [_num(v) for v in history["val_accuracy"]],
            "final_loss": final[0],
            "final_accuracy": history["val_accuracy"][-1],
            "seconds": seconds,
        }

    def _evaluate(self) -> list[float]:
        return [_num(v) for v in self.model.evaluate(self.x, self.y, batch_size=256, verbose=0)]


def _num(value) -> float:
    value = float(value)
    return value if math.isfinite(value) else float("inf")


def diverged(run: dict) -> bool:
    """Non-finite, or the final training loss above the initial one."""
    return not math.isfinite(run["final_loss"]) or run["final_loss"] > run["initial_loss"]


def tuned(
    workload: str,
    variant: str,
    *,
    epochs: int,
    seeds: Sequence[int] = (0, 1, 2),
    grid: Sequence[float] | None = None,
    build: Callable | None = None,
    log=print,
) -> dict:
    """The grid at ``seeds[0]``, then the best rate (lowest final loss) at every seed."""
    make, default_grid = VARIANTS[variant] if build is None else (build, None)
    grid = tuple(grid or default_grid)
    trainer = Trainer(WORKLOADS[workload], make)
    runs = {lr: [trainer.run(lr, seeds[0], epochs)] for lr in grid}
    best = min(grid, key=lambda lr: runs[lr][0]["final_loss"])
    runs[best] += [trainer.run(best, s, epochs) for s in seeds[1:]]
    final = [r["final_loss"] for r in runs[best]]
    accuracy = [r["final_accuracy"] for r in runs[best]]
    out = {
        "workload": workload,
        "variant": variant,
        "epochs": epochs,
        "grid": {str(lr): runs[lr][0]["final_loss"] for lr in grid},
        "best_lr": best,
        "final_loss_mean": float(np.mean(final)),
        "final_loss_std": float(np.std(final)) if np.all(np.isfinite(final)) else float("inf"),
        "accuracy_mean": float(np.mean(accuracy)),
        "accuracy_std": float(np.std(accuracy)),
        "diverged": sum(diverged(r) for rs in runs.values() for r in rs),
        "runs": [r for rs in runs.values() for r in rs],
    }
    log(
        f"  {workload:14s} {variant:24s} lr {best:<6g} loss {out['final_loss_mean']:.4g} "
        f"± {out['final_loss_std']:.2g}  acc {out['accuracy_mean']:.3f}  diverged "
        f"{out['diverged']}/{len(out['runs'])}  grid {out['grid']}"
    )
    return out


# ---------------------------------------------------------------------- studies


# The candidates for the default (the pure eigen Newton is studied in eigen_study).
DEFAULT_CANDIDATES = tuple(v for v in VARIANTS if v != "eigen")


def default_study(
    workloads: Sequence[str] = ZOO,
    variants: Sequence[str] = DEFAULT_CANDIDATES,
    *,
    epochs: int = 3,
    seeds: Sequence[int] = (0, 1, 2),
    log=print,
) -> dict:
    """Every variant, tuned per workload; the rank of each variant per workload."""
    rows = [tuned(w, v, epochs=epochs, seeds=seeds, log=log) for w in workloads for v in variants]
    return {"epochs": epochs, "seeds": list(seeds), "rows": rows, "ranking": _ranking(rows)}


def _ranking(rows: list[dict]) -> dict:
    """Per variant: mean rank over workloads (by mean final loss) and loss relative to SGD."""
    by_workload: dict[str, dict[str, dict]] = {}
    for row in rows:
        by_workload.setdefault(row["workload"], {})[row["variant"]] = row
    ranks: dict[str, list[float]] = {}
    relative: dict[str, list[float]] = {}
    for table in by_workload.values():
        order = sorted(table, key=lambda v: table[v]["final_loss_mean"])
        for rank, variant in enumerate(order, 1):
            ranks.setdefault(variant, []).append(rank)
        sgd = table.get("sgd", {}).get("final_loss_mean")
        for variant, row in table.items():
            if sgd:
                relative.setdefault(variant, []).append(row["final_loss_mean"] / sgd)
    return {
        v: {
            "mean_rank": float(np.mean(r)),
            "geomean_loss_over_sgd": float(np.exp(np.mean(np.log(relative[v]))))
            if v in relative
            else None,
        }
        for v, r in ranks.items()
    }


MOMENTUM_VARIANTS = {
    "sgd_momentum": lambda lr: keras.optimizers.SGD(lr, momentum=0.9),
    "gauss_newton_step": _csn(curvature="gauss_newton", momentum=0.9),
    "gauss_newton_complement": _csn(
        curvature="gauss_newton", momentum=0.9, momentum_on="complement"
    ),
    "projected_step": _csn(curvature="projected_newton", momentum=0.9),
    "projected_complement": _csn(
        curvature="projected_newton", momentum=0.9, momentum_on="complement"
    ),
    "eigen_step": _csn(directions="eigen", eigen_iterations=2, eigen_tolerance=None, momentum=0.9),
    "eigen_complement": _csn(
        directions="eigen",
        eigen_iterations=2,
        eigen_tolerance=None,
        momentum=0.9,
        momentum_on="complement",
    ),
}


def momentum_study(
    workloads: Sequence[str] = ("mlp", "cnn", "mnist1d_mlp"),
    *,
    grid: Sequence[float] = (0.01, 0.03, 0.1),
    epochs: int = 4,
    seeds: Sequence[int] = (0, 1, 2),
    log=print,
) -> dict:
    """Momentum 0.9 on the whole step against momentum on the SGD part only."""
    rows = [
        tuned(w, name, epochs=epochs, seeds=seeds, grid=grid, build=build, log=log)
        for w in workloads
        for name, build in MOMENTUM_VARIANTS.items()
    ]
    return {"epochs": epochs, "grid": list(grid), "rows": rows}


def conv_kernels(model: keras.Model) -> list:
    """The Conv2D kernels (in ResNet9 with BatchNorm each one feeds a BatchNormalization)."""
    return [layer.kernel for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]


class Recorder(keras.callbacks.Callback):
    """Every ``every`` steps: the loss, the convolution kernels' norms, the CSN summary."""

    SUMMARY = (
        "max_direction_cosine",
        "min_complement_eigenvalue",
        "curvature",
        "gauss_newton_quotient",
        "curvature_over_quotient",
    )

    def __init__(self, every: int):
        super().__init__()
        self.every = every
        self.rows: list[dict] = []
        self.step = 0

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        if self.step != 1 and self.step % self.every:
            return
        row = {"step": self.step, "loss": _num((logs or {}).get("loss", float("nan")))}
        row["kernel_norms"] = [_num(tf.norm(k)) for k in conv_kernels(self.model)]
        summary = getattr(self.model.optimizer, "curvature_summary", None)
        if summary is not None:
            values = summary()
            for key in self.SUMMARY:
                if key in values:
                    array = np.asarray(values[key], np.float64)
                    row[key] = [_num(v) for v in array.ravel()] if array.ndim else _num(array)
        self.rows.append(row)


BATCHNORM_VARIANTS = {
    # The paper's Appendix D settings, as published (eq. 15-17).
    "paper": _csn(curvature="paper", momentum=0.9, diagnostics=True),
    "gauss_newton": _csn(curvature="gauss_newton", momentum=0.9, diagnostics=True),
    "sgd_momentum": lambda lr: keras.optimizers.SGD(lr, momentum=0.9),
}


def batchnorm_study(
    *,
    lr: float = 0.1,
    epochs: int = 6,
    every: int = 4,
    seeds: Sequence[int] = (0, 1, 2),
    log=print,
) -> dict:
    """ResNet9 (width 4) on digits with and without BatchNorm, at the paper's settings."""
    out = {"lr": lr, "epochs": epochs, "every": every, "runs": {}}
    for workload in ("resnet9_bn", "resnet9_nobn"):
        for name, build in BATCHNORM_VARIANTS.items():
            trainer = Trainer(WORKLOADS[workload], build)
            runs = []
            for seed in seeds:
                recorder = Recorder(every)
                run = trainer.run(lr, seed, epochs, callbacks=[recorder])
                run["records"] = recorder.rows
                runs.append(run)
            out["runs"][f"{workload}/{name}"] = runs
            norms = [r["records"][-1]["kernel_norms"] for r in runs]
            first = [r["records"][0]["kernel_norms"] for r in runs]
            ratios = [np.mean(np.array(n) / np.array(f)) for n, f in zip(norms, first)]
            growth = float(np.median(ratios))
            log(
                f"  {workload:13s} {name:13s} final loss "
                f"{[round(r['final_loss'], 3) for r in runs]} acc "
                f"{[round(r['final_accuracy'], 3) for r in runs]} kernel-norm growth x{growth:.3g}"
            )
    return out


EIGEN_VARIANTS = {
    "sgd": VARIANTS["sgd"],
    "sgd_momentum": VARIANTS["sgd_momentum"],
    "adam": VARIANTS["adam"],
    "class_gauss_newton": VARIANTS["gauss_newton"],
    "class_projected": VARIANTS["projected_newton"],
    "eigen": VARIANTS["eigen"],
    "eigen_proximal": VARIANTS["eigen_proximal"],
    "eigen_hessian": (
        _csn(directions="eigen", curvature="hessian", damping=0.0, eigen_iterations=3),
        SGD_GRID,
    ),
}
WIDE_GRID = (0.03, 0.1, 0.3, 1.0, 3.0)


def eigen_study(
    workloads: Sequence[str] = ("mlp", "cnn", "mnist1d_mlp"),
    *,
    epochs: int = 6,
    seeds: Sequence[int] = (0, 1, 2),
    log=print,
) -> dict:
    """Top-C eigenspace Newton against the class-gradient version, SGD and Adam.

    The Newton variants get a wider grid (up to η = 3): the point of a Newton step in the
    high-curvature subspace is to allow a larger SGD rate in the complement.
    """
    rows = []
    for w in workloads:
        for name, (build, grid) in EIGEN_VARIANTS.items():
            if grid == SGD_GRID and name.startswith(("eigen", "class")):
                grid = WIDE_GRID
            rows.append(tuned(w, name, epochs=epochs, seeds=seeds, grid=grid, build=build, log=log))
    return {"epochs": epochs, "rows": rows}


# ------------------------------------------------------------------------ plots


def plot_curves(rows: list[dict], path: Path, title: str) -> None:
    """Training loss per epoch (mean over seeds at the best rate), one panel per workload."""
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    fig, axes = plt.subplots(1, len(workloads), figsize=(4.2 * len(workloads), 3.4), squeeze=False)
    for ax, workload in zip(axes[0], workloads):
        for row in (r for r in rows if r["workload"] == workload):
            curves = [r["train_loss"] for r in row["runs"] if r["lr"] == row["best_lr"]]
            mean = np.mean(np.minimum(np.array(curves), 1e3), axis=0)
            ax.plot(
                np.arange(1, len(mean) + 1),
                mean,
                marker="o",
                ms=3,
                label=f"{row['variant']} ({row['best_lr']:g})",
            )
        ax.set_yscale("log")
        ax.set_title(workload)
        ax.set_xlabel("epoch")
        ax.set_ylabel("training loss")
        ax.legend(fontsize=6)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_grid(rows: list[dict], path: Path, title: str) -> None:
    """Final training loss against the learning rate (seed 0), one panel per workload."""
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    fig, axes = plt.subplots(1, len(workloads), figsize=(4.2 * len(workloads), 3.4), squeeze=False)
    for ax, workload in zip(axes[0], workloads):
        for row in (r for r in rows if r["workload"] == workload):
            lrs = [float(k) for k in row["grid"]]
            ax.plot(
                lrs,
                [min(v, 1e3) for v in row["grid"].values()],
                marker="o",
                ms=3,
                label=row["variant"],
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(workload)
        ax.set_xlabel("learning rate")
        ax.set_ylabel("final training loss (capped at 1e3)")
        ax.legend(fontsize=6)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_batchnorm(study: dict, path: Path) -> None:
    """Loss, kernel norms, direction overlap and λ/quotient over steps (seed 0)."""
    import matplotlib.pyplot as plt

    panels = (
        ("loss", "training loss", True),
        ("kernel_norms", "mean conv-kernel norm", True),
        ("min_complement_eigenvalue", "min eig of I − Σ v vᵀ", False),
        ("curvature_over_quotient", "median λ_k / v_kᵀGv_k", True),
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(17, 3.6))
    for key, runs in study["runs"].items():
        records = runs[0]["records"]
        steps = [r["step"] for r in records]
        for ax, (field, label, log_scale) in zip(axes, panels):
            values = [r.get(field) for r in records]
            if any(v is None for v in values):
                continue
            if isinstance(values[0], list):
                values = [
                    float(np.median(v)) if field != "kernel_norms" else float(np.mean(v))
                    for v in values
                ]
            ax.plot(steps, np.minimum(values, 1e6), label=key)
            ax.set_ylabel(label)
            ax.set_xlabel("step")
            if log_scale:
                ax.set_yscale("log")
    axes[0].legend(fontsize=6)
    fig.suptitle("ResNet9 (width 4) on digits, η = 0.1, momentum 0.9, seed 0")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------- main

QUICK = {
    "default": dict(workloads=("mlp",), variants=("sgd", "projected_newton"), epochs=1, seeds=(0,)),
    "momentum": dict(workloads=("mlp",), grid=(0.03,), epochs=1, seeds=(0,)),
    "batchnorm": dict(epochs=1, every=4, seeds=(0,)),
    "eigen": dict(workloads=("mlp",), epochs=1, seeds=(0,)),
}
# What fits about 35 minutes on a shared 2-core CPU: one seed, fewer epochs and workloads.
SMALL = {
    "default": dict(
        variants=("sgd", "paper", "gauss_newton", "projected_newton"), epochs=2, seeds=(0,)
    ),
    "batchnorm": dict(epochs=3, every=4, seeds=(0,)),
    "momentum": dict(workloads=("mlp", "mnist1d_mlp"), epochs=3, seeds=(0,)),
    "eigen": dict(workloads=("mlp", "mnist1d_mlp"), epochs=3, seeds=(0,)),
}
STUDIES = {
    "default": default_study,
    "momentum": momentum_study,
    "batchnorm": batchnorm_study,
    "eigen": eigen_study,
}


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run (minutes)")
    parser.add_argument("--small", action="store_true", help="one seed, fewer runs (~35 min)")
    parser.add_argument(
        "--report", action="store_true", help="print the tables of the results JSON and exit"
    )
    parser.add_argument("--only", default=",".join(STUDIES), help="comma-separated studies")
    parser.add_argument("--out", default=None, help=f"JSON path (default {RESULTS})")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (overrides presets)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs (overrides presets)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in STUDIES]
    if unknown:
        parser.error(f"unknown studies {unknown}; choose from {list(STUDIES)}")
    out_path = (
        Path(args.out)
        if args.out
        else (RESULTS.with_name("csn_science_quick.json") if args.quick else RESULTS)
    )
    results = json.loads(out_path.read_text()) if out_path.exists() else {}
    if args.report:
        print(report(results))
        return results
    for name in names:
        print(f"{name}:", flush=True)
        start = time.perf_counter()
        preset = QUICK if args.quick else SMALL if args.small else {}
        settings = dict(preset.get(name, {}))
        if args.seeds:
            settings["seeds"] = tuple(int(s) for s in args.seeds.split(","))
        if args.epochs:
            settings["epochs"] = args.epochs
        results[name] = STUDIES[name](**settings)
        results[name]["seconds"] = time.perf_counter() - start
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(results, indent=1))
    if not args.quick:
        draw(results)
    return results


def report(results: dict) -> str:
    """Markdown tables of the studies in ``results`` (what the docs page quotes)."""
    lines = []
    for name in ("default", "momentum", "eigen"):
        if name not in results:
            continue
        rows = results[name]["rows"]
        variants = list(dict.fromkeys(r["variant"] for r in rows))
        workloads = list(dict.fromkeys(r["workload"] for r in rows))
        cell = {(r["workload"], r["variant"]): r for r in rows}
        lines += [f"### {name} ({results[name]['epochs']} epochs; best η, loss, accuracy)", ""]
        lines.append("| workload | " + " | ".join(variants) + " |")
        lines.append("|---" * (len(variants) + 1) + "|")
        for w in workloads:
            cells = []
            for v in variants:
                r = cell.get((w, v))
                if r is None:
                    cells.append("")
                    continue
                text = f"{r['best_lr']:g}: {r['final_loss_mean']:.3g}, {r['accuracy_mean']:.2f}"
                cells.append(text + (f" ({r['diverged']} div.)" if r["diverged"] else ""))
            lines.append(f"| {w} | " + " | ".join(cells) + " |")
        lines.append("")
    if "batchnorm" in results:
        lines += ["### batchnorm (seed 0; first -> last record)", ""]
        lines.append(
            "| run | loss | kernel norm | max cos | min eig(I − VVᵀ) | median λ/quotient |"
        )
        lines.append("|---|---|---|---|---|---|")
        for key, runs in results["batchnorm"]["runs"].items():
            records = runs[0]["records"]
            first, last = records[0], records[-1]

            def show(field, record, reduce=np.median):
                value = record.get(field)
                if value is None:
                    return "–"
                return f"{float(reduce(value)) if isinstance(value, list) else value:.3g}"

            lines.append(
                f"| {key} | {show('loss', first)} → {show('loss', last)} "
                f"| {show('kernel_norms', first, np.mean)} → {show('kernel_norms', last, np.mean)} "
                f"| {show('max_direction_cosine', first)} → {show('max_direction_cosine', last)} "
                f"| {show('min_complement_eigenvalue', first)} → "
                f"{show('min_complement_eigenvalue', last)} "
                f"| {show('curvature_over_quotient', first)} → "
                f"{show('curvature_over_quotient', last)} |"
            )
    return "\n".join(lines)


def draw(results: dict) -> None:
    """The plots of docs/class_subspace_newton.md from a results dict."""
    if "default" in results:
        plot_grid(
            results["default"]["rows"],
            IMAGES / "csn_default_grid.png",
            "ClassSubspaceNewton variants: final training loss over the learning rate",
        )
    if "momentum" in results:
        plot_curves(
            results["momentum"]["rows"],
            IMAGES / "csn_momentum.png",
            "Momentum 0.9 on the whole step vs on the SGD part only",
        )
    if "batchnorm" in results:
        plot_batchnorm(results["batchnorm"], IMAGES / "csn_batchnorm.png")
    if "eigen" in results:
        plot_curves(
            results["eigen"]["rows"],
            IMAGES / "csn_eigen_curves.png",
            "Newton in the top-C eigenspace vs class subspace, SGD, Adam",
        )
        plot_grid(
            results["eigen"]["rows"],
            IMAGES / "csn_eigen_grid.png",
            "Final training loss over the learning rate",
        )


if __name__ == "__main__":
    main()
