"""Graph building for the im2col form: fresh names, shared small constants, opset-aware ops.

:class:`Emitter` appends nodes to a graph; Pad, Slice and ReduceSum take attributes before
opsets 11/10/13 and inputs from then on, and every helper emits the form valid for the model's
opset. Constants of at most 16 elements are shared by value.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnx_lower import graph as g

from . import cost

__all__ = ["Emitter", "float_dtype", "is_static"]


class Emitter:
    """Appends nodes to a graph with fresh names, in ops valid for the model's opset."""

    def __init__(self, graph: gs.Graph, opset: int):
        self.graph, self.opset = graph, opset
        self.namer = g.Namer(graph)
        self.consts: dict[tuple, gs.Constant] = {}

    def const(self, base: str, value: np.ndarray) -> gs.Constant:
        value = np.ascontiguousarray(value)
        key = None
        if value.size <= 16:
            key = (value.dtype.str, value.shape, value.tobytes())
            if key in self.consts:
                return self.consts[key]
        c = gs.Constant(self.namer(base), value)
        if key is not None:
            self.consts[key] = c
        return c

    def ints(self, base: str, values) -> gs.Constant:
        return self.const(base, np.asarray(values, dtype=np.int64))

    def op(self, op: str, inputs, shape, dtype, base: str, attrs=None,
           out: gs.Variable | None = None) -> gs.Variable:
        if out is None:
            out = gs.Variable(self.namer(base), dtype=dtype,
                              shape=None if shape is None else list(shape))
        node = gs.Node(op, self.namer(base + "/" + op), dict(attrs or {}), list(inputs), [out])
        self.graph.nodes.append(node)
        return out

    # -- ops ----------------------------------------------------------------------------------

    def reshape(self, x, shape, out_shape, base, out=None):
        return self.op("Reshape", [x, self.ints(base + "/shape", shape)], out_shape, x.dtype,
                       base, out=out)

    def transpose(self, x, perm, out_shape, base, out=None):
        return self.op("Transpose", [x], out_shape, x.dtype, base, {"perm": list(perm)}, out=out)

    def gather(self, x, indices, out_shape, base, axis=1):
        idx = self.const(base + "/taps", np.asarray(indices, dtype=cost.INDEX_DTYPE))
        return self.op("Gather", [x, idx], out_shape, x.dtype, base, {"axis": axis})

    def pad(self, x, pads, out_shape, base, mode: str = "constant"):
        """Zero padding, or ``mode="edge"`` (repeat the border value); ONNX ``pads`` layout: all
        begins, then all ends."""
        pads = [int(p) for p in pads]
        if self.opset >= 11:
            attrs = {} if mode == "constant" else {"mode": mode}
            return self.op("Pad", [x, self.ints(base + "/pads", pads)], out_shape, x.dtype, base,
                           attrs)
        attrs = {"mode": mode, "pads": pads}
        if mode == "constant":
            attrs["value"] = 0.0
        return self.op("Pad", [x], out_shape, x.dtype, base, attrs)

    def slice(self, x, starts, ends, axes, out_shape, base, steps=None):
        """``steps`` (opset >= 10 only) other than all ones add the steps input."""
        if self.opset >= 10:
            inputs = [x, self.ints(base + "/starts", starts), self.ints(base + "/ends", ends),
                      self.ints(base + "/axes", axes)]
            if steps is not None and any(int(v) != 1 for v in steps):
                inputs.append(self.ints(base + "/steps", steps))
            return self.op("Slice", inputs, out_shape, x.dtype, base)
        if steps is not None and any(int(v) != 1 for v in steps):
            raise ValueError("Slice steps need opset 10")
        return self.op("Slice", [x], out_shape, x.dtype, base,
                       {"starts": list(starts), "ends": list(ends), "axes": list(axes)})

    def reduce_sum(self, x, axes, keepdims, out_shape, base):
        if self.opset >= 13:
            return self.op("ReduceSum", [x, self.ints(base + "/axes", axes)], out_shape, x.dtype,
                           base, {"keepdims": int(keepdims)})
        return self.op("ReduceSum", [x], out_shape, x.dtype, base,
                       {"axes": list(axes), "keepdims": int(keepdims)})

    def binary(self, op, a, b, out_shape, base, out=None):
        dtype = a.dtype if isinstance(a, gs.Variable) else b.dtype
        return self.op(op, [a, b], out_shape, dtype, base, out=out)

    def unary(self, op, x, out_shape, base):
        return self.op(op, [x], out_shape, x.dtype, base)

    def concat(self, xs, axis, out_shape, base):
        return self.op("Concat", list(xs), out_shape, xs[0].dtype, base, {"axis": axis})


def float_dtype(t: gs.Tensor) -> np.dtype:
    dtype = np.dtype(t.dtype) if t.dtype is not None else np.dtype(np.float32)
    return dtype if dtype.kind == "f" else np.dtype(np.float32)


def is_static(shape) -> bool:
    return shape is not None and all(isinstance(d, (int, np.integer)) and d >= 0 for d in shape)

