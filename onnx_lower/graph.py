"""Thin helpers around onnx-graphsurgeon: the only module that converts to and from protobuf.

Passes edit ``gs.Graph`` objects through these helpers and never touch protobuf. The conventions:

- Activations carry their batch dimension first. Every other dimension of a tensor that a form
  lowers must be static; :func:`sample_shape` returns those dimensions or raises
  :class:`~onnx_lower.errors.DynamicShapeError`.
- Internal nodes (domain :data:`INTERNAL_DOMAIN`) carry Python payloads in ``node.attrs``; when
  the graph is exported before emission (``--dump-after``), payloads are replaced by a summary.
"""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues
from onnx_graphsurgeon.logger import G_LOGGER

from .errors import DynamicShapeError, InvalidAttributeError, InvalidModelError

__all__ = [
    "INTERNAL_DOMAIN",
    "DEFAULT_DOMAINS",
    "is_op",
    "import_graph",
    "export_model",
    "const_value",
    "constant_bytes",
    "sample_shape",
    "flag",
    "batch_dim",
    "all_graphs",
    "count_nodes",
    "op_counts",
    "attr",
    "producer",
    "is_graph_output",
    "detach",
    "detach_and_release",
    "Namer",
]

#: Domain of onnx_lower's internal nodes; none survives emission.
INTERNAL_DOMAIN = "ai.onnx_lower"
#: Spellings of ONNX's default domain (onnx-graphsurgeon reports it as None).
DEFAULT_DOMAINS = (None, "", "ai.onnx")

G_LOGGER.severity = G_LOGGER.ERROR


def is_op(node: gs.Node, *ops: str) -> bool:
    """``node`` is one of ``ops`` in the default ONNX domain."""
    return node.op in ops and node.domain in DEFAULT_DOMAINS


def import_graph(model: onnx.ModelProto) -> gs.Graph:
    """The main graph as a gs graph; its inputs and outputs must be tensors."""
    for kind, values in (("input", model.graph.input), ("output", model.graph.output)):
        for vi in values:
            which = vi.type.WhichOneof("value")
            if which not in (None, "tensor_type"):
                raise InvalidModelError(
                    f"graph {kind} '{vi.name}' has {which.removesuffix('_type')} type, not tensor; "
                    f"onnx_lower lowers models whose inputs and outputs are tensors"
                )
    graph = gs.import_onnx(model)
    # gs keeps the proto's opset list itself, which would keep the whole input proto (all its
    # weights) alive for as long as the graph lives; give it copies
    for sub in all_graphs(graph):
        if sub.import_domains is not None:
            sub.import_domains = [
                onnx.helper.make_opsetid(o.domain, o.version) for o in sub.import_domains
            ]
    return graph


#: Constants above this size are exported as placeholders and filled into the final proto.
_LARGE = 1 << 20


def export_model(
    graph: gs.Graph, like: onnx.ModelProto, *, release: bool = False
) -> onnx.ModelProto:
    """Export ``graph`` with the metadata of ``like`` (ir_version, opsets, producer, metadata).

    Internal payloads are summarised into plain attributes so the result always serialises.
    Large constants are exported as empty placeholders and their bytes written once into the
    final proto: onnx-graphsurgeon's export would otherwise hold three copies of every weight.
    With ``release=True`` (the final export) each large constant's array is dropped from the
    graph as soon as its bytes are in the proto, so weights are never held twice; the graph
    must not be used afterwards.
    """
    internal = [n for g in all_graphs(graph) for n in g.nodes if n.domain == INTERNAL_DOMAIN]
    saved = [(n, n.attrs) for n in internal]
    for n in internal:
        n.attrs = {k: _summarise(v) for k, v in n.attrs.items()}
    large = _large_constants(graph)
    for const, values in large.values():
        const.values = np.empty((0,), dtype=values.dtype)
    try:
        model = gs.export_onnx(graph, do_type_check=False)
    finally:
        for n, attrs in saved:
            n.attrs = attrs
        if not release:
            for const, values in large.values():
                const.values = values
    _fill_large(model.graph, large)
    model.ir_version = like.ir_version
    model.producer_name = like.producer_name
    model.producer_version = like.producer_version
    model.domain = like.domain
    model.model_version = like.model_version
    model.doc_string = like.doc_string
    del model.metadata_props[:]
    model.metadata_props.extend(like.metadata_props)
    del model.opset_import[:]
    model.opset_import.extend(copy.deepcopy(like.opset_import))
    if internal and not any(o.domain == INTERNAL_DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(INTERNAL_DOMAIN, 1))
    if like.ir_version < 4:  # IR < 4: every initializer must also be a graph input
        listed = {i.name for i in model.graph.input}
        for init in model.graph.initializer:
            if init.name not in listed:
                model.graph.input.append(
                    onnx.helper.make_tensor_value_info(init.name, init.data_type, init.dims)
                )
    return model


def _large_constants(graph: gs.Graph) -> dict[str, tuple[gs.Constant, np.ndarray]]:
    found: dict[str, tuple[gs.Constant, np.ndarray]] = {}
    for sub in all_graphs(graph):
        for t in sub.tensors().values():
            # LazyValues (weights imported from a proto) export without a copy: leave them
            eager = isinstance(t, gs.Constant) and isinstance(t._values, np.ndarray)
            if eager and t.name and t.values.nbytes > _LARGE:
                found[t.name] = (t, t.values)
    return found


def _fill_large(graph_proto: onnx.GraphProto, large: dict) -> None:
    from onnx import numpy_helper

    for init in graph_proto.initializer:
        if init.name in large:
            values = large[init.name][1]
            large[init.name] = (large[init.name][0], None)
            if values.dtype.kind in "biuf" and sys.byteorder == "little":
                # filled in place, the array freed before protobuf copies the bytes in: at most
                # two copies of one weight exist at a time (from_array + CopyFrom made three)
                name = init.name
                init.Clear()
                init.name = name
                init.data_type = onnx.helper.np_dtype_to_tensor_dtype(values.dtype)
                init.dims.extend(values.shape)
                data = np.ascontiguousarray(values).tobytes()
                del values
                init.raw_data = data
                del data
            else:
                init.CopyFrom(numpy_helper.from_array(values, init.name))
                del values  # the proto holds the bytes now
    for node in graph_proto.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                _fill_large(a.g, large)


def _summarise(value):
    if isinstance(value, (int, float, str, list, tuple, np.ndarray, gs.Tensor, gs.Graph)):
        return value
    summary = getattr(value, "summary", None)
    return summary() if callable(summary) else str(value)


def all_graphs(graph: gs.Graph) -> Iterator[gs.Graph]:
    """The graph, every subgraph (If/Loop/Scan bodies) at any depth, and model-local functions."""
    stack = [graph, *getattr(graph, "functions", [])]
    while stack:
        g = stack.pop(0)
        yield g
        for node in g.nodes:
            for value in node.attrs.values():
                if isinstance(value, gs.Graph):
                    stack.append(value)


def count_nodes(graph: gs.Graph) -> int:
    return sum(len(g.nodes) for g in all_graphs(graph))


def op_counts(graph: gs.Graph) -> dict[str, int]:
    counts: dict[str, int] = {}
    for g in all_graphs(graph):
        for n in g.nodes:
            key = n.op if n.domain in DEFAULT_DOMAINS else f"{n.domain}::{n.op}"
            counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def constant_bytes(graph: gs.Graph) -> int:
    """Bytes of every constant tensor (initializers and Constant values) in all graphs."""
    seen: dict[int, int] = {}
    for sub in all_graphs(graph):
        for node in sub.nodes:
            for t in node.inputs:
                if isinstance(t, gs.Constant) and id(t) not in seen:
                    seen[id(t)] = _nbytes(t)
            value = node.attrs.get("value") if is_op(node, "Constant") else None
            if isinstance(value, gs.Constant) and id(value) not in seen:
                seen[id(value)] = _nbytes(value)
    return sum(seen.values())


def gather_index_bytes(graph: gs.Graph) -> int:
    """Bytes of the constant index tensors of every Gather (the im2col form's tap tables)."""
    seen: dict[int, int] = {}
    for sub in all_graphs(graph):
        for node in sub.nodes:
            if is_op(node, "Gather") and isinstance(node.inputs[1], gs.Constant):
                seen[id(node.inputs[1])] = _nbytes(node.inputs[1])
    return sum(seen.values())


def _nbytes(t: gs.Constant) -> int:
    """Bytes of a constant from its shape and dtype, without loading lazy values."""
    return math.prod(int(d) for d in t.shape) * np.dtype(t.dtype).itemsize


def const_value(tensor: gs.Tensor) -> np.ndarray | None:
    """The value of a constant tensor (initializer or Constant node output), else None.

    A weight still lazily backed by the input proto is read without being cached on the
    tensor: a pass that replaces the weight then frees the copy it read, where the cached copy
    would stay resident beside the replacement until the old tensor leaves the graph.
    """
    if isinstance(tensor, gs.Constant):
        if isinstance(tensor._values, LazyValues):
            return np.asarray(tensor._values.load())
        return np.asarray(tensor.values)
    node = producer(tensor)
    if node is not None and is_op(node, "Constant"):
        value = node.attrs.get("value")
        if isinstance(value, gs.Constant):
            return np.asarray(value.values)
        for key, dtype in (("value_float", np.float32), ("value_int", np.int64)):
            if key in node.attrs:
                return np.asarray(node.attrs[key], dtype=dtype)
        for key, dtype in (("value_floats", np.float32), ("value_ints", np.int64)):
            if key in node.attrs:
                return np.asarray(list(node.attrs[key]), dtype=dtype)
    return None


def producer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.inputs[0] if tensor.inputs else None


def is_graph_output(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    return any(t is tensor for t in graph.outputs)


def batch_dim(tensor: gs.Tensor):
    """The first dimension (an int or a symbolic name)."""
    return tensor.shape[0] if tensor.shape else None


def sample_shape(tensor: gs.Tensor, form: str = "mlp") -> tuple[int, ...]:
    """Shape without the batch dimension; every entry must be a static int."""
    shape = tensor.shape
    if shape is None:
        raise DynamicShapeError(tensor.name, -1, "unknown rank", form)
    dims = []
    for axis, d in enumerate(shape[1:], start=1):
        if not isinstance(d, (int, np.integer)) or d < 0:
            raise DynamicShapeError(tensor.name, axis, d, form)
        dims.append(int(d))
    return tuple(dims)


def attr(node: gs.Node, name: str, default=None):
    """An attribute with its ONNX default; strings come back as ``str``."""
    value = node.attrs.get(name, default)
    if isinstance(value, bytes):
        value = value.decode()
    return value


def flag(node: gs.Node, name: str, default: int = 0) -> bool:
    """A 0/1 attribute (Gemm's transA, a pool's ceil_mode...) with its ONNX default; any other
    value is refused, naming the node and the attribute."""
    value = node.attrs.get(name, default)
    if isinstance(value, (bool, int, np.integer)) and int(value) in (0, 1):
        return bool(value)
    raise InvalidAttributeError(node.name, node.op, name, f"is {value!r}; the spec allows 0 or 1")


def detach(node: gs.Node) -> None:
    """Disconnect ``node``; ``graph.cleanup()`` later drops it."""
    node.inputs.clear()
    node.outputs.clear()


def detach_and_release(graph: gs.Graph, node: gs.Node, keep: frozenset[str] = frozenset()) -> None:
    """:func:`detach` ``node``, then empty the constants it alone read (except those named in
    ``keep``: names a subgraph reads from this graph).

    A lowering that replaces its nodes one by one would otherwise hold every old weight beside
    its new form until the pass ends and ``cleanup()`` drops them: the peak is then old + new
    weights (ResNet-50 with Winograd: 495 MB, 116 MB over the lowered model).
    """
    inputs = list(node.inputs)
    detach(node)
    outputs = {id(t) for t in graph.outputs}
    for t in inputs:
        if (isinstance(t, gs.Constant) and not t.outputs and id(t) not in outputs
                and t.name not in keep):
            t.values = np.empty((0,), dtype=t.dtype)


class Namer:
    """Deterministic fresh names: ``base``, ``base_1``, ``base_2`` … unused in the graph."""

    def __init__(self, graph: gs.Graph):
        self.used = {t for t in graph.tensors().keys()} | {n.name for n in graph.nodes}

    def __call__(self, base: str) -> str:
        name, i = base, 0
        while name in self.used:
            i += 1
            name = f"{base}_{i}"
        self.used.add(name)
        return name
