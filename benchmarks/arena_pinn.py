"""The arena's PINN: 1-D convection as a Keras model trained by plain ``compile``/``fit``.

The problem of ``examples/pinn_convection.py`` (Rathore et al. 2024),

    u_t + β u_x = 0,  x ∈ [0, 2π], t ∈ [0, 1],  u(x, 0) = sin x,  u(0, t) = u(2π, t),

with solution u = sin(x − βt), at β = 5 so that the arena's budget can solve it. The
model's ``compute_loss`` is the physics loss (Keras's documented override point, the one
every curvature optimizer sees through the contract):

    L(θ) = mean_i (∂_t u_θ + β ∂_x u_θ)²(p_i) + mean_j (u_θ(x_j, 0) − sin x_j)²
           + mean_j (u_θ(0, t_j) − u_θ(2π, t_j))²,

over the batch's collocation points ``p_i`` (the fit data; targets unused) and fixed
initial and boundary points. The score is the relative L2 error against the exact
solution on a 64 × 32 grid.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf

BETA = 5.0
TWO_PI = 2.0 * math.pi


@keras.saving.register_keras_serializable(package="keras_curv_benchmarks")
class ConvectionPINN(keras.Model):
    """A tanh MLP ``u(x, t)`` whose training loss is the convection residual."""

    def __init__(self, width: int = 32, depth: int = 3, beta: float = BETA, edge: int = 64,
                 seed: int = 0, **kwargs):  # fmt: skip
        super().__init__(**kwargs)
        init = keras.initializers.GlorotNormal(seed)
        self.hidden = [
            keras.layers.Dense(width, activation="tanh", kernel_initializer=init)
            for _ in range(depth)
        ]
        self.head = keras.layers.Dense(1, kernel_initializer=init)
        self.beta, self.width, self.depth, self.edge, self.seed = beta, width, depth, edge, seed
        x0 = np.linspace(0, TWO_PI, edge, dtype="float32")
        tb = np.linspace(0, 1, edge, dtype="float32")
        self.initial = np.stack([x0, np.zeros_like(x0)], 1)
        self.initial_u = np.sin(x0)
        self.left = np.stack([np.zeros_like(tb), tb], 1)
        self.right = np.stack([np.full_like(tb, TWO_PI), tb], 1)

    def call(self, inputs):
        for layer in self.hidden:
            inputs = layer(inputs)
        return self.head(inputs)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        x = tf.convert_to_tensor(x)
        with tf.GradientTape() as tape:
            tape.watch(x)
            u = self(x, training=training)
        du = tape.gradient(u, x)
        pde = du[:, 1] + self.beta * du[:, 0]
        start = self(self.initial, training=training)[:, 0] - self.initial_u
        periodic = (
            self(self.left, training=training)[:, 0] - self(self.right, training=training)[:, 0]
        )
        return tf.reduce_mean(pde**2) + tf.reduce_mean(start**2) + tf.reduce_mean(periodic**2)

    def get_config(self):
        return {**super().get_config(), "width": self.width, "depth": self.depth,
                "beta": self.beta, "edge": self.edge, "seed": self.seed}  # fmt: skip


def collocation(num_points: int = 512, seed: int = 0) -> np.ndarray:
    """Uniform collocation points ``(x, t)``."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.uniform(0, TWO_PI, num_points), rng.uniform(0, 1, num_points)], 1).astype(
        "float32"
    )


def solution_grid(beta: float = BETA, nx: int = 64, nt: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Grid points ``(x, t)`` and the exact ``u = sin(x − βt)`` there."""
    gx, gt = np.meshgrid(np.linspace(0, TWO_PI, nx), np.linspace(0, 1, nt))
    points = np.stack([gx.ravel(), gt.ravel()], 1).astype("float32")
    return points, np.sin(gx.ravel() - beta * gt.ravel()).astype("float32")


def relative_error(model: keras.Model, points: np.ndarray, exact: np.ndarray) -> float:
    """``‖u_θ − u‖ / ‖u‖`` on the given points."""
    u = model.predict(points, batch_size=4096, verbose=0)[:, 0]
    return float(np.linalg.norm(u - exact) / np.linalg.norm(exact))
