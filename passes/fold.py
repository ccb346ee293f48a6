"""Cost-aware folding of chains of Affine nodes.

An Affine producer ``P: u = Σ_j B_j · x_j + b`` whose output feeds only Affine consumers
``C: y = A_k · u + Σ_{i≠k} A_i · v_i + c`` is substituted into each of them:

    y = Σ_j (A_k B_j) · x_j + Σ_{i≠k} A_i · v_i + (A_k b + c)

and terms that read the same tensor merge (see :func:`onnx_lower.affine.compose`).

Folding pays when the emitted dense weights do not grow. With dense sizes ``|M| = rows × cols``
(identity terms are free, emission adds them without a MatMul) the pass folds ``P`` into all its
consumers ``C_1 … C_r`` exactly when

    Σ_r |C_r'|  ≤  |P| + Σ_r |C_r|

which for one consumer and one term is ``m·p ≤ m·n + n·p``. The sizes are known from shapes, so
the decision is taken before any product is computed, and every accepted fold lowers (or keeps)
the total: folding can never make a model's emitted weights larger than not folding.

Folding never crosses a nonlinearity: only Affine → Affine edges are candidates. A producer
whose output is a graph output, or is read by any non-Affine node, is left alone. Products are
computed in float64 (scipy.sparse); the cast to the model's dtype happens once, at emission.
The pass runs to a fixed point.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from onnx_lower import graph as g
from onnx_lower.affine import AffineMap, affine_of, compose, emitted_bytes, is_affine, is_identity
from onnx_lower.pass_manager import GraphPass, LoweringModel, register_pass
from onnx_lower.passes import sample_axis

__all__ = ["FoldLinearPass", "fold_gain"]


def _dense(amap: AffineMap) -> int:
    return amap.dense_elements


def _composed_dense(consumer: AffineMap, inputs, out: gs.Tensor, producer: AffineMap, p_inputs):
    """Dense elements of ``consumer`` after substituting ``producer`` for ``out``, from shapes.

    A composed term ``A_k·B_j`` stays an identity (free) only when both factors are identities
    and it does not merge with another term.
    """
    m = consumer.out_size
    via = [a for t, a in zip(inputs, consumer.terms) if t is out]
    through_identity = len(via) == 1 and is_identity(via[0])
    cols: dict[int, tuple[int, bool]] = {}
    for t, a in zip(inputs, consumer.terms):
        if t is not out:
            cols[id(t)] = (a.shape[1], is_identity(a))
    for t, b in zip(p_inputs, producer.terms):
        merged = id(t) in cols
        cols[id(t)] = (b.shape[1], not merged and through_identity and is_identity(b))
    return sum(0 if ident else n * m for n, ident in cols.values())


def fold_gain(producer_node: gs.Node, graph: gs.Graph) -> int | None:
    """Dense elements saved by folding ``producer_node`` into its consumers, or None if it can't.

    A gain of 0 still folds: the same weights, one MatMul fewer.
    """
    out = producer_node.outputs[0]
    consumers = _unique(out.outputs)
    if not consumers or g.is_graph_output(graph, out):
        return None
    if not all(is_affine(c) for c in consumers):
        return None
    p = affine_of(producer_node)
    before = _dense(p) + sum(_dense(affine_of(c)) for c in consumers)
    after = sum(
        _composed_dense(affine_of(c), c.inputs, out, p, producer_node.inputs) for c in consumers
    )
    return before - after


@register_pass("fold-linear")
class FoldLinearPass(GraphPass):
    """Fold chains of Affine nodes where the dense weights do not grow."""

    def run_on_graph(self, graph: gs.Graph, model: LoweringModel) -> bool:
        # one vector space for every map: once one Affine is whole-tensor, all become so
        sample_axis.promote(graph)
        before = _stats(graph)
        modified, changed = False, True
        while changed:
            changed = False
            graph.toposort()
            for node in list(graph.nodes):
                if not is_affine(node) or not node.outputs:
                    continue
                gain = fold_gain(node, graph)
                if gain is None or gain < 0:
                    continue
                self._fold(graph, node)
                changed = modified = True
        if modified:
            graph.cleanup(remove_unused_graph_inputs=False)
            after = _stats(graph)
            model.note("fold", {"graph": graph.name, "before": before, "after": after})
        return modified

    @staticmethod
    def _fold(graph: gs.Graph, producer: gs.Node) -> None:
        out = producer.outputs[0]
        p = affine_of(producer)
        for consumer in _unique(out.outputs):
            amap, inputs = affine_of(consumer), list(consumer.inputs)
            while any(t is out for t in inputs):
                k = next(i for i, t in enumerate(inputs) if t is out)
                amap, inputs = compose(amap, inputs, k, p, producer.inputs)
            consumer.attrs["affine"] = amap
            consumer.inputs.clear()
            consumer.inputs.extend(inputs)
        g.detach(producer)
        graph.nodes.remove(producer)


def _unique(nodes) -> list[gs.Node]:
    """Nodes without repeats (gs nodes are unhashable), in order."""
    seen: dict[int, gs.Node] = {}
    for n in nodes:
        seen.setdefault(id(n), n)
    return list(seen.values())


def _stats(graph: gs.Graph) -> dict[str, int]:
    nodes = [n for n in graph.nodes if is_affine(n)]
    maps = [affine_of(n) for n in nodes]
    return {
        "affine_nodes": len(maps),
        "matmuls": sum(not is_identity(t) for m in maps for t in m.terms),
        "dense_elements": sum(m.dense_elements for m in maps),
        "bytes": sum(emitted_bytes(n) for n in nodes),
    }
