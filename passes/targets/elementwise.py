"""Elementwise and shape ops rewritten into the forms a reader takes.

``div_as_mul``          ``Div(x, c)`` = ``Mul(x, 1/c)`` for a constant ``c`` (float64, cast once)
``sub_as_add``          ``Sub(x, c)`` = ``Add(x, −c)``
``mul_as_batchnorm``    ``Mul(x, c)`` with ``c`` one value per channel (broadcast over
                        ``x[N, C, ...]``) = ``BatchNormalization(x, scale = c, B = 0, mean = 0,
                        var = 1, epsilon = 0)`` (https://onnx.ai/onnx/operators/
                        onnx__BatchNormalization.html: ``y = scale·(x − mean)/sqrt(var + eps)
                        + B``); ``Mul(c, x)`` is first turned round
``shape_as_reshape``    Squeeze / Unsqueeze / a Reshape with 0 ("copy") entries = a Reshape to
                        the inferred output shape (a dynamic batch as −1)
``batchnorm_epsilon``   ``BatchNormalization`` with its ``epsilon`` written out (the spec default
                        1e-5 where absent; maraboupy's ``batchNorm`` adds ``None`` otherwise)
``batchnorm_as_affine`` ``BatchNormalization`` (inference) folded into the Conv / Gemm before
                        it when that is its only reader (``W' = s·W``, ``b' = s·b + t``), else
                        ``Mul(x, s) + Add(·, t)`` per channel, with ``s = scale/sqrt(var + eps)``,
                        ``t = B − mean·s``
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnx_lower import graph as g

from .common import Context, constant, replace, variable

__all__ = [
    "div_as_mul",
    "sub_as_add",
    "mul_as_batchnorm",
    "shape_as_reshape",
    "batchnorm_epsilon",
    "batchnorm_as_affine",
]

#: https://onnx.ai/onnx/operators/onnx__BatchNormalization.html: epsilon defaults to 1e-5
BN_EPSILON = 1e-5


def _const_operand(node: gs.Node) -> tuple[gs.Tensor, np.ndarray] | None:
    x, c = node.inputs[:2]
    value = g.const_value(c)
    if value is None or g.const_value(x) is not None or x.shape is None:
        return None
    if np.broadcast_shapes(tuple(value.shape), tuple(1 if not isinstance(d, int) else d
                                                      for d in x.shape)) != tuple(
            1 if not isinstance(d, int) else d for d in x.shape):
        return None  # the constant would broadcast the data
    return x, value


def _as(node: gs.Node, op: str, value: np.ndarray, ctx: Context) -> None:
    x = node.inputs[0]
    node.op = op
    node.inputs[1] = constant(ctx, f"{node.name}_c", value.astype(np.dtype(x.dtype)))


def div_as_mul(node: gs.Node, graph: gs.Graph, ctx: Context) -> str | None:
    found = _const_operand(node)
    if found is None or not ctx.accepts_op("Mul") or np.any(found[1] == 0):
        return None
    _as(node, "Mul", 1.0 / found[1].astype(np.float64), ctx)
    return "Mul by the reciprocal"


def sub_as_add(node: gs.Node, graph: gs.Graph, ctx: Context) -> str | None:
    found = _const_operand(node)
    if found is None or not ctx.accepts_op("Add"):
        return None
    _as(node, "Add", -found[1].astype(np.float64), ctx)
    return "Add of the negated constant"


def _per_channel(x: gs.Tensor, value: np.ndarray) -> np.ndarray | None:
    """``value`` as one number per channel of ``x[N, C, ...]``, if it broadcasts that way."""
    shape = x.shape
    if shape is None or len(shape) < 2 or not isinstance(shape[1], int):
        return None
    channels = shape[1]
    v = value.reshape((1,) * (len(shape) - value.ndim) + value.shape)
    if any(d != 1 for i, d in enumerate(v.shape) if i != 1):
        return None
    return np.broadcast_to(v.reshape(-1), (channels,)).copy()


def mul_as_batchnorm(node: gs.Node, graph: gs.Graph, ctx: Context) -> str | None:
    a, b = node.inputs[:2]
    if g.const_value(a) is not None and g.const_value(b) is None:
        node.inputs[0], node.inputs[1] = b, a
        if ctx.profile.accepts(node):
            return "Mul with its operands turned round"
    x, c = node.inputs[:2]
    value = g.const_value(c)
    if value is None or g.const_value(x) is not None or not ctx.accepts_op("BatchNormalization"):
        return None
    scale = _per_channel(x, value)
    if scale is None:
        return None
    dtype = np.dtype(x.dtype)
    zeros = np.zeros_like(scale, dtype)
    ins = [x, constant(ctx, "target_scale", scale.astype(dtype)), constant(ctx, "target_b", zeros),
           constant(ctx, "target_mean", zeros), constant(ctx, "target_var", np.ones_like(zeros))]
    bn = gs.Node("BatchNormalization", ctx.namer(node.name or "mul"), {"epsilon": 0.0}, ins,
                 [node.outputs[0]])
    replace(graph, node, [bn])
    return "per-channel BatchNormalization (scale = c, var = 1, epsilon = 0)"


def shape_as_reshape(node: gs.Node, graph: gs.Graph, ctx: Context) -> str | None:
    y = node.outputs[0]
    if y.shape is None or not ctx.accepts_op("Reshape"):
        return None
    target = [int(d) if isinstance(d, (int, np.integer)) else -1 for d in y.shape]
    if target.count(-1) > 1:
        return None
    shape = constant(ctx, "target_shape", np.asarray(target, np.int64))
    reshape = gs.Node("Reshape", ctx.namer(node.name or "reshape"), {}, [node.inputs[0], shape],
                      [y])
    replace(graph, node, [reshape])
    return f"Reshape to {target}"


def batchnorm_epsilon(node: gs.Node, graph: gs.Graph, ctx: Context) -> str | None:
    rule = ctx.profile.rule(node.op)
    if "epsilon" in node.attrs or rule is None or "epsilon explicit" not in rule.requires:
        return None
    node.attrs["epsilon"] = BN_EPSILON
    return f"the same node with epsilon = {BN_EPSILON} (the spec default) written out"


def batchnorm_as_affine(node: gs.Node, graph: gs.Graph, ctx: Context) -> str | None:
    x, y = node.inputs[0], node.outputs[0]
    params = [g.const_value(t) for t in node.inputs[1:5]]
    if any(p is None for p in params) or x.shape is None or len(x.shape) < 2:
        return None
    scale, bias, mean, var = (p.astype(np.float64).reshape(-1) for p in params)
    s = scale / np.sqrt(var + float(node.attrs.get("epsilon", BN_EPSILON)))
    t = bias - mean * s
    dtype = np.dtype(x.dtype)
    prev = g.producer(x)
    if (prev is not None and g.is_op(prev, "Conv", "Gemm") and len(x.outputs) == 1
            and not g.is_graph_output(graph, x) and _fold_into(prev, s, t, ctx)):
        prev.outputs[0] = y
        g.detach(node)
        return f"folded into {prev.op} '{prev.name}'"
    if not (ctx.accepts_op("Mul") and ctx.accepts_op("Add")):
        return None
    shape = (-1,) + (1,) * (len(x.shape) - 2)
    mid = variable(ctx, f"{x.name}_scaled", x, x.shape)
    mul = gs.Node("Mul", ctx.namer("target_bn_mul"), {},
                  [x, constant(ctx, "target_bn_s", s.reshape(shape).astype(dtype))], [mid])
    add = gs.Node("Add", ctx.namer("target_bn_add"), {},
                  [mid, constant(ctx, "target_bn_t", t.reshape(shape).astype(dtype))], [y])
    replace(graph, node, [mul, add])
    return "per-channel Mul + Add"


def _fold_into(prev: gs.Node, s: np.ndarray, t: np.ndarray, ctx: Context) -> bool:
    """Scale ``prev``'s output channels by ``s`` and shift by ``t`` in its weights."""
    w = g.const_value(prev.inputs[1])
    if w is None:
        return False
    dtype = w.dtype
    has_bias = len(prev.inputs) > 2 and prev.inputs[2].name
    b = g.const_value(prev.inputs[2]) if has_bias else np.zeros(len(s))
    if b is None:
        return False
    w64 = w.astype(np.float64)
    if g.is_op(prev, "Conv"):
        w64 = w64 * s.reshape((-1,) + (1,) * (w.ndim - 1))
    else:
        if int(prev.attrs.get("transA", 0)) or b.size not in (1, len(s)):
            return False
        alpha, beta = float(prev.attrs.get("alpha", 1.0)), float(prev.attrs.get("beta", 1.0))
        w64 = w64 * alpha * (s[:, None] if int(prev.attrs.get("transB", 0)) else s[None, :])
        b = np.broadcast_to(b.reshape(-1) * beta, s.shape)
        prev.attrs["alpha"], prev.attrs["beta"] = 1.0, 1.0
    new_b = b.astype(np.float64).reshape(-1) * s + t
    prev.inputs[1] = constant(ctx, f"{prev.inputs[1].name}_bn", w64.astype(dtype))
    bias = constant(ctx, f"{prev.name}_bn_b", new_b.astype(dtype))
    if has_bias:
        prev.inputs[2] = bias
    else:
        prev.inputs.append(bias)
    return True
