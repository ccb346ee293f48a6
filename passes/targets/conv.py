"""Convolutions brought inside a reader that takes only plain 2-D, ungrouped, undilated Convs.

``conv_as_2d``
    A 1-D Conv on ``x[N, C, L]`` is the 2-D Conv of ``x`` reshaped to ``[N, C, L, 1]`` with
    kernel ``[k, 1]``, strides ``[s, 1]``, dilations ``[d, 1]``, pads ``[b, 0, e, 0]``, reshaped
    back to ``[N, M, L']`` (the batch as -1).
``conv_ungroup``
    A Conv with ``group = G`` is the ungrouped Conv with the block-diagonal weight
    ``W'[m, c] = W[m, c - g·C/G]`` for ``c`` in output ``m``'s group ``g``, zero elsewhere.
``conv_undilate``
    A dilated kernel equals the undilated kernel of extent ``(k − 1)·d + 1`` with zeros between
    the taps (https://onnx.ai/onnx/operators/onnx__Conv.html: dilations default to 1).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnx_lower import graph as g

from .common import Context, constant, ints, replace, variable

__all__ = ["conv_as_2d", "conv_ungroup", "conv_undilate"]


def _reshape(ctx: Context, x: gs.Tensor, shape: list, out: gs.Tensor | None = None):
    target = [-1 if not isinstance(d, (int, np.integer)) else int(d) for d in shape]
    if target.count(-1) > 1:
        return None, None
    out = out or variable(ctx, f"{x.name}_as", x, shape)
    node = gs.Node("Reshape", ctx.namer("target_reshape"), {},
                   [x, constant(ctx, "target_shape", np.asarray(target, np.int64))], [out])
    return node, out


def conv_as_2d(node: gs.Node, graph: gs.Graph, ctx: Context) -> str | None:
    x, w, y = node.inputs[0], node.inputs[1], node.outputs[0]
    weight = g.const_value(w)
    if x.shape is None or len(x.shape) != 3 or weight is None or y.shape is None:
        return None
    if g.attr(node, "auto_pad", "NOTSET") != "NOTSET":
        return None
    pads = ints(node, "pads", [0, 0])
    attrs = dict(node.attrs)
    attrs.update(
        kernel_shape=[int(weight.shape[2]), 1],
        strides=ints(node, "strides", [1]) + [1],
        dilations=ints(node, "dilations", [1]) + [1],
        pads=[pads[0], 0, pads[1], 0],
    )
    before, x4 = _reshape(ctx, x, list(x.shape) + [1])
    if before is None:
        return None
    y4 = variable(ctx, f"{y.name}_2d", y, list(y.shape) + [1])
    inputs = [x4, constant(ctx, f"{w.name}_2d", weight[..., None])] + list(node.inputs[2:])
    conv = gs.Node("Conv", ctx.namer(node.name or "conv"), attrs, inputs, [y4])
    after, _ = _reshape(ctx, y4, list(y.shape), out=y)
    replace(graph, node, [before, conv, after])
    return "Reshape to 4-D + 2-D Conv with kernel [k, 1] + Reshape back"


def conv_ungroup(node: gs.Node, graph: gs.Graph, ctx: Context) -> str | None:
    groups = int(node.attrs.get("group", 1))
    weight = g.const_value(node.inputs[1])
    if groups == 1 or weight is None:
        return None
    m, cg = weight.shape[:2]
    mg = m // groups
    full = np.zeros((m, cg * groups, *weight.shape[2:]), weight.dtype)
    rows = np.arange(m)
    block = rows // mg
    cols = block[:, None] * cg + np.arange(cg)[None, :]
    full[rows[:, None], cols] = weight
    node.inputs[1] = constant(ctx, f"{node.inputs[1].name}_ungrouped", full)
    node.attrs["group"] = 1
    return f"ungrouped Conv with block-diagonal weights (group {groups} -> 1)"


def conv_undilate(node: gs.Node, graph: gs.Graph, ctx: Context) -> str | None:
    weight = g.const_value(node.inputs[1])
    dilations = ints(node, "dilations")
    if weight is None or all(d == 1 for d in dilations):
        return None
    kernel = weight.shape[2:]
    extent = [(k - 1) * d + 1 for k, d in zip(kernel, dilations, strict=True)]
    full = np.zeros(weight.shape[:2] + tuple(extent), weight.dtype)
    index = (slice(None), slice(None)) + tuple(slice(None, None, d) for d in dilations)
    full[index] = weight
    node.inputs[1] = constant(ctx, f"{node.inputs[1].name}_undilated", full)
    node.attrs["dilations"] = [1] * len(dilations)
    node.attrs["kernel_shape"] = extent
    return f"undilated Conv with zero-filled kernel {extent} (dilations {dilations} -> 1)"
