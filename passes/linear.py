"""Linear ops as Affine nodes: the ``lower-linear`` pass.

Every op here is, per sample, an affine map of its activation inputs once its parameters are
constant. With ``x`` the C-order flattening of one sample (the tensor without its batch axis)::

    y = Σ_i A_i · x_i + c

Each op has one pure function ``<op>_map(per-sample shapes, constant arrays, attributes) ->
AffineMap``; these are the one place for that op's math and are reused by other passes. Axes and
per-axis attributes are passed exactly as ONNX gives them, i.e. counted on the *full* tensor with
the batch at axis 0; the functions raise :class:`Refused` (with the reason) when the op would
touch the batch axis or is otherwise not a per-sample affine map.

Patterns (spec: https://onnx.ai/onnx/operators/onnx__<Op>.html):

- BatchNormalization, inference: ``y = s·x + (B − mean·s)``, ``s = scale / sqrt(var + eps)``
  per channel (axis 1; opset < 9 ``spatial=0``: per element) → diagonal. Training mode
  (``training_mode=1``, used running-statistics outputs, opset ≤ 6 ``is_test=0``) is refused.
- Gemm, ``A`` the activation: ``y = α·A·op(B) + β·C`` → ``α·op(B)ᵀ``, bias ``β·C`` (C scalar,
  (M,), (1, M)). ``transA=1`` or a constant ``A`` would contract the batch axis: refused.
- MatMul with a constant operand on either side, numpy semantics (rank-1 operands, broadcast
  batch axes): ``x (N, …, T, K) @ W (…, K, M)`` is ``I_T ⊗ Wᵀ`` per batch block, ``W (…, M, K) @
  x (N, …, K, T)`` is ``W ⊗ I_T``; built from index arithmetic.
- Add/Sub/Mul/Div with a constant (numpy broadcast, the output may be larger than the input):
  ``B·x ± c``, ``diag(c)·B·x``, ``diag(1/c)·B·x`` with ``B`` the broadcast selection.
  ``Div(c, x)`` is not linear. Add/Sub of two activations, ``Sum`` and ``Mean``: one term per
  input. A constant must not vary along the batch axis.
- Neg, Identity, Dropout (inference), Cast to the same float type.
- Data movement — index maps (:func:`onnx_lower.affine.index_map`): Transpose (``perm[0] = 0``),
  Pad (constant/reflect/edge/wrap; negative pads crop first), Concat (constant parts go to the
  bias), Split, Slice (ONNX clamping, negative steps), Gather (constant indices), Expand, Tile,
  DepthToSpace, SpaceToDepth.
- Squeeze, Unsqueeze, Flatten, Reshape: identity with a new per-sample shape, when axis 0 of the
  output is the input's batch axis (Flatten with ``axis=0`` only for a static batch of 1).
- ReduceMean / ReduceSum over non-batch axes (``keepdims``, ``noop_with_empty_axes``).

An op is lowered only when its data inputs are float activations (batch first, static per-sample
shape) and its parameters are constants. Anything else is left unchanged; :func:`explain` gives
the reason, which ``check-mlp`` reports when the node is still there at the end.

**Whole-tensor samples** (:mod:`onnx_lower.passes.sample_axis` decides when): a node refused per
sample is lowered on the whole tensor by :func:`match_whole` when every graph input is static.
The whole tensor ``x`` is seen as one sample of a virtual batch of 1, ``(1, *x.shape)``, so the
same ``<op>_map`` functions apply with the full shape as the per-sample shape and every axis
shifted by one. Elementwise ops (Add/Sub/Mul/Div, Sum/Mean, Neg, Identity, Dropout, Cast) use
their per-sample handlers with :func:`activation_shape` returning full shapes
(:func:`whole_tensor_samples`); Transpose, Gemm, MatMul, Flatten/Reshape/Squeeze/Unsqueeze,
Concat, Split, Slice, Gather, Pad and ReduceSum/ReduceMean have their own handler; the others
(BatchNormalization, whose axis 1 is the channel, Expand, Tile, DepthToSpace, SpaceToDepth) have
none and stay refused.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import scipy.sparse as sp

from onnx_lower.affine import (
    AffineMap,
    broadcast_matrix,
    diag,
    identity,
    index_map,
    make_affine,
    replace_with_affine,
)
from onnx_lower.errors import DynamicShapeError, InvalidModelError, LoweringError
from onnx_lower.graph import (
    attr,
    const_value,
    detach,
    flag,
    is_graph_output,
    is_op,
    sample_shape,
)
from onnx_lower.pass_manager import GraphPass, LoweringModel, register_pass

from . import sample_axis

__all__ = [
    "LowerLinearPass",
    "LINEAR_OPS",
    "Lowering",
    "Refused",
    "explain",
    "match",
    "match_whole",
    "whole_tensor_samples",
    "numpy_matmul_map",
    "batch_norm_map",
    "batch_norm_scale_shift",
    "gemm_map",
    "matmul_map",
    "elementwise_map",
    "linear_combination_map",
    "neg_map",
    "transpose_map",
    "pad_map",
    "concat_map",
    "split_maps",
    "split_sizes",
    "slice_map",
    "gather_map",
    "reshape_map",
    "squeeze_shape",
    "unsqueeze_shape",
    "flatten_shape",
    "reshape_target",
    "reduce_map",
    "expand_map",
    "tile_map",
    "depth_to_space_map",
    "space_to_depth_map",
    "per_sample_constant",
    "activation_shape",
    "same_batch",
    "broadcast_shapes",
    "merge_terms",
    "is_float",
    "is_omitted",
    "onnx_slice",
]

#: Ends of Slice at least this large mean "to the end" even for a symbolic batch.
_BIG = 2**31 - 1


class Refused(Exception):
    """The node is not a per-sample affine map (or not one this pass can prove); ``reason``."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _refuse(reason: str):
    raise Refused(reason)


#: Why a node whose inputs are all constant is not lowered: canonicalisation computes it.
ALL_CONSTANT = "every input is constant (fold-constants evaluates such nodes)"


# --- per-sample shapes and constants -----------------------------------------------------------


def is_float(t: gs.Tensor) -> bool:
    """The tensor holds floats (an unknown dtype counts as float: inference sets every dtype)."""
    if t.dtype is None:
        return True
    try:
        return np.dtype(t.dtype).kind == "f"
    except TypeError:
        return False


def is_omitted(t: gs.Tensor) -> bool:
    """An omitted optional input (``""`` in the protobuf)."""
    return isinstance(t, gs.Variable) and t.name == "" and not t.inputs


def activation_shape(t: gs.Tensor) -> tuple[int, ...]:
    """Per-sample shape of a float activation (batch first); :class:`Refused` otherwise.

    Raises :class:`~onnx_lower.errors.DynamicShapeError` for a dynamic non-batch dimension.
    """
    if const_value(t) is not None:
        _refuse(f"input '{t.name}' is a constant, not an activation")
    if not is_float(t):
        _refuse(
            f"input '{t.name}' has type {np.dtype(t.dtype).name}; only float activations are "
            "lowered (integer tensors are shape or index computations)"
        )
    if t.shape is None:
        _refuse(f"the shape of '{t.name}' is unknown; run shape inference first")
    if _WHOLE.get():
        return _whole_shape(t)
    if len(t.shape) == 0:
        _refuse(f"input '{t.name}' is a scalar: it has no batch axis")
    return sample_shape(t)


#: Set inside :func:`whole_tensor_samples`: the sample is the whole tensor.
_WHOLE: contextvars.ContextVar[bool] = contextvars.ContextVar("whole_tensor", default=False)


@contextlib.contextmanager
def whole_tensor_samples():
    """Within: :func:`activation_shape` gives full shapes and there is no batch axis to check."""
    token = _WHOLE.set(True)
    try:
        yield
    finally:
        _WHOLE.reset(token)


def _whole_shape(t: gs.Tensor) -> tuple[int, ...]:
    """The full shape of ``t``, which must be static (a whole-tensor sample)."""
    if t.shape is None or not all(_static(d) and d >= 0 for d in t.shape):
        _refuse(f"the shape {t.shape} of '{t.name}' is not static")
    return tuple(int(d) for d in t.shape)


def same_batch(a: gs.Tensor, b: gs.Tensor) -> None:
    """Refuse two activations whose batch axes broadcast against each other."""
    if _WHOLE.get():
        return
    da, db = a.shape[0], b.shape[0]
    static = isinstance(da, (int, np.integer)), isinstance(db, (int, np.integer))
    if all(static) and da != db or (static[0] and da == 1) != (static[1] and db == 1):
        _refuse(
            f"'{a.name}' (batch {da}) and '{b.name}' (batch {db}) broadcast along the batch "
            "axis, which is not a per-sample operation"
        )


def per_sample_constant(c: np.ndarray, sample_rank: int) -> np.ndarray:
    """A constant that broadcasts against a (batch, *sample) activation, without its batch axis.

    The constant may have rank up to ``sample_rank + 1``; at full rank its axis 0 lines up with
    the batch and must be 1.
    """
    c = np.asarray(c)
    if c.ndim > sample_rank + 1:
        _refuse(
            f"the constant of shape {c.shape} has more axes than the activation "
            f"({sample_rank + 1}); broadcasting would put new axes before the batch"
        )
    if c.ndim == sample_rank + 1:
        if c.shape[0] != 1:
            _refuse(
                f"the constant of shape {c.shape} has {c.shape[0]} entries along axis 0, the "
                "batch axis: it differs between samples, so the op is not per-sample"
            )
        c = c[0]
    return c


def broadcast_shapes(*shapes: Sequence[int]) -> tuple[int, ...]:
    """numpy's broadcast of per-sample shapes; :class:`Refused` if they do not broadcast."""
    try:
        return tuple(int(d) for d in np.broadcast_shapes(*[tuple(s) for s in shapes]))
    except ValueError:
        _refuse(f"shapes {', '.join(str(tuple(s)) for s in shapes)} do not broadcast")


def _axis(axis: int, rank: int, what: str = "axis") -> int:
    axis = int(axis)
    if not -rank <= axis < rank:
        _refuse(f"{what} {axis} is out of range for rank {rank}")
    return axis + rank if axis < 0 else axis


def _not_batch(axis: int, op: str) -> None:
    if axis == 0:
        _refuse(f"{op} acts on axis 0, the batch axis; only per-sample axes can be lowered")


def _f64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


# --- the pure maps -----------------------------------------------------------------------------


def batch_norm_map(
    in_shape: Sequence[int],
    scale: np.ndarray,
    bias: np.ndarray,
    mean: np.ndarray,
    var: np.ndarray,
    epsilon: float = 1e-5,
) -> AffineMap:
    """Inference BatchNormalization: ``y = scale·(x − mean)/sqrt(var + eps) + bias``.

    Parameters are per channel (size C, per-sample axis 0) or, for opset < 9 ``spatial=0``, per
    element of the sample.
    """
    in_shape = tuple(in_shape)
    if not in_shape:
        _refuse("BatchNormalization needs an input of rank >= 2 (batch, channels, ...)")
    n = math.prod(in_shape)
    channel_shape = (in_shape[0],) + (1,) * (len(in_shape) - 1)

    def per_element(p: np.ndarray, name: str) -> np.ndarray:
        p = _f64(p)
        if p.size == in_shape[0]:
            return np.broadcast_to(p.reshape(channel_shape), in_shape).reshape(-1)
        if p.size == n:
            return p.reshape(-1)
        if p.size == 1:
            return np.full(n, float(p.reshape(-1)[0]))
        _refuse(f"BatchNormalization {name} of shape {p.shape} fits neither C nor {in_shape}")

    s, b = batch_norm_scale_shift(
        per_element(scale, "scale"), per_element(bias, "B"), per_element(mean, "mean"),
        per_element(var, "var"), epsilon,
    )
    return AffineMap([diag(s)], b, in_shape)


def batch_norm_scale_shift(
    scale: np.ndarray, bias: np.ndarray, mean: np.ndarray, var: np.ndarray, epsilon: float
) -> tuple[np.ndarray, np.ndarray]:
    """Inference BatchNormalization as ``y = s·x + b``: ``s = scale/sqrt(var + eps)``,
    ``b = bias − mean·s``, in float64 (the mlp and im2col forms both fold it this way)."""
    s = _f64(scale) / np.sqrt(_f64(var) + float(epsilon))
    return s, _f64(bias) - _f64(mean) * s


def gemm_map(
    in_shape: Sequence[int],
    b: np.ndarray,
    c: np.ndarray | None = None,
    alpha: float = 1.0,
    beta: float = 1.0,
    trans_b: bool = False,
) -> AffineMap:
    """Gemm with the activation as ``A`` (transA = 0): ``y = α·A·op(B) + β·C``."""
    b = _f64(b)
    if b.ndim != 2:
        _refuse(f"Gemm's B must be a matrix, got shape {b.shape}")
    w = b.T if trans_b else b  # (K, M)
    if tuple(in_shape) != (w.shape[0],):
        _refuse(f"Gemm's A has per-sample shape {tuple(in_shape)}, B expects ({w.shape[0]},)")
    m = w.shape[1]
    term = sp.csr_matrix(float(alpha) * w.T)
    term.eliminate_zeros()
    bias = None
    if c is not None and float(beta) != 0.0:
        c = _f64(c)
        if c.ndim > 2:
            _refuse(f"Gemm's C has rank {c.ndim}")
        if c.ndim == 2:
            if c.shape[0] != 1:
                _refuse(
                    f"Gemm's C of shape {c.shape} has one row per batch row: a bias that "
                    "differs between samples is not per-sample"
                )
            c = c[0]
        bias = float(beta) * np.broadcast_to(c, (m,))
    return AffineMap([term], bias, (m,))


def _batch_index(b_shape: tuple[int, ...], out_batch: tuple[int, ...]) -> np.ndarray:
    """Flat index into ``b_shape`` for every flat position of the broadcast ``out_batch``."""
    idx = np.arange(math.prod(b_shape), dtype=np.int64).reshape(b_shape)
    return np.broadcast_to(idx, out_batch).reshape(-1)


def matmul_map(in_shape: Sequence[int], w: np.ndarray, const_left: bool = False) -> AffineMap:
    """numpy matmul of the activation ``x`` (batch first) with the constant ``w``.

    ``const_left=False``: ``y = x @ w``; ``const_left=True``: ``y = w @ x``. Refused when the
    batch axis would be contracted or would not stay axis 0 of the output.
    """
    xs = tuple(int(d) for d in in_shape)
    w = _f64(w)
    r, q = len(xs) + 1, w.ndim
    if q == 0:
        _refuse("MatMul with a scalar operand is invalid")
    if const_left and r <= 2 or not const_left and r == 1:
        _refuse(
            f"MatMul would contract axis 0 of the rank-{r} activation, the batch axis"
        )
    if q >= 2:
        if q > r or (not const_left and r == 2 and q > 2):
            _refuse(
                f"the constant of shape {w.shape} has more batch axes than the activation: "
                "the output's leading axes would come from the constant, not the batch"
            )
        if q == r and q >= 3:  # W's axis 0 lines up with the batch
            if w.shape[0] != 1:
                _refuse(
                    f"the constant of shape {w.shape} has {w.shape[0]} matrices along the "
                    "batch axis: they differ between samples"
                )
            w = w[0]
    return numpy_matmul_map(xs, w, const_left)


def numpy_matmul_map(x_shape: Sequence[int], w: np.ndarray, const_left: bool = False) -> AffineMap:
    """numpy's matmul of an operand of shape ``x_shape`` with the constant ``w`` (rank-1 operands
    promoted and their axis removed, leading axes broadcast), as a map of the flat operand.

    :func:`matmul_map` calls it on the per-sample shape once the batch axis is checked; the
    whole-tensor lowering calls it on the full shape.
    """
    xs = tuple(int(d) for d in x_shape)
    w = _f64(w)
    if w.ndim == 0 or not xs:
        _refuse("MatMul with a scalar operand is invalid")
    x_vector = len(xs) == 1
    if const_left:
        wm = w.reshape(1, -1) if w.ndim == 1 else w  # (*Bw, M, K)
        x2 = (xs[0], 1) if x_vector else xs
        bx, (k, t) = x2[:-2], x2[-2:]
        m = wm.shape[-2]
        if wm.shape[-1] != k:
            _refuse(f"MatMul shapes {w.shape} @ {xs} do not match (per sample)")
    else:
        wm = w.reshape(-1, 1) if w.ndim == 1 else w  # (*Bw, K, M)
        x2 = xs if len(xs) >= 2 else (1, xs[0])
        bx, (t, k) = x2[:-2], x2[-2:]
        m = wm.shape[-1]
        if wm.shape[-2] != k:
            _refuse(f"MatMul shapes {xs} @ {w.shape} do not match (per sample)")
    bw = wm.shape[:-2]
    bo = broadcast_shapes(bx, bw)
    p = math.prod(bo)
    ix, iw = _batch_index(bx, bo), _batch_index(bw, bo)
    wf = wm.reshape(-1, *wm.shape[-2:])
    ix4 = ix[:, None, None, None]
    ks = np.arange(k, dtype=np.int64)[None, None, None, :]
    ts = np.arange(t, dtype=np.int64)
    if const_left:
        # rows (p, m, t), entries over k: col = ix·K·T + k·T + t, value W[iw, m, k]
        cols = ix4 * (k * t) + ks * t + ts[None, None, :, None]
        vals = wf[iw][:, :, None, :]
        shape4 = (p, m, t, k)
        out = (*bo, m, t)
    else:
        # rows (p, t, m), entries over k: col = ix·T·K + t·K + k, value W[iw, k, m]
        cols = ix4 * (t * k) + ts[None, :, None, None] * k + ks
        vals = wf[iw].transpose(0, 2, 1)[:, None, :, :]
        shape4 = (p, t, m, k)
        out = (*bo, t, m)
    n_rows = p * m * t
    term = sp.csr_matrix(
        (
            np.array(np.broadcast_to(vals, shape4)).reshape(-1),
            np.array(np.broadcast_to(cols, shape4)).reshape(-1),
            np.arange(0, n_rows * k + 1, k, dtype=np.int64),
        ),
        shape=(n_rows, math.prod(xs)),
    )
    term.eliminate_zeros()
    if const_left:  # rank-1 operands lose their promoted axis
        out = (*bo, *(() if w.ndim == 1 else (m,)), *(() if x_vector else (t,)))
    else:
        if len(xs) == 1:
            out = (*out[:-2], out[-1])
        if w.ndim == 1:
            out = out[:-1]
    return AffineMap([term], None, out)


def elementwise_map(
    op: str, in_shape: Sequence[int], const: np.ndarray, const_first: bool = False
) -> AffineMap:
    """Add/Sub/Mul/Div of an activation and a constant, numpy broadcasting.

    ``const_first`` says the constant is the first operand (``c − x``, ``c / x``).
    """
    in_shape = tuple(in_shape)
    c = _f64(per_sample_constant(const, len(in_shape)))
    out = broadcast_shapes(in_shape, c.shape)
    if len(out) != len(in_shape):
        _refuse(f"the constant of shape {c.shape} adds axes in front of the batch")
    b = identity(math.prod(in_shape)) if out == in_shape else broadcast_matrix(in_shape, out)
    cb = np.broadcast_to(c, out).reshape(-1)
    if op == "Add":
        return AffineMap([b], cb, out)
    if op == "Sub":
        return AffineMap([-b], cb, out) if const_first else AffineMap([b], -cb, out)
    if op == "Mul":
        return AffineMap([(diag(cb) @ b).tocsr()], None, out)
    if op == "Div":
        if const_first:
            _refuse("Div(constant, x) = c / x is not linear in x")
        if not np.all(cb != 0) or not np.all(np.isfinite(cb)):
            _refuse("Div by a constant containing 0 or a non-finite value")
        return AffineMap([(diag(1.0 / cb) @ b).tocsr()], None, out)
    _refuse(f"{op} is not an elementwise linear op")


def linear_combination_map(
    in_shapes: Sequence[Sequence[int]],
    coefficients: Sequence[float],
    const: np.ndarray | None = None,
) -> AffineMap:
    """``y = Σ_i coefficients[i]·x_i + const`` with numpy broadcasting of per-sample shapes.

    ``const`` is already per-sample (see :func:`per_sample_constant`).
    """
    shapes = [tuple(s) for s in in_shapes]
    if len({len(s) for s in shapes}) > 1:
        _refuse(
            f"activations of per-sample shapes {shapes} have different ranks: their batch axes "
            "would not line up"
        )
    extra = [] if const is None else [np.shape(const)]
    out = broadcast_shapes(*shapes, *extra)
    if len(out) != len(shapes[0]):
        _refuse("a constant adds axes in front of the batch")
    terms = []
    for s, k in zip(shapes, coefficients):
        b = identity(math.prod(s)) if s == out else broadcast_matrix(s, out)
        terms.append(float(k) * b)
    bias = None if const is None else np.broadcast_to(_f64(const), out).reshape(-1)
    return AffineMap(terms, bias, out)


def neg_map(in_shape: Sequence[int]) -> AffineMap:
    return AffineMap([-identity(math.prod(in_shape))], None, tuple(in_shape))


def _from_index_map(in_shapes, fn, fill_value: float = 0.0) -> AffineMap:
    terms, fill, out = index_map(in_shapes, fn)
    bias = np.where(fill, float(fill_value), 0.0) if fill.any() and fill_value else None
    return AffineMap(terms, bias, out)


def transpose_map(in_shape: Sequence[int], perm: Sequence[int] | None = None) -> AffineMap:
    """Transpose; ``perm`` over the full rank, default reversed (spec), ``perm[0]`` must be 0."""
    r = len(in_shape) + 1
    perm = list(range(r))[::-1] if perm is None else [_axis(p, r, "perm entry") for p in perm]
    if sorted(perm) != list(range(r)):
        _refuse(f"perm {perm} is not a permutation of {r} axes")
    if perm[0] != 0:
        _refuse(
            f"Transpose perm {perm} moves the batch axis (perm[0] must be 0); only per-sample "
            "axes can be permuted"
        )
    inner = [p - 1 for p in perm[1:]]
    return _from_index_map([in_shape], lambda a: np.transpose(a, inner))


_PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "edge", "wrap": "wrap"}


def pad_map(
    in_shape: Sequence[int],
    pads: Sequence[int],
    mode: str = "constant",
    value: float = 0.0,
    axes: Sequence[int] | None = None,
) -> AffineMap:
    """Pad; ``pads = [begin_0.., end_0..]`` over ``axes`` (default all, full rank).

    Negative pads crop; cropping happens before padding (onnxruntime's order, which matters for
    reflect/edge/wrap). Pads on the batch axis must be 0.
    """
    in_shape = tuple(int(d) for d in in_shape)
    r = len(in_shape) + 1
    if mode not in _PAD_MODES:
        _refuse(f"Pad mode '{mode}' is unknown")
    axes = list(range(r)) if axes is None else [_axis(a, r) for a in axes]
    pads = [int(p) for p in pads]
    if len(pads) != 2 * len(axes):
        _refuse(f"Pad has {len(pads)} pads for {len(axes)} axes")
    begin, end = [0] * r, [0] * r
    for i, a in enumerate(axes):
        begin[a], end[a] = pads[i], pads[i + len(axes)]
    if begin[0] or end[0]:
        _refuse(f"Pad pads the batch axis ({begin[0]}, {end[0]}); only per-sample axes")
    b, e = begin[1:], end[1:]
    if any(d + min(bb, 0) + min(ee, 0) < 0 for d, bb, ee in zip(in_shape, b, e)):
        _refuse(f"negative pads {pads} crop more than the input {in_shape}")

    def fn(a):
        crop = tuple(slice(-min(bb, 0), d + min(ee, 0)) for d, bb, ee in zip(in_shape, b, e))
        a = a[crop]
        width = [(max(bb, 0), max(ee, 0)) for bb, ee in zip(b, e)]
        if mode == "constant":
            return np.pad(a, width, mode="constant", constant_values=-1)
        if any(w > 0 for pair in width for w in pair) and 0 in a.shape:
            _refuse(f"Pad mode {mode} of an empty axis")
        return np.pad(a, width, mode=_PAD_MODES[mode])

    return _from_index_map([in_shape], fn, value if mode == "constant" else 0.0)


def concat_map(parts: Sequence[Sequence[int] | np.ndarray], axis: int) -> AffineMap:
    """Concat; ``parts`` are per-sample shapes (activations, one term each, in order) or constant
    arrays (full rank, axis 0 of size 1), which go into the bias. ``axis`` is over the full rank.
    """
    shapes, consts = [], {}
    for i, p in enumerate(parts):
        if isinstance(p, np.ndarray):
            if p.ndim == 0 or p.shape[0] != 1:
                _refuse(
                    f"the constant Concat input of shape {p.shape} does not have a batch axis "
                    "of size 1: it is not the same for every sample"
                )
            consts[i] = p[0]
            shapes.append(p.shape[1:])
        else:
            shapes.append(tuple(p))
    r = len(shapes[0]) + 1
    axis = _axis(axis, r)
    _not_batch(axis, "Concat")
    terms, _, out = index_map(shapes, lambda *a: np.concatenate(a, axis=axis - 1))
    bias = np.zeros(math.prod(out))
    for i, c in consts.items():
        bias += terms[i] @ _f64(c).reshape(-1)
    return AffineMap([t for i, t in enumerate(terms) if i not in consts], bias, out)


def split_sizes(dim: int, n_outputs: int, split: Sequence[int] | None = None) -> list[int]:
    """Chunk sizes of Split: explicit ``split``, else ``ceil(dim / n)`` with a smaller last one."""
    if split is not None and len(split):
        sizes = [int(s) for s in split]
        if sum(sizes) != dim or len(sizes) != n_outputs:
            _refuse(f"split {sizes} does not cover dimension {dim} in {n_outputs} outputs")
        return sizes
    chunk = -(-dim // n_outputs)
    sizes = [chunk] * (n_outputs - 1) + [dim - chunk * (n_outputs - 1)]
    if min(sizes) < 0:
        _refuse(f"cannot split {dim} into {n_outputs} chunks")
    return sizes


def split_maps(in_shape: Sequence[int], axis: int, sizes: Sequence[int]) -> list[AffineMap]:
    """Split into chunks of ``sizes`` along ``axis`` (full rank): one map per output."""
    in_shape = tuple(in_shape)
    axis = _axis(axis, len(in_shape) + 1)
    _not_batch(axis, "Split")
    n = math.prod(in_shape)
    idx = np.arange(n, dtype=np.int64).reshape(in_shape)
    cuts = np.cumsum(sizes)[:-1]
    pieces = np.split(idx, cuts, axis=axis - 1)
    return [AffineMap([_selection(p, n)], None, p.shape) for p in pieces]


def _selection(src: np.ndarray, n_in: int) -> sp.csr_matrix:
    src = src.reshape(-1)
    return sp.csr_matrix(
        (np.ones(src.size), src, np.arange(src.size + 1, dtype=np.int64)), shape=(src.size, n_in)
    )


def onnx_slice(start: int, end: int, step: int, dim: int) -> slice:
    """The python slice that ONNX Slice's clamping rules give on an axis of extent ``dim``."""
    if start < 0:
        start += dim
    if end < 0:
        end += dim
    if step > 0:
        start, end = min(max(start, 0), dim), min(max(end, 0), dim)
    else:
        start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
    return slice(start, end if end >= 0 else None, step)


def slice_map(
    in_shape: Sequence[int],
    starts: Sequence[int],
    ends: Sequence[int],
    axes: Sequence[int] | None = None,
    steps: Sequence[int] | None = None,
    batch: int | str | None = None,
) -> AffineMap:
    """Slice with ONNX's clamping; the batch axis (``batch`` its size, int or symbol) may only be
    sliced as a whole.
    """
    in_shape = tuple(int(d) for d in in_shape)
    r = len(in_shape) + 1
    starts, ends = [int(s) for s in starts], [int(e) for e in ends]
    axes = list(range(len(starts))) if axes is None else [_axis(a, r) for a in axes]
    steps = [1] * len(starts) if steps is None else [int(s) for s in steps]
    if not len(starts) == len(ends) == len(axes) == len(steps):
        _refuse("Slice starts, ends, axes and steps have different lengths")
    if len(set(axes)) != len(axes):
        _refuse(f"Slice axes {axes} repeat an axis")
    index: list[slice] = [slice(None)] * (r - 1)
    for start, end, ax, step in zip(starts, ends, axes, steps):
        if step == 0:
            _refuse("Slice step 0 is invalid")
        if ax == 0:
            if isinstance(batch, (int, np.integer)):
                whole = np.arange(int(batch))
                keeps = np.array_equal(whole[onnx_slice(start, end, step, int(batch))], whole)
            else:
                keeps = step == 1 and (start == 0 or start <= -_BIG) and end >= _BIG
            if not keeps:
                _refuse(
                    f"Slice [{start}:{end}:{step}] on axis 0 cuts the batch; only per-sample "
                    "axes can be sliced"
                )
            continue
        index[ax - 1] = onnx_slice(start, end, step, in_shape[ax - 1])
    return _from_index_map([in_shape], lambda a: a[tuple(index)])


def gather_map(in_shape: Sequence[int], indices: np.ndarray, axis: int = 0) -> AffineMap:
    """Gather with constant ``indices`` along a non-batch ``axis`` (negative indices wrap)."""
    in_shape = tuple(in_shape)
    axis = _axis(axis, len(in_shape) + 1)
    _not_batch(axis, "Gather")
    dim = in_shape[axis - 1]
    idx = np.asarray(indices).astype(np.int64)
    if idx.size and (idx.min() < -dim or idx.max() >= dim):
        _refuse(f"Gather indices out of range for an axis of extent {dim}")
    idx = np.where(idx < 0, idx + dim, idx)
    return _from_index_map([in_shape], lambda a: np.take(a, idx, axis=axis - 1))


def reshape_map(in_shape: Sequence[int], out_shape: Sequence[int]) -> AffineMap:
    """A reshape of the sample: the identity on flat vectors with a new per-sample shape."""
    n = math.prod(in_shape)
    if math.prod(out_shape) != n:
        _refuse(f"cannot reshape a sample of shape {tuple(in_shape)} to {tuple(out_shape)}")
    return AffineMap([identity(n)], None, tuple(out_shape))


def _static(d) -> bool:
    return isinstance(d, (int, np.integer))


def squeeze_shape(full_shape: Sequence, axes: Sequence[int] | None) -> tuple[int, ...]:
    """Per-sample output shape of Squeeze on a ``(batch, *sample)`` tensor."""
    r = len(full_shape)
    if axes is None:
        if _static(full_shape[0]) and full_shape[0] == 1:
            _refuse("Squeeze without axes removes the batch axis of size 1")
        axes = [i for i in range(1, r) if full_shape[i] == 1]
    axes = {_axis(a, r) for a in axes}
    if 0 in axes:
        _refuse("Squeeze removes axis 0, the batch axis")
    for a in axes:
        if full_shape[a] != 1:
            _refuse(f"Squeeze axis {a} has extent {full_shape[a]}, not 1")
    return tuple(int(d) for i, d in enumerate(full_shape) if i and i not in axes)


def unsqueeze_shape(full_shape: Sequence, axes: Sequence[int]) -> tuple[int, ...]:
    """Per-sample output shape of Unsqueeze on a ``(batch, *sample)`` tensor."""
    r = len(full_shape) + len(axes)
    axes = {_axis(a, r) for a in axes}
    if 0 in axes:
        _refuse("Unsqueeze inserts axis 0 in front of the batch axis")
    rest = iter(full_shape[1:])
    return tuple(1 if i in axes else int(next(rest)) for i in range(1, r))


def flatten_shape(full_shape: Sequence, axis: int = 1) -> tuple[int, ...]:
    """Per-sample output shape of Flatten; refused when the batch merges with another axis."""
    r = len(full_shape)
    axis = int(axis) + r if int(axis) < 0 else int(axis)
    if not 0 <= axis <= r:
        _refuse(f"Flatten axis {axis} is out of range for rank {r}")
    sample = [int(d) for d in full_shape[1:]]
    if axis == 0:
        if not (_static(full_shape[0]) and full_shape[0] == 1):
            _refuse(
                f"Flatten(axis=0) gives (1, batch·…): it merges the batch (of size "
                f"{full_shape[0]}) into the sample; only a static batch of 1 keeps it apart"
            )
        return (math.prod(sample),)
    if math.prod(sample[: axis - 1]) != 1:
        _refuse(
            f"Flatten(axis={axis}) merges the batch axis with axes 1..{axis - 1} "
            f"(extent {math.prod(sample[: axis - 1])})"
        )
    return (math.prod(sample[axis - 1 :]),)


def reshape_target(full_shape: Sequence, shape: Sequence[int], allowzero: bool = False):
    """Per-sample output shape of Reshape from its (constant) shape input.

    Returns None when the output's axis 0 cannot be proven to be the batch axis.
    """
    shape = [int(s) for s in shape]
    sample_size = math.prod(int(d) for d in full_shape[1:])
    out = []
    for i, s in enumerate(shape):
        if s == 0 and not allowzero:
            if i >= len(full_shape):
                return None
            out.append(full_shape[i])
        else:
            out.append(s)
    if not out:
        return None
    rest = out[1:]
    if any(not _static(d) for d in rest):
        return None
    if out[0] == -1:
        if -1 in rest or math.prod(rest) != sample_size:
            return None
        return tuple(rest)
    if out[0] is full_shape[0] or (_static(full_shape[0]) and out[0] == full_shape[0]):
        if rest.count(-1) == 1:
            known = math.prod(d for d in rest if d != -1)
            if known == 0 or sample_size % known:
                return None
            rest[rest.index(-1)] = sample_size // known
        elif -1 in rest:
            return None
        return tuple(rest)
    return None


def reduce_map(
    in_shape: Sequence[int], axes: Sequence[int], keepdims: bool = True, mean: bool = False
) -> AffineMap:
    """ReduceSum / ReduceMean over non-batch ``axes`` (full rank)."""
    in_shape = tuple(int(d) for d in in_shape)
    r = len(in_shape) + 1
    axes = {_axis(a, r) for a in axes}
    if 0 in axes:
        _refuse("the reduction includes axis 0, the batch axis")
    red = {a - 1 for a in axes}
    keep = tuple(1 if i in red else d for i, d in enumerate(in_shape))
    n = math.prod(in_shape)
    rows = np.broadcast_to(np.arange(math.prod(keep), dtype=np.int64).reshape(keep), in_shape)
    count = math.prod(in_shape[i] for i in red)
    weight = 1.0 / count if mean and count else 1.0
    m = sp.csr_matrix(
        (np.full(n, weight), (rows.reshape(-1), np.arange(n))), shape=(math.prod(keep), n)
    )
    out = keep if keepdims else tuple(d for i, d in enumerate(in_shape) if i not in red)
    return AffineMap([m], None, out)


def expand_map(in_shape: Sequence[int], shape: Sequence[int], batch=None) -> AffineMap:
    """Expand to ``shape`` (full rank, bidirectional broadcast) keeping the batch axis."""
    in_shape = tuple(in_shape)
    shape = [int(s) for s in shape]
    r = len(in_shape) + 1
    if len(shape) > r:
        _refuse(f"Expand to {shape} adds axes in front of the batch axis")
    if len(shape) == r:
        if shape[0] != 1 and not (_static(batch) and shape[0] == batch):
            _refuse(f"Expand to {shape} broadcasts along the batch axis")
        shape = shape[1:]
    out = broadcast_shapes(in_shape, shape)
    return AffineMap([broadcast_matrix(in_shape, out)], None, out)


def tile_map(in_shape: Sequence[int], repeats: Sequence[int]) -> AffineMap:
    """Tile with ``repeats`` over the full rank; ``repeats[0]`` must be 1."""
    repeats = [int(x) for x in repeats]
    if len(repeats) != len(in_shape) + 1:
        _refuse(f"Tile has {len(repeats)} repeats for rank {len(in_shape) + 1}")
    if repeats[0] != 1:
        _refuse(f"Tile repeats the batch axis {repeats[0]} times")
    return _from_index_map([in_shape], lambda a: np.tile(a, repeats[1:]))


def depth_to_space_map(in_shape: Sequence[int], blocksize: int, mode: str = "DCR") -> AffineMap:
    """DepthToSpace on a (C, H, W) sample, modes DCR (default) and CRD."""
    if len(in_shape) != 3:
        _refuse(f"DepthToSpace needs a 4-D input, got per-sample shape {tuple(in_shape)}")
    c, h, w = in_shape
    b = int(blocksize)
    if c % (b * b):
        _refuse(f"DepthToSpace: {c} channels are not divisible by blocksize² = {b * b}")
    if mode == "DCR":
        fn = lambda a: a.reshape(b, b, c // (b * b), h, w).transpose(2, 3, 0, 4, 1)  # noqa: E731
    elif mode == "CRD":
        fn = lambda a: a.reshape(c // (b * b), b, b, h, w).transpose(0, 3, 1, 4, 2)  # noqa: E731
    else:
        _refuse(f"DepthToSpace mode {mode} is unknown")
    return _from_index_map([in_shape], lambda a: fn(a).reshape(c // (b * b), h * b, w * b))


def space_to_depth_map(in_shape: Sequence[int], blocksize: int) -> AffineMap:
    """SpaceToDepth on a (C, H, W) sample."""
    if len(in_shape) != 3:
        _refuse(f"SpaceToDepth needs a 4-D input, got per-sample shape {tuple(in_shape)}")
    c, h, w = in_shape
    b = int(blocksize)
    if h % b or w % b:
        _refuse(f"SpaceToDepth: {h}x{w} is not divisible by blocksize {b}")
    return _from_index_map(
        [in_shape],
        lambda a: a.reshape(c, h // b, b, w // b, b)
        .transpose(2, 4, 0, 1, 3)
        .reshape(c * b * b, h // b, w // b),
    )


# --- matching nodes ----------------------------------------------------------------------------


@dataclasses.dataclass
class Lowering:
    """The result of matching a node: Affine maps over ``inputs``, one per node output."""

    inputs: list[gs.Tensor]
    maps: list[AffineMap]

    def apply(self, graph: gs.Graph, node: gs.Node) -> list[gs.Node]:
        outputs = list(node.outputs)
        if len(self.maps) == 1:
            inputs, amap = merge_terms(self.inputs, self.maps[0])
            return [replace_with_affine(graph, node, inputs, amap)]
        index = graph.nodes.index(node)
        detach(node)
        new = []
        for out, amap in zip(outputs, self.maps):
            inputs, amap = merge_terms(self.inputs, amap)
            new.append(make_affine(inputs, out, amap, out.name, source=node.name))
        graph.nodes[index : index + 1] = new
        return new


def merge_terms(inputs: Sequence[gs.Tensor], amap: AffineMap) -> tuple[list[gs.Tensor], AffineMap]:
    """One term per distinct input tensor (``Add(x, x)`` has one)."""
    merged: list[gs.Tensor] = []
    terms: list[sp.csr_matrix] = []
    for t, m in zip(inputs, amap.terms):
        for i, u in enumerate(merged):
            if u is t:
                terms[i] = (terms[i] + m).tocsr()
                break
        else:
            merged.append(t)
            terms.append(m)
    if len(merged) == len(inputs):
        return list(inputs), amap
    return merged, AffineMap(terms, amap.bias, amap.out_shape, whole=amap.whole)


@dataclasses.dataclass
class _Ctx:
    graph: gs.Graph
    opset: int


def _inputs(node: gs.Node) -> list[gs.Tensor | None]:
    return [None if is_omitted(t) else t for t in node.inputs]


def split_operands(
    node: gs.Node, *, repeats: bool = True
) -> tuple[list[gs.Tensor], list[tuple[int, ...]], list[np.ndarray]]:
    """The activations (with per-sample shapes) and the constants among a variadic node's inputs.

    ``repeats=False`` keeps one copy of an activation read twice (for Max/Min: max(a, a) = a).
    Refuses when every input is constant or the activations' ranks or batches differ.
    """
    acts: list[gs.Tensor] = []
    shapes: list[tuple[int, ...]] = []
    consts: list[np.ndarray] = []
    for t in _inputs(node):
        if t is None:
            continue
        c = const_value(t)
        if c is not None:
            consts.append(c)
        elif repeats or not any(t is a for a in acts):
            shapes.append(activation_shape(t))
            acts.append(t)
    if not acts:
        _refuse(ALL_CONSTANT)
    rank = len(shapes[0])
    if any(len(s) != rank for s in shapes):
        _refuse(f"activations of per-sample shapes {shapes} have different ranks")
    for t in acts[1:]:
        same_batch(acts[0], t)
    return acts, shapes, consts


def _input(node: gs.Node, i: int) -> gs.Tensor | None:
    ins = _inputs(node)
    return ins[i] if i < len(ins) else None


def _const_input(node: gs.Node, i: int, what: str, required: bool = False):
    t = _input(node, i)
    if t is None:
        if required:
            _refuse(f"{what} input is missing")
        return None
    value = const_value(t)
    if value is None:
        _refuse(f"{what} ('{t.name}') is not a constant")
    return value


def _ints(value) -> list[int] | None:
    return None if value is None else [int(v) for v in np.asarray(value).reshape(-1)]


def _used(graph: gs.Graph, t: gs.Tensor) -> bool:
    return not is_omitted(t) and (bool(t.outputs) or is_graph_output(graph, t))


def _data(node: gs.Node) -> tuple[gs.Tensor, tuple[int, ...]]:
    """The node's first input as an activation and its per-sample shape."""
    x = _input(node, 0)
    if x is None:
        _refuse("the data input is missing")
    return x, activation_shape(x)


def _single(node: gs.Node, amap: AffineMap) -> Lowering:
    return Lowering([node.inputs[0]], [amap])


def _lower_batch_norm(node: gs.Node, ctx: _Ctx) -> Lowering:
    x, xs = _data(node)
    if int(attr(node, "training_mode", 0)):
        _refuse("training_mode=1 normalises with batch statistics, which is not per-sample")
    if ctx.opset <= 6 and not int(attr(node, "is_test", 0)):
        _refuse("is_test=0 (training mode, the default before opset 7) uses batch statistics")
    extra = [t.name for t in node.outputs[1:] if _used(ctx.graph, t)]
    if extra:
        _refuse(f"the training outputs {extra} are used; only inference is lowered")
    names = ("scale", "B", "mean", "var")
    params = [_const_input(node, i + 1, names[i], required=True) for i in range(4)]
    # epsilon default 1e-5: https://onnx.ai/onnx/operators/onnx__BatchNormalization.html
    return _single(node, batch_norm_map(xs, *params, epsilon=attr(node, "epsilon", 1e-5)))


def _lower_gemm(node: gs.Node, ctx: _Ctx) -> Lowering:
    a, b = _input(node, 0), _input(node, 1)
    if const_value(a) is not None:
        _refuse(
            "Gemm's A is constant and B is the activation: A·B contracts the batch axis of B"
            if const_value(b) is None else ALL_CONSTANT
        )
    xs = activation_shape(a)
    # Defaults (https://onnx.ai/onnx/operators/onnx__Gemm.html): alpha=beta=1, transA=transB=0.
    if flag(node, "transA"):
        _refuse("transA=1 with the activation as A contracts the batch axis")
    wb = const_value(b)
    if wb is None:
        _refuse("Gemm of two activations is not linear")
    c = _const_input(node, 2, "C")
    alpha, beta = _gemm_scales(node)
    k = wb.shape[-1 if flag(node, "transB") else 0] if wb.ndim == 2 else None
    if len(xs) == 1 and k is not None and xs[0] != k:  # Gemm's A is 2-D: no form could run it
        raise InvalidModelError(
            f"node '{node.name}' (Gemm): its input '{a.name}' has {xs[0]} values per sample, "
            f"but its weight '{b.name}' of shape {list(wb.shape)} takes {k}; the model cannot "
            f"run as declared. Fix the model at its source")
    amap = gemm_map(xs, wb, c, alpha, beta, flag(node, "transB"))
    return Lowering([a], [amap])


def _gemm_scales(node: gs.Node) -> tuple[float, float]:
    """Gemm's ``alpha`` and ``beta`` (default 1), refused unless finite: folded into the
    weights, inf·0 would be NaN where the original computes 0·x."""
    scales = tuple(float(attr(node, name, 1.0)) for name in ("alpha", "beta"))
    for name, value in zip(("alpha", "beta"), scales):
        if not np.isfinite(value):
            _refuse(f"{name} is {value}; a non-finite scale cannot be folded exactly")
    return scales


def _lower_matmul(node: gs.Node, ctx: _Ctx) -> Lowering:
    a, b = node.inputs[0], node.inputs[1]
    ca, cb = const_value(a), const_value(b)
    if ca is not None and cb is not None:
        _refuse(ALL_CONSTANT)
    if ca is None and cb is None:
        _refuse("MatMul of two activations is not linear")
    if cb is not None:
        return Lowering([a], [matmul_map(activation_shape(a), cb, const_left=False)])
    return Lowering([b], [matmul_map(activation_shape(b), ca, const_left=True)])


def _lower_arith(node: gs.Node, ctx: _Ctx) -> Lowering:
    a, b = node.inputs[0], node.inputs[1]
    ca, cb = const_value(a), const_value(b)
    if ca is not None and cb is not None:
        _refuse(ALL_CONSTANT)
    if ca is None and cb is None:
        if is_op(node, "Mul", "Div"):
            _refuse(f"{node.op} of two activations is not linear")
        sa, sb = activation_shape(a), activation_shape(b)
        if len(sa) != len(sb):
            _refuse(
                f"activations of ranks {len(sa) + 1} and {len(sb) + 1}: their batch axes "
                "would not line up"
            )
        same_batch(a, b)
        sign = -1.0 if is_op(node, "Sub") else 1.0
        return Lowering([a, b], [linear_combination_map([sa, sb], [1.0, sign])])
    if cb is not None:
        return Lowering([a], [elementwise_map(node.op, activation_shape(a), cb)])
    return Lowering([b], [elementwise_map(node.op, activation_shape(b), ca, const_first=True)])


def _lower_sum(node: gs.Node, ctx: _Ctx) -> Lowering:
    acts, shapes, consts = split_operands(node)
    k = 1.0 / (len(acts) + len(consts)) if is_op(node, "Mean") else 1.0
    const = None
    if consts:
        const = sum(_f64(per_sample_constant(c, len(shapes[0]))) for c in consts) * k
    return Lowering(acts, [linear_combination_map(shapes, [k] * len(acts), const)])


def _lower_neg(node: gs.Node, ctx: _Ctx) -> Lowering:
    return _single(node, neg_map(_data(node)[1]))


def _lower_identity(node: gs.Node, ctx: _Ctx) -> Lowering:
    xs = _data(node)[1]
    return _single(node, AffineMap([identity(math.prod(xs))], None, xs))


def _lower_dropout(node: gs.Node, ctx: _Ctx) -> Lowering:
    xs = _data(node)[1]
    training = _const_input(node, 2, "training_mode")
    if training is not None and bool(np.asarray(training).reshape(-1)[0]):
        _refuse("training_mode is true: Dropout drops random elements")
    if ctx.opset <= 6 and not int(attr(node, "is_test", 0)):
        _refuse("is_test=0 (training mode before opset 7)")
    if len(node.outputs) > 1 and _used(ctx.graph, node.outputs[1]):
        if ctx.opset < 12:
            _refuse(
                "the mask output is used, and before opset 12 its inference value is ambiguous: "
                "all false in onnxruntime, all true in ONNX's reference; use opset 12 or later"
            )
        _refuse("the mask output is used and its shape is not static")
    return _single(node, AffineMap([identity(math.prod(xs))], None, xs))


def _lower_cast(node: gs.Node, ctx: _Ctx) -> Lowering:
    x, xs = _data(node)
    to = onnx.helper.tensor_dtype_to_np_dtype(int(attr(node, "to")))
    if x.dtype is None or np.dtype(to) != np.dtype(x.dtype):
        _refuse(f"Cast from {x.dtype} to {np.dtype(to).name} changes the type")
    return _single(node, AffineMap([identity(math.prod(xs))], None, xs))


def _lower_transpose(node: gs.Node, ctx: _Ctx) -> Lowering:
    perm = attr(node, "perm")  # default: reversed axes
    return _single(node, transpose_map(_data(node)[1], perm))


def _pad_args(node: gs.Node) -> tuple[str, list[int], float, list[int] | None]:
    """Pad's ``mode, pads, value, axes`` (https://onnx.ai/onnx/operators/onnx__Pad.html: mode
    "constant", constant_value 0): attributes before opset 11, inputs from 11; absent axes are
    None."""
    mode = attr(node, "mode", "constant")
    if "pads" in node.attrs or "paddings" in node.attrs:  # opset < 11
        pads = attr(node, "pads", attr(node, "paddings"))
        return mode, pads, float(attr(node, "value", 0.0)), None
    pads = _ints(_const_input(node, 1, "pads", required=True))
    v = _const_input(node, 2, "constant_value")
    value = 0.0 if v is None or np.asarray(v).size == 0 else float(np.asarray(v).reshape(-1)[0])
    return mode, pads, value, _ints(_const_input(node, 3, "axes"))


def _lower_pad(node: gs.Node, ctx: _Ctx) -> Lowering:
    mode, pads, value, axes = _pad_args(node)
    return _single(node, pad_map(_data(node)[1], pads, mode, value, axes))


def _concat_operands(node: gs.Node, whole: bool) -> tuple[list[gs.Tensor], list]:
    """Concat's activations and its parts in order: an activation's shape, or a constant's
    values (with ``whole``, as one sample of the virtual batch)."""
    acts, parts = [], []
    for t in _inputs(node):
        c = const_value(t)
        if c is None:
            parts.append(activation_shape(t))
            acts.append(t)
        else:
            parts.append(np.asarray(c)[None] if whole else np.asarray(c))
    if not acts:
        _refuse(ALL_CONSTANT)
    return acts, parts


def _lower_concat(node: gs.Node, ctx: _Ctx) -> Lowering:
    acts, parts = _concat_operands(node, whole=False)
    for t in acts[1:]:
        same_batch(acts[0], t)
    return Lowering(acts, [concat_map(parts, attr(node, "axis"))])


def _lower_split(node: gs.Node, ctx: _Ctx) -> Lowering:
    x, xs = _data(node)
    r = len(xs) + 1
    axis = _axis(attr(node, "axis", 0), r)  # default 0 (spec)
    _not_batch(axis, "Split")
    split, n_out = _split_args(node)
    return Lowering([x], split_maps(xs, axis, split_sizes(xs[axis - 1], n_out, split)))


def _split_args(node: gs.Node) -> tuple[list[int] | None, int]:
    """Split's ``split`` sizes (attribute before opset 13, input 1 from 13; None = equal parts)
    and its number of outputs (https://onnx.ai/onnx/operators/onnx__Split.html)."""
    split = attr(node, "split")
    if split is None:
        split = _ints(_const_input(node, 1, "split"))
    n_out = int(attr(node, "num_outputs", len(node.outputs)))
    if n_out != len(node.outputs):
        _refuse(f"num_outputs={n_out} but the node has {len(node.outputs)} outputs")
    return split, n_out


def _slice_args(node: gs.Node):
    """Slice's ``starts, ends, axes, steps``: attributes before opset 10, inputs from 10
    (https://onnx.ai/onnx/operators/onnx__Slice.html); absent axes/steps are None."""
    if "starts" in node.attrs:  # opset < 10
        return attr(node, "starts"), attr(node, "ends"), attr(node, "axes"), None
    return (
        _ints(_const_input(node, 1, "starts", required=True)),
        _ints(_const_input(node, 2, "ends", required=True)),
        _ints(_const_input(node, 3, "axes")),
        _ints(_const_input(node, 4, "steps")),
    )


def _lower_slice(node: gs.Node, ctx: _Ctx) -> Lowering:
    x, xs = _data(node)
    starts, ends, axes, steps = _slice_args(node)
    return _single(node, slice_map(xs, starts, ends, axes, steps, batch=x.shape[0]))


def _lower_gather(node: gs.Node, ctx: _Ctx) -> Lowering:
    x = node.inputs[0]
    if const_value(x) is not None:
        _refuse("Gather from a constant table by activation indices is a lookup, not linear")
    xs = activation_shape(x)
    idx = _const_input(node, 1, "indices", required=True)
    return _single(node, gather_map(xs, idx, attr(node, "axis", 0)))


def _full_shape(x: gs.Tensor, xs: tuple[int, ...]) -> list:
    return [x.shape[0], *xs]


def _lower_squeeze(node: gs.Node, ctx: _Ctx) -> Lowering:
    x, xs = _data(node)
    axes = attr(node, "axes")
    if axes is None:
        axes = _ints(_const_input(node, 1, "axes"))
    return _single(node, reshape_map(xs, squeeze_shape(_full_shape(x, xs), axes)))


def _lower_unsqueeze(node: gs.Node, ctx: _Ctx) -> Lowering:
    x, xs = _data(node)
    axes = attr(node, "axes")
    if axes is None:
        axes = _ints(_const_input(node, 1, "axes", required=True))
    return _single(node, reshape_map(xs, unsqueeze_shape(_full_shape(x, xs), axes)))


def _lower_flatten(node: gs.Node, ctx: _Ctx) -> Lowering:
    x, xs = _data(node)
    # axis default 1: https://onnx.ai/onnx/operators/onnx__Flatten.html
    return _single(node, reshape_map(xs, flatten_shape(_full_shape(x, xs), attr(node, "axis", 1))))


def _lower_reshape(node: gs.Node, ctx: _Ctx) -> Lowering:
    x, xs = _data(node)
    out, batch = node.outputs[0], x.shape[0]
    shape = out.shape
    if shape and all(_static(d) and d >= 0 for d in shape[1:]):
        first = shape[0]
        if first == batch or (_static(first) and _static(batch) and first == batch):
            return _single(node, reshape_map(xs, tuple(int(d) for d in shape[1:])))
    target = _input(node, 1)
    value = None if target is None else const_value(target)
    if value is None:
        _refuse(
            f"the output shape {shape} does not show that axis 0 stays the batch axis "
            f"({batch}) and the shape input is not constant; resolve shapes with "
            "onnxruntime's symbolic shape inference"
        )
    # allowzero default 0 (https://onnx.ai/onnx/operators/onnx__Reshape.html)
    per_sample = reshape_target(_full_shape(x, xs), _ints(value), bool(attr(node, "allowzero", 0)))
    if per_sample is None:
        _refuse(
            f"Reshape to {_ints(value)} does not keep axis 0 as the batch axis ({batch}) of "
            f"the input of shape {_full_shape(x, xs)}"
        )
    return _single(node, reshape_map(xs, per_sample))


def _reduce_args(node: gs.Node) -> tuple[bool, list[int] | None, bool]:
    """``(keepdims, axes, noop)`` of ReduceSum / ReduceMean: keepdims default 1,
    noop_with_empty_axes default 0 (https://onnx.ai/onnx/operators/onnx__ReduceSum.html); axes
    from the attribute (before opset 13/18) or input 1; ``noop`` when no axes and the node asks
    for the identity."""
    keepdims = bool(attr(node, "keepdims", 1))
    axes = attr(node, "axes")
    if axes is None:
        axes = _ints(_const_input(node, 1, "axes"))
    noop = not axes and bool(int(attr(node, "noop_with_empty_axes", 0))) and (
        "axes" not in node.attrs)
    return keepdims, axes, noop


def _lower_reduce(node: gs.Node, ctx: _Ctx) -> Lowering:
    x, xs = _data(node)
    keepdims, axes, noop = _reduce_args(node)
    if noop:
        return _single(node, reshape_map(xs, xs))
    if not axes:
        _refuse(f"{node.op} without axes reduces every axis, the batch axis included")
    return _single(node, reduce_map(xs, axes, keepdims, mean=is_op(node, "ReduceMean")))


def _lower_expand(node: gs.Node, ctx: _Ctx) -> Lowering:
    x, xs = _data(node)
    shape = _ints(_const_input(node, 1, "shape", required=True))
    return _single(node, expand_map(xs, shape, x.shape[0]))


def _lower_tile(node: gs.Node, ctx: _Ctx) -> Lowering:
    xs = _data(node)[1]
    return _single(node, tile_map(xs, _ints(_const_input(node, 1, "repeats", required=True))))


def _lower_depth_to_space(node: gs.Node, ctx: _Ctx) -> Lowering:
    xs = _data(node)[1]
    return _single(
        node, depth_to_space_map(xs, attr(node, "blocksize"), attr(node, "mode", "DCR"))
    )


def _lower_space_to_depth(node: gs.Node, ctx: _Ctx) -> Lowering:
    return _single(node, space_to_depth_map(_data(node)[1], attr(node, "blocksize")))


_HANDLERS: dict[str, Callable[[gs.Node, _Ctx], Lowering]] = {
    "BatchNormalization": _lower_batch_norm,
    "Gemm": _lower_gemm,
    "MatMul": _lower_matmul,
    "Add": _lower_arith,
    "Sub": _lower_arith,
    "Mul": _lower_arith,
    "Div": _lower_arith,
    "Sum": _lower_sum,
    "Mean": _lower_sum,
    "Neg": _lower_neg,
    "Identity": _lower_identity,
    "Dropout": _lower_dropout,
    "Cast": _lower_cast,
    "Transpose": _lower_transpose,
    "Pad": _lower_pad,
    "Concat": _lower_concat,
    "Split": _lower_split,
    "Slice": _lower_slice,
    "Gather": _lower_gather,
    "Squeeze": _lower_squeeze,
    "Unsqueeze": _lower_unsqueeze,
    "Flatten": _lower_flatten,
    "Reshape": _lower_reshape,
    "ReduceMean": _lower_reduce,
    "ReduceSum": _lower_reduce,
    "Expand": _lower_expand,
    "Tile": _lower_tile,
    "DepthToSpace": _lower_depth_to_space,
    "SpaceToDepth": _lower_space_to_depth,
}

#: The ops ``lower-linear`` knows (in the default ONNX domain).
LINEAR_OPS = frozenset(_HANDLERS)


def _check_outputs(node: gs.Node, low: Lowering) -> None:
    for out, amap in zip(node.outputs, low.maps):
        if not is_float(out):
            _refuse(f"output '{out.name}' is not a float tensor")
        shape = out.shape
        if shape is not None and all(_static(d) for d in shape[1:]):
            if len(shape) != len(amap.out_shape) + 1 or tuple(shape[1:]) != amap.out_shape:
                _refuse(
                    f"the computed per-sample shape {amap.out_shape} disagrees with the inferred "
                    f"shape {list(shape)} of '{out.name}'"
                )


# --- whole-tensor samples: the tensor is one sample of a virtual batch of 1 ----------------------


def _shift(axis: int, rank: int) -> int:
    """Axis ``axis`` of a rank-``rank`` tensor, counted on ``(1, *shape)``."""
    return _axis(axis, rank) + 1


def _whole_reshape(node: gs.Node, ctx: _Ctx) -> Lowering:
    """Flatten, Reshape, Squeeze, Unsqueeze: the C-order data is unchanged, the shape inferred."""
    x, xs = _data(node)
    return _single(node, reshape_map(xs, _whole_shape(node.outputs[0])))


def _whole_transpose(node: gs.Node, ctx: _Ctx) -> Lowering:
    x, xs = _data(node)
    r = len(xs)
    perm = attr(node, "perm")  # default: reversed axes
    perm = list(range(r))[::-1] if perm is None else [_axis(p, r, "perm entry") for p in perm]
    return _single(node, transpose_map(xs, [0, *(p + 1 for p in perm)]))


def _transposed(xs: tuple[int, ...]) -> AffineMap:
    if len(xs) != 2:
        _refuse(f"Gemm's operands must be matrices, got shape {xs}")
    return transpose_map(xs, [0, 2, 1])


def _whole_gemm(node: gs.Node, ctx: _Ctx) -> Lowering:
    """``y = α·op(A)·op(B) + β·C`` with either operand the activation, C broadcast to (M, N)."""
    # Defaults (https://onnx.ai/onnx/operators/onnx__Gemm.html): alpha=beta=1, transA=transB=0.
    a, b = _input(node, 0), _input(node, 1)
    ca, cb = const_value(a), const_value(b)
    if (ca is None) == (cb is None):
        _refuse(ALL_CONSTANT if ca is not None else "Gemm of two activations is not linear")
    x = a if cb is not None else b
    trans_x, trans_w = (("transA", "transB") if cb is not None else ("transB", "transA"))
    xs = activation_shape(x)
    t = _transposed(xs) if int(attr(node, trans_x, 0)) else None
    w = _f64(cb if cb is not None else ca)
    if w.ndim != 2:
        _refuse(f"Gemm's constant operand must be a matrix, got shape {w.shape}")
    w = w.T if int(attr(node, trans_w, 0)) else w
    mm = numpy_matmul_map(t.out_shape if t else xs, w, const_left=cb is None)
    term = mm.terms[0] if t is None else mm.terms[0] @ t.terms[0]
    alpha, beta = _gemm_scales(node)
    term = alpha * term
    c = _const_input(node, 2, "C")
    bias = None
    if c is not None and beta != 0.0:
        try:
            bias = beta * np.broadcast_to(_f64(c), mm.out_shape).reshape(-1)
        except ValueError:
            _refuse(f"Gemm's C of shape {np.shape(c)} does not broadcast to {mm.out_shape}")
    return Lowering([x], [AffineMap([term], bias, mm.out_shape)])


def _whole_matmul(node: gs.Node, ctx: _Ctx) -> Lowering:
    a, b = node.inputs[0], node.inputs[1]
    ca, cb = const_value(a), const_value(b)
    if (ca is None) == (cb is None):
        _refuse(ALL_CONSTANT if ca is not None else "MatMul of two activations is not linear")
    if cb is not None:
        return Lowering([a], [numpy_matmul_map(activation_shape(a), cb, const_left=False)])
    return Lowering([b], [numpy_matmul_map(activation_shape(b), ca, const_left=True)])


def _whole_concat(node: gs.Node, ctx: _Ctx) -> Lowering:
    acts, parts = _concat_operands(node, whole=True)
    return Lowering(acts, [concat_map(parts, _shift(attr(node, "axis"), len(parts[0])))])


def _whole_split(node: gs.Node, ctx: _Ctx) -> Lowering:
    x, xs = _data(node)
    axis = _shift(attr(node, "axis", 0), len(xs))  # default 0 (spec)
    split, n_out = _split_args(node)
    return Lowering([x], split_maps(xs, axis, split_sizes(xs[axis - 1], n_out, split)))


def _whole_slice(node: gs.Node, ctx: _Ctx) -> Lowering:
    x, xs = _data(node)
    starts, ends, axes, steps = _slice_args(node)
    axes = range(len(starts)) if axes is None else axes
    return _single(node, slice_map(xs, starts, ends, [_shift(a, len(xs)) for a in axes], steps))


def _whole_gather(node: gs.Node, ctx: _Ctx) -> Lowering:
    x = node.inputs[0]
    if const_value(x) is not None:
        _refuse("Gather from a constant table by activation indices is a lookup, not linear")
    xs = activation_shape(x)
    idx = _const_input(node, 1, "indices", required=True)
    return _single(node, gather_map(xs, idx, _shift(attr(node, "axis", 0), len(xs))))


def _whole_reduce(node: gs.Node, ctx: _Ctx) -> Lowering:
    x, xs = _data(node)
    keepdims, axes, noop = _reduce_args(node)
    if noop:
        return _single(node, reshape_map(xs, xs))
    if not axes:
        axes = range(len(xs))
    axes = [_shift(a, len(xs)) for a in axes]
    return _single(node, reduce_map(xs, axes, keepdims, mean=is_op(node, "ReduceMean")))


def _whole_pad(node: gs.Node, ctx: _Ctx) -> Lowering:
    xs = _data(node)[1]
    r = len(xs)
    mode, pads, value, axes = _pad_args(node)
    if axes is None:
        if len(pads) != 2 * r:
            _refuse(f"Pad has {len(pads)} pads for a tensor of rank {r}")
        pads = [0, *pads[:r], 0, *pads[r:]]
    else:
        axes = [_shift(a, r) for a in axes]
    return _single(node, pad_map(xs, pads, mode, value, axes))


#: Whole-tensor lowerings: ops with axes get their own; elementwise ops reuse the per-sample ones.
_WHOLE_HANDLERS: dict[str, Callable[[gs.Node, _Ctx], Lowering]] = {
    **{op: _HANDLERS[op] for op in (
        "Add", "Sub", "Mul", "Div", "Sum", "Mean", "Neg", "Identity", "Dropout", "Cast")},
    **{op: _whole_reshape for op in ("Flatten", "Reshape", "Squeeze", "Unsqueeze")},
    "Transpose": _whole_transpose,
    "Gemm": _whole_gemm,
    "MatMul": _whole_matmul,
    "Concat": _whole_concat,
    "Split": _whole_split,
    "Slice": _whole_slice,
    "Gather": _whole_gather,
    "ReduceSum": _whole_reduce,
    "ReduceMean": _whole_reduce,
    "Pad": _whole_pad,
}


def match_whole(node: gs.Node, graph: gs.Graph, opset: int) -> Lowering | str | LoweringError:
    """The node's lowering on whole-tensor samples (maps with ``whole=True``), or why not."""
    if not is_op(node, *_WHOLE_HANDLERS):
        return f"{node.op} has no whole-tensor lowering"
    try:
        with whole_tensor_samples():
            low = _WHOLE_HANDLERS[node.op](node, _Ctx(graph, opset))
            for out, amap in zip(node.outputs, low.maps):
                if not is_float(out):
                    _refuse(f"output '{out.name}' is not a float tensor")
                if out.shape is not None and tuple(_whole_shape(out)) != amap.out_shape:
                    _refuse(
                        f"the computed shape {amap.out_shape} disagrees with the inferred "
                        f"shape {list(out.shape)} of '{out.name}'"
                    )
    except Refused as exc:
        return exc.reason
    except DynamicShapeError as exc:
        return exc
    for amap in low.maps:
        amap.whole = True
    return low


def match(node: gs.Node, graph: gs.Graph, opset: int) -> Lowering | str | LoweringError:
    """The node's lowering, or why it has none (a reason, or the shape error to raise)."""
    if not is_op(node, *_HANDLERS):
        return f"{node.op} is not a linear op"
    try:
        low = _HANDLERS[node.op](node, _Ctx(graph, opset))
        _check_outputs(node, low)
        return low
    except Refused as exc:
        return exc.reason
    except DynamicShapeError as exc:
        return exc


def explain(node: gs.Node, graph: gs.Graph, opset: int) -> str | LoweringError | None:
    """Why ``lower-linear`` leaves ``node`` alone; None if it is not a linear op or lowers it."""
    if not is_op(node, *_HANDLERS):
        return None
    result = match(node, graph, opset)
    return None if isinstance(result, Lowering) else result


@register_pass("lower-linear")
class LowerLinearPass(GraphPass):
    """Lower linear ops with constant parameters (BatchNorm, Gemm, MatMul, Pad, ...) to Affine."""

    def run_on_graph(self, graph: gs.Graph, model: LoweringModel) -> bool:
        modified = False
        for node in list(graph.nodes):
            if not is_op(node, *_HANDLERS):
                continue
            result = match(node, graph, model.opset)
            if isinstance(result, str) and sample_axis.whole_tensor_allowed(graph, model):
                whole = match_whole(node, graph, model.opset)
                if isinstance(whole, Lowering):
                    sample_axis.enter(model, node, result)
                    result = whole
            if isinstance(result, Lowering):
                result.apply(graph, node)
                modified = True
        return modified
