"""Conv and ConvTranspose as im2col Gather + MatMul, and the one place a conv picks its algorithm.

Conv (1-D/2-D/3-D, any strides, dilations, asymmetric pads, groups)
-------------------------------------------------------------------
:func:`onnx_lower.windows.sliding_windows` gives the taps ``(S_out, K)``: the flat input row
that tap ``t`` of output position ``o`` reads, ``-1`` for padding. Padding taps read a **zero
row** appended to the input with one ``Pad`` on axis 1. Then::

    G = Gather(x, taps, axis=1)               (N, S_out, K, C)
    y = Reshape(G, (N·S_out, K·C)) @ W + b    W[t·C + c, m] = weight[m, c, t]

A 1×1 stride-1 unpadded conv (taps = ``arange(S)``) is a bare MatMul; a kernel that covers the
whole input is a Reshape + MatMul. BatchNormalization and per-channel constant Mul/Add/Sub/Div
after a Conv or ConvTranspose are folded into its weight columns and bias first (pass
``im2col-fold``, in float64, cast once); a BatchNormalization elsewhere is Mul + Add.

* groups and depthwise convs: :mod:`.grouped`.
* strided convs whose channel block is tiny (``C·itemsize ≤ 32`` bytes: RGB stems) gather
  copies of 12 bytes, ~12 ns each in onnxruntime. **space-to-depth** folds the last spatial axis
  by its stride into the channels, a free Reshape (``(w, r, c)`` is contiguous): input position
  ``p = s·q + r`` becomes row ``q``, channel block ``r``, and tap ``t`` reads
  ``q = o + ⌊(t·d - b)/s⌋``, ``r = (t·d - b) mod s`` — a stride-1 conv along that axis
  (:class:`SpaceToDepth`; folding every axis needs a Transpose and measured no better).
  ResNet-18's 7×7/2 stem: 614 k copies of 12 B become 351 k of 24 B, −5 % whole-network.
* ConvTranspose: the transpose of the conv from its output space back to its input space; for a
  fixed tap ``t``, output position ``p`` is read by at most one input ``i``, so inverting that
  conv's window table gives ``(S_out, K)`` taps with ``-1`` where no input contributes
  (:func:`conv_transpose_taps`), then the same Gather + MatMul (geometry from
  :func:`onnx_lower.passes.conv.conv_transpose_geometry`).

Algorithms (:func:`choose_conv_algorithm`, the single dispatch point): ``"matmul"`` when the
taps are the identity (a bare MatMul or a Reshape + MatMul), ``"im2col"`` for Gather + MatMul
in chunks (:mod:`.cost`), ``"grouped"`` and ``"depthwise"`` in :mod:`.grouped`, ``"winograd"``
(F(2,3)/F(4,3) for 3×3 stride-1 convs, chosen per conv by a cost model) in :mod:`.winograd`.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx_graphsurgeon as gs

from onnx_lower import graph as g
from onnx_lower.errors import UnsupportedOpError
from onnx_lower.passes.conv import conv_transpose_geometry
from onnx_lower.windows import resolve_pads, sliding_windows

from . import cost
from .emitter import is_static
from .fold import single_consumer
from .layout import CL, shuffle_permutation
from .ops import FORM, SINKABLE
from .winograd import ConvChoice

__all__ = [
    "ConvOps",
    "GatherPlan",
    "SpaceToDepth",
    "choose_conv_algorithm",
    "conv_transpose_taps",
    "conv_windows",
    "dense_weight",
    "gather_indices",
    "group_weights",
    "space_to_depth_taps",
]


def _strides_dilations(node: gs.Node, r: int):
    strides = tuple(g.attr(node, "strides", None) or (1,) * r)
    dilations = tuple(g.attr(node, "dilations", None) or (1,) * r)
    return strides, dilations


def conv_windows(spatial, kernel, strides=None, pads=None, dilations=None, auto_pad="NOTSET"):
    """Windows of a Conv over ``spatial`` (``auto_pad`` resolved as onnxruntime's Conv does)."""
    pads = resolve_pads(spatial, kernel, strides, dilations, pads, auto_pad)
    return sliding_windows(spatial, kernel, strides, pads, dilations)


def conv_transpose_taps(out_spatial, kernel, strides, pads, dilations, in_size: int) -> np.ndarray:
    """``(S_out, K)`` taps of a ConvTranspose: the input position each output tap reads, or -1.

    The ConvTranspose is the transpose of the Conv that maps its output space back to its input
    space: Conv window ``i`` (an input position) tap ``t`` reads output position ``p``. For a
    fixed ``t``, ``p = i·s - b + t·d`` determines ``i``, so inverting the window table gives at
    most one input position per (output position, tap).
    """
    win = sliding_windows(out_spatial, kernel, strides, pads, dilations)
    fwd = win.taps[:in_size]
    s_out, k = math.prod(out_spatial), fwd.shape[1]
    taps = np.full((s_out, k), -1, dtype=np.int64)
    i_idx, t_idx = np.nonzero(fwd >= 0)
    taps[fwd[i_idx, t_idx], t_idx] = i_idx
    return taps


@dataclasses.dataclass(frozen=True)
class GatherPlan:
    """How to read the taps of a layer from an ``(N, S_in, C)`` tensor.

    ``indices`` is ``(S_out, K)`` into ``S_in`` rows, or into ``S_in + 1`` rows when
    ``zero_row`` (padding taps read an appended zero row). ``identity`` means the taps are
    ``arange(S_in).reshape(S_out, K)``: a Reshape does the job, no Gather.
    """

    indices: np.ndarray
    zero_row: bool
    identity: bool

    @property
    def shape(self) -> tuple[int, int]:
        return self.indices.shape


def gather_indices(taps: np.ndarray, s_in: int) -> GatherPlan:
    """Gather plan for ``taps`` (``-1`` = padding, read from a zero row at index ``s_in``)."""
    taps = np.asarray(taps, dtype=np.int64)
    valid = taps >= 0
    zero_row = not bool(valid.all())
    indices = np.where(valid, taps, s_in).astype(np.int64)
    identity = (not zero_row and indices.size == s_in
                and bool(np.array_equal(indices.ravel(), np.arange(s_in))))
    return GatherPlan(indices, zero_row, identity)


def group_weights(weight: np.ndarray, group: int, transpose: bool = False) -> np.ndarray:
    """Conv weights ``(M, C/g, *k)`` (or ConvTranspose ``(C, M/g, *k)`` with ``transpose``) as
    ``(g, K, C/g, M/g)`` float64: group, tap, input channel, output channel."""
    w = np.asarray(weight, dtype=np.float64)
    k = math.prod(w.shape[2:])
    if transpose:
        c, mg = w.shape[:2]
        return w.reshape(group, c // group, mg, k).transpose(0, 3, 1, 2)
    m, cg = w.shape[:2]
    return w.reshape(group, m // group, cg, k).transpose(0, 3, 2, 1)


def dense_weight(wg: np.ndarray) -> np.ndarray:
    """``(K·C, M)`` MatMul weight from ``(g, K, Cg, Mg)``; block diagonal when ``g > 1``.

    Row ``t·C + c`` matches the gathered ``(K, C)`` taps flattened in C order.
    """
    grp, k, cg, mg = wg.shape
    if grp == 1:
        return wg[0].reshape(k * cg, mg)
    dense = np.zeros((k, grp, cg, grp, mg))
    ar = np.arange(grp)
    dense[:, ar, :, ar, :] = wg  # (g, K, Cg, Mg) lands on the diagonal blocks
    return dense.reshape(k * grp * cg, grp * mg)



@dataclasses.dataclass(frozen=True)
class SpaceToDepth:
    """A strided conv rewritten as a conv over a space-to-depth input.

    With block ``s`` on an axis (its stride), input position ``p = s·q + r`` becomes position
    ``q``, channel block ``r`` of the rearranged input. Tap ``t`` of window ``o`` reads
    ``p = o·s - b + t·d``, i.e. ``q = o + δ_t`` with ``δ_t = ⌊(t·d - b)/s⌋`` and
    ``r_t = (t·d - b) mod s``: along that axis a stride-1 conv with kernel
    ``δ_max - δ_min + 1`` and pad ``-δ_min``, whose weight holds ``W[·, ·, t]`` at
    ``(δ_t - δ_min, r_t)`` and zeros elsewhere. An axis with block 1 keeps its conv as it is.
    """

    taps: np.ndarray  # (S_out, K2) over the space-to-depth grid, -1 = padding
    kernel: tuple[int, ...]  # K2 per axis
    grid: tuple[int, ...]  # spatial extent of the space-to-depth input
    tap_index: np.ndarray  # (K,) new tap of each original tap
    phase_index: np.ndarray  # (K,) channel block of each original tap
    blocks: int  # Π block

    def weights(self, wg: np.ndarray) -> np.ndarray:
        """``(1, K2, R·C, M)`` from the original ``(1, K, C, M)``."""
        _, k, c, m = wg.shape
        k2 = math.prod(self.kernel)
        out = np.zeros((k2, self.blocks, c, m))
        out[self.tap_index, self.phase_index] = wg[0]
        return out.reshape(1, k2, self.blocks * c, m)


def space_to_depth_taps(spatial, kernel, strides, pads, dilations, block=None) -> SpaceToDepth:
    """The :class:`SpaceToDepth` form of a conv (all its windows from ``sliding_windows``).

    ``block`` per axis is the stride (fold the axis) or 1 (keep it); default: every stride.
    """
    r = len(kernel)
    block = tuple(strides) if block is None else tuple(block)
    win = sliding_windows(spatial, kernel, strides, pads, dilations)
    grid, k2, s2, d2, b2, e2, taps_ax, phases = [], [], [], [], [], [], [], []
    for i in range(r):
        if block[i] == 1:
            grid.append(spatial[i])
            k2.append(kernel[i])
            s2.append(strides[i])
            d2.append(dilations[i])
            b2.append(pads[i])
            e2.append(pads[r + i])
            taps_ax.append(np.arange(kernel[i]))
            phases.append(np.zeros(kernel[i], dtype=np.int64))
            continue
        if block[i] != strides[i]:
            raise ValueError(f"space-to-depth block {block[i]} must be 1 or the stride")
        n2 = -(-spatial[i] // strides[i])
        first = win.positions[i][0]  # window 0: positions -b + t·d
        delta, phase = np.floor_divide(first, strides[i]), np.mod(first, strides[i])
        lo, hi = int(delta.min()), int(delta.max())
        grid.append(n2)
        k2.append(hi - lo + 1)
        s2.append(1)
        d2.append(1)
        b2.append(-lo)
        e2.append(win.out_shape[i] - 1 - n2 + lo + k2[-1])
        taps_ax.append(delta - lo)
        phases.append(phase)
    new = sliding_windows(grid, k2, s2, b2 + e2, d2)
    if new.out_shape != win.out_shape:  # pragma: no cover - guarded by the algebra above
        raise ValueError("space-to-depth windows disagree with the conv's")
    t_axes = np.indices(kernel).reshape(r, -1)  # per-axis tap index of each flat tap
    tap_index = np.ravel_multi_index([taps_ax[i][t_axes[i]] for i in range(r)], k2)
    phase_index = np.ravel_multi_index([phases[i][t_axes[i]] for i in range(r)], block)
    return SpaceToDepth(new.taps, tuple(k2), tuple(grid), tap_index, phase_index,
                        math.prod(block))



def _space_to_depth_block(channels: int, strides, dtype: np.dtype) -> tuple[int, ...] | None:
    """Per-axis space-to-depth factors for a strided conv with a tiny channel block, or None."""
    if channels * dtype.itemsize > cost.S2D_MAX_BYTES or all(s == 1 for s in strides):
        return None
    if cost.S2D_AXES == "all":
        return tuple(strides)
    if strides[-1] == 1:
        return None
    return (*(1,) * (len(strides) - 1), strides[-1])



#: The conv algorithms :func:`choose_conv_algorithm` picks from, each a ``ConvOps`` /
#: ``GroupedOps`` method ``emit_<algorithm>`` with the same signature.
CONV_ALGORITHMS = ("matmul", "im2col", "grouped", "depthwise", "depthwise_slices", "winograd")


def choose_conv_algorithm(wg_shape: tuple[int, int, int, int], plan: GatherPlan,
                          winograd: ConvChoice | None = None) -> str:
    """The algorithm of a conv with weights ``(g, K, C/g, M/g)`` read through ``plan``.

    * ``"depthwise_slices"``: a depthwise Conv whose :class:`.winograd.ConvChoice` says so
      (thin channel blocks, :func:`.grouped.depthwise_slice_reason`): one Slice, Mul and Add
      per tap (:mod:`.grouped`);
    * ``"depthwise"``: ``C/g == 1``, ``g > 1`` (and :data:`.cost.DEPTHWISE` is ``"mul"``):
      Gather, Mul by per-tap weights, ReduceSum over the taps (:mod:`.grouped`);
    * ``"grouped"``: more than :data:`.cost.DENSE_GROUPS` groups: a batched per-group MatMul
      (:mod:`.grouped`);
    * ``"matmul"``: the taps are ``arange(S_in)`` (1×1 stride 1 unpadded, or a kernel covering
      the whole input): a bare MatMul or Reshape + MatMul;
    * ``"winograd"``: a Conv whose :class:`.winograd.ConvChoice` (the cost model and the
      numerics gate of :mod:`.winograd`, ``--conv-algo``) is F(2,3) or F(4,3);
    * ``"im2col"``: otherwise Gather + MatMul, in chunks.

    This is the single place a conv picks its algorithm; ConvTranspose goes through it too.
    """
    grp, _, cg, _ = wg_shape
    if cg == 1 and grp > 1 and winograd is not None and winograd.algo == "depthwise-slices":
        return "depthwise_slices"
    if cg == 1 and grp > 1 and cost.DEPTHWISE == "mul":
        return "depthwise"
    if grp > cost.DENSE_GROUPS:
        return "grouped"
    if winograd is not None and winograd.m is not None and grp == 1:
        return "winograd"
    return "matmul" if plan.identity else "im2col"


class ConvOps:
    """Conv and ConvTranspose: taps, the algorithm dispatch, the im2col Gather + MatMul."""

    def per_chunk(self, rows: int, row_bytes: int, body, out_shape_fn, base: str,
                  chunk_bytes: int, axis: int = 1):
        """Run ``body(lo, hi, tag)`` on row ranges of about ``chunk_bytes``; Concat them.

        A layer's gathered taps are ``row_bytes`` per output row. Producing and consuming them
        chunk by chunk keeps each chunk in cache between the Gather and its consumers (see the
        :mod:`.cost` for the measurements).
        """
        chunks = cost.chunk_bounds(rows, row_bytes, chunk_bytes)
        outs = [body(lo, hi, f"{base}/c{i}" if len(chunks) > 1 else base)
                for i, (lo, hi) in enumerate(chunks)]
        if len(chunks) == 1:
            return outs[0]
        return self.e.concat(outs, axis, out_shape_fn(rows), base + "/concat")

    def emit_conv(self, node, x: CL, wg: np.ndarray, bias, taps, out_t,
                  shuffle: int | None = None,
                  winograd: ConvChoice | None = None) -> tuple[gs.Variable, bool]:
        """Gather + contraction for a conv-like op with weights ``(g, K, Cg, Mg)``.

        Returns ``(y, shuffled)``: ``y`` is ``(N·S_out, M)`` (dense and identity cases, a 2-D
        MatMul) or ``(N, S_out, M)``; the algorithm comes from :func:`choose_conv_algorithm`.
        With ``shuffle = s`` (a channel shuffle of ``s`` groups follows), ``shuffled`` says the
        output channels were written in shuffled order: for free by permuting the dense weight
        columns and the bias, or, for the batched grouped MatMul with ``s = g``, by the
        Transpose that merges the groups anyway.
        """
        base = node.name or out_t.name
        plan = gather_indices(taps, x.s)
        algorithm = choose_conv_algorithm(wg.shape, plan, winograd)
        grp, k, cg, mg = wg.shape
        shuffled = shuffle is not None and (
            algorithm in ("matmul", "im2col", "winograd")
            or (algorithm == "grouped" and shuffle == grp))
        if shuffled:
            perm = shuffle_permutation(grp * mg, shuffle)
            bias = None if bias is None else np.asarray(bias).reshape(-1)[perm]
            if algorithm != "grouped":
                wg = dense_weight(wg)[:, perm].reshape(1, k, grp * cg, grp * mg)
        b = None
        if bias is not None and np.any(bias):
            b = self.e.const(f"{base}/bias", np.asarray(bias, dtype=np.float64).astype(x.dtype))
        emit = getattr(self, "emit_" + algorithm)
        if algorithm in ("winograd", "depthwise_slices"):
            return emit(x, wg, b, plan, out_t, base, winograd), shuffled
        if algorithm == "grouped":
            return emit(x, wg, b, plan, out_t, base, shuffled=shuffled), shuffled
        return emit(x, wg, b, plan, out_t, base), shuffled

    def add_bias(self, y: gs.Variable, b: gs.Constant | None, shape, tag: str) -> gs.Variable:
        return y if b is None else self.e.binary("Add", y, b, shape, tag + "/bias")

    def emit_matmul(self, x: CL, wg: np.ndarray, b, plan: GatherPlan, out_t,
                    base: str) -> gs.Variable:
        """Identity taps: ``(N·S, K·C) @ W``, the input's 2-D view (K = 1) or a Reshape of it."""
        _, k, _, mg = wg.shape
        n, m, dtype = x.batch, wg.shape[0] * mg, x.dtype
        rows_dim = n * plan.shape[0] if isinstance(n, int) else None
        w = self.e.const(f"{base}/weight", dense_weight(wg).astype(dtype))
        kc = k * x.channels
        flat = self.t2(x) if k == 1 else self.e.reshape(
            self.primary(x), [-1, kc], [rows_dim, kc], base + "/im2col")
        y = self.e.binary("MatMul", flat, w, [rows_dim, m], base + "/matmul")
        return self.add_bias(y, b, [rows_dim, m], base)

    def emit_im2col(self, x: CL, wg: np.ndarray, b, plan: GatherPlan, out_t,
                    base: str) -> gs.Variable:
        """Gather + MatMul per chunk of output rows, the sole consumer activation per chunk."""
        _, k, _, mg = wg.shape
        n, m, dtype = x.batch, wg.shape[0] * mg, x.dtype
        s_out = plan.shape[0]
        rows_dim = n * s_out if isinstance(n, int) else None
        w = self.e.const(f"{base}/weight", dense_weight(wg).astype(dtype))
        kc = k * x.channels
        src = self.source(self.t3(x), plan.zero_row, base)
        chunks = cost.chunk_bounds(s_out, kc * dtype.itemsize, cost.CONV_CHUNK_BYTES)
        act = self.sinkable_activation(out_t) if len(chunks) > 1 else None
        rows2d = isinstance(n, (int, np.integer)) and n == 1  # chunks join as 2-D rows

        def body(lo, hi, tag):
            rows = hi - lo
            r2 = n * rows if isinstance(n, (int, np.integer)) else None
            gat = self.e.gather(src, plan.indices[lo:hi], [n, rows, k, x.channels],
                                tag + "/gather")
            flat = self.e.reshape(gat, [-1, kc], [r2, kc], tag + "/im2col")
            y = self.add_bias(self.e.binary("MatMul", flat, w, [r2, m], tag + "/matmul"), b,
                              [r2, m], tag)
            if act is not None:
                y = self.e.op(act.op, [y, *act.inputs[1:]], y.shape, y.dtype,
                              f"{tag}/{act.op.lower()}", dict(act.attrs))
            if len(chunks) > 1 and not rows2d:
                y = self.e.reshape(y, [-1, rows, m], [n, rows, m], tag + "/rows")
            return y

        outs = [body(lo, hi, f"{base}/c{i}" if len(chunks) > 1 else base)
                for i, (lo, hi) in enumerate(chunks)]
        if len(chunks) == 1:
            return outs[0]
        y = (self.e.concat(outs, 0, [rows_dim, m], base + "/concat") if rows2d else
             self.e.concat(outs, 1, [n, s_out, m], base + "/concat"))
        if act is not None:
            self.sunk[out_t.name] = act
        return y

    def sinkable_activation(self, t: gs.Tensor) -> gs.Node | None:
        """The unary elementwise op that is ``t``'s only consumer, if any (constant extras)."""
        nxt = single_consumer(self.graph, t)
        if (nxt is None or nxt.op not in SINKABLE or nxt.domain not in g.DEFAULT_DOMAINS
                or nxt.inputs[0] is not t or len(nxt.outputs) != 1):
            return None
        if any(g.const_value(i) is None for i in nxt.inputs[1:] if i.name):
            return None
        return nxt

    def to_s2d(self, x_t: gs.Tensor, block: tuple[int, ...], base: str) -> CL:
        """Space-to-depth of ``x_t``: ``(N, S', R·C)``, ``R = Π block``, channels ``(r, c)``.

        From the channels-last ``(N, *spatial, C)`` view (zero-padded at the ends to multiples
        of ``block``): the last spatial axis folds into the channels for free (``(w, r, c)`` is
        contiguous), and one Transpose that moves blocks of ``s_last·C`` elements interleaves the
        others, if they fold too. (A single 6-D Transpose straight from NCHW measured 10× slower
        in onnxruntime than the plain (N, C, S) → (N, S, C) entry Transpose plus this one.)
        """
        key = (x_t.name, block)
        if key in self.s2d:
            return self.s2d[key]
        x = self.to_cl(x_t)
        c, spatial, n = x.channels, x.spatial, x.batch
        r = len(spatial)
        n2 = tuple(-(-a // s) for a, s in zip(spatial, block))
        extra = [a2 * s - a for a2, s, a in zip(n2, block, spatial)]
        rr = math.prod(block)
        s2 = math.prod(n2)
        view = self.primary(x)
        if any(extra):
            view = self.e.reshape(view, [-1, *spatial, c], [n, *spatial, c], base + "/spatial")
            view = self.e.pad(view, [0] * (r + 2) + [0, *extra, 0],
                              [n, *(a2 * s for a2, s in zip(n2, block)), c], base + "/s2d_pad")
        if all(b == 1 for b in block[:-1]):  # only the last axis folds: a free Reshape
            v = self.e.reshape(view, [-1, s2, rr * c], [n, s2, rr * c], base + "/s2d_flat")
        else:
            split = [d for a2, s in zip(n2[:-1], block[:-1]) for d in (a2, s)]
            inner = block[-1] * c
            shape = [n, *split, n2[-1], inner]
            v = self.e.reshape(view, [-1, *split, n2[-1], inner], shape, base + "/s2d_split")
            perm = [0, *range(1, 2 * r - 1, 2), 2 * r - 1, *range(2, 2 * r - 1, 2), 2 * r]
            tr = self.e.transpose(v, perm, [n, *n2, *block[:-1], inner], base + "/s2d")
            v = self.e.reshape(tr, [-1, s2, rr * c], [n, s2, rr * c], base + "/s2d_flat")
        info = CL(v, n2, rr * c, n, x.dtype)
        self.s2d[key] = info
        return info

    def _weights(self, node):
        w = g.const_value(node.inputs[1]) if len(node.inputs) > 1 else None
        if w is None:
            raise UnsupportedOpError(node.name, node.op, FORM, "its weight is not a constant")
        b = None
        if len(node.inputs) > 2 and node.inputs[2].name:
            b = g.const_value(node.inputs[2])
            if b is None:
                raise UnsupportedOpError(node.name, node.op, FORM, "its bias is not a constant")
        return w, b

    def do_Conv(self, node) -> bool:
        x_t, out_t = node.inputs[0], node.outputs[0]
        if not self.activation(x_t) or not is_static(out_t.shape[1:] if out_t.shape else None):
            return False
        w, b = self._weights(node)
        x = self.cl_view(x_t)
        kernel = tuple(w.shape[2:])
        group = int(g.attr(node, "group", 1))
        strides, dilations = _strides_dilations(node, len(kernel))
        pads = g.attr(node, "pads", None)
        auto_pad = g.attr(node, "auto_pad", "NOTSET")
        try:
            win = conv_windows(x.spatial, kernel, strides, pads, dilations, auto_pad)
        except ValueError as exc:
            raise UnsupportedOpError(node.name, node.op, FORM, str(exc)) from exc
        m, out_spatial = self.out_cl_shape(out_t)
        if tuple(win.out_shape) != out_spatial or m != w.shape[0]:
            raise UnsupportedOpError(node.name, node.op, FORM,
                                     f"its windows give {win.out_shape}, the model says "
                                     f"{out_spatial}")
        choice = self.conv_choice(node, x, w, strides, dilations, group, pads, auto_pad)
        wg = group_weights(w, group)
        shuffle = self.shuffle_after(out_t)  # a channel shuffle follows: absorb it if we can
        block = _space_to_depth_block(x.channels, strides, x.dtype) if group == 1 else None
        if block is not None:
            pads = resolve_pads(x.spatial, kernel, strides, dilations, pads, auto_pad)
            s2d = space_to_depth_taps(x.spatial, kernel, strides, pads, dilations, block)
            x2 = self.to_s2d(x_t, block, node.name or out_t.name)
            y, shuffled = self.emit_conv(node, x2, s2d.weights(wg), b, s2d.taps, out_t,
                                         shuffle and shuffle[0])
        else:
            y, shuffled = self.emit_conv(node, self.to_cl(x_t), wg, b, win.taps, out_t,
                                         shuffle and shuffle[0], choice)
        if shuffled:
            self.shuffled.add(shuffle[1].name)
        self.conv_out(out_t, y, out_spatial, m)
        return True

    def conv_out(self, out_t: gs.Tensor, y: gs.Variable, spatial, channels) -> None:
        """Record a conv's output; if its activation ran per chunk, that op is done too."""
        act = self.sunk.pop(out_t.name, None)
        if act is None:
            self.new_cl(out_t, y, spatial, channels)
            return
        self.new_cl(act.outputs[0], y, spatial, channels)
        g.detach(act)

    def do_ConvTranspose(self, node) -> bool:
        x_t, out_t = node.inputs[0], node.outputs[0]
        if not self.activation(x_t) or not is_static(out_t.shape[1:] if out_t.shape else None):
            return False
        w, b = self._weights(node)
        x = self.to_cl(x_t)
        kernel = tuple(w.shape[2:])
        group = int(g.attr(node, "group", 1))
        strides, dilations = _strides_dilations(node, len(kernel))
        try:
            pads, out_shape = conv_transpose_geometry(
                (x.channels, *x.spatial), w.shape, strides=strides,
                pads=g.attr(node, "pads", None), dilations=dilations, group=group,
                output_padding=g.attr(node, "output_padding", None),
                output_shape=g.attr(node, "output_shape", None),
                auto_pad=g.attr(node, "auto_pad", "NOTSET"),
                kernel_shape=g.attr(node, "kernel_shape", None))
        except ValueError as exc:
            raise UnsupportedOpError(node.name, node.op, FORM, str(exc)) from exc
        m, out_spatial = self.out_cl_shape(out_t)
        if tuple(out_shape[1:]) != out_spatial:
            raise UnsupportedOpError(node.name, node.op, FORM,
                                     f"its geometry gives {out_shape[1:]}, the model says "
                                     f"{out_spatial}")
        taps = conv_transpose_taps(out_spatial, kernel, strides, pads, dilations, x.s)
        wg = group_weights(w, group, transpose=True)
        y, _ = self.emit_conv(node, x, wg, b, taps, out_t)
        self.conv_out(out_t, y, out_spatial, m)
        return True

