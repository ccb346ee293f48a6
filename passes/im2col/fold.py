"""Pass ``im2col-fold``: BatchNormalization and per-channel constant affines into conv weights.

``scale·conv(x) + shift`` per output channel is the conv with weights ``W[m]·scale[m]`` and
bias ``b[m]·scale[m] + shift[m]`` (:func:`fold_scale_shift`, composed in float64 and cast once).
The affine is the only consumer of a Conv or ConvTranspose output: an inference
BatchNormalization (``scale = γ/√(σ² + ε)``, ``shift = β - μ·scale``), or an Add/Sub/Mul/Div by
a constant that broadcasts only along channels. Folding repeats while one follows.

Residual biases (issue 13, the residual Add + Relu epilogue): ``(Wa·x + ba) + (Wb·z + bb)``
is ``Wa·x + (Wb·z + (ba + bb))``. Where the two inputs of an Add are each the only use of a
Conv's output (a ResNet downsample block: main path and projection shortcut), the bias of one
conv moves to the other, so the lowered graph has ``MatMul(A, Wa)`` feeding the Add, which
onnxruntime runs as one Gemm with the shortcut as ``C`` and the Relu fused (one pass), where
``Gemm(A, Wa, ba)`` + Add + Relu took three. Single 1×1 layer + residual + Relu, 1 thread:
0.81-0.94× (BENCHMARKS.md "Epilogues and the 3-channel stem"). The bias moves out of a 1×1
stride-1 conv if one is summed (it lowers to a single MatMul), else out of the conv with more
MACs. An Add fed by one conv and an identity shortcut has nowhere to put the bias exactly (the
block's input is also the next conv's input) and is left alone.
``cost.RESIDUAL_BIAS_FOLD`` switches this off.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from onnx_lower import graph as g
from onnx_lower.pass_manager import GraphPass, LoweringModel, register_pass
from onnx_lower.passes.linear import batch_norm_scale_shift

from . import cost

__all__ = ["Im2colFold", "bn_scale_shift", "fold_scale_shift", "single_consumer",
           "fold_residual_bias"]


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


def _constant_params(node: gs.Node) -> tuple[np.ndarray, np.ndarray | None] | None:
    """A conv's constant float ``(weight, bias or None)``, or None if either is computed."""
    w = g.const_value(node.inputs[1]) if len(node.inputs) > 1 else None
    bias_t = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    b = g.const_value(bias_t) if bias_t is not None else None
    if w is None or (bias_t is not None and b is None) or w.dtype.kind != "f":
        return None
    return w, b


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
        if cost.RESIDUAL_BIAS_FOLD:
            for node in list(graph.nodes):
                changed |= fold_residual_bias(graph, node)
        if changed:
            graph.cleanup(remove_unused_graph_inputs=False)
        return changed

    def _fold_once(self, graph: gs.Graph, node: gs.Node, model: LoweringModel) -> bool:
        params = _constant_params(node)
        if params is None:
            return False
        w, b = params
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


def _conv_feeding(graph: gs.Graph, t: gs.Tensor, add: gs.Node):
    """``(conv, weight, bias or None)`` if ``t`` is a Conv output used only by ``add``."""
    conv = t.inputs[0] if len(t.inputs) == 1 else None
    if conv is None or not g.is_op(conv, "Conv") or conv.outputs[0] is not t:
        return None
    if single_consumer(graph, t) is not add:
        return None
    params = _constant_params(conv)
    return None if params is None else (conv, *params)


def _gives_bias(conv: gs.Node, w: np.ndarray) -> tuple[bool, int]:
    """Sort key of the conv that gives its bias away: a 1×1 stride-1 conv first (it lowers to
    one MatMul that onnxruntime fuses with the Add), then the one with more MACs."""
    out = conv.outputs[0].shape
    spatial = out[2:] if out and all(isinstance(d, int) for d in out[2:]) else []
    strides = g.attr(conv, "strides", None) or [1] * (w.ndim - 2)
    pointwise = all(k == 1 for k in w.shape[2:]) and all(s == 1 for s in strides)
    return pointwise, w.size * math.prod(spatial)


def fold_residual_bias(graph: gs.Graph, add: gs.Node) -> bool:
    """Move the bias of one of the two Convs summed by ``add`` into the other (see module)."""
    if not g.is_op(add, "Add") or len(add.inputs) != 2 or add.inputs[0] is add.inputs[1]:
        return False
    a, b = (_conv_feeding(graph, t, add) for t in add.inputs)
    if a is None or b is None:
        return False
    sa, sb = (c.outputs[0].shape for c, _, _ in (a, b))
    if not sa or list(sa) != list(sb) or not all(isinstance(d, int) for d in sa):
        return False  # a broadcasting Add: the biases are not per output element alike
    if _gives_bias(*a[:2]) < _gives_bias(*b[:2]):
        a, b = b, a  # ``a`` gives its bias to ``b``
    (conv_a, _, bias_a), (conv_b, w_b, bias_b) = a, b
    if bias_a is None or not np.any(bias_a):
        return False
    total = np.asarray(bias_a, np.float64)
    if bias_b is not None:
        total = total + np.asarray(bias_b, np.float64)
    namer = g.Namer(graph)
    new_b = gs.Constant(namer(f"{conv_b.name}/residual_bias"), total.astype(w_b.dtype))
    conv_b.inputs = [*conv_b.inputs[:2], new_b]
    conv_a.inputs = list(conv_a.inputs[:2])
    return True
