"""``keras_curv.minimize``: deterministic full-batch minimisation of a Keras model's loss.

One iteration is one step of a full-batch solver (:class:`~keras_curv.LBFGS`,
:class:`~keras_curv.NewtonCG`, :class:`~keras_curv.NysNewtonCG`,
:class:`~keras_curv.LevenbergMarquardt`: the very ``solve`` they run in ``fit``) on a
:class:`~keras_curv.optimizers.objective.FullBatchObjective`, traced once with
``tf.function``. Keras callbacks see one "epoch" of one "batch" per iteration, with
the iteration's statistics in ``logs``; ``model.stop_training`` ends the run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import keras
import tensorflow as tf

from keras_curv._internal import validation
from keras_curv.optimizers.distribute import all_finite
from keras_curv.optimizers.full_batch import COMMON_STATISTICS, FullBatchOptimizer
from keras_curv.optimizers.lbfgs import LBFGS
from keras_curv.optimizers.newton_cg import LevenbergMarquardt, NewtonCG, NysNewtonCG
from keras_curv.optimizers.objective import FullBatchObjective

METHODS: dict[str, type[FullBatchOptimizer]] = {
    "lbfgs": LBFGS,
    "newton_cg": NewtonCG,
    "nys_newton_cg": NysNewtonCG,
    "levenberg_marquardt": LevenbergMarquardt,
}
# Consecutive iterations without a step after which a run stops: a line search that
# found no decrease along −g (L-BFGS restarts from it) or after more damping; LM
# rejects trial points routinely while λ grows.
_STALLS = {LBFGS: 2, NewtonCG: 3, NysNewtonCG: 3, LevenbergMarquardt: 30}


class MinimizeHistory(keras.callbacks.History):
    """What :func:`minimize` returns: Keras's ``History`` plus how the run ended.

    ``history`` has one entry per iteration for ``loss`` (after the iteration),
    ``gradient_norm`` (‖∇f‖₂ there), ``step_size``, ``function_evaluations``,
    ``cg_iterations``, ``hessian_vector_products`` and the solver's own statistics
    (``damping``, ``curvature_pairs``...).

    Attributes:
        converged: Whether a tolerance was met (not: out of iterations, stalled, or
            stopped by a callback).
        message: Why the run ended.
        iterations: Iterations run.
        initial_loss: ``f`` at the starting weights.
        initial_gradient_norm: ``‖∇f‖₂`` there.
        solver: The solver (its state, e.g. L-BFGS's memory, is kept for a next call).
    """

    def __init__(self) -> None:
        super().__init__()
        self.converged = False
        self.message = ""
        self.iterations = 0
        self.initial_loss = math.nan
        self.initial_gradient_norm = math.nan
        self.solver: FullBatchOptimizer | None = None

    @property
    def loss(self) -> float:
        """The final loss."""
        values = self.history.get("loss")
        return values[-1] if values else self.initial_loss

    def __repr__(self) -> str:
        return (
            f"MinimizeHistory(loss={self.loss:.6g}, iterations={self.iterations}, "
            f"converged={self.converged}, message={self.message!r})"
        )


def _solver(method: Any) -> FullBatchOptimizer:
    if isinstance(method, FullBatchOptimizer):
        return method
    if isinstance(method, str) and method in METHODS:
        return METHODS[method]()
    raise ValueError(
        f"`method` must be one of {tuple(METHODS)} or a keras_curv full-batch optimizer "
        f"instance (e.g. keras_curv.NysNewtonCG(rank=20)); got {method!r}."
    )


def _check_solver(solver: FullBatchOptimizer, objective: FullBatchObjective, loss: Any) -> None:
    model = objective.model
    compiled = loss is None and objective.residuals is None
    solver.check_model(model, model.loss if compiled else None)
    uses_ggn = isinstance(solver, LevenbergMarquardt) or getattr(solver, "curvature", "") == "ggn"
    if loss is not None and uses_ggn:
        raise ValueError(
            f"{type(solver).__name__} uses the Gauss–Newton matrix, which splits the loss at "
            "the model's outputs; a `loss(model, x, y)` callable does not expose them. Pass "
            "residuals=<callable returning r> (the loss is then ‖r‖²), use NewtonCG/"
            "NysNewtonCG with curvature='hessian', or compile the model with its loss and "
            "pass loss=None."
        )
    if solver.built and solver.flat_dim != objective.dim:
        raise ValueError(
            f"The {type(solver).__name__} instance was built for {solver.flat_dim} "
            f"parameters and this model has {objective.dim}: pass a fresh one."
        )


def minimize(
    model: keras.Model,
    x: Any,
    y: Any = None,
    *,
    method: str | FullBatchOptimizer = "lbfgs",
    loss: Callable | None = None,
    residuals: Callable | None = None,
    sample_weight: Any = None,
    batch_size: int | None = None,
    max_iterations: int = 100,
    tolerance: float = 1e-5,
    loss_tolerance: float = 1e-12,
    callbacks: Sequence[keras.callbacks.Callback] | None = None,
    verbose: str | int = "auto",
    training: bool = False,
) -> MinimizeHistory:
    """Minimises a model's loss over a fixed data set with a full-batch second-order method.

    ```
    f(θ) = (1/N) Σ_b n_b L_b(θ)       (the compiled loss with regularization, or loss(model, x, y))
    θ_{k+1} = θ_k + t_k d_k            (d_k, t_k from the method; see each optimizer)
    ```

    Deterministic: every iteration sees all the data (accumulated exactly over
    ``batch_size`` batches), in inference mode unless ``training``. Stops when
    ``max |∇f| ≤ tolerance``, when an accepted step changes the loss by at most
    ``loss_tolerance · max(|f|, 1)``, after ``max_iterations``, when the method makes
    no progress, or when a callback sets ``model.stop_training``. The model's
    variables hold the final weights; they are never set to non-finite values.

    Args:
        model: The model whose trainable weights are fitted.
        x: Inputs (arrays or a nest of them), or a finite ``tf.data.Dataset`` of
            ``(x, y)`` / ``(x, y, sample_weight)``.
        y: Targets (``None`` for a ``loss`` of the inputs only, such as a PINN's).
        method: ``"lbfgs"``, ``"newton_cg"``, ``"nys_newton_cg"``,
            ``"levenberg_marquardt"``, or a configured optimizer instance
            (``keras_curv.LBFGS(memory=20)``), whose state carries over between calls.
        loss: ``None`` for the compiled loss, or ``loss(model, x, y) -> scalar`` (the
            batch mean; it may differentiate with respect to ``x`` with a
            ``tf.GradientTape``).
        residuals: Instead of ``loss``, ``residuals(model, x, y) -> r``: the loss is
            ``‖r‖²`` (least squares, e.g. a PINN's scaled residuals), and the
            Gauss–Newton matrix ``2 JᵀJ`` serves Levenberg–Marquardt and
            ``curvature="ggn"``.
        sample_weight: Per-sample weights (compiled loss only).
        batch_size: Rows per batch for the accumulation (default: one batch).
        max_iterations: Most iterations (int ≥ 1).
        tolerance: Gradient tolerance (max-norm).
        loss_tolerance: Relative loss-change tolerance.
        callbacks: Keras callbacks (``TensorBoard``, ``EarlyStopping(monitor="loss")``,
            ``TerminateOnNaN``, the keras-curv diagnostic callbacks...).
        verbose: ``"auto"``/1 progress bar, 2 one line at the end, 0 silent.
        training: Evaluate the model in training mode (refused with Dropout/noise).

    Returns:
        A :class:`MinimizeHistory`.

    Raises:
        ValueError: bad arguments, empty data, a stochastic model in training mode,
            a loss without second derivatives for a Newton method, or a non-finite
            loss at the starting weights.

    Example:
        >>> model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        >>> result = keras_curv.minimize(model, x, y, method="lbfgs", max_iterations=200)
        >>> result.loss, result.converged, result.message
    """
    max_iterations = validation.integer(max_iterations, "max_iterations", minimum=1)
    tolerance = validation.non_negative(tolerance, "tolerance")
    loss_tolerance = validation.non_negative(loss_tolerance, "loss_tolerance")
    if verbose == "auto":
        verbose = 1
    if verbose not in (0, 1, 2):
        raise ValueError(f"`verbose` must be 'auto', 0, 1 or 2; received verbose={verbose!r}.")
    solver = _solver(method)
    objective = FullBatchObjective(
        model,
        x,
        y,
        loss=loss,
        residuals=residuals,
        sample_weight=sample_weight,
        batch_size=batch_size,
        training=training,
    )
    _check_solver(solver, objective, loss)
    if not solver.built:
        solver.build(objective.variables)

    w0 = objective.weights()
    f0, g0 = objective.value_and_gradient(w0)
    if not bool(all_finite([f0, g0])):
        raise ValueError(
            f"The loss or its gradient is not finite at the starting weights (loss={float(f0)}); "
            "check the data, the loss and the initialisation."
        )
    current_loss = tf.Variable(f0, trainable=False)
    current_gradient = tf.Variable(g0, trainable=False)
    iterate = tf.function(
        lambda: _iteration(solver, objective, current_loss, current_gradient), autograph=False
    )

    history = MinimizeHistory()
    history.solver = solver
    history.initial_loss = float(f0)
    history.initial_gradient_norm = float(tf.norm(g0))
    callback_list = keras.callbacks.CallbackList(
        list(callbacks or []) + [history],
        add_history=False,
        add_progbar=False,
        model=model,
        verbose=0,
        epochs=max_iterations,
        steps=1,
    )
    names = ["loss", "gradient_norm", *COMMON_STATISTICS, *solver.STATISTICS]
    progbar = None
    if verbose:
        progbar = keras.utils.Progbar(
            max_iterations, verbose=verbose, stateful_metrics=names, unit_name="iteration"
        )
    model.stop_training = False
    callback_list.on_train_begin()
    logs: dict[str, float] = {"loss": history.initial_loss}
    message = f"reached max_iterations={max_iterations}"
    stalls, stall_limit = 0, _STALLS.get(type(solver), 3)
    previous_loss = history.initial_loss
    if float(tf.reduce_max(tf.abs(g0))) <= tolerance:
        history.converged, message = True, "the gradient tolerance holds at the start"
        max_iterations = 0
    for k in range(max_iterations):
        callback_list.on_epoch_begin(k)
        callback_list.on_train_batch_begin(0)
        result = {name: float(value) for name, value in iterate().items()}
        logs = {name: result[name] for name in names}
        callback_list.on_train_batch_end(0, logs)
        callback_list.on_epoch_end(k, logs)
        history.iterations = k + 1
        if progbar is not None:
            progbar.update(k + 1, [(n, logs[n]) for n in names[:4]])
        stalls = stalls + 1 if result["step_size"] == 0.0 else 0
        change = abs(previous_loss - logs["loss"]) / max(abs(logs["loss"]), 1.0)
        previous_loss = logs["loss"]
        if result["max_gradient"] <= tolerance:
            history.converged, message = True, f"max |gradient| <= tolerance={tolerance:g}"
        elif result["step_size"] > 0.0 and change <= loss_tolerance:
            history.converged = True
            message = f"relative loss change <= loss_tolerance={loss_tolerance:g}"
        elif stalls >= stall_limit:
            message = f"no decrease in {stalls} consecutive iterations"
        elif getattr(model, "stop_training", False):
            message = "stopped by a callback (model.stop_training)"
        else:
            continue
        break
    if progbar is not None and history.iterations < progbar.target:
        progbar.update(
            history.iterations, [(n, logs[n]) for n in names[:4] if n in logs], finalize=True
        )
    history.message = message
    callback_list.on_train_end(logs)
    return history


def _iteration(
    solver: FullBatchOptimizer,
    objective: FullBatchObjective,
    current_loss: tf.Variable,
    current_gradient: tf.Variable,
) -> dict[str, tf.Tensor]:
    """One solver step on the objective, applied only if finite (traced once)."""
    w = objective.weights()
    loss = tf.convert_to_tensor(current_loss)
    gradient = tf.convert_to_tensor(current_gradient)
    outcome = solver.solve(objective, w, loss, gradient)
    finite = all_finite([outcome.step, outcome.loss])

    def apply():
        new_w = w + outcome.step
        objective.assign(new_w)
        solver.commit(outcome)
        solver.iterations.assign_add(1)
        if outcome.gradient is None:
            new_loss, new_gradient = objective.value_and_gradient(new_w)
        else:
            new_loss, new_gradient = outcome.loss, outcome.gradient
        current_loss.assign(new_loss)
        current_gradient.assign(new_gradient)
        return outcome.statistics["step_size"]

    def reject():
        return tf.zeros_like(outcome.statistics["step_size"])

    step_size = tf.cond(finite, apply, reject)
    statistics = dict(outcome.statistics, step_size=step_size)
    g = tf.convert_to_tensor(current_gradient)
    return {
        **statistics,
        "loss": tf.convert_to_tensor(current_loss),
        "gradient_norm": tf.norm(g),
        "max_gradient": tf.reduce_max(tf.abs(g)),
    }
