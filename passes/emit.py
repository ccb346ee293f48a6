"""Emission: internal Affine nodes become ONNX MatMul/Add on flat vectors.

Each Affine node ``y = Σ_i A_i · x_i + c`` (see :mod:`onnx_lower.affine`) is emitted as

    x_i' = Flatten(x_i, axis=1)                 (skipped when x_i is already (N, n))
    y'   = Σ_i MatMul(x_i', W_i) + c            (W_i = A_iᵀ, dense (in, out), model dtype)
    y    = Reshape(y', [-1, *out_shape])        (skipped when y is (N, m))

A whole-tensor Affine (``whole=True``, see :mod:`onnx_lower.passes.sample_axis`) reads the whole
tensor as one flat vector and writes the full shape:

    x_i' = Flatten(x_i, axis=0)                 (1, |x_i|); skipped when x_i is already (1, n)
    y    = Reshape(y', out_shape)               skipped when out_shape is (1, m)

An identity term (a Reshape folded to nothing, or the skip of a residual block) adds ``x_i'``
directly without a MatMul. A sum of MatMuls is used rather than one MatMul over a Concat of the
inputs: both store the same weight bytes, and Concat is not part of the mlp form.

Before anything is densified, :class:`EmitAffinePass` adds up the bytes every dense ``W_i`` will
take and refuses with :class:`~onnx_lower.errors.BudgetExceededError` when they exceed
``options.max_weight_bytes``, naming the largest layer; no matrix is allocated first.

:class:`FlattenRegionsPass` then removes the layout round trips emission leaves between Affine
nodes, using that elementwise ops commute with reshapes:

    Flatten(Reshape(z))            -> z            (z is (N, m) and the Flatten gives (N, m);
                                                    Flatten(axis=0) when z is (1, m))
    f(Reshape(z)) for elementwise f -> Reshape(f(z))

so a lowered region reads ``Flatten → MatMul/Add/Relu … → Reshape``.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from onnx_lower import graph as g
from onnx_lower.affine import affine_of, emitted_bytes, is_affine, is_identity, to_dense
from onnx_lower.errors import BudgetExceededError, LoweringError, UnsupportedOpError
from onnx_lower.pass_manager import GraphPass, LoweringModel, PassResult, register_pass

__all__ = ["EmitAffinePass", "FlattenRegionsPass", "SHAPE_AGNOSTIC_OPS"]

#: Elementwise unary ops whose result does not depend on the tensor's shape: a Reshape can move
#: across them. (Softmax and LogSoftmax depend on the axis, so they are not here.)
SHAPE_AGNOSTIC_OPS = frozenset(
    {
        "Relu", "Sigmoid", "Tanh", "Sign", "Selu", "Elu", "Exp", "Log", "Softplus", "Softsign",
        "Erf", "Neg", "Abs", "LeakyRelu", "HardSigmoid", "Clip", "Sqrt", "Reciprocal", "Floor",
        "Ceil", "Round", "Cos", "Sin", "Identity", "Celu", "ThresholdedRelu", "HardSwish",
        "Mish", "Gelu", "Cast",
    }
)  # fmt: skip


@register_pass("emit-affine")
class EmitAffinePass(GraphPass):
    """Turn Affine nodes into Flatten/MatMul/Add/Reshape with dense float weights."""

    def run(self, model: LoweringModel) -> PassResult:
        layers = [
            (n, emitted_bytes(n))
            for graph in g.all_graphs(model.graph)
            for n in graph.nodes
            if is_affine(n)
        ]
        total = sum(b for _, b in layers)
        budget = model.options.max_weight_bytes
        if layers and total > budget:
            node, worst = max(layers, key=lambda nb: nb[1])
            raise BudgetExceededError(affine_of(node).label(node.name), worst, budget, total)
        model.notes["emitted_weight_bytes"] = total
        model.notes["emitted_matmuls"] = sum(
            sum(not is_identity(t) for t in affine_of(n).terms) for n, _ in layers
        )
        return super().run(model)

    def ensures(self, model: LoweringModel) -> None:
        """No internal node survives emission, in any graph."""
        left = [
            n.name
            for graph in g.all_graphs(model.graph)
            for n in graph.nodes
            if n.domain == g.INTERNAL_DOMAIN
        ]
        if left:
            raise LoweringError(
                f"internal nodes are left after emit-affine: {', '.join(left[:3])}"
            )

    def run_on_graph(self, graph: gs.Graph, model: LoweringModel) -> bool:
        nodes = [n for n in graph.nodes if is_affine(n)]
        if not nodes:
            return False
        namer = g.Namer(graph)
        flat_cache: dict[int, gs.Tensor] = {}
        for node in nodes:
            self._emit(graph, node, namer, flat_cache)
        graph.toposort()
        return True

    def _emit(self, graph: gs.Graph, node: gs.Node, namer: g.Namer, flat_cache: dict) -> None:
        amap = affine_of(node)
        out = node.outputs[0]
        dtype = np.dtype(out.dtype or np.float32)
        if dtype.kind != "f":
            raise LoweringError(f"Affine node '{node.name}' has non-float output dtype {dtype}")
        if not node.inputs:
            raise LoweringError(f"Affine node '{node.name}' reads no activation")
        if 0 in amap.out_shape:  # Reshape(y', [-1, 0, ...]) cannot infer the batch
            raise UnsupportedOpError(
                node.name, "Affine", "mlp",
                f"its output '{out.name}' has the zero-size "
                f"{'whole-tensor' if amap.whole else 'per-sample'} shape "
                f"{list(amap.out_shape)}", "Use --form im2col, which keeps the op as it is",
            )
        whole = amap.whole
        batch, m = (1 if whole else g.batch_dim(out)), amap.out_size
        base = node.name or out.name
        new_nodes: list[gs.Node] = []

        def add_node(op: str, inputs: list, suffix: str, shape, attrs=None, output=None):
            y = output or gs.Variable(namer(f"{base}/{suffix}"), dtype=dtype, shape=shape)
            new_nodes.append(gs.Node(op, namer(f"{base}/{op}"), attrs or {}, inputs, [y]))
            return y

        def flat(x: gs.Tensor) -> gs.Tensor:
            if x.shape is not None and len(x.shape) == 2 and (not whole or x.shape[0] == 1):
                return x
            key = (id(x), whole)
            if key not in flat_cache:
                size = math.prod(int(d) for d in x.shape) if whole else _size(x)
                y = gs.Variable(namer(f"{x.name}/flat"), dtype=x.dtype, shape=[batch, size])
                axis = 0 if whole else 1
                flatten = gs.Node("Flatten", namer(f"{x.name}/Flatten"), {"axis": axis}, [x], [y])
                graph.nodes.append(flatten)
                flat_cache[key] = y
            return flat_cache[key]

        parts: list[gs.Tensor] = []
        for i, (x, a) in enumerate(zip(node.inputs, amap.terms)):
            if is_identity(a):
                parts.append(flat(x))
            else:
                w = gs.Constant(namer(f"{base}/W{i}"), to_dense(a, dtype))
                parts.append(add_node("MatMul", [flat(x), w], f"MatMul{i}", [batch, m]))
        if amap.bias is not None:
            parts.append(gs.Constant(namer(f"{base}/bias"), amap.bias.astype(dtype)))
        acc = parts[0]
        for j, term in enumerate(parts[1:]):
            acc = add_node("Add", [acc, term], f"Add{j}", [batch, m])
        g.detach(node)
        graph.nodes.remove(node)
        flat_out = amap.out_shape == (1, m) if whole else len(amap.out_shape) == 1
        if flat_out and new_nodes and new_nodes[-1].outputs[0] is acc:
            new_nodes[-1].outputs[0] = out  # the last MatMul/Add writes the Affine's tensor
        else:  # restore the logical shape (or, for a bare identity, copy under the new name)
            target = list(amap.out_shape) if whole else [-1, *amap.out_shape]
            shape = gs.Constant(namer(f"{base}/shape"), np.array(target, np.int64))
            add_node("Reshape", [acc, shape], "Reshape", None, output=out)
        graph.nodes.extend(new_nodes)


def _size(t: gs.Tensor) -> int:
    return math.prod(int(d) for d in t.shape[1:])


@register_pass("flatten-regions")
class FlattenRegionsPass(GraphPass):
    """Cancel Reshape/Flatten round trips between lowered layers, moving reshapes past Relu."""

    def run_on_graph(self, graph: gs.Graph, model: LoweringModel) -> bool:
        modified, changed = False, True
        namer = g.Namer(graph)
        while changed:
            changed = False
            for node in list(graph.nodes):
                if not node.outputs or not node.inputs:
                    continue
                if self._cancel(graph, node) or self._sink(graph, node, namer):
                    changed = modified = True
        if modified:
            graph.cleanup(remove_unused_graph_inputs=False)
            graph.toposort()
        return modified

    @staticmethod
    def _flat_source(t: gs.Tensor) -> gs.Tensor | None:
        """``z`` when ``t = Reshape(z)`` and ``z`` is a flat ``(N, m)`` tensor."""
        p = g.producer(t)
        if p is None or not g.is_op(p, "Reshape"):
            return None
        z = p.inputs[0]
        if z.shape is None or len(z.shape) != 2 or t.shape is None:
            return None
        if not isinstance(z.shape[1], (int, np.integer)):
            return None
        return z

    def _cancel(self, graph: gs.Graph, node: gs.Node) -> bool:
        axis = g.attr(node, "axis", 1) if g.is_op(node, "Flatten") else None
        if axis not in (0, 1) and not g.is_op(node, "Reshape"):
            return False
        out = node.outputs[0]
        if out.shape is None or len(out.shape) != 2 or g.is_graph_output(graph, out):
            return False
        z = self._flat_source(node.inputs[0])
        if z is None or z.shape[1] != out.shape[1]:
            return False
        if axis == 0 and not (z.shape[0] == 1 and out.shape[0] == 1):
            return False  # Flatten(axis=0) gives (1, m): z must be one whole-tensor vector
        for consumer in list(out.outputs):
            for k, t in enumerate(consumer.inputs):
                if t is out:
                    consumer.inputs[k] = z
        g.detach(node)
        return True

    def _sink(self, graph: gs.Graph, node: gs.Node, namer: g.Namer) -> bool:
        if not (g.is_op(node, *SHAPE_AGNOSTIC_OPS) and len(node.outputs) == 1):
            return False
        if any(g.const_value(t) is None for t in node.inputs[1:] if t.name):
            return False  # Clip with activation bounds etc.
        x = node.inputs[0]
        z = self._flat_source(x)
        if z is None:
            return False
        reshape = g.producer(x)
        out = node.outputs[0]
        flat_out = gs.Variable(namer(f"{out.name}/flat"), dtype=out.dtype, shape=list(z.shape))
        node.inputs[0] = z
        node.outputs[0] = flat_out
        shape = reshape.inputs[1]
        name = namer(f"{node.name}/Reshape")
        graph.nodes.append(gs.Node("Reshape", name, inputs=[flat_out, shape], outputs=[out]))
        return True
