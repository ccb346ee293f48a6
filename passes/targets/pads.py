"""Padding rewrites: Pad folded or expressed exactly; padded MaxPool as an unpadded one.

``fold_pad``
    ``Conv(Pad(x, p))`` = ``Conv(x)`` with ``pads += p`` when ``Pad`` is constant-mode, pads
    with 0, pads only spatial axes by amounts >= 0 (https://onnx.ai/onnx/operators/onnx__Pad.html:
    mode defaults to "constant", constant_value to 0): a Conv's own pads are zeros too. Same for
    ``AveragePool`` with ``count_include_pad = 1`` and no ``ceil_mode`` (its divisor is then the
    whole kernel, as after an explicit Pad). Every reader of the Pad must take it.
``pad_as_conv``
    A zero Pad that cannot be folded becomes a 1×1 Conv with identity weights and those pads:
    the Conv's padding is exact zeros.
``maxpool_zero_pad``
    MaxPool pads with −inf (https://onnx.ai/onnx/operators/onnx__MaxPool.html). Over an input
    that is provably >= 0 (a Relu output, through sign-keeping ops), padding with 0 gives the same
    maximum as long as every window holds one real tap (pads < kernel; a ceil_mode window starts
    inside the input or its left padding). So ``MaxPool(x, pads, ceil_mode)`` =
    ``MaxPool(identity_conv(x, pads + extra), pads = 0)``, where ``extra`` end padding makes the
    floor-mode output as long as the ceil-mode one.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnx_lower import graph as g
from onnx_lower.windows import output_extent

from .common import (
    Context,
    extra_outputs_read,
    identity_conv,
    ints,
    nonnegative,
    pool_window,
    replace,
    static_spatial,
    variable,
)

__all__ = ["fold_pad", "pad_as_conv", "maxpool_zero_pad", "spatial_zero_pads"]


def spatial_zero_pads(node: gs.Node, opset: int) -> list[int] | None:
    """A 4-D (or 3-D) Pad's spatial pads (begins, ends) if it pads with zeros only there."""
    if g.attr(node, "mode", "constant") != "constant":
        return None
    if opset >= 11:
        if len(node.inputs) > 3 and node.inputs[3].name:
            return None  # explicit axes (opset 18): not handled
        pads = g.const_value(node.inputs[1]) if len(node.inputs) > 1 else None
        value = g.const_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name \
            else np.zeros(1)
    else:
        pads = np.asarray(ints(node, "pads"))
        value = np.asarray(node.attrs.get("value", 0.0))
    if pads is None or value is None or np.any(value != 0):
        return None
    pads = [int(p) for p in np.asarray(pads).reshape(-1)]
    rank = len(pads) // 2
    if rank < 3 or any(p < 0 for p in pads):
        return None
    begins, ends = pads[:rank], pads[rank:]
    if any(begins[:2]) or any(ends[:2]):
        return None
    return begins[2:] + ends[2:]


def _takes_pads(reader: gs.Node) -> bool:
    if g.attr(reader, "auto_pad", "NOTSET") != "NOTSET":
        return False
    if g.is_op(reader, "Conv"):
        return True
    if g.is_op(reader, "AveragePool"):
        include = int(reader.attrs.get("count_include_pad", 0)) == 1
        include = include or not any(ints(reader, "pads"))
        return include and int(reader.attrs.get("ceil_mode", 0)) == 0
    return False


def fold_pad(node: gs.Node, graph: gs.Graph, ctx: Context) -> str | None:
    pads = spatial_zero_pads(node, ctx.opset)
    out = node.outputs[0]
    readers = list(out.outputs)
    if pads is None or not readers or g.is_graph_output(graph, out):
        return None
    if not all(_takes_pads(r) and r.inputs[0] is out for r in readers):
        return None
    for r in readers:
        rank = len(pads) // 2
        own = ints(r, "pads", [0] * (2 * rank))
        r.attrs["pads"] = [a + b for a, b in zip(own, pads, strict=True)]
        if g.is_op(r, "AveragePool"):
            r.attrs["count_include_pad"] = 1
        r.inputs[0] = node.inputs[0]
    g.detach(node)
    names = ", ".join(f"{r.op} '{r.name}'" for r in readers)
    if not any(pads):
        return f"removed (pads nothing; {names} reads its input)"
    return f"pads {pads} folded into {names}"


def pad_as_conv(node: gs.Node, graph: gs.Graph, ctx: Context) -> str | None:
    pads = spatial_zero_pads(node, ctx.opset)
    x = node.inputs[0]
    if pads is None or not ctx.accepts_op("Conv") or static_spatial(x) is None:
        return None
    replace(graph, node, [identity_conv(ctx, x, pads, node.outputs[0])])
    return f"identity 1×1 Conv with pads {pads}"


def maxpool_zero_pad(node: gs.Node, graph: gs.Graph, ctx: Context) -> str | None:
    x, y = node.inputs[0], node.outputs[0]
    spatial = static_spatial(x)
    explicit = g.attr(node, "auto_pad", "NOTSET") == "NOTSET"
    if spatial is None or not ctx.accepts_op("Conv") or not explicit:
        return None
    if extra_outputs_read(node, graph):
        return None  # the Indices output is read
    rank = len(spatial)
    kernel, strides, dilations, pads, ceil = pool_window(node)
    if any(d != 1 for d in dilations) or not (any(pads) or ceil):
        return None
    if any(p >= k for p, k in zip(pads, kernel + kernel, strict=True)) or not nonnegative(x):
        return None
    extra = []
    for n, k, s, b, e in zip(spatial, kernel, strides, pads[:rank], pads[rank:], strict=True):
        out = output_extent(n, k, s, 1, b, e, ceil)
        extra.append(max(0, (out - 1) * s + k - (n + b + e)))
    padded = pads[:rank] + [e + x_ for e, x_ in zip(pads[rank:], extra, strict=True)]
    shape = list(x.shape[:2]) + [n + b + e for n, b, e in
                                 zip(spatial, padded[:rank], padded[rank:], strict=True)]
    mid = variable(ctx, f"{x.name}_zero_padded", x, shape)
    conv = identity_conv(ctx, x, padded, mid)
    attrs = dict(node.attrs)
    attrs.update(pads=[0] * (2 * rank), ceil_mode=0)
    pool = gs.Node("MaxPool", ctx.namer(node.name or "maxpool"), attrs, [mid], [y])
    replace(graph, node, [conv, pool])
    return (f"identity 1×1 Conv with zero pads {padded} (input proven >= 0) + unpadded MaxPool"
            + (" (ceil_mode as end padding)" if ceil else ""))
