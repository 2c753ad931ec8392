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
