"""What diagnostic callbacks on the same model share within one ``fit``.

Two things are shared, both found through a per-model registry with weak keys (a model
that goes away takes its entry with it):

* :class:`SharedProbe`: one :class:`~keras_curv.curvature.HessianOperator` per probe set,
  loss and ``training`` flag, plus the latest top eigenpairs computed with it. When
  ``HessianSpectrum`` and ``SubspaceAlignment`` measure the same probe data at the same
  weights, the second reuses the first's eigenvectors instead of running its own
  eigensolver. Probe sets are compared by content (a hash of the batches), so two
  ``(x[:256], y[:256])`` slices match; different probe data, loss or batching share nothing.
* :class:`~keras_curv.callbacks._schedule.OverheadLedger`: the seconds spent by all the
  callbacks of one ``fit`` against the training seconds, so that the ``max_overhead``
  budget bounds their *combined* cost.
"""

from __future__ import annotations

import hashlib
import time
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow as tf

from keras_curv._internal.data import ProbeData
from keras_curv.callbacks._schedule import OverheadLedger
from keras_curv.curvature.eigensolvers import EigenResult, top_eigenpairs
from keras_curv.curvature.operators import HessianOperator


def probe_fingerprint(probe: ProbeData) -> str:
    """A content hash of the probe batches (shapes, dtypes, bytes, batch boundaries)."""
    digest = hashlib.blake2b(digest_size=16)
    for batch in probe.batches:
        digest.update(f"|batch {batch.size}|".encode())
        for leaf in tf.nest.flatten((batch.x, batch.y, batch.sample_weight)):
            array = np.asarray(leaf)
            digest.update(f"{array.dtype.str}{array.shape}".encode())
            digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def weights_state(model: Any) -> tuple:
    """Identifies the current weights: optimizer step and a checksum of the variables.

    Two callbacks measuring at the same epoch end see the same state; any training step
    (or ``set_weights``) changes it.
    """
    optimizer = getattr(model, "optimizer", None)
    iterations = getattr(optimizer, "iterations", None)
    step = int(iterations.numpy()) if iterations is not None else -1
    values = [tf.cast(tf.reshape(v.value, [-1]), tf.float64) for v in model.trainable_variables]
    sums = tf.stack([tf.reduce_sum(v) for v in values] + [tf.reduce_sum(v * v) for v in values])
    return step, sums.numpy().tobytes()


class SharedProbe:
    """A Hessian operator on one probe set and the latest top eigenpairs computed with it.

    Attributes:
        operator: The :class:`~keras_curv.curvature.HessianOperator`.
        hvp_seconds: Wall time of one product, measured once it is traced (``None`` before).
        eig_seconds: Wall time of the latest eigensolver run (``None`` before).
        eig_runs: How many times the eigensolver ran (reuses do not count).
    """

    def __init__(self, operator: HessianOperator):
        self.operator = operator
        self.hvp_seconds: float | None = None
        self.eig_seconds: float | None = None
        self.eig_runs = 0
        self._latest: tuple | None = None

    def calibrate(self, clock: Callable[[], float]) -> float:
        """Traces the product (first call) and times one more; returns its seconds."""
        if self.hvp_seconds is None:
            op = self.operator
            v = tf.ones([op.dim], op.dtype)
            op.matvec(v).numpy()
            start = clock()
            op.matvec(v).numpy()
            self.hvp_seconds = max(clock() - start, 0.0)
        return self.hvp_seconds

    def cached(self, state: tuple, k: int, method: str, tol: float) -> EigenResult | None:
        """The latest eigenpairs if computed at ``state`` with ``method``, >= ``k`` pairs
        and a tolerance at least as tight as ``tol``; else ``None``."""
        if self._latest is None:
            return None
        cached_state, cached_method, cached_tol, result = self._latest
        if (
            cached_state == state
            and cached_method == method
            and cached_tol <= tol
            and len(result.eigenvalues) >= k
        ):
            return _first(result, k)
        return None

    def top_eigenpairs(
        self,
        k: int,
        *,
        method: str,
        tol: float,
        seed: int,
        init: Any,
        model: Any,
        clock: Callable[[], float] = time.perf_counter,
    ) -> tuple[EigenResult, bool]:
        """The top ``k`` eigenpairs at the current weights; ``(result, reused)``.

        Reuses the latest result (see :meth:`cached`); otherwise runs
        :func:`~keras_curv.curvature.top_eigenpairs`, remembers the result and its wall
        time in :attr:`eig_seconds`.
        """
        state = weights_state(model)
        found = self.cached(state, k, method, tol)
        if found is not None:
            return found, True
        start = clock()
        result = top_eigenpairs(self.operator, k, method=method, tol=tol, seed=seed, init=init)
        self.eig_seconds = clock() - start
        self.eig_runs += 1
        self._latest = (state, method, tol, result)
        return result, False


def _first(result: EigenResult, k: int) -> EigenResult:
    if len(result.eigenvalues) == k:
        return result
    return EigenResult(
        eigenvalues=result.eigenvalues[:k],
        eigenvectors=result.eigenvectors[:, :k],
        residuals=result.residuals[:k],
        converged=result.converged,
        num_matvecs=result.num_matvecs,
        num_iters=result.num_iters,
        method=result.method,
    )


class _ModelEntry:
    def __init__(self, clock):
        self.ledger = OverheadLedger(clock)
        # Weak values: the callbacks own the SharedProbes (which hold the model), so the
        # registry never keeps a model alive.
        self.probes: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


_REGISTRY: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def model_entry(model: Any, clock: Callable[[], float]) -> _ModelEntry:
    entry = _REGISTRY.get(model)
    if entry is None:
        entry = _REGISTRY[model] = _ModelEntry(clock)
    return entry


def shared_probe(model: Any, key: tuple, build: Callable[[], HessianOperator]) -> SharedProbe:
    """The :class:`SharedProbe` of ``model`` for ``key``, built with ``build()`` if absent."""
    probes = model_entry(model, time.perf_counter).probes
    found = probes.get(key)
    if found is None:
        found = SharedProbe(build())
        probes[key] = found
    return found
