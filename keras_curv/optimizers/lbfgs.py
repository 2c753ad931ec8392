"""L-BFGS with a strong-Wolfe line search, for ``fit`` on a full batch and for ``minimize``.

The math is :func:`~keras_curv.optimizers.full_batch_math.two_loop_direction`,
:func:`~keras_curv.optimizers.full_batch_math.push_curvature_pair` and
:func:`~keras_curv.optimizers.full_batch_math.strong_wolfe`; ``docs/full_batch.md``
explains the choices.
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

from keras_curv._internal import validation
from keras_curv.optimizers import full_batch_math as fbm
from keras_curv.optimizers.full_batch import FullBatchOptimizer, StepOutcome


@keras.saving.register_keras_serializable(package="keras_curv")
class LBFGS(FullBatchOptimizer):
    """Limited-memory BFGS with a strong-Wolfe line search.

    With the ``m`` newest pairs ``sᵢ = θᵢ₊₁ − θᵢ``, ``yᵢ = gᵢ₊₁ − gᵢ`` (both on the same
    batch):

    ```
    d = −H g                  (two-loop recursion, H₀ = sᵀy / yᵀy · I)
    t: f(θ + t d) ≤ f + c1 t gᵀd,  |∇f(θ + t d)ᵀd| ≤ c2 |gᵀd|       (strong Wolfe)
    θ ← θ + t d;  store (t d, ∇f(θ + t d) − g) unless sᵀy ≤ ε ‖s‖‖y‖
    ```

    The first trial step is ``learning_rate`` (``learning_rate · min(1, 1/‖g‖₁)`` while
    the memory is empty). A line search that finds no decrease leaves the weights and
    clears the memory (the next step is along ``−g``). For a fixed full batch
    (``batch_size=len(x)``); on changing batches it warns once (``docs/full_batch.md``).

    Args:
        learning_rate: First trial step of the line search (default 1).
        memory: Curvature pairs kept, ``m`` (int ≥ 1).
        c1: Sufficient-decrease constant, in ``(0, c2)``.
        c2: Curvature constant, in ``(c1, 1)``.
        max_evaluations: Loss-and-gradient evaluations per step (int ≥ 1).
        tolerance_change: Smallest bracket the line search zooms into.
        name: Name of the optimizer.
        **kwargs: Keras's optimizer arguments (``weight_decay`` and clipping are refused).

    Example:
        >>> model.compile(optimizer=keras_curv.LBFGS(), loss="mse")
        >>> model.fit(x, y, batch_size=len(x), epochs=50)
    """

    STATISTICS = ("curvature_pairs",)
    needs_curvature = False

    def __init__(
        self,
        learning_rate: Any = 1.0,
        memory: int = 10,
        c1: float = 1e-4,
        c2: float = 0.9,
        max_evaluations: int = 25,
        tolerance_change: float = 1e-9,
        name: str = "lbfgs",
        **kwargs: Any,
    ) -> None:
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.memory = validation.integer(memory, "memory", minimum=1)
        self.c1 = validation.number(c1, "c1", low=0.0, high=1.0, low_open=True, high_open=True)
        self.c2 = validation.number(c2, "c2", low=self.c1, high=1.0, low_open=True, high_open=True)
        self.max_evaluations = validation.integer(max_evaluations, "max_evaluations", minimum=1)
        self.tolerance_change = validation.positive(tolerance_change, "tolerance_change")

    def build_state(self, dim: int, dtype: tf.DType) -> dict[str, Any]:
        """The pairs' circular buffers ``(m, n)``, their count and the newest row."""
        return {
            "s_memory": self.state_variable((self.memory, dim), dtype, "s_memory"),
            "y_memory": self.state_variable((self.memory, dim), dtype, "y_memory"),
            "count": self.state_variable((), "int32", "pair_count"),
            "newest": self.state_variable((), "int32", "newest_pair", value=-1),
        }

    def solve(self, problem, w, loss, gradient) -> StepOutcome:
        """Two-loop direction, strong-Wolfe step, new curvature pair."""
        state = {k: tf.convert_to_tensor(v) for k, v in self._state.items()}
        s_memory, y_memory = state["s_memory"], state["y_memory"]
        direction = fbm.two_loop_direction(
            gradient, s_memory, y_memory, state["count"], state["newest"]
        )
        slope = tf.reduce_sum(gradient * direction)
        descent = tf.logical_and(slope < 0.0, tf.math.is_finite(slope))
        # Rounding can make −Hg an ascent direction: restart from the gradient.
        direction = tf.where(descent, direction, -gradient)
        count = tf.where(descent, state["count"], tf.zeros_like(state["count"]))
        dtype = gradient.dtype
        one = tf.ones([], dtype)
        first = tf.minimum(one, tf.math.divide_no_nan(one, tf.reduce_sum(tf.abs(gradient))))
        start = self.initial_step(dtype) * tf.where(count > 0, one, first)
        search = fbm.strong_wolfe(
            lambda t: problem.value_and_gradient(w + t * direction),
            loss,
            gradient,
            direction,
            start,
            c1=self.c1,
            c2=self.c2,
            max_evaluations=self.max_evaluations,
            tolerance_change=self.tolerance_change,
        )
        step = search.step * direction
        s_memory, y_memory, count, newest, _ = fbm.push_curvature_pair(
            s_memory, y_memory, count, state["newest"], step, search.gradient - gradient
        )
        progress = search.step > 0.0
        zero = tf.zeros([], dtype)
        return StepOutcome(
            step=step,
            loss=search.loss,
            gradient=search.gradient,
            statistics={
                "step_size": search.step,
                "function_evaluations": tf.cast(search.evaluations, dtype),
                "cg_iterations": zero,
                "hessian_vector_products": zero,
                "curvature_pairs": tf.cast(tf.where(progress, count, tf.zeros_like(count)), dtype),
            },
            state={
                "s_memory": s_memory,
                "y_memory": y_memory,
                "count": tf.where(progress, count, tf.zeros_like(count)),
                "newest": newest,
            },
        )

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            {
                "memory": self.memory,
                "c1": self.c1,
                "c2": self.c2,
                "max_evaluations": self.max_evaluations,
                "tolerance_change": self.tolerance_change,
            }
        )
        return config
