"""Internals shared by several keras-curv packages (not public API).

* :mod:`~keras_curv._internal.flat`: the flat parameter layout;
* :mod:`~keras_curv._internal.data`: probe data and class labels;
* :mod:`~keras_curv._internal.model`: the one stateless forward pass;
* :mod:`~keras_curv._internal.losses`: turning what users pass as a loss into a Keras loss,
  and the loss of a model when none is passed;
* :mod:`~keras_curv._internal.optimizer`: the optimizer a model trains with, unwrapped from
  a ``LossScaleOptimizer``;
* :mod:`~keras_curv._internal.validation`: the argument validators;
* :mod:`~keras_curv._internal.versions`: the Keras / TensorFlow floors, checked at import;
* :mod:`~keras_curv._internal.keras_privates`: every Keras / TensorFlow private relied on.
"""
