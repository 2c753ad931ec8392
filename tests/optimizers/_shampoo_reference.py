"""A NumPy transcription of Shampoo's update (docs/shampoo.md), written independently.

Only NumPy: blocks by index ranges, statistics from mode unfoldings, preconditioning by
``einsum``, roots by ``numpy.linalg.eigh``. The tests compare ``keras_curv.Shampoo``
trained through ``fit`` with it.
"""

from __future__ import annotations

import itertools
import string

import numpy as np


def inverse_root(statistic, exponent, epsilon):
    """``(S + ε λ_max I)^(−1/e)`` with the eigenvalues clipped at 0 (``λ_max := 1`` if ≤ 0)."""
    values, vectors = np.linalg.eigh(statistic)
    largest = values.max()
    scale = largest if largest > 0 else 1.0
    powers = scale ** (-1.0 / exponent) * (np.maximum(values / scale, 0) + epsilon) ** (
        -1.0 / exponent
    )
    return (vectors * powers) @ vectors.T


def _ranges(length, block_size):
    return [range(s, min(s + block_size, length)) for s in range(0, length, block_size)]


def _mode_product(block, roots):
    """``G ×₁ R₁ ⋯ ×_p R_p`` by one einsum."""
    letters = string.ascii_lowercase
    p = block.ndim
    ins, outs = letters[:p], letters[p : 2 * p]
    spec = ",".join([ins, *(f"{i}{o}" for i, o in zip(ins, outs))]) + "->" + outs
    return np.einsum(spec, block, *roots)


class VariableState:
    """One weight's Shampoo state; ``layout`` is its preconditioner shape or ``None``."""

    def __init__(self, shape, layout, block_size):
        self.shape, self.layout, self.block_size = tuple(shape), layout, block_size
        self.m = np.zeros(shape)
        self.v = np.zeros(shape)
        self.blocks = []
        if layout is not None:
            for index in itertools.product(*(_ranges(n, block_size) for n in layout)):
                sizes = [len(r) for r in index]
                self.blocks.append(
                    {
                        "index": np.ix_(*index),
                        "stats": [np.zeros((n, n)) for n in sizes],
                        "roots": [np.eye(n) for n in sizes],
                    }
                )


def step(state, w, g, s, hp):
    """The new weight after update step ``s`` (0-based) of gradient ``g``; updates ``state``.

    ``hp``: lr, beta_1, beta_2, epsilon, every, start, grafting, grafting_epsilon,
    weight_decay.
    """
    t = s + 1
    b1, b2 = hp["beta_1"], hp["beta_2"]
    if hp["grafting"] == "adam":
        state.v = b2 * state.v + (1 - b2) * g**2
        reference = g / (np.sqrt(state.v / (1 - b2**t)) + hp["grafting_epsilon"])
    else:
        reference = g
    direction = reference
    if state.layout is not None:
        G = g.reshape(state.layout)
        A = reference.reshape(state.layout)
        refresh = s >= hp["start"] and (s - hp["start"]) % hp["every"] == 0
        P = np.zeros(state.layout)
        for block in state.blocks:
            Gb = G[block["index"]]
            p = Gb.ndim
            for k in range(p):
                unfolded = np.moveaxis(Gb, k, 0).reshape(Gb.shape[k], -1)
                block["stats"][k] = b2 * block["stats"][k] + (1 - b2) * unfolded @ unfolded.T
            if refresh:
                block["roots"] = [
                    inverse_root(S / (1 - b2**t), 2 * p, hp["epsilon"]) for S in block["stats"]
                ]
            Pb = _mode_product(Gb, block["roots"])
            if hp["grafting"] != "none":
                norm = np.linalg.norm(Pb)
                Pb = Pb * (np.linalg.norm(A[block["index"]]) / norm if norm > 0 else 0.0)
            P[block["index"]] = Pb
        if s >= hp["start"]:
            direction = P.reshape(state.shape)
    state.m = b1 * state.m + (1 - b1) * direction
    w = w * (1 - hp["lr"] * hp.get("weight_decay", 0.0))
    return w - hp["lr"] * state.m / (1 - b1**t)


def dense_preconditioner(optimizer):
    """Shampoo's ``P`` of its last step, dense, from its state (``docs/shampoo.md``).

    Per preconditioned block, the Kronecker product of the inverted roots over the flat
    indices of the block's entries (found by index ranges), divided by the block's last
    grafting ratio; ``diag(√v̂ + ε_g)`` (or ``I``) for the weights under grafting alone.
    """
    t = int(optimizer.iterations.numpy())
    start = optimizer.start_preconditioning_step
    start = optimizer.precondition_every if start is None else start
    parts = []
    for i, variable in enumerate(optimizer._trainable_variables):
        n = int(np.prod(variable.shape))
        layout = optimizer.preconditioner_shapes()[i]
        if layout is None or t - 1 < start:
            d = np.ones(n)
            if optimizer.grafting == "adam":
                v = np.asarray(optimizer._second_moments[i]).reshape(-1)
                d = np.sqrt(v / (1 - optimizer.beta_2**t)) + optimizer.grafting_epsilon
            parts.append(np.diag(d))
            continue
        dense = np.zeros((n, n))
        flat = np.arange(n).reshape(layout)
        ranges = itertools.product(*(_ranges(k, optimizer.block_size) for k in layout))
        ratios = optimizer.graft_ratios[i] or [1.0] * len(optimizer.inverse_roots[i])
        for index, roots, ratio in zip(ranges, optimizer.inverse_roots[i], ratios):
            entries = flat[np.ix_(*index)].reshape(-1)
            block = np.ones((1, 1))
            for root in roots:
                block = np.kron(block, np.linalg.inv(np.asarray(root, np.float64)))
            dense[np.ix_(entries, entries)] = block / float(np.asarray(ratio))
        parts.append(dense)
    size = sum(len(p) for p in parts)
    out, offset = np.zeros((size, size)), 0
    for p in parts:
        out[offset : offset + len(p), offset : offset + len(p)] = p
        offset += len(p)
    return out
