"""A static batch ``N > 1`` through a reader that writes window equations for sample 0 only.

Math. Conv, MaxPool and BatchNormalization act on each sample alone:
``f(x)[n] = f(x[n:n+1])[0]``. So ``y = f(x)`` for ``x[N, ...]`` equals
``Concat_0(f(x_0), …, f(x_{N−1}))`` with ``x_n = x[n:n+1]`` (``Split`` along axis 0 into ``N``
parts of 1, https://onnx.ai/onnx/operators/onnx__Split.html). Every clone keeps the node's
weights (one shared initializer) and attributes, so the equations written are ``N`` times those
of one sample: what the batch costs, with no dense matrix.

``split_batch`` covers any node whose profile rule fails on ``batch 1`` only through the batch
(Conv, MaxPool, BatchNormalization for Marabou: maraboupy's ``convEquations`` and
``maxpoolEquations`` index ``inVars[0]``, ``batchNorm`` reshapes the whole tensor per channel).
Where the input is already split (a ``Concat`` along axis 0 of ``N`` single samples, maybe
behind a unary elementwise op such as the Tanh between a Conv and a pool) the parts are reused
(the unary op cloned per part), so a chain of such nodes is split once.

How the split is written, per opset (Split changed at 13 and 18), and what maraboupy 2.0's
``splitEquations`` reads of it (``Split_18.eval(x, split=<the 'split' attribute>, axis)``):

* opset < 13: the ``split = [1]*N`` attribute, read as ``N`` parts ``[1, ...]``;
* opset ≥ 13 (``split`` an input) or ≥ 18 (``num_outputs``): the reader passes ``split=None``,
  gets ``x`` itself back, and takes part ``n`` as ``x[n]``, the sample *without* its batch
  axis. Each part is therefore read through a ``Reshape`` to ``[1, ...]``: an identity for
  onnxruntime, the missing axis restored for maraboupy.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnx_lower import graph as g
from onnx_lower.targets import PREDICATES

from .common import Context, constant, extra_outputs_read, replace, variable

__all__ = ["split_batch", "SAMPLEWISE_UNARY"]

SAMPLEWISE_UNARY = frozenset({"Relu", "Tanh", "Sigmoid", "LeakyRelu", "Identity"})


def _static_batch(t: gs.Tensor) -> int | None:
    shape = t.shape
    if shape is None or not shape or not all(isinstance(d, (int, np.integer)) for d in shape):
        return None
    return int(shape[0])


def _one(shape) -> list[int]:
    return [1, *[int(d) for d in shape[1:]]]


def _parts_of(x: gs.Tensor, n: int, ctx: Context, made: list[gs.Node],
              depth: int = 0) -> list[gs.Tensor] | None:
    """``x`` as ``n`` single-sample tensors already in the graph (or built from them), else None."""
    node = g.producer(x)
    if node is None or depth > 8:
        return None
    if g.is_op(node, "Concat") and int(node.attrs.get("axis", 0)) == 0 \
            and len(node.inputs) == n and all(_static_batch(t) == 1 for t in node.inputs):
        return list(node.inputs)
    if node.op in SAMPLEWISE_UNARY and len(node.outputs) == 1:
        inner = _parts_of(node.inputs[0], n, ctx, made, depth + 1)
        return None if inner is None else _per_sample(node, inner, x, ctx, made)
    return None


def _per_sample(node: gs.Node, parts: list, y, ctx, made: list[gs.Node]) -> list:
    """One clone of ``node`` per sample in ``parts`` (its other inputs shared), each writing a
    single-sample slice of ``y``; the clones go to ``made``, their outputs are returned."""
    outs = []
    for i, part in enumerate(parts):
        out = variable(ctx, f"{y.name}_s{i}", y, _one(y.shape))
        made.append(gs.Node(node.op, ctx.namer(f"{node.name}_s{i}"), dict(node.attrs),
                            [part, *node.inputs[1:]], [out]))
        outs.append(out)
    return outs


def _split(x: gs.Tensor, n: int, ctx: Context, made: list[gs.Node]) -> list[gs.Tensor] | None:
    """``Split(x, axis 0)`` into ``n`` samples, in the form of the model's opset (see above)."""
    if not ctx.accepts_op("Split") or not ctx.accepts_op("Reshape"):
        return None
    raw = [variable(ctx, f"{x.name}_split{i}", x, _one(x.shape)) for i in range(n)]
    inputs, attrs = [x], {"axis": 0}
    if ctx.opset < 13:
        attrs["split"] = [1] * n
    elif ctx.opset < 18:
        inputs.append(constant(ctx, "target_split", np.ones(n, np.int64)))
    else:
        attrs["num_outputs"] = n
    made.append(gs.Node("Split", ctx.namer("target_split"), attrs, inputs, raw))
    if ctx.opset < 13:
        return raw
    shape = constant(ctx, "target_sample_shape", np.asarray(_one(x.shape), np.int64))
    parts = []
    for i, t in enumerate(raw):
        out = variable(ctx, f"{x.name}_sample{i}", x, _one(x.shape))
        made.append(gs.Node("Reshape", ctx.namer("target_sample"), {}, [t, shape], [out]))
        parts.append(out)
    return parts


def split_batch(node: gs.Node, graph: gs.Graph, ctx: Context) -> str | None:
    rule = ctx.profile.rule(node.op)
    if rule is None or "batch 1" not in rule.requires:
        return None  # the batch is not what the reader gets wrong
    x, y = node.inputs[0], node.outputs[0]
    n = _static_batch(x)
    if n is None or n <= 1 or PREDICATES["batch 1"](node) or _static_batch(y) != n:
        return None
    if extra_outputs_read(node, graph) or not ctx.accepts_op("Concat"):
        return None  # a second output (MaxPool indices, BatchNorm statistics) is read
    if any(g.const_value(t) is None for t in node.inputs[1:] if t.name):
        return None  # only the data input is per sample
    before = g.producer(x)
    if before is not None and ctx.profile.check(before) is not None:
        return None  # its producer is rewritten first; its samples are then reused
    if not ctx.accepts_op("Split") and _parts_of(x, n, ctx, []) is None:
        return None
    while len(node.outputs) > 1:  # unread
        node.outputs.pop()
    made: list[gs.Node] = []
    parts = _parts_of(x, n, ctx, made)
    reused = parts is not None
    if parts is None:
        made = []
        parts = _split(x, n, ctx, made)
        if parts is None:
            return None
    outs = _per_sample(node, parts, y, ctx, made)
    made.append(gs.Node("Concat", ctx.namer(f"{node.name}_batch"), {"axis": 0}, outs, [y]))
    replace(graph, node, made)
    how = "the split samples before it" if reused else "Split along the batch"
    return f"{n} per-sample {node.op}s (one shared weight) on {how}, Concat back"
