"""The sample axis of the mlp form: per sample (axis 0 is the batch), or the whole tensor.

The mlp form works on flat vectors. By convention axis 0 is the batch and a vector is one
sample: the C-order flattening of ``x[i]``. That convention is a choice, not a fact. When axis 0
of every graph input is static, the whole tensor ``x`` (batch included) is a vector too, and any
linear map of it is exact, including the ones that mix axis 0:

- Transpose with ``perm[0] != 0``; Flatten with ``axis != 1``; a Reshape, Squeeze or Unsqueeze
  whose axis 0 is not the input's (``(1, 8, 4, 4) → (128,)`` in Marabou's ``conv_mp1.onnx``);
- Gemm with ``transA=1``, a constant ``A``, or a bias ``C`` with one row per batch row;
- MatMul with a rank-1 activation, or a constant with one matrix per batch entry;
- a constant that varies along axis 0 (Add/Sub/Mul/Div, PRelu's slope, Max/Min);
- Concat, Split, Slice, Gather, ReduceSum/ReduceMean on axis 0.

**The decision** is made in one place, :func:`whole_tensor_allowed` and :func:`enter`, called by
``lower-linear`` and ``lower-activations`` for a node they refuse per sample: when the graph is
the main graph, every graph input is fully static, and the node's whole-tensor lowering exists,
the node is lowered on whole tensors (an Affine with ``whole=True``) and the model's notes get
``sample_axis = {"mode": "whole-tensor", "node", "op", "reason"}``, the reason being the per-sample
refusal. A model whose axis 0 no op mixes keeps the per-sample lowering; a dynamic axis 0 that an
op mixes stays refused with the per-sample reason.

**Promotion** (:func:`promote`, run by ``fold-linear`` before it composes anything): once one
Affine of a graph is whole-tensor, every per-sample Affine ``A`` over a tensor whose axis 0 has
``n`` entries becomes ``I_n ⊗ A`` (:func:`onnx_lower.affine.whole_tensor`), so all of them act on
one flat vector, the whole tensor, and fold into each other. Emission then flattens each input
with ``Flatten(axis=0)`` to ``(1, D)`` and reshapes each output back to its full shape, so the
model keeps its input and output names, shapes and order. The matrices grow with the batch:
``n`` times the rows and columns (``n`` times the nonzeros).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnx_lower.affine import affine_of, whole_tensor
from onnx_lower.pass_manager import LoweringModel

__all__ = ["NOTE", "MODE", "whole_tensor_allowed", "enter", "is_whole", "promote"]

#: Key of the model note, and its mode value.
NOTE = "sample_axis"
MODE = "whole-tensor"


def _static(shape) -> bool:
    return shape is not None and all(
        isinstance(d, (int, np.integer)) and int(d) >= 0 for d in shape
    )


def whole_tensor_allowed(graph: gs.Graph, model: LoweringModel) -> bool:
    """The whole tensor may be the sample: ``graph`` is the main graph, its inputs fully static."""
    return graph is model.graph and all(_static(t.shape) for t in graph.inputs)


def enter(model: LoweringModel, node: gs.Node, reason: str) -> None:
    """Record that ``node`` needed whole-tensor samples (the first such node is the one named)."""
    if NOTE not in model.notes:
        model.notes[NOTE] = {"mode": MODE, "node": node.name, "op": node.op, "reason": reason}


def is_whole(graph: gs.Graph) -> bool:
    """Some Affine node of ``graph`` works on whole tensors."""
    return any(getattr(affine_of(n), "whole", False) for n in graph.nodes)


def promote(graph: gs.Graph) -> int:
    """Make every per-sample Affine of ``graph`` whole-tensor if one is; the number promoted."""
    if not is_whole(graph):
        return 0
    count = 0
    for node in graph.nodes:
        amap = affine_of(node)
        if amap is None or amap.whole:
            continue
        n = node.outputs[0].shape[0]
        if not isinstance(n, (int, np.integer)):
            raise ValueError(f"Affine '{node.name}': axis 0 of '{node.outputs[0].name}' is {n}")
        node.attrs["affine"] = whole_tensor(amap, int(n))
        count += 1
    return count
