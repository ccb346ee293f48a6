"""Grouped and depthwise convs of the im2col form.

* groups (not depthwise): ``(N, g, S, C/g)`` (one Transpose), Gather on axis 2, batched
  MatMul with ``(g, K·C/g, M/g)``, Transpose back. One block-diagonal ``(K·C, M)`` matrix
  (g× the FLOPs, no Transposes) measured slower at every group count: 3×3 convs, 128 channels
  at 28², vs onnxruntime: g=2 2.16× vs 1.25×, g=4 4.04× vs 1.67×, g=32 5.75× vs 4.65×.
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
"""

from __future__ import annotations

import numpy as np

from . import cost
from .layout import CL

__all__ = ["GroupedOps", "depthwise_weight"]


def depthwise_weight(wg: np.ndarray) -> np.ndarray:
    """``(K, C, Mg)`` per-tap, per-channel weights of a depthwise conv (``C/g == 1``)."""
    return wg[:, :, 0, :].transpose(1, 0, 2)



class GroupedOps:
    """Grouped (batched per-group MatMul) and depthwise (Mul + ReduceSum) convs."""

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

    def emit_grouped(self, x: CL, wg: np.ndarray, b, plan, out_t, base: str):
        """``(N, g, S, C/g)`` (one Transpose), Gather on axis 2, batched MatMul with
        ``(g, K·C/g, M/g)``, Transpose back."""
        grp, k, cg, mg = wg.shape
        n, m, dtype = x.batch, grp * mg, x.dtype
        s_out = plan.shape[0]
        x4 = self.e.reshape(self.primary(x), [-1, x.s, grp, cg], [n, x.s, grp, cg],
                            base + "/groups")
        xt = self.e.transpose(x4, [0, 2, 1, 3], [n, grp, x.s, cg], base + "/group_major")
        src = self.source(xt, plan.zero_row, base, axis=2)
        gat = self.e.gather(src, plan.indices, [n, grp, s_out, k, cg], base + "/gather",
                            axis=2)
        flat = self.e.reshape(gat, [-1, grp, s_out, k * cg], [n, grp, s_out, k * cg],
                              base + "/im2col")
        w = self.e.const(f"{base}/weight", wg.reshape(grp, k * cg, mg).astype(dtype))
        yg = self.e.binary("MatMul", flat, w, [n, grp, s_out, mg], base + "/matmul")
        yt = self.e.transpose(yg, [0, 2, 1, 3], [n, s_out, grp, mg], base + "/channel_last")
        y = self.e.reshape(yt, [-1, s_out, m], [n, s_out, m], base + "/merge_groups")
        return self.add_bias(y, b, [n, s_out, m], base)
