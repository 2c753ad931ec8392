r"""The optional measurements of ``HessianSpectrum``, as functions of operators.

* :func:`resolve_blocks` and :class:`BlockSpectra`: the top eigenvalue and the trace of
  each block's Hessian :math:`H_{BB}` (a layer, or a group of variables), with the
  Hessian operator restricted to the block;
* :func:`preconditioned_sharpness`: :math:`\lambda_1(P^{-1} H)` by Lanczos on
  :math:`P^{-1/2} H P^{-1/2}`;
* :func:`curvature_model_quality`: an optimizer's curvature model :math:`M` against
  :math:`H`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from keras_curv.curvature.alignment import subspace_overlap
from keras_curv.curvature.eigensolvers import EigenResult, top_eigenpairs
from keras_curv.curvature.operators import LinearOperator


def _layer_variables(model: keras.Model, name: str) -> list:
    try:
        layer = model.get_layer(name)
    except ValueError:
        known = [layer.name for layer in model.layers if layer.trainable_weights]
        raise ValueError(
            f"`blocks` names a layer {name!r} that the model does not have; its layers with "
            f"trainable weights are {known}."
        ) from None
    return list(layer.trainable_variables)


def resolve_blocks(model: keras.Model, blocks: Any) -> dict[str, list]:
    """The blocks ``HessianSpectrum(blocks=...)`` measures: name -> trainable variables.

    Args:
        model: The model.
        blocks: ``None`` (no blocks); ``"layer"`` (one block per layer of ``model.layers``
            with trainable weights, a nested model or layer counting as one); a list of
            layer names; or a mapping block name -> list of layer names and/or trainable
            variables.

    Raises:
        ValueError: an unknown layer, a block without trainable variables, or a variable
            that is not trainable in the model.
    """
    if blocks is None:
        return {}
    if isinstance(blocks, str):
        if blocks != "layer":
            raise ValueError(
                f'`blocks` must be None, "layer", a list of layer names or a dict; got {blocks!r}.'
            )
        return {
            layer.name: list(layer.trainable_variables)
            for layer in model.layers
            if layer.trainable_variables
        }
    if isinstance(blocks, Mapping):
        items = list(blocks.items())
    elif isinstance(blocks, Sequence) and all(isinstance(b, str) for b in blocks):
        items = [(name, [name]) for name in blocks]
    else:
        raise ValueError(
            '`blocks` must be None, "layer", a list of layer names, or a dict name -> list of '
            f"layer names / variables; got {type(blocks).__name__}."
        )
    trainable = {id(v) for v in model.trainable_variables}
    resolved = {}
    for name, members in items:
        variables = []
        for member in [members] if isinstance(members, str) else list(members):
            variables.extend(
                _layer_variables(model, member) if isinstance(member, str) else [member]
            )
        if not variables:
            raise ValueError(f"The block {name!r} has no trainable variables.")
        if any(id(v) not in trainable for v in variables):
            raise ValueError(
                f"The block {name!r} holds a variable that is not trainable in the model."
            )
        resolved[str(name).replace("/", "_")] = variables
    return resolved


class BlockSpectra:
    """The top eigenvalue and the trace of each block's Hessian :math:`H_{BB}`.

    The eigenvalue comes from Lanczos on the full Hessian restricted to the block's flat
    index ranges (:meth:`~keras_curv.curvature.LinearOperator.restrict`), which reuses
    the full operator's traced product, so a model with many layers traces nothing
    more; the trace is the block's share of the full Hutch++ estimate
    (:func:`~keras_curv.curvature.hutchinson_trace` with ``ranges``), for no product.

    Args:
        hessian: The full Hessian operator.
        ranges: Block name -> its ``(start, stop)`` flat index ranges.
        method: Eigensolver.
        tol: Its tolerance.
    """

    def __init__(
        self,
        hessian: LinearOperator,
        ranges: Mapping[str, list[tuple[int, int]]],
        method: str,
        tol: float,
    ):
        self.ranges = dict(ranges)
        self.operators = {name: hessian.restrict(r) for name, r in self.ranges.items()}
        self.method = method
        self.tol = tol
        self._eigenvectors: dict[str, np.ndarray | None] = dict.fromkeys(self.operators)

    @property
    def num_matvecs(self) -> int:
        return sum(op.num_matvecs for op in self.operators.values())

    def expected_products(self) -> int:
        # A warm Lanczos for one eigenvalue to 1e-3 took 4-6 products on the demo CNN,
        # a cold one about 20.
        return 10 * len(self.operators)

    def calibrate(self) -> None:
        """Traces each block's layout changes (the full product is traced already)."""
        for op in self.operators.values():
            op.matvec(tf.ones([op.dim], op.dtype)).numpy()

    def measure(self, rng: np.random.Generator, traces: Sequence[float]) -> dict[str, dict]:
        """``{block: {"top_eigenvalue", "trace"}}``; ``traces`` are the full estimate's parts."""
        found = {}
        for (name, op), trace in zip(self.operators.items(), traces):
            result = top_eigenpairs(
                op,
                1,
                method=self.method,
                tol=self.tol,
                seed=int(rng.integers(2**31)),
                init=self._eigenvectors[name],
            )
            self._eigenvectors[name] = result.eigenvectors
            found[name] = {"top_eigenvalue": float(result.eigenvalues[0]), "trace": float(trace)}
        return found


def preconditioned_sharpness(
    hessian: LinearOperator,
    preconditioner: LinearOperator,
    *,
    method: str,
    tol: float,
    seed: int,
    init: np.ndarray | None,
) -> EigenResult:
    r""":math:`\lambda_1(P^{-1}H) = \lambda_1(P^{-1/2} H P^{-1/2})` and its eigenvector.

    Raises:
        ValueError: :math:`P` is not positive definite (``P.power(-0.5)`` fails).
        NotImplementedError: :math:`P` has no closed-form power.
    """
    root = preconditioner.power(-0.5)
    return top_eigenpairs(root @ hessian @ root, 1, method=method, tol=tol, seed=seed, init=init)


def curvature_model_quality(
    model: LinearOperator,
    hessian: LinearOperator,
    eigenvalues: np.ndarray,
    eigenvectors: np.ndarray,
    rng: np.random.Generator,
    num_probes: int,
) -> dict[str, Any]:
    r"""How well a curvature model :math:`M` matches :math:`H` on the top-:math:`k` eigenpairs.

    With :math:`(\lambda_i, u_i)` the top eigenpairs of :math:`H`:

    * ``rayleigh``: :math:`u_i^\top M u_i` (``(k,)``; :math:`u_i^\top H u_i = \lambda_i`);
    * ``rayleigh_ratio``: the mean of :math:`u_i^\top M u_i / \lambda_i` over
      :math:`\lambda_i > 0` (1 when :math:`M` has the true curvature along them);
    * ``overlap``: :func:`~keras_curv.curvature.subspace_overlap` of the top-:math:`k`
      eigenvectors of :math:`M` with the :math:`u_i` (1: the same subspace);
    * ``relative_error``: :math:`\lVert (M - H) Z\rVert_F / \lVert H Z\rVert_F` for
      ``num_probes`` Rademacher probes :math:`Z`, an estimate of
      :math:`\lVert M - H\rVert_F / \lVert H\rVert_F` (``num_probes`` products of
      :math:`H`).

    Args:
        model: :math:`M`.
        hessian: :math:`H`.
        eigenvalues: ``(k,)`` top eigenvalues of :math:`H`.
        eigenvectors: ``(dim, k)`` their eigenvectors.
        rng: Draws the probes and the start of :math:`M`'s eigensolver.
        num_probes: Rademacher probes for the relative error.
    """
    u = np.asarray(eigenvectors, dtype=np.float64)
    k = u.shape[1]
    rayleigh = np.sum(u * tf.cast(model.matmat(u), tf.float64).numpy(), axis=0)
    positive = np.asarray(eigenvalues) > 0
    ratio = float(np.mean(rayleigh[positive] / eigenvalues[positive])) if positive.any() else np.nan
    seed = int(rng.integers(2**31))
    try:  # closed form for diagonal and low-rank models, no products
        _, top_vectors = model.top_eigenpairs(k)
    except (AttributeError, ValueError):
        top_vectors = top_eigenpairs(model, k, tol=1e-3, seed=seed).eigenvectors
    probes = np.where(rng.random((num_probes, hessian.dim)) < 0.5, 1.0, -1.0).T
    hz = tf.cast(hessian.matmat(probes), tf.float64).numpy()
    mz = tf.cast(model.matmat(probes), tf.float64).numpy()
    return {
        "rayleigh": rayleigh,
        "rayleigh_ratio": ratio,
        "overlap": subspace_overlap(top_vectors.T, u.T),
        "relative_error": float(np.linalg.norm(mz - hz) / np.linalg.norm(hz)),
    }
