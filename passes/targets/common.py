"""Helpers shared by the target rewrites: building nodes and proving facts about tensors.

A rewrite is a function ``(node, graph, ctx) -> str | None``: it replaces ``node`` by nodes
that compute the same function and returns what the node became (for the report), or returns
None and leaves the graph as it was (the reason it does not apply is then the profile rule the
node still breaks). ``ctx`` carries the profile and a name generator.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import onnx_graphsurgeon as gs

from onnx_lower import graph as g
from onnx_lower.targets import Profile
from onnx_lower.windows import window_attributes

__all__ = [
    "Context",
    "Rewrite",
    "constant",
    "variable",
    "replace",
    "nonnegative",
    "identity_conv",
    "static_spatial",
    "ints",
    "extra_outputs_read",
]


@dataclasses.dataclass
class Context:
    profile: Profile
    namer: g.Namer
    opset: int

    def accepts_op(self, op: str, *, group: bool = False) -> bool:
        """The profile reads ``op`` (and, with ``group``, a grouped Conv)."""
        rule = self.profile.rule(op)
        if rule is None:
            return False
        return not group or "group == 1" not in rule.requires


Rewrite = Callable[[gs.Node, gs.Graph, Context], "str | None"]


def ints(node: gs.Node, name: str, default: list[int] | None = None) -> list[int]:
    value = node.attrs.get(name)
    return [int(v) for v in value] if value is not None else list(default or [])


def constant(ctx: Context, base: str, value: np.ndarray) -> gs.Constant:
    return gs.Constant(ctx.namer(base), np.ascontiguousarray(value))


def variable(ctx: Context, base: str, like: gs.Tensor, shape) -> gs.Variable:
    return gs.Variable(ctx.namer(base), dtype=like.dtype, shape=list(shape) if shape else None)


def replace(graph: gs.Graph, node: gs.Node, nodes: list[gs.Node]) -> None:
    """Put ``nodes`` (already wired to ``node``'s outputs) in place of ``node``."""
    outputs = list(node.outputs)
    g.detach(node)
    graph.nodes.extend(nodes)
    assert all(t.inputs for t in outputs), "a rewrite left an output without a producer"


def static_spatial(t: gs.Tensor) -> list[int] | None:
    """The static dims after (N, C), or None."""
    shape = t.shape
    if shape is None or len(shape) < 3:
        return None
    dims = shape[1:]
    if not all(isinstance(d, (int, np.integer)) and d > 0 for d in dims):
        return None
    return [int(d) for d in shape[2:]]


_KEEPS_SIGN = frozenset({
    "MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Dropout",
    "Concat", "GlobalMaxPool",
})  # fmt: skip


def nonnegative(t: gs.Tensor, depth: int = 0) -> bool:
    """Provably ``t >= 0`` everywhere: a Relu output, through ops that keep the sign."""
    node = g.producer(t)
    if node is None or depth > 50:
        return False
    if g.is_op(node, "Relu", "Sigmoid", "Softplus", "Abs"):
        return True
    if node.op in _KEEPS_SIGN:
        data = [x for x in node.inputs if g.const_value(x) is None]
        return bool(data) and all(nonnegative(x, depth + 1) for x in data)
    return False


def extra_outputs_read(node: gs.Node, graph: gs.Graph) -> bool:
    """An output after the first (MaxPool Indices, BatchNorm statistics) is read by a node or
    is a graph output, so a rewrite of the first output alone would lose it."""
    return any(t.outputs or g.is_graph_output(graph, t) for t in node.outputs[1:])


def identity_conv(ctx: Context, x: gs.Tensor, pads: list[int], out: gs.Tensor) -> gs.Node:
    """``out = x`` zero-padded by ``pads`` (begins, ends), as a 1×1 Conv with identity weights.

    With groups the weight is ``[C, 1, 1, 1]`` of ones and ``group = C``; without, the dense
    ``[C, C, 1, 1]`` identity (every output channel reads its own input channel).
    """
    channels = int(x.shape[1])
    dtype = np.dtype(x.dtype)
    rank = len(x.shape) - 2
    if ctx.accepts_op("Conv", group=True):
        weight = np.ones((channels, 1) + (1,) * rank, dtype)
        group = channels
    else:
        weight = np.eye(channels, dtype=dtype).reshape((channels, channels) + (1,) * rank)
        group = 1
    attrs = {
        "kernel_shape": [1] * rank, "strides": [1] * rank, "dilations": [1] * rank,
        "pads": [int(p) for p in pads], "group": group,
    }  # fmt: skip
    return gs.Node(
        "Conv", ctx.namer("target_pad"), attrs, [x, constant(ctx, "target_pad_w", weight)], [out]
    )


def pool_window(node: gs.Node) -> tuple[list[int], list[int], list[int], list[int], bool]:
    """A pool's ``kernel, strides, dilations, pads`` (lists the caller may change) and
    ``ceil_mode``, from the one validated reader :func:`onnx_lower.windows.window_attributes`
    (spec defaults filled in)."""
    wa = window_attributes(node)
    return list(wa.kernel), list(wa.strides), list(wa.dilations), list(wa.pads), wa.ceil_mode
