"""A new curvature optimizer written against keras-curv's contract, in about 40 lines.

``GradientNewton`` steps along the gradient with Newton's step size on the local quadratic
model (steepest descent with an exact line search):

    θ ← θ − lr · α g,        α = gᵀg / (gᵀ H g + δ gᵀg)

It needs one Hessian-vector product of the training loss per step, which the step's
:class:`keras_curv.TrainBatch` provides. ``docs/integration.md`` walks through it;
``tests/optimizers/test_contract_example.py`` checks it against NumPy.

Run ``python examples/gradient_newton.py`` to train a least-squares model with it.
"""

from __future__ import annotations

# --8<-- [start:GradientNewton]
import keras
import numpy as np
import tensorflow as tf

import keras_curv
from keras_curv.optimizers import StepStatistics, replica_sum


@keras.saving.register_keras_serializable(package="examples")
class GradientNewton(keras_curv.CurvatureOptimizer):
    """Steepest descent with Newton's step size ``α = gᵀg / (gᵀHg + δ gᵀg)``.

    Args:
        learning_rate: Multiplies ``α`` (1 is the exact line search on the quadratic model).
        damping: ``δ ≥ 0``, relative to ``|g|²``: bounds the step where ``gᵀHg`` is small.
        **kwargs: Keras's optimizer arguments.
    """

    def __init__(self, learning_rate=1.0, damping=1e-3, name="gradient_newton", **kwargs):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.damping = float(damping)

    def step_statistics(self, batch):
        def statistics(replica):
            # Each `yield` returns its argument summed over the replicas in sync.
            gradient = yield replica.gradients()
            curvature = yield replica.hessian_vector_product(gradient)
            g_g = tf.add_n([tf.reduce_sum(g * g) for g in gradient])
            g_h_g = tf.add_n([tf.reduce_sum(g * h) for g, h in zip(gradient, curvature)])
            return g_g / (g_h_g + self.damping * g_g)

        with batch.step_graph():
            step_size = replica_sum(batch, statistics)
        return StepStatistics(shared={"step_size": step_size})

    def update_step(self, gradient, variable, learning_rate):
        step_size = self.statistics_for(variable)["step_size"]
        scale = keras.ops.cast(learning_rate * step_size, variable.dtype)
        self.assign_sub(variable, scale * keras.ops.cast(gradient, variable.dtype))

    def get_config(self):
        return {**super().get_config(), "damping": self.damping}


# --8<-- [end:GradientNewton]


def main() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 8)) * np.geomspace(1.0, 30.0, 8)  # condition number ~ 900
    y = x @ rng.normal(size=(8, 1)) + 0.01 * rng.normal(size=(256, 1))
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(1)])
    model.compile(optimizer=GradientNewton(), loss="mse")
    history = model.fit(x, y, batch_size=256, epochs=20, verbose=0)
    losses = history.history["loss"]
    print(f"GradientNewton, full batch: loss {losses[0]:.4g} -> {losses[-1]:.4g} in 20 steps")


if __name__ == "__main__":
    main()
