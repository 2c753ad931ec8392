"""K-FAC's blocks: which curvature block each trainable variable of a model gets.

* :class:`KroneckerBlock`: ``Dense`` (input rows), ``Conv1D``/``Conv2D`` (KFC: im2col
  patches, channels last or first, any stride, dilation and padding, ``groups=1``) and
  ``Embedding`` (one-hot input rows, so ``A`` is diagonal: the token frequencies), with a
  homogeneous coordinate for the bias;
* :class:`DepthwiseBlock`: ``DepthwiseConv1D``/``DepthwiseConv2D``, one Kronecker block per
  input channel (its ``kh·kw`` patch entries against its ``depth_multiplier`` outputs);
* :class:`NormBlock`: the scale and shift of ``BatchNormalization`` and
  ``LayerNormalization``, a diagonal Fisher from per-sample gradients;
* :class:`DiagonalBlock`: every other trainable variable (untapped layers such as
  ``EinsumDense``, ``MultiHeadAttention``, ``LSTM`` cells, custom layers, a tapped layer
  whose ``call`` is overridden, weights shared between layers): the diagonal
  ``(Σ_n ε_n g_n)² / N`` of the summed Fisher-loss gradient, an unbiased estimate of the
  diagonal Fisher (``ε_n`` the sampled labels' zero-mean noise, or random signs).

A block turns one replica's layer taps into sums (:meth:`statistics`), reduced over the
replicas by the optimizer, then into factors (:meth:`factors`), preconditions gradients
with the factors' eigen-decompositions (:meth:`solve`) and multiplies steps by the factors
(:meth:`curvature`). Every sum is over rows (positions, tokens, calls of a shared layer)
and over the cotangent columns (one, or K for the exact Fisher).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from keras_curv._internal.keras_privates import flatten_layers
from keras_curv._internal.numerics import curvature_dtype
from keras_curv.optimizers import kfac_math as km
from keras_curv.optimizers.batch import LayerCall

# Largest factor side kept as a full matrix by default; larger factors are diagonal.
MAX_FACTOR_SIZE = 2048
# Patches per example a convolution's ``A`` is estimated from by default (docs/kfac.md, "Cost").
MAX_PATCHES_PER_EXAMPLE = 16

# ``uniforms(call, examples, count)``: ``(examples, count)`` uniforms in ``(0, 1)`` for the
# patch sample of a block's ``call``-th call (see ``KFAC``'s ``max_patches_per_example``).
PatchUniforms = Callable[[int, Any, int], tf.Tensor]


def _own_call(layer: keras.layers.Layer, cls: type) -> bool:
    """``layer`` is a ``cls`` whose ``call`` is Keras's (a subclass may compute otherwise)."""
    return isinstance(layer, cls) and type(layer).call is cls.call


def _plain(layer: keras.layers.Layer) -> bool:
    return not getattr(layer, "lora_enabled", False) and not getattr(
        layer, "quantization_mode", None
    )


@dataclass
class Block:
    """The curvature block of one layer (or of the untapped variables).

    Attributes:
        name: The layer's name (``"<diagonal>"`` for the fallback).
        layer: The layer, or ``None``.
        indices: Positions of the block's variables in the optimizer's variable list.
        dtype: The factors' dtype (float32 at least, float64 for float64 variables).
    """

    name: str
    layer: Any
    indices: tuple[int, ...]
    dtype: tf.DType = tf.float32
    kind: str = field(default="", init=False)

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        """Name -> shape of the moving-average factors."""
        raise NotImplementedError

    def eigen_shapes(self) -> dict[str, tuple[int, ...]]:
        """Name -> shape of the stored eigen-decompositions (none for diagonal blocks)."""
        return {}


# --------------------------------------------------------------------- Kronecker


@dataclass
class KroneckerBlock(Block):
    """``F ≈ A ⊗ G`` for a layer ``s = a W + b`` (``W`` reshaped to ``P x O``).

    Attributes:
        layer_type: ``"dense"``, ``"conv"`` or ``"embedding"``.
        kernel_shape: The kernel's shape.
        has_bias: Whether the bias is one of the block's variables (homogeneous row).
        a_diagonal, g_diagonal: Whether ``A`` resp. ``G`` is kept as its diagonal.
        max_patches: A convolution's ``A`` from at most this many random patches per
            example (``None``: every patch).
    """

    layer_type: str = "dense"
    kernel_shape: tuple[int, ...] = ()
    has_bias: bool = False
    a_diagonal: bool = False
    g_diagonal: bool = False
    max_patches: int | None = None

    def __post_init__(self) -> None:
        self.kind = "kronecker"

    @property
    def a_dim(self) -> int:
        return int(np.prod(self.kernel_shape[:-1])) + int(self.has_bias)

    @property
    def g_dim(self) -> int:
        return int(self.kernel_shape[-1])

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        a, g = self.a_dim, self.g_dim
        return {
            "a": (a,) if self.a_diagonal else (a, a),
            "g": (g,) if self.g_diagonal else (g, g),
        }

    def eigen_shapes(self) -> dict[str, tuple[int, ...]]:
        a, g = self.a_dim, self.g_dim
        shapes = {"a_values": (a,), "g_values": (g,)}
        if not self.a_diagonal:
            shapes["a_vectors"] = (a, a)
        if not self.g_diagonal:
            shapes["g_vectors"] = (g, g)
        return shapes

    # ------------------------------------------------------------ statistics

    def _rows(
        self, call: LayerCall, gradient: tf.Tensor, uniforms: PatchUniforms | None, index: int
    ) -> tuple[tf.Tensor, tf.Tensor | float | None, tf.Tensor]:
        """One call's input rows ``(R, P)`` (no homogeneous column), their weights (``(R,)``,
        one float for all, or ``None``: 1) and its output-gradient rows ``(K', R', O)``.

        A convolution's rows are its positions (patches). ``A`` takes every one (weights
        ``None``) or ``max_patches`` random ones per example when the examples have
        more, each weighted by the positions it stands for
        (:func:`~kfac_math.patch_sample`); ``G`` always takes every position.
        """
        inputs = tf.cast(call.inputs, self.dtype)
        gradient = tf.cast(gradient, self.dtype)
        if self.layer_type != "conv":
            g_rows = tf.reshape(gradient, [gradient.shape[0], -1, gradient.shape[-1]])
            return km.rows(inputs), None, g_rows
        layer = self.layer
        if layer.data_format == "channels_first":
            inputs = tf.transpose(inputs, [0, *range(2, inputs.shape.rank), 1])
            gradient = tf.transpose(gradient, [0, 1, *range(3, gradient.shape.rank), 2])
        g_rows = tf.reshape(gradient, [gradient.shape[0], -1, gradient.shape[-1]])
        geometry = (layer.kernel_size, layer.strides, layer.dilation_rate, layer.padding)
        positions = km.conv_positions(inputs, *geometry)
        q = self.max_patches
        if uniforms is None or q is None or (isinstance(positions, int) and positions <= q):
            return km.rows(km.conv_patches(inputs, *geometry)), None, g_rows
        indices, weights = km.patch_sample(uniforms(index, tf.shape(inputs)[0], q), positions)
        a_rows = km.rows(km.patches_at(inputs, *geometry, indices))
        if not isinstance(weights, float):
            weights = tf.cast(tf.reshape(weights, [-1]), self.dtype)
        return a_rows, weights, g_rows

    def statistics(
        self,
        calls: Sequence[LayerCall],
        gradients: Sequence[tf.Tensor],
        uniforms: PatchUniforms | None = None,
    ) -> dict:
        """Sums ``Σ a aᵀ``, ``Σ g gᵀ`` and the row count over this replica's ``calls``.

        With ``uniforms``, a convolution's ``Σ a aᵀ`` and row count are over a random sample
        of its positions (unbiased estimates of the sums over every position; see
        :meth:`_rows`).
        """
        a_sum, g_sum, count = 0, 0, 0
        for i, (call, gradient) in enumerate(zip(calls, gradients)):
            a_rows, weights, g_rows = self._rows(call, gradient, uniforms, i)
            if self.layer_type == "embedding":
                ids = tf.reshape(tf.cast(call.inputs, tf.int32), [-1])
                a_sum += tf.math.unsorted_segment_sum(
                    tf.ones_like(ids, self.dtype), ids, self.kernel_shape[0]
                )
                count += tf.cast(tf.size(ids), self.dtype)
            else:
                a_sum += km.second_moment(a_rows, self.a_diagonal, weights, self.has_bias)
                count += _row_count(a_rows, weights)
            # One matrix product over the rows of every cotangent column (oneDNN's batched
            # product of one tall matrix is slower).
            g_sum += km.second_moment(km.rows(g_rows), self.g_diagonal)
        return {"a": a_sum, "g": g_sum, "rows": count}

    def factors(self, sums: dict, samples: tf.Tensor) -> dict:
        """``A = Σ a aᵀ / R`` and ``G = Σ g gᵀ / N`` from the replica-summed ``sums``."""
        rows = tf.maximum(sums["rows"], 1)
        return {"a": sums["a"] / rows, "g": sums["g"] / tf.cast(samples, self.dtype)}

    # ------------------------------------------------------------ the step

    def to_matrix(self, tensors: Sequence[tf.Tensor]) -> tf.Tensor:
        """The block's variables' tensors (kernel, bias) as one ``P x O`` matrix."""
        kernel = tf.reshape(tf.cast(tensors[0], self.dtype), [-1, self.g_dim])
        if not self.has_bias:
            return kernel
        return tf.concat([kernel, tf.cast(tensors[1], self.dtype)[None]], axis=0)

    def from_matrix(self, matrix: tf.Tensor) -> list[tf.Tensor]:
        if not self.has_bias:
            return [tf.reshape(matrix, self.kernel_shape)]
        return [tf.reshape(matrix[:-1], self.kernel_shape), matrix[-1]]

    def eigen(self, factors: dict) -> dict:
        a_vectors, a_values = km.eigen(factors["a"], self.a_diagonal)
        g_vectors, g_values = km.eigen(factors["g"], self.g_diagonal)
        out = {"a_values": a_values, "g_values": g_values}
        if a_vectors is not None:
            out["a_vectors"] = a_vectors
        if g_vectors is not None:
            out["g_vectors"] = g_vectors
        return out

    def solve(self, eigen: dict, tensors: Sequence[tf.Tensor], damping: tf.Tensor) -> list:
        """``(A + π√λ)⁻¹ V (G + √λ/π)⁻¹`` for the block's gradient tensors."""
        a = (eigen.get("a_vectors"), eigen["a_values"])
        g = (eigen.get("g_vectors"), eigen["g_values"])
        pi = km.pi_adjustment(a[1], g[1])
        solved = km.damped_kronecker_solve(self.to_matrix(tensors), a, g, damping, pi)
        return self.from_matrix(solved)

    def curvature(self, factors: dict, tensors: Sequence[tf.Tensor]) -> tf.Tensor:
        """``vec(V)ᵀ (A ⊗ G) vec(V)`` for the block's step tensors."""
        v = self.to_matrix(tensors)
        product = km.kronecker_product(
            v, factors["a"], factors["g"], self.a_diagonal, self.g_diagonal
        )
        return tf.reduce_sum(product * v)


@dataclass
class DepthwiseBlock(KroneckerBlock):
    """One Kronecker block per input channel of a depthwise convolution.

    The kernel ``(k..., C, M)`` becomes ``C`` matrices ``(k [+1]) x M``; ``A`` is
    ``(C, k+1, k+1)`` and ``G`` is ``(C, M, M)``.
    """

    def __post_init__(self) -> None:
        self.kind = "depthwise"

    @property
    def channels(self) -> int:
        return int(self.kernel_shape[-2])

    @property
    def a_dim(self) -> int:
        return int(np.prod(self.kernel_shape[:-2])) + int(self.has_bias)

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        c = self.channels
        return {name: (c, *shape) for name, shape in super().state_shapes().items()}

    def eigen_shapes(self) -> dict[str, tuple[int, ...]]:
        c = self.channels
        return {name: (c, *shape) for name, shape in super().eigen_shapes().items()}

    def statistics(
        self,
        calls: Sequence[LayerCall],
        gradients: Sequence[tf.Tensor],
        uniforms: PatchUniforms | None = None,
    ) -> dict:
        c, m = self.channels, self.g_dim
        a_sum, g_sum, count = 0, 0, 0
        for i, (call, gradient) in enumerate(zip(calls, gradients)):
            patches, weights, g_rows = self._rows(call, gradient, uniforms, i)
            # (R, k, C) -> (C, R, k): each channel's patch entries.
            per_channel = tf.transpose(
                tf.reshape(patches, [-1, self.a_dim - self.has_bias, c]), [2, 0, 1]
            )
            a_sum += km.second_moment(per_channel, self.a_diagonal, weights, self.has_bias)
            count += _row_count(patches, weights)
            # (K', R, C, M) -> (C, K'·R, M).
            g_rows = tf.reshape(g_rows, [g_rows.shape[0], -1, c, m])
            g_rows = tf.reshape(tf.transpose(g_rows, [2, 0, 1, 3]), [c, -1, m])
            g_sum += km.second_moment(g_rows, self.g_diagonal)
        return {"a": a_sum, "g": g_sum, "rows": count}

    def to_matrix(self, tensors: Sequence[tf.Tensor]) -> tf.Tensor:
        c, m = self.channels, self.g_dim
        kernel = tf.reshape(tf.cast(tensors[0], self.dtype), [-1, c, m])
        kernel = tf.transpose(kernel, [1, 0, 2])  # (C, k, M)
        if not self.has_bias:
            return kernel
        bias = tf.reshape(tf.cast(tensors[1], self.dtype), [c, 1, m])
        return tf.concat([kernel, bias], axis=1)

    def from_matrix(self, matrix: tf.Tensor) -> list[tf.Tensor]:
        kernel = matrix[:, :-1] if self.has_bias else matrix
        kernel = tf.reshape(tf.transpose(kernel, [1, 0, 2]), self.kernel_shape)
        if not self.has_bias:
            return [kernel]
        return [kernel, tf.reshape(matrix[:, -1], [-1])]


def _row_count(matrix: tf.Tensor, weights: tf.Tensor | float | None) -> tf.Tensor:
    """The rows ``(R, P)`` stand for: all of them, or the weight of a patch sample."""
    if weights is None or isinstance(weights, float):
        return tf.cast(tf.shape(matrix)[0], matrix.dtype) * (weights or 1.0)
    return tf.reduce_sum(weights)


# --------------------------------------------------------------------- diagonal


@dataclass
class NormBlock(Block):
    """The diagonal Fisher of a normalization layer's scale ``γ`` and shift ``β``.

    With ``x̂`` the normalized input (``s = γ x̂ + β``), the per-sample gradients are
    ``Σ x̂ ⊙ g`` and ``Σ g`` over the axes other than the batch and ``γ``'s; their squares
    are summed over the samples.

    Attributes:
        roles: ``"gamma"`` / ``"beta"``, aligned with ``indices``.
        shapes: The variables' shapes.
    """

    roles: tuple[str, ...] = ()
    shapes: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self) -> None:
        self.kind = "norm"

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(zip(self.roles, self.shapes))

    def _parameter_axes(self, rank: int) -> list[int]:
        axis = self.layer.axis
        axes = axis if isinstance(axis, (list, tuple)) else [axis]
        return sorted(a % rank for a in axes)

    def statistics(
        self,
        calls: Sequence[LayerCall],
        gradients: Sequence[tf.Tensor],
        gamma_handle: Any,
        gate: Any,
    ) -> dict:
        sums = {role: 0 for role in self.roles}
        for call, gradient in zip(calls, gradients):
            outputs = call.outputs
            rank = outputs.shape.rank
            keep = self._parameter_axes(rank)
            summed = [a + 1 for a in range(1, rank) if a not in keep]
            g = tf.cast(gradient, self.dtype)
            for role, shape in zip(self.roles, self.shapes):
                if role == "gamma":
                    per_element = (
                        g * tf.cast(_normalized(outputs, gamma_handle, gate), self.dtype)[None]
                    )
                else:
                    per_element = g
                per_sample = tf.reduce_sum(per_element, axis=summed) if summed else per_element
                per_sample = tf.reshape(per_sample, [g.shape[0], -1, *shape])
                sums[role] += tf.reduce_sum(tf.square(per_sample), axis=[0, 1])
        return sums

    def factors(self, sums: dict, samples: tf.Tensor) -> dict:
        return {role: sums[role] / tf.cast(samples, self.dtype) for role in self.roles}

    def diagonals(self, factors: dict) -> list[tf.Tensor]:
        """The curvature of each variable, shaped like it."""
        return [factors[role] for role in self.roles]


def _normalized(outputs: tf.Tensor, gamma: Any, gate: Any) -> tf.Tensor:
    """``x̂ = ∂s/∂γ · 1``, by a double VJP (exact for any ``s`` affine in ``γ`` per channel)."""
    dummy = gate.enter(tf.zeros_like(outputs))
    transposed = tf.gradients(outputs, gamma, grad_ys=dummy)[0]
    if transposed is None:
        return tf.zeros_like(outputs)
    transposed = tf.convert_to_tensor(transposed)
    (normalized,) = tf.gradients(transposed, dummy, grad_ys=tf.ones_like(transposed))
    return tf.zeros_like(outputs) if normalized is None else normalized


@dataclass
class DiagonalBlock(Block):
    """The fallback: ``diag F ≈ (Σ_n ε_n g_n)² / N`` per variable (see the module docstring).

    That estimate is unbiased but noisy entry by entry (one random projection per step):
    ``isotropic`` blocks precondition each variable by the mean of its diagonal instead,
    ``F ≈ (tr F_v / dim v) I``, whose estimate averages over the whole variable.

    Attributes:
        shapes: The variables' shapes.
        reasons: Why each variable is here (for :meth:`KFAC.blocks`).
        isotropic: One curvature per variable (else per entry).
    """

    shapes: tuple[tuple[int, ...], ...] = ()
    reasons: tuple[str, ...] = ()
    isotropic: bool = True

    def __post_init__(self) -> None:
        self.kind = "diagonal"

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        return {f"d{i}": shape for i, shape in enumerate(self.shapes)}

    def statistics(self, gradients: Sequence[tf.Tensor]) -> dict:
        return {
            f"d{i}": tf.reduce_sum(tf.square(tf.cast(g, self.dtype)), axis=0)
            for i, g in enumerate(gradients)
        }

    def factors(self, sums: dict, samples: tf.Tensor) -> dict:
        return {name: value / tf.cast(samples, self.dtype) for name, value in sums.items()}

    def diagonals(self, factors: dict) -> list[tf.Tensor]:
        """The curvature of each variable, shaped like it (its mean if ``isotropic``)."""
        out = []
        for i in range(len(self.shapes)):
            d = factors[f"d{i}"]
            out.append(tf.reduce_mean(d) * tf.ones_like(d) if self.isotropic else d)
        return out


# --------------------------------------------------------------------- the plan


def _layer_variables(layer: keras.layers.Layer) -> tuple[str, list[tuple[str, Any]]] | None:
    """``(layer type, [(role, variable)...])`` of a layer K-FAC has a block for, else ``None``."""
    if _own_call(layer, keras.layers.Dense) and _plain(layer):
        return "dense", [("kernel", layer.kernel), ("bias", layer.bias)]
    for cls in (keras.layers.Conv1D, keras.layers.Conv2D):
        if _own_call(layer, cls) and layer.groups == 1:
            return "conv", [("kernel", layer.kernel), ("bias", layer.bias)]
    for cls in (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D):
        if _own_call(layer, cls):
            return "depthwise", [("kernel", layer.kernel), ("bias", layer.bias)]
    if _own_call(layer, keras.layers.Embedding) and _plain(layer):
        return "embedding", [("kernel", layer.embeddings)]
    for cls in (keras.layers.BatchNormalization, keras.layers.LayerNormalization):
        if _own_call(layer, cls) and not getattr(layer, "synchronized", False):
            return "norm", [("gamma", layer.gamma), ("beta", layer.beta)]
    return None


def plan_blocks(
    model: keras.Model,
    variables: Sequence[Any],
    max_factor_size: int = MAX_FACTOR_SIZE,
    isotropic_fallback: bool = True,
    max_patches: int | None = None,
) -> list[Block]:
    """The blocks of ``model``'s trainable ``variables`` (in the optimizer's order).

    Every variable is in exactly one block; the last block is the :class:`DiagonalBlock`
    of the variables no layer block takes (absent when there are none), isotropic per
    variable if ``isotropic_fallback``. Convolutions estimate ``A`` from at most
    ``max_patches`` patches per example.
    """
    index = {id(v): i for i, v in enumerate(variables)}
    candidates = []
    for layer in dict.fromkeys(flatten_layers(model)):
        found = _layer_variables(layer) if layer.built else None
        if found is None:
            continue
        layer_type, pairs = found
        pairs = [(role, v) for role, v in pairs if v is not None and id(v) in index]
        if layer_type != "norm" and (not pairs or pairs[0][0] != "kernel"):
            continue  # a frozen kernel: its trainable bias falls back to the diagonal
        if pairs:
            candidates.append((layer, layer_type, pairs))
    claims: dict[int, int] = {}
    for _layer, _, pairs in candidates:
        for _, v in pairs:
            claims[id(v)] = claims.get(id(v), 0) + 1
    blocks: list[Block] = []
    taken: set[int] = set()
    shared: set[int] = set()
    for layer, layer_type, pairs in candidates:
        if any(claims[id(v)] > 1 for _, v in pairs):
            shared.update(id(v) for _, v in pairs)
            continue
        indices = tuple(index[id(v)] for _, v in pairs)
        dtype = curvature_dtype(pairs[0][1].dtype)
        taken.update(indices)
        if layer_type == "norm":
            blocks.append(
                NormBlock(
                    layer.name,
                    layer,
                    indices,
                    dtype,
                    roles=tuple(r for r, _ in pairs),
                    shapes=tuple(tuple(v.shape) for _, v in pairs),
                )  # fmt: skip
            )
            continue
        cls = DepthwiseBlock if layer_type == "depthwise" else KroneckerBlock
        block = cls(
            layer.name, layer, indices, dtype,
            layer_type="conv" if layer_type == "depthwise" else layer_type,
            kernel_shape=tuple(int(d) for d in pairs[0][1].shape),
            has_bias=len(pairs) > 1,
            max_patches=max_patches if layer_type in ("conv", "depthwise") else None,
        )  # fmt: skip
        block.a_diagonal = layer_type == "embedding" or block.a_dim > max_factor_size
        block.g_diagonal = block.g_dim > max_factor_size
        blocks.append(block)
    rest = [i for i in range(len(variables)) if i not in taken]
    if rest:
        reasons = tuple(
            "shared between layers" if id(variables[i]) in shared else "untapped layer"
            for i in rest
        )
        blocks.append(
            DiagonalBlock(
                "<diagonal>",
                None,
                tuple(rest),
                curvature_dtype(variables[rest[0]].dtype),
                shapes=tuple(tuple(variables[i].shape) for i in rest),
                reasons=reasons,
                isotropic=isotropic_fallback,
            )  # fmt: skip
        )
    return blocks
