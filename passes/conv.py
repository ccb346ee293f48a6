"""Conv and ConvTranspose as sparse per-sample linear maps.

Convention: a per-sample map on the C-order flattening of a tensor without its batch dimension,
``y.ravel() = A @ x.ravel() + c``, with ``A`` a float64 ``scipy.sparse.csr_matrix`` of shape
``(out_size, in_size)`` and ``c`` a float64 vector (or ``None`` without bias).

Conv (https://onnx.ai/onnx/operators/onnx__Conv.html). Input ``x`` of shape ``(C, *S_in)``,
weight ``W`` of shape ``(M, C/group, *k)``, output ``y`` of shape ``(M, *S_out)``::

    y[m, o] = b[m] + Σ_{c ∈ group(m)} Σ_t W[m, c - c0(m), t] · x[c, p(o, t)]

where ``o`` runs over the output positions and ``t`` over the kernel taps (both flattened in
C-order), ``p(o, t)`` is the flat input position that tap ``t`` of window ``o`` reads, as given by
:func:`onnx_lower.windows.sliding_windows` (``-1`` for padding), ``group(m)`` is the block of
``C/group`` input channels that starts at ``c0(m) = (m // (M/group)) · (C/group)``. Padding taps
read zeros, so they are dropped from the matrix.

Attribute defaults follow the spec: strides and dilations 1, pads 0, group 1, auto_pad NOTSET
(SAME_UPPER / SAME_LOWER / VALID resolved by :func:`onnx_lower.windows.resolve_pads`).

ConvTranspose (https://onnx.ai/onnx/operators/onnx__ConvTranspose.html). Input ``x`` of shape
``(C, *S_in)``, weight ``W`` of shape ``(C, M/group, *k)``, output ``(M, *S_out)``. It is the
transpose of the Conv that maps the ConvTranspose *output* space ``(M, *S_out)`` back to its
*input* space ``(C, *S_in)`` with the same weight tensor (read as a Conv weight with ``C`` output
and ``M`` input channels), strides, dilations, pads and group::

    y = B^T x + b[m]   where   B = conv_matrix((M, *S_out), W, strides, pads, dilations, group)

``B^T`` is built without building ``B``: the window table of ``B`` (``(|S_in|, K)``, from
``sliding_windows`` over ``S_out``) is inverted into a table ``(|S_out|, K)`` that gives, for
output position ``j`` and tap ``t``, the input position ``i`` whose window reads ``j`` through
``t`` (or -1); that table is expanded over channels by the same CSR construction as Conv. Along
such a row the input position decreases with the tap, so taps are taken in reverse order to keep
rows sorted.

The spatial output extent is ``S_out = s·(S_in - 1) + output_padding + (k - 1)·d + 1 - pads_b -
pads_e``. If ``output_shape`` is given (it then overrides ``pads``), or ``auto_pad`` is SAME_UPPER /
SAME_LOWER (which asks for ``output_shape = S_in · s``), the pads are derived from
``total = s·(S_in - 1) + output_padding + (k - 1)·d + 1 - output_shape``: SAME_UPPER puts
``total // 2`` at the beginning and the rest at the end; every other auto_pad value (NOTSET,
SAME_LOWER, VALID) puts the larger half at the beginning, as the spec text says. Where the spec and
onnxruntime 1.32 differ, onnxruntime (the reference) is followed and the difference is checked by
the tests:

* a negative ``total`` is clipped to 0 (no negative pads); an explicit ``output_shape`` is then
  still the output extent (the extra trailing outputs are bias only), while SAME_* gives the
  unpadded extent rather than ``S_in · s``;
* the Conv ``B`` must have exactly one window per ConvTranspose input position. Otherwise (an
  ``output_padding ≥ stride``, allowed by the spec below the dilation, or an ``output_shape`` too
  large for the input) onnxruntime rejects the node and so does :func:`conv_transpose_matrix`.

For Conv with SAME_* and dilation > 1, onnxruntime refuses the node; the spec defines it (pads
from the dilated kernel extent) and it is built as such (checked against the ONNX reference
evaluator).

Sparse layout. Rows are ``(m, o)`` in C-order and, within a row, columns are ``c`` outer and taps
inner, i.e. ``c · |S_in| + p(o, t)``. Valid taps of a window read strictly increasing flat positions
(positions are lexicographically increasing in the tap index and inside the grid), so every row is
sorted and duplicate free: the CSR is built directly in row order (no COO sort) and marked
canonical. The sparsity pattern is *structural*: explicit zeros of the weight are kept (the pattern
depends only on shapes, so :func:`conv_nnz` is exact; call ``A.eliminate_zeros()`` to drop them).
Indices are int32 whenever ``nnz`` and the matrix dimensions fit, int64 otherwise.

Composition is in float64; float32 weights and biases are cast to float64.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import onnx_graphsurgeon as gs
import scipy.sparse as sp

from onnx_lower import graph as g
from onnx_lower.affine import AffineMap, replace_with_affine
from onnx_lower.errors import UnsupportedOpError
from onnx_lower.pass_manager import GraphPass, LoweringModel, register_pass
from onnx_lower.windows import output_extent, resolve_pads, sliding_windows, window_attributes

__all__ = [
    "conv_matrix",
    "conv_transpose_matrix",
    "conv_nnz",
    "conv_transpose_nnz",
    "conv_transpose_geometry",
    "LowerConvPass",
]

_AUTO_PADS = ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID")
_INT32_MAX = np.iinfo(np.int32).max


# --- attribute handling --------------------------------------------------------------------------


def _ints(name: str, values: Sequence[int] | None, n: int, default: int) -> tuple[int, ...]:
    if values is None or len(values) == 0:
        return (default,) * n
    values = tuple(int(v) for v in values)
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} values, expected {n}")
    return values


def _auto_pad(auto_pad: str | bytes | None) -> str:
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    auto_pad = auto_pad or "NOTSET"
    if auto_pad not in _AUTO_PADS:
        raise ValueError(f"unknown auto_pad {auto_pad!r}; expected one of {', '.join(_AUTO_PADS)}")
    return auto_pad


def _check_common(
    op: str,
    in_shape: Sequence[int],
    weight_shape: Sequence[int],
    group: int,
    kernel_shape: Sequence[int] | None,
) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    in_shape = tuple(int(v) for v in in_shape)
    weight_shape = tuple(int(v) for v in weight_shape)
    if len(in_shape) < 2:
        raise ValueError(f"{op}: input shape {in_shape} needs a channel and >= 1 spatial axis")
    if len(weight_shape) != len(in_shape) + 1:
        raise ValueError(
            f"{op}: weight shape {weight_shape} needs 2 + {len(in_shape) - 1} spatial axes for "
            f"the per-sample input shape {in_shape} (channels + spatial, no batch)"
        )
    if min(in_shape) <= 0 or min(weight_shape) <= 0:
        raise ValueError(f"{op}: empty input {in_shape} or weight {weight_shape}")
    group = int(group)
    if group < 1:
        raise ValueError(f"{op}: group must be >= 1, got {group}")
    if kernel_shape is not None and len(kernel_shape):
        if tuple(int(v) for v in kernel_shape) != weight_shape[2:]:
            raise ValueError(
                f"{op}: kernel_shape {tuple(kernel_shape)} does not match the weight's spatial "
                f"shape {weight_shape[2:]}"
            )
    return in_shape, weight_shape, group


def _check_geometry(op: str, strides, dilations, pads, r: int) -> None:
    if min(strides) < 1:
        raise ValueError(f"{op}: strides must be >= 1, got {strides}")
    if min(dilations) < 1:
        raise ValueError(f"{op}: dilations must be >= 1, got {dilations}")
    if len(pads) != 2 * r:
        raise ValueError(f"{op}: pads has {len(pads)} values, expected {2 * r}")
    if min(pads) < 0:
        raise ValueError(f"{op}: pads must be >= 0, got {pads}")


def _conv_geometry(
    in_shape: Sequence[int],
    weight_shape: Sequence[int],
    strides,
    pads,
    dilations,
    group,
    auto_pad,
    kernel_shape=None,
):
    """Validated ``(C, spatial, M, Cg, kernel, strides, pads, dilations, group)`` of a Conv."""
    in_shape, weight_shape, group = _check_common(
        "Conv", in_shape, weight_shape, group, kernel_shape
    )
    c, spatial = in_shape[0], in_shape[1:]
    m, cg, kernel = weight_shape[0], weight_shape[1], weight_shape[2:]
    r = len(kernel)
    if c % group or cg * group != c:
        raise ValueError(
            f"Conv: input channels {c} must equal weight.shape[1] ({cg}) * group ({group})"
        )
    if m % group:
        raise ValueError(f"Conv: output channels {m} are not divisible by group {group}")
    strides = _ints("strides", strides, r, 1)
    dilations = _ints("dilations", dilations, r, 1)
    pads = tuple(
        int(v)
        for v in resolve_pads(
            spatial, kernel, strides, dilations, _ints("pads", pads, 2 * r, 0), _auto_pad(auto_pad)
        )
    )
    _check_geometry("Conv", strides, dilations, pads, r)
    return c, spatial, m, cg, kernel, strides, pads, dilations, group


def conv_transpose_geometry(
    in_shape: Sequence[int],
    weight_shape: Sequence[int],
    *,
    strides: Sequence[int] | None = None,
    pads: Sequence[int] | None = None,
    dilations: Sequence[int] | None = None,
    group: int = 1,
    output_padding: Sequence[int] | None = None,
    output_shape: Sequence[int] | None = None,
    auto_pad: str | bytes = "NOTSET",
    kernel_shape: Sequence[int] | None = None,
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Resolved ``(pads, out_shape)`` of a ConvTranspose; ``out_shape = (M, *S_out)``.

    ``output_shape`` may list the spatial axes only (the spec) or also batch and channels (as
    onnxruntime accepts). ``output_padding`` must be below ``max(stride, dilation)`` per axis, as
    onnxruntime enforces.
    """
    op = "ConvTranspose"
    in_shape, weight_shape, group = _check_common(op, in_shape, weight_shape, group, kernel_shape)
    c, spatial = in_shape[0], in_shape[1:]
    kernel = weight_shape[2:]
    r = len(kernel)
    if weight_shape[0] != c:
        raise ValueError(f"{op}: weight.shape[0] ({weight_shape[0]}) must equal input channels {c}")
    if c % group:
        raise ValueError(f"{op}: input channels {c} are not divisible by group {group}")
    m = weight_shape[1] * group
    strides = _ints("strides", strides, r, 1)
    dilations = _ints("dilations", dilations, r, 1)
    out_pad = _ints("output_padding", output_padding, r, 0)
    auto_pad = _auto_pad(auto_pad)
    for i in range(r):
        if not 0 <= out_pad[i] < max(strides[i], dilations[i]):
            raise ValueError(
                f"{op}: output_padding[{i}] = {out_pad[i]} must be in [0, max(stride, dilation)"
                f" = {max(strides[i], dilations[i])})"
            )
    full = [
        s * (n - 1) + a + (k - 1) * d + 1
        for n, k, s, d, a in zip(spatial, kernel, strides, dilations, out_pad, strict=True)
    ]
    explicit = output_shape is not None and len(output_shape) > 0
    if explicit:
        target = tuple(int(v) for v in output_shape)
        if len(target) == r + 2:
            target = target[2:]
        if len(target) != r:
            raise ValueError(f"{op}: output_shape {tuple(output_shape)} must have {r} values")
    elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        target = tuple(n * s for n, s in zip(spatial, strides, strict=True))
    else:
        target = None
    if target is not None:
        # onnxruntime clips the total padding at 0 (no negative pads).
        totals = [max(0, f - t) for f, t in zip(full, target, strict=True)]
        small = [t // 2 for t in totals]
        big = [t - t // 2 for t in totals]
        pads = tuple(small + big) if auto_pad == "SAME_UPPER" else tuple(big + small)
    elif auto_pad == "VALID":
        pads = (0,) * (2 * r)
    else:
        pads = _ints("pads", pads, 2 * r, 0)
    _check_geometry(op, strides, dilations, pads, r)
    if explicit:
        out_spatial = target
    else:
        out_spatial = tuple(f - pads[i] - pads[r + i] for i, f in enumerate(full))
    if min(out_spatial) <= 0:
        raise ValueError(f"{op}: output spatial shape {out_spatial} is empty (pads {pads})")
    # The Conv from the output back to the input must have exactly one window per input
    # position (onnxruntime rejects the node otherwise: output_padding too large for the stride,
    # or an output_shape too large for the input).
    back = tuple(
        output_extent(o, k, s, d, pads[i], pads[r + i])
        for i, (o, k, s, d) in enumerate(zip(out_spatial, kernel, strides, dilations, strict=True))
    )
    if back != spatial:
        raise ValueError(
            f"{op}: output spatial shape {out_spatial} (pads {pads}, output_padding {out_pad}) "
            f"is inconsistent with the input spatial shape {spatial}: it maps back to {back}"
        )
    return pads, (m, *out_spatial)


# --- index construction ---------------------------------------------------------------------------


def _windows_taps(spatial, kernel, strides, pads, dilations) -> tuple[np.ndarray, tuple[int, ...]]:
    """``(S_out, K)`` taps and spatial output shape of the windows; error if there are none."""
    win = sliding_windows(spatial, kernel, strides, pads, dilations)
    if any(n <= 0 for n in win.out_shape):
        raise ValueError(
            f"convolution output is empty: input {tuple(spatial)}, kernel {tuple(kernel)}, "
            f"strides {tuple(strides)}, pads {tuple(pads)}, dilations {tuple(dilations)}"
        )
    return win.taps, win.out_shape


def _axis_valid_counts(spatial, kernel, strides, pads, dilations) -> int:
    """Number of valid (window, tap) pairs, as a product of per-axis 1-D window counts."""
    r = len(kernel)
    total = 1
    for i in range(r):
        taps, _ = _windows_taps(
            (spatial[i],), (kernel[i],), (strides[i],), (pads[i], pads[r + i]), (dilations[i],)
        )
        total *= int(np.count_nonzero(taps >= 0))
    return total


def _build(
    c: int,
    in_spatial: tuple[int, ...],
    weight: np.ndarray,
    group: int,
    taps: np.ndarray,
) -> sp.csr_matrix:
    """CSR of the Conv map for windows ``taps`` ``(S_out, K)`` (see the module docstring)."""
    m, cg = weight.shape[0], weight.shape[1]
    s_in = math.prod(in_spatial)
    s_out, k = taps.shape
    mg = m // group
    valid = taps >= 0
    per_window = np.count_nonzero(valid, axis=1)  # (S_out,)
    p = cg * int(per_window.sum())  # nonzeros of one output channel
    nnz = m * p
    n_rows, n_cols = m * s_out, c * s_in
    idx = np.int32 if max(nnz, n_rows, n_cols) <= _INT32_MAX else np.int64

    # The pattern of one output channel of group 0: (o, c, t) for valid t, in that order.
    mask = np.broadcast_to(valid[:, None, :], (s_out, cg, k))
    cols0 = (taps.astype(idx)[:, None, :] + (np.arange(cg, dtype=idx) * s_in)[None, :, None])[mask]
    wsel = np.broadcast_to(np.arange(cg * k, dtype=np.intp).reshape(1, cg, k), mask.shape)[mask]

    # Every output channel repeats it, shifted by its group's first input column.
    indices = np.empty((m, p), dtype=idx)
    group_col = (np.arange(m, dtype=idx) // mg) * (cg * s_in)
    np.add(cols0[None, :], group_col[:, None], out=indices)
    w2 = np.ascontiguousarray(weight.reshape(m, cg * k), dtype=np.float64)
    data = np.take(w2, wsel, axis=1)

    # Row (m, o) starts at m·p plus the nonzeros of the windows before o.
    starts = np.zeros(s_out, dtype=idx)
    np.cumsum(per_window[:-1] * cg, out=starts[1:])
    indptr = np.empty(n_rows + 1, dtype=idx)
    indptr[:-1] = ((np.arange(m, dtype=idx) * p)[:, None] + starts[None, :]).reshape(-1)
    indptr[-1] = nnz
    a = sp.csr_matrix((data.reshape(-1), indices.reshape(-1), indptr), shape=(n_rows, n_cols))
    a.has_sorted_indices = True  # see the module docstring: rows are sorted and duplicate free
    a.has_canonical_format = True
    return a


def _as_weight(weight) -> np.ndarray:
    weight = np.asarray(weight)
    if weight.dtype.kind not in "fiu":
        raise ValueError(f"weight must be a real array, got dtype {weight.dtype}")
    return weight.astype(np.float64, copy=False)


def _bias_vector(bias, channels: int, s_out: int) -> np.ndarray | None:
    if bias is None:
        return None
    bias = np.asarray(bias, dtype=np.float64).reshape(-1)
    if bias.shape != (channels,):
        raise ValueError(f"bias has {bias.size} values, expected {channels} (output channels)")
    return np.repeat(bias, s_out)


# --- public API -----------------------------------------------------------------------------------


def conv_matrix(
    in_shape: Sequence[int],
    weight: np.ndarray,
    bias: np.ndarray | None = None,
    *,
    strides: Sequence[int] | None = None,
    pads: Sequence[int] | None = None,
    dilations: Sequence[int] | None = None,
    group: int = 1,
    auto_pad: str | bytes = "NOTSET",
    kernel_shape: Sequence[int] | None = None,
) -> tuple[sp.csr_matrix, np.ndarray | None, tuple[int, ...]]:
    """``(A, c, out_shape)`` of an ONNX Conv on one sample of shape ``in_shape = (C, *spatial)``.

    ``weight`` is ``(M, C/group, *k)``; ``A`` is float64 CSR ``(M·|S_out|, C·|S_in|)``, ``c`` the
    bias broadcast to ``(M·|S_out|,)`` (``None`` without bias), ``out_shape = (M, *S_out)``.
    ``kernel_shape``, if given, is only checked against the weight. Raises ``ValueError`` for
    inconsistent shapes or attributes.
    """
    weight = _as_weight(weight)
    c, spatial, m, _, kernel, strides, pads, dilations, group = _conv_geometry(
        in_shape, weight.shape, strides, pads, dilations, group, auto_pad, kernel_shape
    )
    taps, out_spatial = _windows_taps(spatial, kernel, strides, pads, dilations)
    a = _build(c, spatial, weight, group, taps)
    return a, _bias_vector(bias, m, taps.shape[0]), (m, *out_spatial)


def conv_transpose_matrix(
    in_shape: Sequence[int],
    weight: np.ndarray,
    bias: np.ndarray | None = None,
    *,
    strides: Sequence[int] | None = None,
    pads: Sequence[int] | None = None,
    dilations: Sequence[int] | None = None,
    group: int = 1,
    output_padding: Sequence[int] | None = None,
    output_shape: Sequence[int] | None = None,
    auto_pad: str | bytes = "NOTSET",
    kernel_shape: Sequence[int] | None = None,
) -> tuple[sp.csr_matrix, np.ndarray | None, tuple[int, ...]]:
    """``(A, c, out_shape)`` of an ONNX ConvTranspose on one sample ``in_shape = (C, *spatial)``.

    ``weight`` is ``(C, M/group, *k)``. ``A`` is the transpose of the Conv from the output space
    ``(M, *S_out)`` to the input space (module docstring), transposed at the level of its window
    table and expanded over channels by the same construction as :func:`conv_matrix`.
    """
    weight = _as_weight(weight)
    pads, out_shape = conv_transpose_geometry(
        in_shape,
        weight.shape,
        strides=strides,
        pads=pads,
        dilations=dilations,
        group=group,
        output_padding=output_padding,
        output_shape=output_shape,
        auto_pad=auto_pad,
        kernel_shape=kernel_shape,
    )
    r = weight.ndim - 2
    strides, dilations = _ints("strides", strides, r, 1), _ints("dilations", dilations, r, 1)
    c, spatial = int(in_shape[0]), tuple(int(v) for v in in_shape[1:])
    m, out_spatial = out_shape[0], out_shape[1:]
    group = int(group)
    # Windows of the Conv B from the ConvTranspose output back to its input: (|S_in|, K) with
    # values in [0, |S_out|). Transposed: (|S_out|, K), entry j, t = the input position i whose
    # window reads j through tap t (unique: i -> i·s + t·d is injective), or -1.
    taps, _ = _windows_taps(out_spatial, weight.shape[2:], strides, pads, dilations)
    taps_t = _transpose_taps(taps, math.prod(out_spatial))
    # B's weight for (output channel m of the ConvTranspose, input channel c of its group, tap t)
    # in Conv layout (M, C/group, K). Along a row of B^T the input position decreases with the
    # tap, so both are reversed to keep the columns of each row increasing.
    k = taps.shape[1]
    cg, mg = c // group, m // group
    w = weight.reshape(group, cg, mg, k).transpose(0, 2, 1, 3).reshape(m, cg, k)
    a = _build(c, spatial, w[:, :, ::-1], group, taps_t[:, ::-1])
    return a, _bias_vector(bias, m, math.prod(out_spatial)), out_shape


def _transpose_taps(taps: np.ndarray, n_targets: int) -> np.ndarray:
    """Invert a window table ``(S, K)``: result ``[j, t] = i`` iff ``taps[i, t] = j``, else -1.

    Requires that ``taps[:, t]`` is injective on its valid entries (true for every window table).
    """
    rows, cols = np.nonzero(taps >= 0)
    out = np.full((n_targets, taps.shape[1]), -1, dtype=taps.dtype)
    out[taps[rows, cols], cols] = rows
    return out


def conv_nnz(
    in_shape: Sequence[int],
    weight_shape: Sequence[int],
    *,
    strides: Sequence[int] | None = None,
    pads: Sequence[int] | None = None,
    dilations: Sequence[int] | None = None,
    group: int = 1,
    auto_pad: str | bytes = "NOTSET",
    kernel_shape: Sequence[int] | None = None,
) -> int:
    """Exact ``conv_matrix(...)[0].nnz`` without building it (cost: 1-D windows per axis).

    The dense size is ``out_size · in_size``, with ``out_size`` from the output shape.
    """
    _, spatial, m, cg, kernel, strides, pads, dilations, _ = _conv_geometry(
        in_shape, weight_shape, strides, pads, dilations, group, auto_pad, kernel_shape
    )
    return m * cg * _axis_valid_counts(spatial, kernel, strides, pads, dilations)


def conv_transpose_nnz(
    in_shape: Sequence[int],
    weight_shape: Sequence[int],
    *,
    strides: Sequence[int] | None = None,
    pads: Sequence[int] | None = None,
    dilations: Sequence[int] | None = None,
    group: int = 1,
    output_padding: Sequence[int] | None = None,
    output_shape: Sequence[int] | None = None,
    auto_pad: str | bytes = "NOTSET",
    kernel_shape: Sequence[int] | None = None,
) -> int:
    """Exact ``conv_transpose_matrix(...)[0].nnz`` without building it."""
    pads, out_shape = conv_transpose_geometry(
        in_shape,
        weight_shape,
        strides=strides,
        pads=pads,
        dilations=dilations,
        group=group,
        output_padding=output_padding,
        output_shape=output_shape,
        auto_pad=auto_pad,
        kernel_shape=kernel_shape,
    )
    r = len(weight_shape) - 2
    strides, dilations = _ints("strides", strides, r, 1), _ints("dilations", dilations, r, 1)
    c = int(in_shape[0])
    valid = _axis_valid_counts(out_shape[1:], tuple(weight_shape[2:]), strides, pads, dilations)
    return c * int(weight_shape[1]) * valid


# --- pass ---


@register_pass("lower-conv")
class LowerConvPass(GraphPass):
    """Conv and ConvTranspose with constant weights → Affine (exact sparse matrices)."""

    def run_on_graph(self, graph: gs.Graph, model: LoweringModel) -> bool:
        nodes = [n for n in graph.nodes if g.is_op(n, "Conv", "ConvTranspose")]
        for node in nodes:
            x = node.inputs[0]
            weight = g.const_value(node.inputs[1])
            if weight is None:
                raise UnsupportedOpError(
                    node.name,
                    node.op,
                    model.options.form,
                    "its weight is computed at run time, not a constant",
                    "Fold the weight into an initializer, or keep the node with --form im2col",
                )
            has_bias = len(node.inputs) > 2 and node.inputs[2].name
            bias = g.const_value(node.inputs[2]) if has_bias else None
            if has_bias and bias is None:
                raise UnsupportedOpError(
                    node.name, node.op, model.options.form, "its bias is not a constant"
                )
            shape = g.sample_shape(x)
            window_attributes(  # the shared validated reader: refuses out-of-spec attributes
                node,
                weight.shape[2:],
                spatial=shape[1:] if len(shape) == weight.ndim - 1 else None,
                channels=shape[0] if shape else None,
                weight_shape=weight.shape,
            )
            attrs = {
                key: g.attr(node, key)
                for key in ("strides", "pads", "dilations", "kernel_shape")
            }
            attrs["group"] = g.attr(node, "group", 1)
            attrs["auto_pad"] = g.attr(node, "auto_pad", "NOTSET")
            try:
                if node.op == "Conv":
                    a, c, out_shape = conv_matrix(g.sample_shape(x), weight, bias, **attrs)
                else:
                    a, c, out_shape = conv_transpose_matrix(
                        g.sample_shape(x),
                        weight,
                        bias,
                        output_padding=g.attr(node, "output_padding"),
                        output_shape=g.attr(node, "output_shape"),
                        **attrs,
                    )
            except ValueError as exc:
                raise UnsupportedOpError(node.name, node.op, model.options.form, str(exc)) from None
            replace_with_affine(graph, node, [x], AffineMap([a], c, out_shape))
        return bool(nodes)
