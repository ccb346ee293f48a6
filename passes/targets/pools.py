"""Average pools as convolutions with fixed weights.

``AveragePool(x)`` with kernel ``K`` (``|K|`` taps), strides, pads, dilations and either no
pads or ``count_include_pad = 1`` (https://onnx.ai/onnx/operators/onnx__AveragePool.html:
count_include_pad defaults to 0) and no ``ceil_mode`` divides every window sum by ``|K|``, so
it equals ``Conv(x, W)`` with the same window attributes and

* ``W[c, 0] = 1/|K|``, ``group = C`` (depthwise) where the profile reads grouped Convs;
* ``W[c, c'] = [c == c'] / |K|``, ``group = 1`` (block weights) where it does not.

``GlobalAveragePool`` is the same with ``K`` the whole spatial extent.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnx_lower import graph as g

from .common import Context, constant, ints, replace, static_spatial

__all__ = ["avgpool_as_conv"]


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
