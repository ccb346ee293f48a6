"""Regions of a model: the parts ``--form auto`` lowers each in its own form.

A *region* is a maximal weakly connected set of nodes joined by the tensors they pass each
other, where the ops that every form keeps as they are do not join anything: the elementwise
ops without a MatMul/Add/Relu form
(:data:`onnx_lower.passes.activations.KEPT_ELEMENTWISE`: Sigmoid, Tanh,
Softmax, ...). Constant nodes belong to no region either; a region that reads one gets its own
copy. A CNN is one region; a model with a Sigmoid gate, a Softmax between two heads or a
non-linearity between two stacks has several.

Both forms give a region's boundary tensors their original names, layouts and shapes (the mlp
form reshapes back, the im2col form transposes back at region exits), so regions lowered apart
join by name:

* :func:`extract_region` makes a region a model of its own: its inputs are the tensors it reads
  from outside (typed from the canonical model's value_info), its outputs the tensors it writes
  for outside readers or for the graph's outputs, its initializers the ones it reads.
* :func:`merge_same_form` joins regions of one form through the kept ops between them, so the
  graph is cut only where the form changes (each cut costs a Reshape/Flatten or two Transposes).
* :func:`stitch` puts the lowered regions back: every name a lowered region made for itself is
  prefixed ``<region>/``, so no two regions collide, and the kept nodes between them stay as
  they are. The result is sorted topologically.

Splitting is refused (one region, the whole graph) when the model has functions or control
flow, whose bodies can read any tensor of the outer graph.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import onnx

from .errors import LoweringError

__all__ = ["Region", "find_regions", "splittable", "merge_same_form", "extract_region", "stitch"]


@dataclasses.dataclass
class Region:
    """Nodes ``nodes`` (indices into ``graph.node``) with their boundary tensors."""

    name: str
    nodes: list[int]
    inputs: list[str]
    outputs: list[str]


def _separators() -> frozenset[str]:
    from onnx_lower.passes.activations import KEPT_ELEMENTWISE

    return KEPT_ELEMENTWISE


def splittable(model: onnx.ModelProto) -> str | None:
    """Why ``model`` is lowered as one region (None when it may be split)."""
    if model.functions:
        return "the model has local functions"
    for node in model.graph.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for a in node.attribute):
            return f"{node.op_type} '{node.name}' has a subgraph"
    return None


def find_regions(model: onnx.ModelProto) -> list[Region]:
    """The regions of the main graph, in the order of their first node."""
    graph = model.graph
    if splittable(model) is not None:
        return [_whole(model)]
    index = _Index.of(model)
    separators = _separators()
    member = [
        n.domain in ("", "ai.onnx") and n.op_type not in separators and n.op_type != "Constant"
        for n in graph.node
    ]
    parent = list(range(len(member)))
    for i, node in enumerate(graph.node):
        if not member[i]:
            continue
        for name in node.input:
            j = index.producer.get(name)
            if j is not None and member[j]:
                parent[_root(parent, i)] = _root(parent, j)
    groups: dict[int, list[int]] = {}
    for i in range(len(member)):
        if member[i]:
            groups.setdefault(_root(parent, i), []).append(i)
    regions = [
        _boundary(graph, index, f"region{k}", idx) for k, idx in enumerate(groups.values())
    ]
    return regions or [_whole(model)]


def merge_same_form(
    model: onnx.ModelProto, regions: Sequence[Region], forms: Sequence[str]
) -> list[tuple[Region, list[int]]]:
    """Join regions of one form through the kept ops between them: only a change of form cuts.

    A kept node whose neighbouring regions (those producing its inputs or reading its outputs)
    all have one form joins them, and is lowered inside them as the whole-graph pipelines do.
    Softmax and LogSoftmax join im2col parts only (the mlp form refuses some of their axes).
    Returns each part as a region, with the indices of the regions it holds.
    """
    graph = model.graph
    index = _Index.of(model)
    owner = {i: k for k, r in enumerate(regions) for i in r.nodes}
    parent = list(range(len(regions)))
    joined: dict[int, int] = {}  # kept node -> a region it joined
    for i, node in enumerate(graph.node):
        if i in owner or node.op_type == "Constant":
            continue
        near = {owner[index.producer[t]] for t in node.input if index.producer.get(t) in owner}
        near |= {owner[j] for t in node.output for j in index.readers.get(t, []) if j in owner}
        kinds = {forms[k] for k in near}
        if len(kinds) != 1 or (kinds == {"mlp"} and node.op_type in ("Softmax", "LogSoftmax")):
            continue
        first, *rest = sorted(near)
        for k in rest:
            parent[_root(parent, k)] = _root(parent, first)
        joined[i] = first
    members: dict[int, list[int]] = {}
    for k in range(len(regions)):
        members.setdefault(_root(parent, k), []).append(k)
    parts = []
    for root, ks in members.items():
        nodes = sorted(
            [i for k in ks for i in regions[k].nodes]
            + [i for i, k in joined.items() if _root(parent, k) == root]
        )
        name = "+".join(regions[k].name for k in ks)
        parts.append((_boundary(graph, index, name, nodes), ks))
    return parts


def _root(parent: list[int], i: int) -> int:
    """The representative of ``i`` in a union-find forest (path halving on the way)."""
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


@dataclasses.dataclass
class _Index:
    """Who makes and who reads each tensor of the main graph, and which tensors are fixed.

    ``readers`` lists node indices; a graph output is read by ``-1``, i.e. from outside.
    """

    producer: dict[str, int]
    readers: dict[str, list[int]]
    constants: dict[str, onnx.NodeProto | onnx.TensorProto]

    @classmethod
    def of(cls, model: onnx.ModelProto) -> _Index:
        graph = model.graph
        producer = {t: i for i, n in enumerate(graph.node) for t in n.output if t}
        readers: dict[str, list[int]] = {}
        for i, n in enumerate(graph.node):
            for t in n.input:
                readers.setdefault(t, []).append(i)
        for o in graph.output:
            readers.setdefault(o.name, []).append(-1)
        return cls(producer, readers, _constant_outputs(model))


def _whole(model: onnx.ModelProto) -> Region:
    graph = model.graph
    return Region(
        graph.name or "main",
        list(range(len(graph.node))),
        [i.name for i in graph.input],
        [o.name for o in graph.output],
    )


def _boundary(graph: onnx.GraphProto, index: _Index, name: str, indices: list[int]) -> Region:
    """The region of nodes ``indices``: what it reads from outside, what outside reads of it."""
    inside = set(indices)
    inputs: list[str] = []
    for i in indices:
        for t in graph.node[i].input:
            made_inside = index.producer.get(t) in inside
            if t and not made_inside and t not in index.constants and t not in inputs:
                inputs.append(t)
    outputs = [
        t
        for i in indices
        for t in graph.node[i].output
        if t and any(j not in inside for j in index.readers.get(t, []))
    ]
    return Region(name, indices, inputs, outputs)


def _constant_outputs(model: onnx.ModelProto) -> dict[str, onnx.NodeProto | onnx.TensorProto]:
    """Tensors with a value fixed in the model: initializers and Constant node outputs."""
    found: dict[str, onnx.NodeProto | onnx.TensorProto] = {
        t.name: t for t in model.graph.initializer
    }
    for node in model.graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            found[node.output[0]] = node
    return found


def extract_region(model: onnx.ModelProto, region: Region) -> onnx.ModelProto:
    """``region`` as a model of its own (same opsets and IR version)."""
    graph = model.graph
    types = {v.name: v for v in (*graph.input, *graph.value_info, *graph.output)}
    missing = [t for t in (*region.inputs, *region.outputs) if t not in types]
    if missing:
        raise LoweringError(
            f"region '{region.name}' has boundary tensors without a known type "
            f"({', '.join(missing[:3])}); shape inference did not type them"
        )
    constants = _constant_outputs(model)
    nodes = [graph.node[i] for i in region.nodes]
    read = {t for n in nodes for t in n.input if t in constants}
    const_nodes = [c for t, c in constants.items() if t in read and isinstance(c, onnx.NodeProto)]
    inits = [c for t, c in constants.items() if t in read and isinstance(c, onnx.TensorProto)]
    sub = onnx.helper.make_graph(
        [*const_nodes, *nodes],
        f"{graph.name or 'main'}/{region.name}",
        [types[t] for t in region.inputs],
        [types[t] for t in region.outputs],
        initializer=inits,
    )
    out = onnx.ModelProto()
    out.ir_version = model.ir_version
    out.opset_import.extend(model.opset_import)
    out.graph.CopyFrom(sub)
    if model.ir_version < 4:  # IR < 4: every initializer is also a graph input
        out.graph.input.extend(
            onnx.helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in inits
        )
    return out


def stitch(
    model: onnx.ModelProto, regions: Sequence[Region], lowered: Sequence[onnx.ModelProto]
) -> onnx.ModelProto:
    """``model`` with each region replaced by its lowered model, sorted topologically."""
    graph = model.graph
    replaced = {i for r in regions for i in r.nodes}
    nodes = [n for i, n in enumerate(graph.node) if i not in replaced]
    inits: list[onnx.TensorProto] = []
    for region, low in zip(regions, lowered, strict=True):
        keep = {v.name for v in (*low.graph.input, *low.graph.output)}
        prefix = f"{region.name}/"

        def rename(t: str, keep=keep, prefix=prefix) -> str:
            return t if not t or t in keep else prefix + t

        for node in low.graph.node:
            node.name = prefix + node.name if node.name else node.name
            node.input[:] = [rename(t) for t in node.input]
            node.output[:] = [rename(t) for t in node.output]
            nodes.append(node)
        for init in low.graph.initializer:
            init.name = rename(init.name)
            inits.append(init)
    read = {t for n in nodes for t in n.input} | {o.name for o in graph.output}
    inits.extend(t for t in graph.initializer if t.name in read)
    read_const = {t for n in nodes if n.op_type != "Constant" for t in n.input}
    read_const |= {o.name for o in graph.output}
    nodes = [n for n in nodes if n.op_type != "Constant" or n.output[0] in read_const]
    out = onnx.ModelProto()
    for field in ("ir_version", "producer_name", "producer_version", "domain", "model_version",
                  "doc_string"):
        setattr(out, field, getattr(model, field))
    out.opset_import.extend(model.opset_import)
    out.metadata_props.extend(model.metadata_props)
    init_names = {t.name for t in graph.initializer}
    out.graph.name = graph.name
    out.graph.doc_string = graph.doc_string
    out.graph.input.extend(i for i in graph.input if i.name not in init_names)
    out.graph.output.extend(graph.output)
    out.graph.node.extend(_toposort(nodes, {i.name for i in out.graph.input}, inits))
    out.graph.initializer.extend(inits)
    if model.ir_version < 4:
        out.graph.input.extend(
            onnx.helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in inits
        )
    return out


def _toposort(
    nodes: list[onnx.NodeProto], inputs: set[str], inits: list[onnx.TensorProto]
) -> list[onnx.NodeProto]:
    """Kahn's order, stable in the given order; a cycle or a dangling read is a bug."""
    ready = set(inputs) | {t.name for t in inits} | {""}
    done: list[onnx.NodeProto] = []
    pending = list(nodes)
    while pending:
        rest = []
        for n in pending:
            if all(t in ready for t in n.input):
                ready.update(n.output)
                done.append(n)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            missing = sorted({t for n in rest for t in n.input if t not in ready})
            raise LoweringError(
                f"stitching the lowered regions left reads of unknown tensors "
                f"({', '.join(missing[:3])}); this is a bug in onnx_lower"
            )
        pending = rest
    return done
