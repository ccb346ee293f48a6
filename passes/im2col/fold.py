"""Pass ``im2col-fold``: BatchNormalization and per-channel constant affines into conv weights.

``scale·conv(x) + shift`` per output channel is the conv with weights ``W[m]·scale[m]`` and
bias ``b[m]·scale[m] + shift[m]`` (:func:`fold_scale_shift`, composed in float64 and cast once).
The affine is the only consumer of a Conv or ConvTranspose output: an inference
BatchNormalization (``scale = γ/√(σ² + ε)``, ``shift = β - μ·scale``), or an Add/Sub/Mul/Div by
a constant that broadcasts only along channels. Folding repeats while one follows.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnx_lower import graph as g
from onnx_lower.pass_manager import GraphPass, LoweringModel, register_pass
from onnx_lower.passes.linear import batch_norm_scale_shift

__all__ = ["Im2colFold", "bn_scale_shift", "fold_scale_shift", "single_consumer"]


def fold_scale_shift(weight, bias, scale, shift, *, transpose=False, group=1):
    """``(W', b')`` of ``scale·conv(x) + shift`` per output channel, composed in float64."""
    w = np.asarray(weight, dtype=np.float64)
    m = w.shape[1] * group if transpose else w.shape[0]
    b = np.zeros(m) if bias is None else np.asarray(bias, dtype=np.float64)
    scale = np.broadcast_to(np.asarray(scale, dtype=np.float64).reshape(-1), (m,))
    shift = np.broadcast_to(np.asarray(shift, dtype=np.float64).reshape(-1), (m,))
    if transpose:
        c, mg = w.shape[:2]
        per = scale.reshape(group, 1, mg)  # output channel gi·Mg + j
        w = (w.reshape(group, c // group, mg, -1) * per[..., None]).reshape(w.shape)
    else:
        w = w * scale.reshape((m,) + (1,) * (w.ndim - 1))
    return w, b * scale + shift



def single_consumer(graph: gs.Graph, t: gs.Tensor) -> gs.Node | None:
    if len(t.outputs) != 1 or g.is_graph_output(graph, t):
        return None
    return t.outputs[0]


def bn_scale_shift(node: gs.Node) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-channel ``(scale, shift)`` of an inference BatchNormalization, or None."""
    params = [g.const_value(t) for t in node.inputs[1:5]]
    if len(params) != 4 or any(p is None for p in params):
        return None
    if len([o for o in node.outputs if o.outputs]) > 1 or g.attr(node, "training_mode", 0):
        return None
    if g.attr(node, "spatial", 1) != 1 and params[0].ndim > 1:
        return None
    # epsilon default 1e-5: https://onnx.ai/onnx/operators/onnx__BatchNormalization.html
    return batch_norm_scale_shift(*(p.reshape(-1) for p in params), g.attr(node, "epsilon", 1e-5))


def _per_channel(value: np.ndarray, rank: int, channels: int) -> np.ndarray | None:
    """``value`` as a ``(C,)`` vector if it broadcasts against ``(N, C, 1...)`` only on C."""
    v = np.asarray(value)
    if v.ndim > rank:
        return None
    v = v.reshape((1,) * (rank - v.ndim) + v.shape)
    if v.shape[0] != 1 or any(d != 1 for d in v.shape[2:]) or v.shape[1] not in (1, channels):
        return None
    return np.broadcast_to(v.reshape(-1), (channels,)).astype(np.float64)


def _affine_after(graph: gs.Graph, node: gs.Node, rank: int, channels: int):
    """``(scale, shift, consumer)`` if the only consumer of ``node`` is a per-channel affine."""
    out = node.outputs[0]
    nxt = single_consumer(graph, out)
    if nxt is None:
        return None
    if g.is_op(nxt, "BatchNormalization") and nxt.inputs[0] is out:
        ss = bn_scale_shift(nxt)
        return None if ss is None or ss[0].size != channels else (*ss, nxt)
    if g.is_op(nxt, "Add", "Sub", "Mul", "Div") and len(nxt.inputs) == 2:
        other = nxt.inputs[1] if nxt.inputs[0] is out else nxt.inputs[0]
        cv = g.const_value(other)
        if cv is None or cv.dtype.kind != "f":
            return None
        v = _per_channel(cv, rank, channels)
        if v is None:
            return None
        one, zero = np.ones(channels), np.zeros(channels)
        if nxt.op == "Add":
            return one, v, nxt
        if nxt.op == "Mul":
            return v, zero, nxt
        if nxt.op == "Sub":
            return (one, -v, nxt) if nxt.inputs[0] is out else (-one, v, nxt)
        if nxt.inputs[0] is out:  # Div by a constant
            return 1.0 / v, zero, nxt
    return None


@register_pass("im2col-fold")
class Im2colFold(GraphPass):
    """Fold BatchNormalization and per-channel constant affines into Conv/ConvTranspose weights."""

    def run_on_graph(self, graph: gs.Graph, model: LoweringModel) -> bool:
        changed = False
        for node in list(graph.nodes):
            if not g.is_op(node, "Conv", "ConvTranspose") or not node.outputs:
                continue
            while self._fold_once(graph, node, model):
                changed = True
        if changed:
            graph.cleanup(remove_unused_graph_inputs=False)
        return changed

    def _fold_once(self, graph: gs.Graph, node: gs.Node, model: LoweringModel) -> bool:
        w = g.const_value(node.inputs[1]) if len(node.inputs) > 1 else None
        bias_t = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
        b = g.const_value(bias_t) if bias_t is not None else None
        if w is None or (bias_t is not None and b is None) or w.dtype.kind != "f":
            return False
        out = node.outputs[0]
        transpose = node.op == "ConvTranspose"
        group = int(g.attr(node, "group", 1))
        m = w.shape[1] * group if transpose else w.shape[0]
        found = _affine_after(graph, node, w.ndim, m)
        if found is None:
            return False
        scale, shift, nxt = found
        w2, b2 = fold_scale_shift(w, b, scale, shift, transpose=transpose, group=group)
        namer = g.Namer(graph)
        new_w = gs.Constant(namer(f"{node.name}/folded_weight"), w2.astype(w.dtype))
        new_b = gs.Constant(namer(f"{node.name}/folded_bias"), b2.astype(w.dtype))
        folded_out = nxt.outputs[0]
        node.inputs = [node.inputs[0], new_w, new_b]
        node.outputs = [folded_out]
        g.detach(nxt)
        del out  # the intermediate tensor is now dangling; cleanup drops it
        return True
