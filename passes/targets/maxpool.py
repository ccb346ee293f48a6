"""MaxPool as Conv + Relu layers, for readers without MaxPool that cut the graph at each Relu.

    max(a, b) = relu(a − b) + relu(b) − relu(−b)

(DNNV's ReluifyMaxPool identity: 3 ReLUs per pairwise max, and no path skips a Relu, unlike
``b + relu(a − b)``, so a reader that cuts the graph into one chain at each Relu, like nnenum,
reads it.) A window of ``K`` taps is a tournament of ``ceil(log2 K)`` levels, each a Conv
followed by a Relu, and one last 1×1 Conv:

* level 1: a ``k×k`` depthwise Conv (``group = C``, same strides/dilations) whose ``3·P``
  output channels per input channel are ``a − b, b, −b`` of each of the ``P`` tap pairs;
* level ``l > 1``: a depthwise 1×1 Conv mapping the previous ``3·P`` Relu outputs to the next
  pairs' ``a − b, b, −b``, where each candidate is ``r₀ + r₁ − r₂`` of its pair;
* last: a depthwise 1×1 Conv giving each channel's ``r₀ + r₁ − r₂``.

An odd candidate out plays against itself (``max(b, b) = b``). Pads are −inf in MaxPool
(https://onnx.ai/onnx/operators/onnx__MaxPool.html); a Conv pads with zeros, which is the same
only over a provably nonnegative input (then ``ceil_mode`` becomes extra end padding, as in
:func:`~onnx_lower.passes.targets.pads.maxpool_zero_pad`). A signed, padded MaxPool is left
for the mlp fallback.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnx_lower import graph as g
from onnx_lower.windows import output_extent

from .common import (
    Context,
    constant,
    extra_outputs_read,
    nonnegative,
    pool_window,
    replace,
    static_spatial,
    variable,
)

__all__ = ["maxpool_as_relu_layers"]


def _pairs(cands: np.ndarray) -> np.ndarray:
    """Rows ``a − b, b, −b`` for each pair of candidate rows (an odd last one plays itself)."""
    if len(cands) % 2:
        cands = np.vstack([cands, cands[-1:]])
    a, b = cands[0::2], cands[1::2]
    return np.stack([a - b, b, -b], axis=1).reshape(-1, cands.shape[1])


def _winners(n_pairs: int) -> np.ndarray:
    """Candidate rows over ``3·n_pairs`` Relu outputs: ``r₀ + r₁ − r₂`` of each pair."""
    out = np.zeros((n_pairs, 3 * n_pairs))
    j = np.arange(n_pairs)
    out[j, 3 * j], out[j, 3 * j + 1], out[j, 3 * j + 2] = 1, 1, -1
    return out


def maxpool_as_relu_layers(node: gs.Node, graph: gs.Graph, ctx: Context) -> str | None:
    x, y = node.inputs[0], node.outputs[0]
    spatial = static_spatial(x)
    usable = ctx.accepts_op("Conv", group=True) and ctx.accepts_op("Relu")
    if spatial is None or not usable or ctx.profile.rule("MaxPool") is not None:
        return None
    if g.attr(node, "auto_pad", "NOTSET") != "NOTSET" or extra_outputs_read(node, graph):
        return None
    rank = len(spatial)
    kernel, strides, dilations, pads, ceil = pool_window(node)
    if any(pads) or ceil:
        if not nonnegative(x) or any(p >= k for p, k in zip(pads, kernel + kernel, strict=True)):
            return None
        for i, (n, k, s, d) in enumerate(zip(spatial, kernel, strides, dilations, strict=True)):
            out = output_extent(n, k, s, d, pads[i], pads[rank + i], ceil)
            need = (out - 1) * s + (k - 1) * d + 1 - (n + pads[i] + pads[rank + i])
            pads[rank + i] += max(0, need)
    channels = int(x.shape[1])
    taps = int(np.prod(kernel))
    dtype = np.dtype(x.dtype)
    rows = _pairs(np.eye(taps))  # level 1 over the taps
    nodes, src, level = [], x, 0
    base = node.name or "maxpool"
    while True:
        level += 1
        n_rows = rows.shape[0]
        if level == 1:
            weight = np.tile(rows.reshape(n_rows, 1, *kernel), (channels, 1) + (1,) * rank)
            attrs = {"kernel_shape": kernel, "strides": strides, "dilations": dilations,
                     "pads": pads, "group": channels}
        else:
            weight = np.tile(rows.reshape(n_rows, rows.shape[1], *([1] * rank)),
                             (channels, 1) + (1,) * rank)
            attrs = {"kernel_shape": [1] * rank, "group": channels}
        pre = variable(ctx, f"{base}_level{level}", x, None)
        nodes.append(gs.Node("Conv", ctx.namer(f"{base}_level{level}"), attrs,
                             [src, constant(ctx, f"{base}_w{level}", weight.astype(dtype))], [pre]))
        act = variable(ctx, f"{base}_relu{level}", x, None)
        nodes.append(gs.Node("Relu", ctx.namer(f"{base}_relu{level}"), {}, [pre], [act]))
        src = act
        cands = _winners(n_rows // 3)
        if len(cands) == 1:
            break
        rows = _pairs(cands)
    last = np.tile(cands.reshape(1, -1, *([1] * rank)), (channels, 1) + (1,) * rank)
    nodes.append(gs.Node("Conv", ctx.namer(f"{base}_max"), {"kernel_shape": [1] * rank,
                                                              "group": channels},
                         [src, constant(ctx, f"{base}_wmax", last.astype(dtype))], [y]))
    replace(graph, node, nodes)
    return (f"{level} depthwise Conv + Relu tournament levels and a 1×1 Conv "
            f"(max(a, b) = relu(a − b) + relu(b) − relu(−b), {taps} taps)")
