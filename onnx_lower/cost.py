"""What a model costs: weight bytes, multiply-accumulates (MACs) and ReLU neurons, from shapes.

MACs count one multiply-add per weight use:

- Conv: ``N · M · Π out_spatial · (C / group) · Π kernel``; ConvTranspose the same, counted
  from the input side;
- MatMul/Gemm: ``Π batch dims · M · K · N``;
- pools, elementwise ops and data movement count 0 (they are not contractions).

The ratio between the original's and the lowered model's MACs is the arithmetic a lowering costs.

Neurons (:func:`count_neurons`) are what a verifier's cost grows with (each one may be split
into cases); they are counted per sample (a dynamic batch dimension taken as 1), as output
elements of the nodes in the main graph (subgraphs are not counted):

- ``relu``: elements of every ``Relu`` output. In a lowered mlp model this is every
  nonlinearity there is: MaxPool pairwise maxima and the Relus LeakyRelu/PRelu/Clip/Abs/Max/Min
  were rewritten into all show up here.
- ``max``: elements of every MaxPool / GlobalMaxPool / ReduceMax output of the original. Each is
  one many-input max (a native max constraint for tools that have one); an exact ReLU encoding
  of a window of ``K`` taps needs at least ``K − 1`` pairwise maxima, fewer per output when
  windows overlap (see :mod:`onnx_lower.passes.pool_max`).
- ``piecewise``: elements of the other piecewise-linear activations of the original (LeakyRelu,
  PRelu, Clip, HardSigmoid, Abs, elementwise Max/Min); each becomes one or two ReLUs in the mlp
  form (Clip and HardSigmoid two, the others one per input beyond the first).

Smooth activations (Sigmoid, Tanh, Softmax, ...) are not piecewise linear and are not counted.
"""

from __future__ import annotations

import math

import onnx

from .model_io import tensor_bytes

__all__ = [
    "weight_bytes", "count_macs", "count_neurons", "value_shapes", "MAX_OPS", "PIECEWISE_OPS",
]

#: Ops of the original counted as ``max`` neurons (one per output element).
MAX_OPS = ("MaxPool", "GlobalMaxPool", "ReduceMax")
#: Piecewise-linear activations of the original counted as ``piecewise`` neurons.
PIECEWISE_OPS = ("LeakyRelu", "PRelu", "Clip", "HardSigmoid", "Abs", "Max", "Min")


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of all initializers (dense and sparse) and Constant node values."""
    total = 0
    for t in model.graph.initializer:
        total += tensor_bytes(t)
    for st in model.graph.sparse_initializer:
        total += tensor_bytes(st.values) + tensor_bytes(st.indices)
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    total += tensor_bytes(a.t)
    return total


def count_macs(model: onnx.ModelProto, batch: int = 1) -> int:
    """MACs of one inference at ``batch``, using shapes from ONNX shape inference."""
    graph, shapes = _inferred_shapes(model, batch)
    return int(sum(_node_macs(n, shapes) for n in graph.node))


def count_neurons(model: onnx.ModelProto) -> dict[str, int]:
    """``{"relu", "max", "piecewise"}`` neuron counts per sample (module docstring).

    An output whose shape inference cannot resolve counts 0.
    """
    graph, shapes = _inferred_shapes(model, 1)
    counts = {"relu": 0, "max": 0, "piecewise": 0}
    for n in graph.node:
        if n.domain not in ("", "ai.onnx") or not n.output:
            continue
        key = ("relu" if n.op_type == "Relu" else "max" if n.op_type in MAX_OPS
               else "piecewise" if n.op_type in PIECEWISE_OPS else None)
        shape = shapes.get(n.output[0])
        if key is None or shape is None:
            continue
        if n.op_type in ("Max", "Min"):  # one pairwise max per extra input
            counts[key] += math.prod(shape) * max(len(n.input) - 1, 0)
        else:
            counts[key] += math.prod(shape)
    return counts


def value_shapes(model: onnx.ModelProto, batch: int = 1) -> dict[str, list[int]]:
    """The shape of every value of the main graph that shape inference resolves, with dynamic
    input dimensions set to ``batch``."""
    return _inferred_shapes(model, batch)[1]


def _inferred_shapes(model: onnx.ModelProto, batch: int) -> tuple[onnx.GraphProto, dict]:
    """The main graph after shape inference (dynamic input dims set to ``batch``) and the shape
    of every value it knows."""
    from .model_io import skeleton

    fixed = skeleton(model)
    for vi in fixed.graph.input:  # a concrete batch flows through Reshape(-1, ...) of im2col
        for d in vi.type.tensor_type.shape.dim:
            if not d.HasField("dim_value"):
                d.dim_value = batch
    try:
        inferred = onnx.shape_inference.infer_shapes(fixed)
    except Exception:
        inferred = model
    shapes: dict[str, list] = {}
    graph = inferred.graph
    for vi in [*graph.input, *graph.value_info, *graph.output]:
        dims = vi.type.tensor_type.shape.dim
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else batch for d in dims]
    for t in graph.initializer:
        shapes[t.name] = list(t.dims)
    return graph, shapes


def _node_macs(n: onnx.NodeProto, shapes: dict[str, list]) -> int:
    def shape(name):
        return shapes.get(name)

    if n.op_type in ("Conv", "ConvTranspose") and len(n.input) > 1:
        w, y, x = shape(n.input[1]), shape(n.output[0]), shape(n.input[0])
        if not w or not y or not x:
            return 0
        if n.op_type == "Conv":
            return math.prod(y) * math.prod(w[1:])
        return math.prod(x) * math.prod(w[1:])
    if n.op_type in ("MatMul", "Gemm"):
        a, b, y = shape(n.input[0]), shape(n.input[1]), shape(n.output[0])
        if not a or not b or not y:
            return 0
        if n.op_type == "Gemm":
            trans_a = next((at.i for at in n.attribute if at.name == "transA"), 0)
            k = a[0] if trans_a else a[-1]
        else:
            k = a[-1]
        return math.prod(y) * k
    return 0
