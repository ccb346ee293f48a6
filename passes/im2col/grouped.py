"""Grouped and depthwise convs of the im2col form.

* groups (not depthwise): ``(N, g, S, C/g)`` (one Transpose), Gather on axis 2 (none for
  identity taps: 1×1 stride 1), batched MatMul with ``(g, K·C/g, M/g)``, Transpose back. One
  block-diagonal ``(K·C, M)`` matrix (g× the FLOPs, no Transposes) measured slower at every
  group count: 3×3 convs, 128 channels at 28², vs onnxruntime: g=2 2.16× vs 1.25×, g=4 4.04×
  vs 1.67×, g=32 5.75× vs 4.65×; and for ShuffleNet V1's grouped 1×1 convs (g = 3, issue 13,
  ``tools/bench_layers.py --only grouped``): equal at 28² (240→60: 1.00× vs 1.03× native),
  slower at 14² and 7² (1.72-2.16× vs 1.27-1.43×) and at g = 8 (3.08× vs 1.89×). Dropping the
  identity Gather of 1×1 convs took the batched form from 1.22-2.32× to 1.03-2.10× native.
* a channel shuffle of ``g`` groups right after a grouped conv (ShuffleNet) is free: the
  Transpose back writes ``(N, S, M/g, g)`` instead of ``(N, S, g, M/g)``
  (:meth:`.layout.LayoutOps.shuffle_after`); after a g = 1 conv it permutes the weight columns
  and the bias (:mod:`.conv`). Grouped 1×1 + Relu + shuffle: 1.30-1.31× native, against
  1.62-2.55× with the shuffle done in NCHW (exit Transpose, shuffle, entry Transpose).
* depthwise (``C/g = 1``): ``ReduceSum(Gather(x) · w[K, C], axis=2)`` (a channel multiplier
  adds an axis). Measured per layer against onnxruntime's NCHWc depthwise kernel: 3-15× slower
  whatever the formulation: this one; one Gather + Mul + Add per tap; Slices of the padded
  ``(N, H, W, C)`` view; channel blocks of 16 with a batched block-diagonal MatMul (B× the
  FLOPs, two Transposes); one dense per-tap-diagonal MatMul (C× the FLOPs); NCHW rows gathered
  with a banded Toeplitz MatMul per channel (tiles of 1-16 rows: 5-8×); the grouped batched
  MatMul above (a GEMV per channel): MobileNetV2 5.7× slower than this; taps gathered tap-major
  ``(K, rows, C)`` with the sum over K as ``MatMul(ones(1, K), ·)``: 0.92-1.28× this, chunked
  (``tools/bench_layers.py``). Every formulation writes
  the K-fold tap tensor and runs ~4 elementwise passes over it, where the native kernel reads x
  once: this is what limits MobileNetV2 (:mod:`.cost`).
* depthwise with thin channel blocks on large maps (issue 13; ``C·itemsize ≤``
  :data:`.cost.DW_SLICE_MAX_BYTES` and ``S_out ≥`` :data:`.cost.DW_SLICE_MIN_ROWS`, channel
  multiplier 1): ``Σ_t Slice_t(Pad(x)) · w_t`` on the ``(N, *spatial, C)`` view — one Pad, one
  (strided) Slice per tap (whole rows of ``W·C`` values: memcpy speed, where the Gather pays
  ~12 ns per block of ``C`` values), a Mul by the tap's weight row **tiled along the last
  spatial axis** (onnxruntime broadcasts a ``(C,)`` row span by span: untiled, the 9 Muls of a
  32-channel 112² layer took 2.2 ms against 1.2 ms for its 9 Adds), an Add chain, the bias
  tiled likewise (:meth:`GroupedOps.emit_depthwise_slices`). More passes than the gather form
  (K Slices + K Muls + K−1 Adds of the output size, against one K-fold Gather, Mul and
  ReduceSum), but no per-block cost. Whole networks, interleaved A/B
  (``tools/bench_knobs.py``, loaded machine, ratio to native, 8 rounds): MobileNetV2 2.73-3.23
  (gather) → 2.47-2.78; ShuffleNet V2 (58-232 channels at 28² and below) loses 2-10 % with
  slices on its small maps, hence the ``S_out`` rule (BENCHMARKS.md, "Depthwise convs and
  MaxPool without gathered taps"). Tried and not kept, with their numbers there: row bands,
  one ``Sum`` instead of the Add chain, Slices of the flattened padded rows, the bias as a 10th
  tap, tiled weights and tap-major taps in the gather form; depthwise Winograd was not built
  (its dense transforms cost 27-64 MACs per output against the direct conv's 9).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

import numpy as np
import onnx_graphsurgeon as gs

from . import cost
from .layout import CL

__all__ = ["GroupedOps", "depthwise_slice_reason", "depthwise_weight", "tap_slices"]


def depthwise_weight(wg: np.ndarray) -> np.ndarray:
    """``(K, C, Mg)`` per-tap, per-channel weights of a depthwise conv (``C/g == 1``)."""
    return wg[:, :, 0, :].transpose(1, 0, 2)


def depthwise_slice_reason(channels: int, itemsize: int, multiplier: int, strides,
                           opset: int, s_out: int) -> str | None:
    """Why a depthwise conv (``C/g = 1``) takes its taps as Slices, or None if it gathers them.

    Slices of the padded ``(N, *spatial, C)`` view copy whole rows; the Gather copies one block
    of ``C`` values per tap and output position at a fixed ~12 ns each, which dominates for thin
    channel blocks (:data:`.cost.DW_SLICE_MAX_BYTES`, measured in the module docstring).
    """
    if multiplier != 1:
        return None
    if channels * itemsize > cost.DW_SLICE_MAX_BYTES or s_out < cost.DW_SLICE_MIN_ROWS:
        return None
    if opset < 10 and any(s != 1 for s in strides):
        return None  # strided Slices need the steps input
    return (f"depthwise, {channels} channels ({channels * itemsize} B ≤ "
            f"{cost.DW_SLICE_MAX_BYTES} B), {s_out} outputs ≥ {cost.DW_SLICE_MIN_ROWS}: "
            "tap Slices + Mul + Add")


def tap_slices(kernel, strides, dilations,
               out_spatial) -> Iterator[tuple[list[int], list[int], list[int]]]:
    """``(starts, ends, steps)`` per tap (C order over ``kernel``) on the padded input: tap
    ``t`` of axis ``i`` reads positions ``t·d + o·s`` for ``o < out_i``."""
    for t in itertools.product(*(range(k) for k in kernel)):
        starts = [ti * d for ti, d in zip(t, dilations)]
        ends = [st + (o - 1) * s + 1 for st, o, s in zip(starts, out_spatial, strides)]
        yield starts, ends, list(strides)



class GroupedOps:
    """Grouped (batched per-group MatMul) and depthwise (Mul + ReduceSum, or Slices) convs."""

    def emit_depthwise_slices(self, x: CL, wg: np.ndarray, b: gs.Constant | None, plan, out_t,
                              base: str, choice) -> gs.Variable:
        """``Σ_t Slice_t(Pad(x)) · w_t`` on the ``(N, *spatial, C)`` view (channel multiplier
        1): one Pad, then per tap a (strided) Slice and a Mul by its weight row tiled along the
        last spatial axis (onnxruntime broadcasts a ``(C,)`` row in spans of ``C``, slowly), an
        Add chain, and the bias (tiled likewise). ``plan`` is unused: the Slices are the taps.
        Returns ``(N, S_out, C)``."""
        grp, k, _, _ = wg.shape
        n, dtype, r = x.batch, x.dtype, len(x.spatial)
        _, out_spatial = self.out_cl_shape(out_t)
        view, _ = self.padded_spatial(x, choice.pads, base)
        shape = [n, *out_spatial, grp]
        wd = depthwise_weight(wg)[:, :, 0]  # (K, C)
        last = out_spatial[-1]
        used = [t for t in range(k) if np.any(wd[t])] or [0]  # zero taps add nothing
        acc = None
        axes = list(range(1, r + 1))
        for t, (starts, ends, steps) in enumerate(tap_slices(choice.kernel, choice.strides,
                                                             choice.dilations, out_spatial)):
            if t not in used:
                continue
            full = all(st == 0 and en == view.shape[1 + i] and sp == 1
                       for i, (st, en, sp) in enumerate(zip(starts, ends, steps)))
            tap = view if full else self.e.slice(view, starts, ends, axes, shape,
                                                 f"{base}/dw_tap{t}", steps=steps)
            w = self.e.const(f"{base}/dw_w{t}", np.tile(wd[t], (last, 1)).astype(dtype))
            prod = self.e.binary("Mul", tap, w, shape, f"{base}/dw_mul{t}")
            acc = prod if acc is None else self.e.binary("Add", acc, prod, shape,
                                                         f"{base}/dw_add{t}")
        if b is not None:
            bt = self.e.const(f"{base}/dw_bias", np.tile(np.asarray(b.values).reshape(-1),
                                                         (last, 1)).astype(dtype))
            acc = self.e.binary("Add", acc, bt, shape, base + "/bias")
        s_out = math.prod(out_spatial)
        return self.e.reshape(acc, [-1, s_out, grp], [n, s_out, grp], base + "/dw_rows")

    def emit_depthwise(self, x: CL, wg: np.ndarray, b, plan, out_t, base: str):
        """``ReduceSum(Gather(x) · w[K, C], axis=2)`` per chunk (a channel multiplier ``Mg > 1``
        adds an axis); the conv's sole consumer activation runs per chunk."""
        grp, k, _, mg = wg.shape
        n, m, dtype = x.batch, grp * mg, x.dtype
        s_out = plan.shape[0]
        wd = depthwise_weight(wg)
        src = self.source(self.t3(x), plan.zero_row, base)
        w = self.e.const(f"{base}/dw_weight",
                         (wd[:, :, 0] if mg == 1 else wd).astype(dtype))

        chunks = cost.chunk_bounds(s_out, k * grp * mg * dtype.itemsize, cost.DW_CHUNK_BYTES)
        act = self.sinkable_activation(out_t) if len(chunks) > 1 else None
        if act is not None:
            self.sunk[out_t.name] = act

        def dw_body(lo, hi, tag):
            rows = hi - lo
            gat = self.e.gather(src, plan.indices[lo:hi], [n, rows, k, grp], tag + "/gather")
            if mg == 1:
                prod = self.e.binary("Mul", gat, w, [n, rows, k, grp], tag + "/dw_mul")
                y = self.e.reduce_sum(prod, [2], 0, [n, rows, m], tag + "/dw_sum")
            else:
                g5 = self.e.reshape(gat, [-1, rows, k, grp, 1], [n, rows, k, grp, 1],
                                    tag + "/dw_expand")
                prod = self.e.binary("Mul", g5, w, [n, rows, k, grp, mg], tag + "/dw_mul")
                y4 = self.e.reduce_sum(prod, [2], 0, [n, rows, grp, mg], tag + "/dw_sum")
                y = self.e.reshape(y4, [-1, rows, m], [n, rows, m], tag + "/dw_out")
            y = self.add_bias(y, b, [n, rows, m], tag)
            if act is not None:
                y = self.e.op(act.op, [y, *act.inputs[1:]], y.shape, y.dtype,
                              f"{tag}/{act.op.lower()}", dict(act.attrs))
            return y

        return self.per_chunk(s_out, k * grp * mg * dtype.itemsize, dw_body,
                              lambda r: [n, r, m], base, cost.DW_CHUNK_BYTES)

    def emit_grouped(self, x: CL, wg: np.ndarray, b, plan, out_t, base: str, *,
                     shuffled: bool = False):
        """``(N, g, S, C/g)`` (one Transpose), Gather on axis 2 (a Reshape when the taps are the
        identity: 1×1 stride 1), batched MatMul with ``(g, K·C/g, M/g)``, Transpose back to
        ``(N, S, g, M/g)``, or to ``(N, S, M/g, g)`` when ``shuffled`` (the channel shuffle of
        ``g`` groups that follows, for free)."""
        grp, k, cg, mg = wg.shape
        n, m, dtype = x.batch, grp * mg, x.dtype
        s_out = plan.shape[0]
        x4 = self.e.reshape(self.primary(x), [-1, x.s, grp, cg], [n, x.s, grp, cg],
                            base + "/groups")
        xt = self.e.transpose(x4, [0, 2, 1, 3], [n, grp, x.s, cg], base + "/group_major")
        if plan.identity:
            flat = xt if k == 1 else self.e.reshape(
                xt, [-1, grp, s_out, k * cg], [n, grp, s_out, k * cg], base + "/im2col")
        else:
            src = self.source(xt, plan.zero_row, base, axis=2)
            gat = self.e.gather(src, plan.indices, [n, grp, s_out, k, cg], base + "/gather",
                                axis=2)
            flat = self.e.reshape(gat, [-1, grp, s_out, k * cg], [n, grp, s_out, k * cg],
                                  base + "/im2col")
        w = self.e.const(f"{base}/weight", wg.reshape(grp, k * cg, mg).astype(dtype))
        yg = self.e.binary("MatMul", flat, w, [n, grp, s_out, mg], base + "/matmul")
        if shuffled:
            yt = self.e.transpose(yg, [0, 2, 3, 1], [n, s_out, mg, grp], base + "/shuffled")
        else:
            yt = self.e.transpose(yg, [0, 2, 1, 3], [n, s_out, grp, mg], base + "/channel_last")
        y = self.e.reshape(yt, [-1, s_out, m], [n, s_out, m], base + "/merge_groups")
        return self.add_bias(y, b, [n, s_out, m], base)
