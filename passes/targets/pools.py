"""Average pools as convolutions with fixed weights.

``AveragePool(x)`` with kernel ``K`` (``|K|`` taps), strides, pads, dilations and either no
pads or ``count_include_pad = 1`` (https://onnx.ai/onnx/operators/onnx__AveragePool.html:
count_include_pad defaults to 0) and no ``ceil_mode`` divides every window sum by ``|K|``, so
it equals ``Conv(x, W)`` with the same window attributes and

* ``W[c, 0] = 1/|K|``, ``group = C`` (depthwise) where the profile reads grouped Convs;
* ``W[c, c'] = [c == c'] / |K|``, ``group = 1`` (block weights) where it does not.

``GlobalAveragePool`` is the same with ``K`` the whole spatial extent.

Cheapest form: a reader without groups (Marabou) writes one equation term per weight, zeros
included, so the block weights cost ``|y|·C·|K|`` terms. When the pool's output only flows
through Flatten/Reshape into a Gemm/MatMul with constant weights (:func:`linear_tail`), the pool
folded into that layer costs ``|x|·n_out`` terms; if that is fewer, the rewrite declines and the
mlp fallback lowers the region pool → … → Gemm, which folds it into one matrix.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnx_lower import graph as g

from .common import Context, constant, ints, replace, static_spatial

__all__ = ["avgpool_as_conv", "linear_tail"]

_RESHAPES = ("Flatten", "Reshape")


def linear_tail(node: gs.Node, graph: gs.Graph) -> list[gs.Node]:
    """The nodes after ``node`` up to a Gemm/MatMul with a constant weight, through
    Flatten/Reshape, each the only reader of the one before (empty if there is none)."""
    tail, cur = [], node
    while True:
        out = cur.outputs[0]
        if len(out.outputs) != 1 or g.is_graph_output(graph, out):
            return []
        nxt = out.outputs[0]
        if g.is_op(nxt, *_RESHAPES):
            tail.append(nxt)
        elif g.is_op(nxt, "Gemm", "MatMul") and nxt.inputs[0] is out \
                and g.const_value(nxt.inputs[1]) is not None:
            return [*tail, nxt]
        else:
            return []
        cur = nxt


def _fold_is_cheaper(node: gs.Node, graph: gs.Graph, conv_terms: int) -> bool:
    tail = linear_tail(node, graph)
    if not tail:
        return False
    y = tail[-1].outputs[0]
    if y.shape is None or not all(isinstance(d, int) for d in y.shape[1:]):
        return False
    x_elems = int(np.prod(node.inputs[0].shape[1:]))
    return x_elems * int(np.prod(y.shape[1:])) < conv_terms


def avgpool_as_conv(node: gs.Node, graph: gs.Graph, ctx: Context) -> str | None:
    x = node.inputs[0]
    spatial = static_spatial(x)
    if spatial is None or not ctx.accepts_op("Conv"):
        return None
    rank = len(spatial)
    if g.is_op(node, "GlobalAveragePool"):
        kernel, strides, pads, dilations = spatial, [1] * rank, [0] * (2 * rank), [1] * rank
    else:
        if g.attr(node, "auto_pad", "NOTSET") != "NOTSET" or int(node.attrs.get("ceil_mode", 0)):
            return None
        kernel = ints(node, "kernel_shape")
        strides = ints(node, "strides", [1] * rank)
        pads = ints(node, "pads", [0] * (2 * rank))
        dilations = ints(node, "dilations", [1] * rank)
        if any(pads) and int(node.attrs.get("count_include_pad", 0)) != 1:
            return None
    channels = int(x.shape[1])
    taps = int(np.prod(kernel))
    dtype = np.dtype(x.dtype)
    grouped = ctx.accepts_op("Conv", group=True)
    out_elems = int(np.prod(node.outputs[0].shape[1:])) if node.outputs[0].shape else 0
    if not grouped and _fold_is_cheaper(node, graph, out_elems * channels * taps):
        return None  # the mlp fallback folds it into the Gemm/MatMul after it
    if grouped:
        weight = np.full((channels, 1, *kernel), 1.0 / taps, dtype)
    else:
        eye = np.eye(channels).reshape((channels, channels) + (1,) * rank)
        weight = (np.broadcast_to(eye, (channels, channels, *kernel)) / taps).astype(dtype)
    attrs = {"kernel_shape": kernel, "strides": strides, "pads": pads, "dilations": dilations,
             "group": channels if grouped else 1}
    conv = gs.Node("Conv", ctx.namer(node.name or "avgpool"), attrs,
                   [x, constant(ctx, f"{node.name}_w", weight)], [node.outputs[0]])
    replace(graph, node, [conv])
    kind = "depthwise" if grouped else "group=1 block-diagonal"
    return f"Conv with fixed {kind} weights 1/{taps} (kernel {kernel})"
