"""What a model costs: weight bytes and multiply-accumulates (MACs), from resolved shapes.

MACs count one multiply-add per weight use:

- Conv: ``N · M · Π out_spatial · (C / group) · Π kernel``; ConvTranspose the same, counted
  from the input side;
- MatMul/Gemm: ``Π batch dims · M · K · N``;
- pools, elementwise ops and data movement count 0 (they are not contractions).

The ratio between the original's and the lowered model's MACs is the arithmetic a lowering costs.
"""

from __future__ import annotations

import math

import onnx

from .model_io import tensor_bytes

__all__ = ["weight_bytes", "count_macs"]


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
    total = 0
    for n in graph.node:
        total += _node_macs(n, shapes)
    return int(total)


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
