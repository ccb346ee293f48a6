"""Layout-agnostic and dense ops of the im2col form on channels-last tensors.

* Unary elementwise ops run unchanged on either view; Identity/Dropout alias their input.
* Add/Sub/Mul/Div/... of region tensors (residuals; ``(N, 1, C)`` broadcasts as SE blocks need)
  or with a constant rewritten for ``(N, S, C)`` (:func:`.layout.channels_last_constant`); on the
  2-D ``(N·S, C)`` view when every operand allows it, so onnxruntime can fuse the op into a
  preceding Gemm.
* Concat on channels → on the last axis; followed by a channel shuffle of as many groups as
  it has equal inputs (ShuffleNet V2), a Concat on a new last axis that interleaves them.
* A BatchNormalization not folded into a conv (``im2col-fold``) is Mul + Add per channel.
* Gemm → MatMul (+ Add, alpha and beta folded into constants); a channels-last flatten input
  permutes the constant matrix rows from ``c·S + s`` to ``s·C + c`` (:func:`_cl_rows`), so no
  Transpose precedes the classifier. MatMul of such a flatten likewise.
"""

from __future__ import annotations

import math

import numpy as np

from onnx_lower import graph as g
from onnx_lower.errors import InvalidModelError, UnsupportedOpError

from .emitter import float_dtype, is_static
from .fold import bn_scale_shift, single_consumer
from .layout import channels_last_constant
from .ops import FORM

__all__ = ["ElementwiseOps"]


class ElementwiseOps:
    """Unary/binary elementwise ops, Concat, BatchNormalization, Gemm and MatMul."""

    def do_BatchNormalization(self, node) -> bool:
        x_t, out_t = node.inputs[0], node.outputs[0]
        if not self.activation(x_t):
            return False
        ss = bn_scale_shift(node)
        if ss is None:
            raise UnsupportedOpError(node.name, node.op, FORM,
                                     "only inference-mode BatchNormalization with constant "
                                     "per-channel parameters can be lowered")
        x = self.to_cl(x_t)
        base = node.name or out_t.name
        v = self.primary(x)
        y = self.e.binary("Mul", v, self.e.const(f"{base}/scale", ss[0].astype(x.dtype)),
                          v.shape, base + "/scale")
        y = self.e.binary("Add", y, self.e.const(f"{base}/shift", ss[1].astype(x.dtype)),
                          v.shape, base + "/shift")
        self.new_cl(out_t, y, x.spatial, x.channels)
        return True

    # -- layout-agnostic ops ----------------------------------------------------------------

    def unary(self, node) -> bool:
        if not node.inputs or node.inputs[0].name not in self.cl:
            return False
        if g.is_op(node, "Dropout") and any(o.outputs for o in node.outputs[1:]):
            return False
        x = self.cl[node.inputs[0].name]
        out_t = node.outputs[0]
        if g.is_op(node, "Identity", "Dropout"):
            self.cl[out_t.name] = x
            self.originals[out_t.name] = out_t
            return True
        v = self.primary(x)
        dtype = out_t.dtype if out_t.dtype is not None else v.dtype
        y = self.e.op(node.op, [v, *node.inputs[1:]], v.shape, dtype, node.name or out_t.name,
                      dict(node.attrs))
        self.graph.nodes[-1].domain = node.domain
        self.new_cl(out_t, y, x.spatial, x.channels)
        return True

    def binary(self, node) -> bool:
        ins = list(node.inputs)
        out_t = node.outputs[0]
        if not any(t.name in self.cl for t in ins) or out_t.shape is None:
            return False
        rank = len(out_t.shape)
        if rank < 3 or not is_static(out_t.shape[1:]):
            return False
        c, spatial = self.out_cl_shape(out_t)
        s = math.prod(spatial)
        consts: dict[int, np.ndarray] = {}
        for i, t in enumerate(ins):
            cv = g.const_value(t)
            if cv is not None:
                v = channels_last_constant(cv, rank, c, spatial)
                if v is None:
                    return False
                consts[i] = v.astype(cv.dtype)
                continue
            if t.shape is None or len(t.shape) != rank or not is_static(t.shape[1:]):
                return False
            tc, tsp = t.shape[1], tuple(t.shape[2:])
            if tc not in (1, c) or (tsp != tuple(spatial) and any(d != 1 for d in tsp)):
                return False
        acts = [self.to_cl(t) for i, t in enumerate(ins) if i not in consts]
        # 2-D (N·S, C) if every activation is full-size and has a 2-D view and every constant
        # is per channel: then onnxruntime can fuse the op with a preceding Gemm.
        flat = (all(a.rows is not None and a.s == s for a in acts)
                and all(v.shape[1] == 1 for v in consts.values()))
        new_inputs = []
        for i, t in enumerate(ins):
            if i in consts:
                v = consts[i].reshape(1, -1) if flat else consts[i]
                new_inputs.append(self.e.const(f"{node.name}/{t.name}_cl", v))
            else:
                a = self.cl[t.name]
                new_inputs.append(self.t2(a) if flat else self.t3(a))
        shape = [acts[0].rows_dim, c] if flat else [out_t.shape[0], s, c]
        y = self.e.op(node.op, new_inputs, shape, out_t.dtype, node.name or out_t.name,
                      dict(node.attrs))
        self.new_cl(out_t, y, spatial, c)
        return True

    def do_Concat(self, node) -> bool:
        out_t = node.outputs[0]
        if out_t.shape is None or len(out_t.shape) < 3 or not is_static(out_t.shape[1:]):
            return False
        rank = len(out_t.shape)
        if int(g.attr(node, "axis", 1)) % rank != 1:
            return False
        if not any(t.name in self.cl for t in node.inputs):
            return False
        if not all(self.activation(t) for t in node.inputs):
            return False
        xs = [self.to_cl(t) for t in node.inputs]
        c, spatial = self.out_cl_shape(out_t)
        s = math.prod(spatial)
        base = node.name or out_t.name
        if self._interleave(node, xs, c, spatial, base):
            return True
        if all(x.rows is not None for x in xs):
            v = self.e.concat([x.rows for x in xs], 1, [xs[0].rows_dim, c], base)
        else:
            v = self.e.concat([self.t3(x) for x in xs], 2, [out_t.shape[0], s, c], base)
        self.new_cl(out_t, v, spatial, c)
        return True

    def _interleave(self, node, xs, c: int, spatial, base: str) -> bool:
        """Concat of ``g`` equal inputs followed by a channel shuffle of ``g`` groups (ShuffleNet
        V2): one Concat on a new last axis of the ``(N·S, C/g, 1)`` views writes the shuffled
        order directly (channel ``i·g + a`` is input ``a``'s channel ``i``), and the shuffle
        becomes free. 0.71-0.89× the time of Concat + shuffle Transpose (BENCHMARKS.md)."""
        out_t = node.outputs[0]
        nxt = single_consumer(self.graph, out_t)
        if nxt is None or out_t.name in self.keep_nchw or not g.is_op(nxt, "Reshape") \
                or nxt.inputs[0] is not out_t:
            return False
        found = self.channel_shuffle(nxt)
        grp = len(xs)
        if found is None or found[0] != grp or any(x.channels * grp != c for x in xs):
            return False
        cg, rows = c // grp, xs[0].rows_dim
        parts = [self.e.reshape(self.t2(x), [-1, cg, 1], [rows, cg, 1], f"{base}/part{i}")
                 for i, x in enumerate(xs)]
        v = self.e.concat(parts, 2, [rows, cg, grp], base + "/interleave")
        self.new_cl(out_t, self.e.reshape(v, [-1, c], [rows, c], base + "/shuffled"), spatial, c)
        self.shuffled.add(out_t.name)
        return True

    # -- contractions -----------------------------------------------------------------------

    def do_Gemm(self, node) -> bool:
        """Gemm → MatMul (+ Add); a CL flatten input permutes the weight rows."""
        a_t, b_t = node.inputs[0], node.inputs[1]
        c_t = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
        out_t = node.outputs[0]
        alpha = float(g.attr(node, "alpha", 1.0))
        beta = float(g.attr(node, "beta", 1.0))
        trans_a, trans_b = g.attr(node, "transA", 0), g.attr(node, "transB", 0)
        b = g.const_value(b_t)
        base = node.name or out_t.name
        dtype = float_dtype(out_t)
        perm = None
        if a_t.name in self.flat and not trans_a and b is not None:
            a, perm = self.flat[a_t.name]
        else:
            self.ensure_nchw(a_t)
            a = a_t
            if trans_a:
                shape = list(reversed(a_t.shape)) if a_t.shape else None
                a = self.e.transpose(a_t, [1, 0], shape, base + "/transA")
        scale_after = None
        if b is not None:
            k = b.shape[-1 if trans_b else 0] if b.ndim == 2 else None
            if perm is not None and k != perm[0] * perm[1]:
                raise InvalidModelError(
                    f"node '{node.name}' (Gemm): its input '{a_t.name}' flattens "
                    f"{perm[0]} channels × {perm[1]} positions = {perm[0] * perm[1]} values, "
                    f"but its weight '{b_t.name}' of shape {list(b.shape)} takes {k}; the "
                    f"model cannot run as declared. Fix the model at its source")
            bm = _cl_rows(b, perm, trans_b)
            if alpha != 1.0:
                bm = (np.asarray(bm, dtype=np.float64) * alpha).astype(b.dtype)
            b_in = self.e.const(f"{base}/weight", np.ascontiguousarray(bm))
        else:
            self.ensure_nchw(b_t)
            b_in = b_t
            if trans_b:
                shape = list(reversed(b_t.shape)) if b_t.shape else None
                b_in = self.e.transpose(b_t, [1, 0], shape, base + "/transB")
            scale_after = alpha if alpha != 1.0 else None
        last = c_t is None and scale_after is None
        y = self.e.op("MatMul", [a, b_in], out_t.shape, out_t.dtype, base,
                      out=out_t if last else None)
        if scale_after is not None:
            y = self.e.binary("Mul", y, self.e.const(f"{base}/alpha",
                                                     np.asarray(alpha, dtype=dtype)),
                              out_t.shape, base + "/alpha", out=out_t if c_t is None else None)
        if c_t is not None:
            _check_gemm_bias(node, c_t, out_t)
            cv = g.const_value(c_t)
            if cv is not None:
                cv2 = cv if beta == 1.0 else (np.asarray(cv, np.float64) * beta).astype(cv.dtype)
                c_in = self.e.const(f"{base}/bias", cv2)
            else:
                self.ensure_nchw(c_t)
                c_in = c_t
                if beta != 1.0:
                    c_in = self.e.binary("Mul", c_t, self.e.const(
                        f"{base}/beta", np.asarray(beta, dtype=dtype)), c_t.shape, base + "/beta")
            self.e.binary("Add", y, c_in, out_t.shape, base + "/bias", out=out_t)
        return True

    def do_MatMul(self, node) -> bool:
        a_t = node.inputs[0]
        if a_t.name not in self.flat:
            return False
        b = g.const_value(node.inputs[1])
        a, perm = self.flat[a_t.name]
        out_t = node.outputs[0]
        w = self.e.const(f"{node.name or out_t.name}/weight", _cl_rows(b, perm, False))
        self.e.op("MatMul", [a, w], out_t.shape, out_t.dtype, node.name or out_t.name,
                  out=out_t)
        return True



def _transpose2d(b: np.ndarray, tile: int = 512) -> np.ndarray:
    """``b.T`` as a contiguous array, copied tile by tile (2× faster than numpy's one-shot copy
    on classifier-sized matrices, whose strided reads thrash the cache)."""
    n, k = b.shape
    out = np.empty((k, n), dtype=b.dtype)
    for i in range(0, n, tile):
        for j in range(0, k, tile):
            out[j:j + tile, i:i + tile] = b[i:i + tile, j:j + tile].T
    return out


def _cl_rows(b: np.ndarray, perm: tuple[int, int] | None, trans: bool) -> np.ndarray:
    """Contiguous ``(K, N)`` weight (``b.T`` if ``trans``) with rows in channels-last order.

    One new array, whatever the flags: classifier weights are the largest of a CNN.

    ``perm = (C, S)`` reorders rows ``c·S + s`` to ``s·C + c`` (one transpose-copy in numpy,
    much faster than fancy indexing on 100 M-element classifier weights).
    """
    if perm is None:
        return _transpose2d(b) if trans else np.ascontiguousarray(b)
    c, s = perm
    if not trans:
        return np.ascontiguousarray(b.reshape(c, s, -1).transpose(1, 0, 2)).reshape(c * s, -1)
    # b is (N, C·S): out[s·C + c, n] = b[n, c·S + s] in one copy (a transpose then a
    # permutation would hold a third classifier-sized array), tiled over (n, c) so the strided
    # side stays in cache: VGG-11's 4096 × 25088 classifier in 0.42 s against 0.96 s before
    src = b.reshape(-1, c, s)
    out = np.empty((s, c, src.shape[0]), dtype=b.dtype)
    for i in range(0, src.shape[0], 128):
        for j in range(0, c, 32):
            out[:, j:j + 32, i:i + 128] = src[i:i + 128, j:j + 32].transpose(2, 1, 0)
    return out.reshape(s * c, -1)




def _check_gemm_bias(node, c_t, out_t) -> None:
    """Gemm's C must broadcast unidirectionally to the output ``(M, N)``
    (https://onnx.ai/onnx/operators/onnx__Gemm.html): each of its trailing dims is 1 or the
    output's. A plain Add would broadcast both ways instead (``(1, 6) + (6, 1)`` is ``(6, 6)``),
    so anything else, or a dim that matches only some batch sizes, is refused."""
    if not out_t.shape:
        return  # shapes are resolved up front; nothing to compare against
    c_shape, out_shape = list(c_t.shape or []), list(out_t.shape)
    if len(c_shape) > 2 or len(out_shape) != 2:
        raise UnsupportedOpError(node.name, node.op, FORM,
                                 f"C has rank {len(c_shape)} (at most 2, for an output of 2)")
    for c_dim, o_dim in zip(reversed(c_shape), reversed(out_shape)):
        if c_dim != 1 and c_dim != o_dim:
            raise UnsupportedOpError(
                node.name, node.op, FORM,
                f"C of shape {tuple(c_shape)} does not broadcast unidirectionally to the output "
                f"{tuple(out_shape)}, as the spec requires")
