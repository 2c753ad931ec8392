"""HessianSpectrum's research measurements against dense float64 oracles on a tiny model.

Per-block spectra (blocks sliced from the dense Hessian), the preconditioned sharpness
(P^-1/2 H P^-1/2 formed densely, for Adam's diagonal P, a Kronecker P and Shampoo's), the
curvature model's quality, and training left bit-for-bit unchanged by all of them.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_curv import AdaHessian, ClassSubspaceNewton, Shampoo
from keras_curv._internal.flat import variable_ranges
from keras_curv.callbacks import HessianSpectrum
from keras_curv.curvature import BlockDiagonalOperator, KroneckerOperator, stability_threshold
from tests.callbacks.conftest import dense_spectrum, mean_xent, tiny_data, tiny_model
from tests.curvature.helpers import dense_ggn
from tests.optimizers._shampoo_reference import dense_preconditioner

XENT = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
EXACT = {"tol": 1e-10, "every_n_epochs": 1}


def fit(model, optimizer, callbacks, epochs=2):
    x, y = tiny_data()
    model.compile(loss=XENT, optimizer=optimizer)
    return model.fit(
        x, y, epochs=epochs, batch_size=16, shuffle=False, verbose=0, callbacks=callbacks
    )


def dense_root(matrix, p):
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * values**p) @ vectors.T


def test_block_spectra_and_traces_are_those_of_the_dense_diagonal_blocks():
    x, y = tiny_data()
    model = tiny_model()
    cb = HessianSpectrum((x, y), blocks="layer", trace_samples=150, **EXACT)
    history = fit(model, keras.optimizers.SGD(0.1), [cb]).history
    _, _, h = dense_spectrum(model, x, y)
    total = 0.0
    for layer in model.layers:
        ranges = variable_ranges(model.trainable_variables, layer.trainable_variables)
        idx = np.concatenate([np.arange(a, b) for a, b in ranges])
        block = h[np.ix_(idx, idx)]
        top = history[f"{layer.name}_top_eigenvalue"][-1]
        assert top == pytest.approx(np.linalg.eigvalsh(block)[-1], rel=1e-8)
        assert history[f"{layer.name}_trace"][-1] == pytest.approx(np.trace(block), rel=1e-8)
        total += history[f"{layer.name}_trace"][-1]
    # The blocks tile the parameters: their traces add up to the whole trace.
    assert total == pytest.approx(history["hessian_trace"][-1], rel=1e-8)


def test_named_blocks_and_bad_blocks():
    x, y = tiny_data()
    model = tiny_model()
    first = model.layers[0]
    blocks = {"kernels": [model.layers[0].kernel, model.layers[1].kernel], "first": [first.name]}
    cb = HessianSpectrum((x, y), blocks=blocks, trace_samples=150, **EXACT)
    history = fit(model, keras.optimizers.SGD(0.1), [cb], epochs=1).history
    _, _, h = dense_spectrum(model, x, y)
    ranges = variable_ranges(model.trainable_variables, [v for v in blocks["kernels"]])
    idx = np.concatenate([np.arange(a, b) for a, b in ranges])
    assert history["kernels_top_eigenvalue"][0] == pytest.approx(
        np.linalg.eigvalsh(h[np.ix_(idx, idx)])[-1], rel=1e-8
    )
    assert "first_trace" in history
    for bad, match in ((["nope"], "does not have"), ("layers", "must be None")):
        model = tiny_model()
        with pytest.raises(ValueError, match=match):
            fit(model, "sgd", [HessianSpectrum((x, y), blocks=bad, every_n_epochs=1)], epochs=1)


def test_sgd_sharpness_against_two_over_eta(tmp_path, needs_tensorboard):
    from tests.callbacks.conftest import read_events

    x, y = tiny_data()
    model = tiny_model()
    cb = HessianSpectrum((x, y), log_dir=str(tmp_path), **EXACT)
    history = fit(model, keras.optimizers.SGD(0.2, momentum=0.5), [cb]).history
    values, _, _ = dense_spectrum(model, x, y)
    assert history["sharpness"][-1] == pytest.approx(values[0], rel=1e-8)
    assert history["sharpness_x_lr"][-1] == pytest.approx(0.2 * values[0], rel=1e-6)
    assert "preconditioned_sharpness" not in history  # P = I
    events = read_events(tmp_path / "curvature")
    threshold = float(events["hessian/sharpness_threshold"][-1][2])
    assert threshold == pytest.approx((2 + 2 * 0.5) / 0.2, rel=1e-6)


def test_adam_preconditioned_sharpness_matches_the_dense_congruence():
    x, y = tiny_data()
    model = tiny_model()
    cb = HessianSpectrum((x, y), **EXACT)
    optimizer = keras.optimizers.Adam(0.01, epsilon=1e-3)
    history = fit(model, optimizer, [cb]).history
    _, _, h = dense_spectrum(model, x, y)
    # P from the optimizer's public variable list (not the slots the adapter reads).
    velocities = [v for v in optimizer.variables if "velocity" in v.path]
    v = np.concatenate([np.asarray(s.numpy()).reshape(-1) for s in velocities])
    t = int(optimizer.iterations.numpy())
    p = (np.sqrt(v) + 1e-3) / np.sqrt(1 - 0.999**t)
    expected = np.linalg.eigvalsh(np.diag(p**-0.5) @ h @ np.diag(p**-0.5))[-1]
    assert history["preconditioned_sharpness"][-1] == pytest.approx(expected, rel=1e-7)
    assert np.isfinite(history["preconditioned_sharpness"][0])


class KroneckerSGD(keras.optimizers.SGD):
    """Plain SGD that reports a fixed Kronecker preconditioner through the protocol."""

    factors = None

    def preconditioner(self):
        return BlockDiagonalOperator([KroneckerOperator(f) for f in self.factors])

    def stability_threshold(self):
        return stability_threshold(0.1)


def test_kronecker_preconditioned_sharpness_matches_the_dense_congruence():
    x, y = tiny_data()
    model = tiny_model()
    rng = np.random.default_rng(0)

    def spd(n):
        a = rng.standard_normal((n, n))
        return a @ a.T / n + 0.5 * np.eye(n)

    # Per Dense layer, kernel and bias stacked as the rows of one (in + 1, out) matrix.
    factors = [[spd(5), spd(5)], [spd(6), spd(3)]]
    optimizer = KroneckerSGD(0.1)
    optimizer.factors = factors
    history = fit(model, optimizer, [HessianSpectrum((x, y), **EXACT)]).history
    _, _, h = dense_spectrum(model, x, y)
    dense_p = np.zeros_like(h)
    dense_p[:25, :25] = np.kron(*factors[0])
    dense_p[25:, 25:] = np.kron(*factors[1])
    root = dense_root(dense_p, -0.5)
    expected = np.linalg.eigvalsh(root @ h @ root)[-1]
    assert history["preconditioned_sharpness"][-1] == pytest.approx(expected, rel=1e-7)


def test_shampoo_preconditioned_sharpness_matches_the_dense_congruence():
    """Blocks of 3 cut the (4, 5) kernel along both axes; biases use Adam grafting's diagonal."""
    x, y = tiny_data()
    model = tiny_model()
    optimizer = Shampoo(
        0.05, beta_2=0.9, block_size=3, precondition_every=2, start_preconditioning_step=1
    )
    history = fit(model, optimizer, [HessianSpectrum((x, y), **EXACT)]).history
    _, _, h = dense_spectrum(model, x, y)
    root = dense_root(dense_preconditioner(optimizer), -0.5)
    expected = np.linalg.eigvalsh(root @ h @ root)[-1]
    assert np.isfinite(expected) and expected > 0
    assert history["preconditioned_sharpness"][-1] == pytest.approx(expected, rel=1e-7)


def test_adahessian_curvature_model_quality_against_dense_values():
    x, y = tiny_data()
    model = tiny_model()
    cb = HessianSpectrum((x, y), model_probes=5, seed=3, **EXACT)
    optimizer = AdaHessian(0.05, seed=0)
    history = fit(model, optimizer, [cb]).history
    values, vectors, h = dense_spectrum(model, x, y)
    v = np.concatenate([e.numpy().reshape(-1) for e in optimizer.hessian_diagonal_ema])
    tau = int(optimizer.hessian_iterations.numpy())
    m = np.diag(np.sqrt(v / (1 - 0.999**tau)))
    u = vectors[:, :3]
    rayleigh = np.sum(u * (m @ u), axis=0)
    assert history["curvature_model_rayleigh_ratio"][-1] == pytest.approx(
        np.mean(rayleigh / values[:3]), rel=1e-6
    )
    top_m = np.argsort(-np.diag(m))[:3]
    overlap = np.sum(u[top_m] ** 2) / 3  # M's top eigenvectors are coordinate vectors
    assert history["curvature_model_overlap"][-1] == pytest.approx(overlap, rel=1e-5)
    rng = np.random.default_rng([3, cb.measurements["step"][-1], 2])
    rng.integers(2**31)  # the draw that seeds M's eigensolver
    z = np.where(rng.random((5, h.shape[0])) < 0.5, 1.0, -1.0).T
    error = np.linalg.norm((m - h) @ z) / np.linalg.norm(h @ z)
    assert history["curvature_model_relative_error"][-1] == pytest.approx(error, rel=1e-6)
    # AdaHessian's P = sqrt(v̂) + eps: its preconditioned sharpness, densely.
    p = np.diag(m) + optimizer.epsilon
    expected = np.linalg.eigvalsh(np.diag(p**-0.5) @ h @ np.diag(p**-0.5))[-1]
    assert history["preconditioned_sharpness"][-1] == pytest.approx(expected, rel=1e-7)


def test_curvature_model_against_the_dense_gauss_newton_matrix():
    x, y = tiny_data()
    model = tiny_model()
    cb = HessianSpectrum(
        (x, y), model_probes=5, seed=3, curvature_reference="gauss_newton", **EXACT
    )
    optimizer = AdaHessian(0.05, seed=0)
    history = fit(model, optimizer, [cb]).history
    g = dense_ggn(model, mean_xent(y), tf.constant(x))
    values, vectors = np.linalg.eigh(0.5 * (g + g.T))
    values, vectors = values[::-1], vectors[:, ::-1]
    assert history["ggn_top_eigenvalue"][-1] == pytest.approx(values[0], rel=1e-8)
    v = np.concatenate([e.numpy().reshape(-1) for e in optimizer.hessian_diagonal_ema])
    tau = int(optimizer.hessian_iterations.numpy())
    m = np.diag(np.sqrt(v / (1 - 0.999**tau)))
    u = vectors[:, :3]
    rayleigh = np.sum(u * (m @ u), axis=0)
    assert history["curvature_model_rayleigh_ratio"][-1] == pytest.approx(
        np.mean(rayleigh / values[:3]), rel=1e-6
    )
    top_m = np.argsort(-np.diag(m))[:3]
    assert history["curvature_model_overlap"][-1] == pytest.approx(
        np.sum(u[top_m] ** 2) / 3, rel=1e-5
    )
    rng = np.random.default_rng([3, cb.measurements["step"][-1], 2])
    rng.integers(2**31)
    z = np.where(rng.random((5, g.shape[0])) < 0.5, 1.0, -1.0).T
    error = np.linalg.norm((m - g) @ z) / np.linalg.norm(g @ z)
    assert history["curvature_model_relative_error"][-1] == pytest.approx(error, rel=1e-6)
    # The model is not linear in its outputs: G is not H, so the reference mattered.
    _, _, h = dense_spectrum(model, x, y)
    assert np.linalg.norm(g - h) > 1e-3 * np.linalg.norm(h)
    with pytest.raises(ValueError, match="curvature_reference"):
        HessianSpectrum((x, y), curvature_reference="fisher")


@pytest.mark.parametrize(
    "make",
    [
        lambda: keras.optimizers.Adam(0.01),
        lambda: AdaHessian(0.05, seed=0),
        lambda: ClassSubspaceNewton(0.1, damping=1.0, momentum=0.5),
        lambda: Shampoo(0.05, block_size=3, precondition_every=2, start_preconditioning_step=1),
    ],
    ids=["adam", "adahessian", "csn", "shampoo"],
)
def test_training_is_bit_identical_with_every_measurement(make):
    x, y = tiny_data()
    runs = []
    for callbacks in ([], [HessianSpectrum((x, y), blocks="layer", **EXACT)]):
        model = tiny_model()
        fit(model, make(), callbacks, epochs=2)
        runs.append(model)
    for a, b in zip(runs[0].weights, runs[1].weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    for a, b in zip(runs[0].optimizer.variables, runs[1].optimizer.variables):
        np.testing.assert_array_equal(np.asarray(a.numpy()), np.asarray(b.numpy()))
