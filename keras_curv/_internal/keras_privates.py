"""Every Keras and TensorFlow private that keras-curv relies on, in one place.

Each function here wraps one private (or one undocumented convention) and says why it
is needed. ``tests/test_keras_privates.py`` pins every one of them against the
installed Keras and TensorFlow, so that an upgrade that moves one fails there, loudly,
instead of silently in training. Nothing outside this module touches a Keras or
TensorFlow private.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import keras
import tensorflow as tf
from tensorflow.python.ops import control_flow_util

# How many callers :func:`calling_models` looks through (see there).
_DISCOVERY_DEPTH = 32


def under_xla() -> bool:
    """Whether ops built now will be compiled by XLA (``jit_compile``).

    TensorFlow has no public way to ask; XLA drops ``Switch``/``Merge`` and assertions,
    so the optimizers need to know.
    """
    graph = tf.compat.v1.get_default_graph()
    return bool(control_flow_util.GraphOrParentsInXlaContext(graph))


def strategy_needs_merge_call() -> bool:
    """Whether the current strategy's replicas must rendezvous through ``merge_call``.

    ``MirroredStrategy`` over several local devices does; Keras's ``LossScaleOptimizer``
    then calls the inner optimizer inside a cross-replica ``tf.cond``, where no collective
    can run. Keras reads the same ``tf.__internal__`` flag for the same decision.
    """
    return not tf.__internal__.distribute.strategy_supports_no_merge_call()


def flatten_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """Every layer of ``model``, nested ones included (Keras's ``_flatten_layers``)."""
    return list(model._flatten_layers(include_self=False))


def call_takes_training(model: keras.Model) -> bool:
    """Whether ``model.call`` accepts ``training`` (Keras records it at construction)."""
    return bool(getattr(model, "_call_has_training_arg", True))


def has_random_state(layer: keras.layers.Layer) -> bool:
    """Whether ``layer`` draws random numbers in its forward pass (Dropout, noise...)."""
    return bool(getattr(layer, "_seed_generators", ()))


def softmax_logits(outputs: Any) -> tf.Tensor | None:
    """The pre-softmax logits Keras caches on a softmax output, or ``None``.

    Keras's ``softmax`` activation keeps them (``_keras_logits``) so that cross-entropy
    on probabilities is computed stably; the class scores use them the same way.
    """
    return getattr(outputs, "_keras_logits", None)


def run_before(op: tf.Operation, guard: tf.Operation) -> bool:
    """Makes ``guard`` a control input of ``op`` (already built); False where unsupported.

    Used to run the label check before the loss that already reads the labels, so that
    the check's message, not the loss kernel's, is what the user sees.
    """
    add_control_input = getattr(op, "_add_control_input", None)
    if add_control_input is None:
        return False
    add_control_input(guard)
    return True


def track_optimizer_variable(optimizer: keras.optimizers.Optimizer, variable: Any) -> None:
    """Adds a variable created outside ``add_variable`` (an RNG state) to the optimizer's.

    So that it is saved, restored and mirrored like the optimizer's own state.
    """
    optimizer._track_variable(variable)


def clipped_gradients(optimizer: keras.optimizers.Optimizer, gradients: list) -> list:
    """``gradients`` clipped as the optimizer's ``clipnorm``/``clipvalue``/``global_clipnorm`` do.

    A curvature optimizer that projects the gradient before Keras's per-variable updates
    must project the gradient those updates will see.
    """
    return list(optimizer._clip_gradients(gradients))


def variable_index(optimizer: keras.optimizers.Optimizer, variable: Any) -> int:
    """The position of a trainable ``variable`` in the optimizer's list.

    Keras's own optimizers use this private in their ``update_step`` to find slots.
    """
    return optimizer._get_variable_index(variable)


def calling_models(start_depth: int = 2) -> Iterator[keras.Model]:
    """The ``keras.Model`` instances among the receivers (``self``) of the callers.

    Keras never tells an optimizer which model it trains. A curvature optimizer needs
    to know once, before its first train step is traced for real; Keras calls it from
    the model's own methods (``_symbolic_build``, ``train_step``, ``compile_from_config``),
    so the model is the ``self`` of a caller. Only ``self`` is read, never another
    local, and only at the optimizer's first contact with a model, never per trace.
    ``keras_curv.attach(model)`` makes this unnecessary.
    """
    frame = sys._getframe(start_depth)
    for _ in range(_DISCOVERY_DEPTH):
        if frame is None:
            return
        owner = frame.f_locals.get("self")
        if isinstance(owner, keras.Model):
            yield owner
        frame = frame.f_back
