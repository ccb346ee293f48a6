"""Pass ``lower-im2col``: the driver that walks a graph and dispatches each node to its family.

``Lowering`` is one graph's rewrite: :class:`.layout.LayoutCore` owns the layout state (which
tensors have a channels-last form, region entries and exits), and one mixin per family handles its
ops: :class:`.layout.LayoutOps` (aliases, Transpose, Pad), :class:`.conv.ConvOps`,
:class:`.grouped.GroupedOps` and :class:`.winograd.WinogradOps` (convs), :class:`.pools.PoolOps`,
:class:`.elementwise.ElementwiseOps`. A node is handled by its family's ``do_<Op>`` (or the
elementwise ``unary``/``binary``) when that returns True; otherwise it keeps its original layout
(its inputs are converted back), and a node in :data:`.ops.LOWERED_OPS` left that way is refused
with the reason.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnx_lower import graph as g
from onnx_lower.errors import UnsupportedOpError
from onnx_lower.pass_manager import GraphPass, LoweringModel, register_pass

from ..canonicalize import WINDOW_OPS, check_window_node
from .conv import ConvOps
from .elementwise import ElementwiseOps
from .fold import Im2colFold
from .grouped import GroupedOps
from .layout import LayoutCore, LayoutOps, names_used_by_subgraphs_of
from .ops import ELEMENTWISE_BINARY, ELEMENTWISE_UNARY, FORM, LOWERED_OPS, REFUSED
from .pools import PoolOps
from .winograd import WinogradOps

__all__ = ["LowerIm2col", "Lowering"]


def _refusal_reason(node: gs.Node) -> str:
    """Why a conv/pool/BN node was not lowered: a non-float input, else an unknown shape."""
    x = node.inputs[0]
    if x.dtype is not None and np.dtype(x.dtype).kind != "f":
        dtype = np.dtype(x.dtype)
        return f"its input '{x.name}' has type {dtype}; only float activations are lowered"
    return "its input needs a known rank >= 3 and static non-batch dimensions"



class Lowering(LayoutOps, ConvOps, GroupedOps, WinogradOps, PoolOps, ElementwiseOps,
               LayoutCore):
    """One graph's rewrite into channels-last regions (see :mod:`onnx_lower.passes.im2col`)."""

    def run(self) -> bool:
        changed = False
        captured = frozenset(n for node in self.graph.nodes for v in node.attrs.values()
                             if isinstance(v, gs.Graph) for n in names_used_by_subgraphs_of(v))
        for node in list(self.graph.nodes):
            if not node.outputs and not node.inputs:
                continue
            if node.domain not in g.DEFAULT_DOMAINS:
                self.generic(node)
                continue
            if node.op in REFUSED:
                raise UnsupportedOpError(node.name, node.op, FORM, "it has no im2col lowering")
            if node.op in WINDOW_OPS:
                check_window_node(node)  # whatever the pass list: refuse out-of-spec attributes
            handler = getattr(self, f"do_{node.op}", None)
            done = False
            if handler is not None:
                done = handler(node)
            elif node.op in ELEMENTWISE_UNARY:
                done = self.unary(node)
            elif node.op in ELEMENTWISE_BINARY:
                done = self.binary(node)
            if done:
                changed = True
                g.detach_and_release(self.graph, node, captured)
            else:
                if node.op in LOWERED_OPS:
                    raise UnsupportedOpError(node.name, node.op, FORM, _refusal_reason(node))
                self.generic(node)
        for t in self.graph.outputs:
            self.ensure_nchw(t)
        return changed

    def generic(self, node: gs.Node) -> None:
        """A node that needs its inputs in their original layout (also those its subgraphs
        read from this graph)."""
        for t in node.inputs:
            if isinstance(t, gs.Variable) and t.name:
                self.ensure_nchw(t)
        captured = {n for v in node.attrs.values() if isinstance(v, gs.Graph)
                    for n in names_used_by_subgraphs_of(v)}
        for name in sorted(captured & set(self.originals)):
            self.ensure_nchw(self.originals[name])


@register_pass("lower-im2col")
class LowerIm2col(GraphPass):
    """Lower Conv, ConvTranspose, pools and BatchNormalization to Gather + MatMul on (N, S, C)."""

    def run_on_graph(self, graph: gs.Graph, model: LoweringModel) -> bool:
        folded = Im2colFold().run_on_graph(graph, model)
        changed = Lowering(graph, model).run()
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return bool(folded or changed)

    def ensures(self, model: LoweringModel) -> None:
        for graph in g.all_graphs(model.graph):
            for node in graph.nodes:
                if g.is_op(node, *LOWERED_OPS):
                    raise UnsupportedOpError(node.name, node.op, FORM, "it was left in the graph")
