"""The arena's workloads: models, data splits, targets and step budgets.

Every workload is a train / validation / test split of locally generated or embedded data
(no download), a model builder seeded by the run's seed, the compiled loss, and the
validation *score* that selects a learning rate and defines the target:

* classification workloads score validation accuracy (higher is better);
* the autoencoder scores validation mean squared error (lower is better);
* the ill-conditioned logistic regression is an optimisation problem: it scores the
  suboptimality ``f(w) - f*`` of the regularised training objective, with ``f*`` from
  scipy's L-BFGS-B run to machine precision on the same objective (lower is better);
* the PINN (:mod:`benchmarks.arena_pinn`) scores the relative L2 error against the exact
  solution (lower is better).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache

import keras
import numpy as np

from benchmarks import arena_pinn
from benchmarks.training import conv1d
from benchmarks.training import mlp as reference_mlp
from keras_curv.data import load_dataset, motif_sequences
from keras_curv.models import small_cnn, transformer_classifier


@dataclass(frozen=True)
class Splits:
    """Train / validation / test arrays of one workload."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


@dataclass(frozen=True)
class Workload:
    """One arena problem.

    Attributes:
        name: Key in :data:`WORKLOADS`.
        description: One line for the docs.
        data: Returns the (cached) splits.
        build: ``build(seed)`` returns an uncompiled model.
        loss: The compiled loss.
        score: ``"accuracy"`` (validation accuracy, higher is better), ``"loss"``
            (validation loss, lower is better), ``"suboptimality"`` (training objective
            minus its optimum, lower is better) or ``"relative_error"`` (against an exact
            solution, lower is better).
        target: The score that counts as reached.
        epochs: Step budget in epochs of ``batch_size``.
        batch_size: Mini-batch size.
        classification: Whether the class-subspace optimizers apply.
        full_batch: Whether the full-batch solvers (L-BFGS, Newton-CG, NysNewton-CG) run
            here, with one batch of the whole training set per step.
        full_batch_steps: Their step budget.
    """

    name: str
    description: str
    data: Callable[[], Splits]
    build: Callable[[int], keras.Model]
    loss: Callable[[], keras.losses.Loss | None]
    score: str
    target: float
    epochs: int
    batch_size: int
    classification: bool = True
    full_batch: bool = False
    full_batch_steps: int = 0
    optimum: Callable[[], float] | None = field(default=None, repr=False)

    @property
    def higher_is_better(self) -> bool:
        return self.score == "accuracy"

    def reached(self, value: float) -> bool:
        """Whether a score meets the target."""
        if not np.isfinite(value):
            return False
        return value >= self.target if self.higher_is_better else value <= self.target


def _validation_split(x, y, fraction: float = 0.2, seed: int = 1234):
    order = np.random.default_rng(seed).permutation(len(x))
    cut = int(round(len(x) * (1 - fraction)))
    keep, held = order[:cut], order[cut:]
    return x[keep], y[keep], x[held], y[held]


@cache
def _dataset(name: str) -> Splits:
    data = load_dataset(name, seed=0)
    x, y, x_val, y_val = _validation_split(data.x_train, data.y_train)
    return Splits(x, y, x_val, y_val, data.x_test, data.y_test)


@cache
def _digits_images() -> Splits:
    d = _dataset("digits")
    flat = [a.reshape(len(a), -1) for a in (d.x_train, d.x_val, d.x_test)]
    return Splits(flat[0], flat[0], flat[1], flat[1], flat[2], flat[2])


@cache
def _motifs() -> Splits:
    x, y = motif_sequences(1600, sequence_length=24, vocabulary=40, num_classes=8, seed=0)
    x_train, y_train, x_rest, y_rest = _validation_split(x, y, fraction=0.4)
    half = len(x_rest) // 2
    return Splits(x_train, y_train, x_rest[:half], y_rest[:half], x_rest[half:], y_rest[half:])


LOGREG_L2 = 1e-3


@cache
def _ill_conditioned() -> Splits:
    """Binary labels from a planted separator over features scaled across 3 decades.

    The feature scales ``s_j`` run log-uniformly from 1 to 1e-3, so the data Gram matrix
    (and the Hessian of the regularised logistic loss) has condition number near 1e6.
    """
    rng = np.random.default_rng(0)
    n, d = 1800, 40
    scales = np.logspace(0, -3, d)
    x = rng.standard_normal((n, d)) * scales
    w = rng.standard_normal(d) / scales
    logits = x @ w / np.sqrt(d)
    y = (rng.random(n) < 1 / (1 + np.exp(-4 * logits))).astype("float32")
    x = x.astype("float32")
    return Splits(x[:1000], y[:1000], x[1000:1400], y[1000:1400], x[1400:], y[1400:])


def _logreg_model(seed: int) -> keras.Model:
    return keras.Sequential(
        [
            keras.Input((40,)),
            keras.layers.Dense(
                1,
                kernel_regularizer=keras.regularizers.L2(LOGREG_L2),
                kernel_initializer=keras.initializers.GlorotUniform(seed),
            ),
        ],
        name="logreg",
    )


def logreg_optimum() -> float:
    """The regularised objective's minimum ``f*``."""
    return logreg_solution()[1]


@cache
def logreg_solution() -> tuple[np.ndarray, float]:
    """``(w, b), f*``: the regularised objective's minimiser, by scipy's L-BFGS-B in float64."""
    from scipy.optimize import minimize

    data = _ill_conditioned()
    x, y = data.x_train.astype("float64"), data.y_train.astype("float64")

    def objective(theta):
        w, b = theta[:-1], theta[-1]
        z = x @ w + b
        loss = np.mean(np.logaddexp(0.0, z) - y * z) + LOGREG_L2 * w @ w
        p = 1 / (1 + np.exp(-z))
        grad_w = x.T @ (p - y) / len(y) + 2 * LOGREG_L2 * w
        return loss, np.append(grad_w, np.mean(p - y))

    result = minimize(
        objective, np.zeros(x.shape[1] + 1), jac=True, method="L-BFGS-B",
        options={"maxiter": 100_000, "ftol": 1e-15, "gtol": 1e-12},
    )  # fmt: skip
    return result.x, float(result.fun)


@cache
def _pinn_points() -> Splits:
    """Collocation points (targets unused) and the exact solution on two grids."""
    x = arena_pinn.collocation(256, seed=0)
    x_val, u_val = arena_pinn.solution_grid(nx=64, nt=32)
    x_test, u_test = arena_pinn.solution_grid(nx=128, nt=64)
    return Splits(x, np.zeros((len(x), 1), "float32"), x_val, u_val, x_test, u_test)


def _autoencoder(seed: int) -> keras.Model:
    """A deep autoencoder 64-32-16-8-16-32-64 (ReLU, sigmoid output) on digits."""
    init = keras.initializers.GlorotUniform(seed)
    layers = [keras.Input((64,))]
    for width in (32, 16):
        layers.append(keras.layers.Dense(width, activation="relu", kernel_initializer=init))
    layers.append(keras.layers.Dense(8, kernel_initializer=init))
    for width in (16, 32):
        layers.append(keras.layers.Dense(width, activation="relu", kernel_initializer=init))
    layers.append(keras.layers.Dense(64, activation="sigmoid", kernel_initializer=init))
    return keras.Sequential(layers, name="autoencoder")


def _sparse_ce() -> keras.losses.Loss:
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _seeded_pinn(seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return arena_pinn.ConvectionPINN(seed=seed)


def _seeded(builder: Callable[[], keras.Model]) -> Callable[[int], keras.Model]:
    def build(seed: int) -> keras.Model:
        keras.utils.set_random_seed(seed)
        return builder()

    return build


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload(
            "digits_cnn", "small_cnn (two Conv2D) on the 8x8 digits, batch 32",
            lambda: _dataset("digits"),
            _seeded(lambda: small_cnn((8, 8, 1), 10)), _sparse_ce, "accuracy", 0.95,
            epochs=6, batch_size=32,
        ),
        Workload(
            "mnist1d_mlp", "the MNIST-1D reference MLP (100-100 ReLU), batch 100",
            lambda: _dataset("mnist1d"),
            _seeded(lambda: reference_mlp((40, 1), 10)), _sparse_ce, "accuracy", 0.55,
            epochs=10, batch_size=100,
        ),
        Workload(
            "mnist1d_cnn", "the MNIST-1D reference 1-D CNN (three Conv1D), batch 100",
            lambda: _dataset("mnist1d"),
            _seeded(lambda: conv1d((40, 1), 10)), _sparse_ce, "accuracy", 0.80,
            epochs=10, batch_size=100,
        ),
        Workload(
            "digits_autoencoder", "deep autoencoder 64-32-16-8-16-32-64 on digits, MSE, batch 32",
            _digits_images, _autoencoder, keras.losses.MeanSquaredError, "loss", 0.03,
            epochs=10, batch_size=32, classification=False,
        ),
        Workload(
            "transformer_motifs",
            "Transformer encoder (MHA + LayerNorm) finding one of 8 planted motifs in 24 tokens, "
            "batch 32",
            _motifs, _seeded(lambda: transformer_classifier(24, 40, 8, dropout=0.0)),
            _sparse_ce, "accuracy", 0.90, epochs=6, batch_size=32,
        ),
        Workload(
            "logreg_ill_conditioned",
            "l2-regularised logistic regression, 40 features over 3 decades of scale "
            "(Hessian condition ~1e6), batch 100",
            _ill_conditioned, _logreg_model,
            lambda: keras.losses.BinaryCrossentropy(from_logits=True),
            "suboptimality", 1e-3, epochs=20, batch_size=100, classification=False,
            full_batch=True, full_batch_steps=40, optimum=logreg_optimum,
        ),
        Workload(
            "pinn_convection",
            "PINN for 1-D convection (beta 5): tanh MLP 32x3, physics loss in compute_loss, "
            "256 collocation points, batch 128",
            _pinn_points, _seeded_pinn, lambda: None, "relative_error", 0.05,
            epochs=60, batch_size=128, classification=False, full_batch=True,
            full_batch_steps=120,
        ),
    )
}  # fmt: skip
