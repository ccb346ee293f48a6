"""Piecewise-linear activations as Relu + Affine (``lower-activations``) and the final check of
the mlp form (``check-mlp``).

Each rewrite is exact and uses one Relu node (per pair, for Max/Min of several activations).
With ``I`` the identity on the flat sample and ``B`` a broadcast selection
(:func:`onnx_lower.affine.broadcast_matrix`):

- LeakyRelu(α) (α default 0.01, https://onnx.ai/onnx/operators/onnx__LeakyRelu.html)::

      y = α·x + (1 − α)·relu(x)              r = Relu(x); y = Affine([x, r], [α·I, (1−α)·I])

- PRelu(slope), the constant slope broadcast to the sample: ``y = s⊙x + (1 − s)⊙relu(x)``.
- Clip(lo, hi) (attributes before opset 11, optional inputs since; a missing bound is
  unbounded; ``lo > hi`` gives ``hi`` everywhere, as onnxruntime does)::

      both:    y = lo + relu(x − lo) − relu(x − hi)   one Relu over the stacked [x − lo; x − hi]
      lo only: y = lo + relu(x − lo)
      hi only: y = hi − relu(hi − x)

  This covers ReLU6 (Clip(0, 6)) and HardTanh (Clip(−1, 1)).
- HardSigmoid(α=0.2, β=0.5) = clip(α·x + β, 0, 1), by the Clip rule on ``α·x + β``.
- Abs: ``y = 2·relu(x) − x``.
- Max/Min (numpy broadcast of per-sample shapes; constants are merged first)::

      max(a, b) = b + relu(a − b)      min(a, b) = a − relu(a − b)
      max(x, c) = c + relu(x − c)      min(x, c) = c − relu(c − x)

- Relu stays as it is.

:data:`KEPT_ELEMENTWISE` are the ops that stay unchanged in the mlp form because they act on
flat vectors exactly as on the shaped tensor: elementwise ops (shape-agnostic), and
Softmax/LogSoftmax when they normalise over the whole sample — i.e. over the last axis of the
flat ``(batch, features)`` vector. That holds when every per-sample axis but the softmax axis has
extent 1 (opset ≥ 13, axis default −1), or when the coerced 2-D form of opset < 13 (axis default
1) has rows = batch, i.e. the axes between the batch and ``axis`` have extent 1.

``check-mlp`` runs after all lowering passes. It raises
:class:`~onnx_lower.errors.UnsupportedOpError` for the first live node (in graph order) that is
none of: Affine, Relu, a kept op, Flatten/Reshape, Constant; the reason comes from the lowering
pass that refused the node when there is one. It notes the kept ops for the report
(``kept_ops``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np
import onnx_graphsurgeon as gs
import scipy.sparse as sp

from onnx_lower.affine import (
    AffineMap,
    broadcast_matrix,
    diag,
    identity,
    is_affine,
    is_identity,
    make_affine,
    replace_with_affine,
)
from onnx_lower.errors import DynamicShapeError, LoweringError, UnsupportedOpError
from onnx_lower.graph import Namer, attr, const_value, is_graph_output, is_op, sample_shape
from onnx_lower.pass_manager import GraphPass, LoweringModel, register_pass

from . import linear, sample_axis
from .linear import (
    Refused,
    activation_shape,
    broadcast_shapes,
    is_float,
    is_omitted,
    merge_terms,
    per_sample_constant,
)

__all__ = [
    "LowerActivationsPass",
    "CheckMlpPass",
    "KEPT_ELEMENTWISE",
    "ACTIVATION_OPS",
    "match",
    "explain",
    "mlp_violation",
    "MLP_HINT",
]

#: Ops that stay unchanged in the mlp form: they work on flat per-sample vectors. Softmax and
#: LogSoftmax only when they normalise over the whole sample (see the module docstring).
KEPT_ELEMENTWISE = frozenset(
    {
        "Sigmoid", "Tanh", "Sign", "Selu", "Elu", "Celu", "Exp", "Log", "Softplus", "Softsign",
        "Erf", "Gelu", "Mish", "HardSwish", "ThresholdedRelu", "Shrink", "Sqrt", "Reciprocal",
        "Sin", "Cos", "Tan", "Asin", "Acos", "Atan", "Sinh", "Cosh", "Asinh", "Acosh", "Atanh",
        "Floor", "Ceil", "Round", "Softmax", "LogSoftmax",
    }
)  # fmt: skip

_AXIS_OPS = ("Softmax", "LogSoftmax")

MLP_HINT = (
    "Use --form im2col or --form auto, which keep ops that have no MatMul/Add/Relu form as "
    "they are"
)

#: Bounds of Clip at or beyond float32's range mean "unbounded" (the opset < 11 defaults).
_FLT_MAX = float(np.finfo(np.float32).max)


def _refuse(reason: str):
    raise Refused(reason)


# --- building the rewrite ------------------------------------------------------------------------


class _Builder:
    """Creates the nodes of a rewrite in front of ``node``, then replaces ``node``."""

    def __init__(self, graph: gs.Graph, node: gs.Node, namer: Namer, whole: bool = False):
        self.graph, self.node, self.namer, self.whole = graph, node, namer, whole
        out = node.outputs[0]
        first = next(t for t in node.inputs if t.shape and const_value(t) is None)
        self.batch = first.shape[0]
        self.dtype = out.dtype if out.dtype is not None else first.dtype
        self.base = node.name or out.name

    def _insert(self, new: gs.Node) -> None:
        self.graph.nodes.insert(self.graph.nodes.index(self.node), new)

    def _tensor(self, tag: str, shape: Sequence[int]) -> gs.Variable:
        name = self.namer(f"{self.base}_{tag}")
        shape = list(shape) if self.whole else [self.batch, *shape]
        return gs.Variable(name, dtype=self.dtype, shape=shape)

    def affine(self, inputs: Sequence[gs.Tensor], amap: AffineMap, tag: str) -> gs.Tensor:
        amap.whole = self.whole
        inputs, amap = merge_terms(inputs, amap)
        if (
            len(inputs) == 1
            and amap.bias is None
            and is_identity(amap.terms[0])
            and self._sample(inputs[0]) == amap.out_shape
        ):
            return inputs[0]
        out = self._tensor(tag, amap.out_shape)
        self._insert(make_affine(inputs, out, amap, out.name, source=self.node.name))
        return out

    def _sample(self, x: gs.Tensor) -> tuple:
        return tuple(x.shape if self.whole else x.shape[1:])

    def relu(self, x: gs.Tensor, tag: str = "relu") -> gs.Tensor:
        out = self._tensor(tag, self._sample(x))
        self._insert(gs.Node("Relu", name=out.name, inputs=[x], outputs=[out]))
        return out

    def finish(self, inputs: Sequence[gs.Tensor], amap: AffineMap) -> None:
        amap.whole = self.whole
        inputs, amap = merge_terms(inputs, amap)
        replace_with_affine(self.graph, self.node, inputs, amap)


Plan = Callable[[_Builder], None]


@dataclasses.dataclass
class _Ctx:
    graph: gs.Graph
    opset: int


def _data(node: gs.Node) -> tuple[gs.Tensor, tuple[int, ...]]:
    x = node.inputs[0]
    return x, activation_shape(x)


def _scalar(value, what: str) -> float | None:
    """A Clip bound: None when absent or unbounded."""
    if value is None:
        return None
    v = np.asarray(value, dtype=np.float64).reshape(-1)
    if v.size != 1:
        _refuse(f"Clip {what} must be a scalar, got shape {np.shape(value)}")
    v = float(v[0])
    if np.isnan(v):
        _refuse(f"Clip {what} is NaN")
    return None if abs(v) >= _FLT_MAX else v


def _const_input(node: gs.Node, i: int, what: str):
    if i >= len(node.inputs) or is_omitted(node.inputs[i]):
        return None
    value = const_value(node.inputs[i])
    if value is None:
        _refuse(
            f"{what} ('{node.inputs[i].name}') is an activation; only constant {what} is linear "
            "in pieces"
        )
    return value


def _clip_plan(
    x: gs.Tensor, xs: tuple[int, ...], scale: float, shift: float, lo, hi
) -> Plan:
    """clip(scale·x + shift, lo, hi) with one Relu (``lo``/``hi`` None when unbounded)."""
    n = math.prod(xs)
    eye = identity(n)
    if lo is not None and hi is not None and lo > hi:
        lo = hi

    def plan(b: _Builder) -> None:
        if lo is not None and hi is not None:
            stacked = AffineMap(
                [sp.vstack([scale * eye, scale * eye]).tocsr()],
                np.concatenate([np.full(n, shift - lo), np.full(n, shift - hi)]),
                (2, *xs),
            )
            r = b.relu(b.affine([x], stacked, "clip_in"))
            b.finish([r], AffineMap([sp.hstack([eye, -eye]).tocsr()], np.full(n, lo), xs))
        elif lo is not None:
            r = b.relu(b.affine([x], AffineMap([scale * eye], np.full(n, shift - lo), xs), "lo"))
            b.finish([r], AffineMap([eye], np.full(n, lo), xs))
        elif hi is not None:
            r = b.relu(b.affine([x], AffineMap([-scale * eye], np.full(n, hi - shift), xs), "hi"))
            b.finish([r], AffineMap([-eye], np.full(n, hi), xs))
        else:
            b.finish([x], AffineMap([scale * eye], np.full(n, shift), xs))

    return plan


def _lower_leaky_relu(node: gs.Node, ctx: _Ctx) -> Plan:
    x, xs = _data(node)
    alpha = float(attr(node, "alpha", 0.01))  # https://onnx.ai/onnx/operators/onnx__LeakyRelu.html
    eye = identity(math.prod(xs))

    def plan(b: _Builder) -> None:
        if alpha == 1.0:
            b.finish([x], AffineMap([eye], None, xs))
            return
        r = b.relu(x)
        b.finish([x, r], AffineMap([alpha * eye, (1.0 - alpha) * eye], None, xs))

    return plan


def _lower_prelu(node: gs.Node, ctx: _Ctx) -> Plan:
    x, xs = _data(node)
    slope = _const_input(node, 1, "slope")
    if slope is None:
        _refuse("PRelu needs a slope")
    s = np.asarray(per_sample_constant(slope, len(xs)), dtype=np.float64)
    try:
        s = np.broadcast_to(s, xs).reshape(-1)
    except ValueError:
        _refuse(f"slope of shape {np.shape(slope)} does not broadcast to the sample {xs}")

    def plan(b: _Builder) -> None:
        r = b.relu(x)
        b.finish([x, r], AffineMap([diag(s), diag(1.0 - s)], None, xs))

    return plan


def _lower_clip(node: gs.Node, ctx: _Ctx) -> Plan:
    x, xs = _data(node)
    if "min" in node.attrs or "max" in node.attrs or ctx.opset < 11:
        # opset < 11: attributes, defaults -FLT_MAX / FLT_MAX (unbounded)
        lo, hi = _scalar(attr(node, "min"), "min"), _scalar(attr(node, "max"), "max")
    else:
        lo = _scalar(_const_input(node, 1, "min"), "min")
        hi = _scalar(_const_input(node, 2, "max"), "max")
    return _clip_plan(x, xs, 1.0, 0.0, lo, hi)


def _lower_hard_sigmoid(node: gs.Node, ctx: _Ctx) -> Plan:
    x, xs = _data(node)
    # alpha 0.2, beta 0.5: https://onnx.ai/onnx/operators/onnx__HardSigmoid.html
    alpha, beta = float(attr(node, "alpha", 0.2)), float(attr(node, "beta", 0.5))
    return _clip_plan(x, xs, alpha, beta, 0.0, 1.0)


def _lower_abs(node: gs.Node, ctx: _Ctx) -> Plan:
    x, xs = _data(node)
    eye = identity(math.prod(xs))

    def plan(b: _Builder) -> None:
        r = b.relu(x)
        b.finish([x, r], AffineMap([-eye, 2.0 * eye], None, xs))

    return plan


def _bmat(src: tuple[int, ...], dst: tuple[int, ...]) -> sp.csr_matrix:
    return identity(math.prod(src)) if src == dst else broadcast_matrix(src, dst)


def _lower_max_min(node: gs.Node, ctx: _Ctx) -> Plan:
    is_max = is_op(node, "Max")
    acts, shapes, consts = linear.split_operands(node, repeats=False)  # max(a, a) = a
    const = None
    if consts:
        reduce = np.maximum if is_max else np.minimum
        rank = len(shapes[0])
        parts = [np.asarray(per_sample_constant(c, rank), dtype=np.float64) for c in consts]
        try:
            const = reduce.reduce(np.broadcast_arrays(*parts)) if len(parts) > 1 else parts[0]
        except ValueError:
            _refuse("the constant inputs do not broadcast together")
        if not np.all(np.isfinite(const)):
            _refuse(f"{node.op} with a non-finite constant")
    # Per-sample shapes of the running result after each step (validated here, built later).
    acc_shapes = [shapes[0]]
    for s in shapes[1:]:
        acc_shapes.append(broadcast_shapes(acc_shapes[-1], s))
    final = acc_shapes[-1]
    if const is not None:
        final = broadcast_shapes(final, const.shape)

    def plan(b: _Builder) -> None:
        acc = acts[0]
        steps = len(acts) - 1
        if steps == 0 and const is None:
            b.finish([acc], AffineMap([_bmat(shapes[0], final)], None, final))
            return
        for i in range(steps):
            a, sa, sacc, o = acts[i + 1], shapes[i + 1], acc_shapes[i], acc_shapes[i + 1]
            # d = acc − a;  max = a + relu(acc − a);  min = acc − relu(acc − a)
            d = b.affine([acc, a], AffineMap([_bmat(sacc, o), -_bmat(sa, o)], None, o), "diff")
            r = b.relu(d)
            eye = identity(math.prod(o))
            if is_max:
                amap, ins = AffineMap([_bmat(sa, o), eye], None, o), [a, r]
            else:
                amap, ins = AffineMap([_bmat(sacc, o), -eye], None, o), [acc, r]
            if i == steps - 1 and const is None:
                b.finish(ins, amap)
                return
            acc = b.affine(ins, amap, "max" if is_max else "min")
        o = final
        cb = np.broadcast_to(const, o).reshape(-1)
        bm = _bmat(acc_shapes[-1], o)
        eye = identity(math.prod(o))
        sign = 1.0 if is_max else -1.0
        # max: c + relu(x − c);  min: c − relu(c − x)
        r = b.relu(b.affine([acc], AffineMap([sign * bm], -sign * cb, o), "diff"))
        b.finish([r], AffineMap([sign * eye], cb, o))

    return plan


_HANDLERS: dict[str, Callable[[gs.Node, _Ctx], Plan]] = {
    "LeakyRelu": _lower_leaky_relu,
    "PRelu": _lower_prelu,
    "Clip": _lower_clip,
    "HardSigmoid": _lower_hard_sigmoid,
    "Abs": _lower_abs,
    "Max": _lower_max_min,
    "Min": _lower_max_min,
}

#: The ops ``lower-activations`` rewrites (in the default ONNX domain).
ACTIVATION_OPS = frozenset(_HANDLERS)


def match(
    node: gs.Node, graph: gs.Graph, opset: int, whole: bool = False
) -> Plan | str | LoweringError:
    """The rewrite of ``node`` (a callable taking a builder), or why it has none.

    ``whole=True``: on whole-tensor samples (every handler here is elementwise, so the
    per-sample one serves with full shapes; see :mod:`onnx_lower.passes.sample_axis`).
    """
    if not is_op(node, *_HANDLERS):
        return f"{node.op} is not a piecewise-linear activation"
    try:
        with linear.whole_tensor_samples() if whole else contextlib.nullcontext():
            plan = _HANDLERS[node.op](node, _Ctx(graph, opset))
        for out in node.outputs:
            if not is_float(out):
                _refuse(f"output '{out.name}' is not a float tensor")
    except Refused as exc:
        return exc.reason
    except DynamicShapeError as exc:
        return exc
    return plan


def explain(node: gs.Node, graph: gs.Graph, opset: int) -> str | LoweringError | None:
    """Why ``lower-activations`` leaves ``node`` alone; None if it is not handled here."""
    if not is_op(node, *_HANDLERS):
        return None
    result = match(node, graph, opset)
    return result if isinstance(result, (str, LoweringError)) else None


@register_pass("lower-activations")
class LowerActivationsPass(GraphPass):
    """Rewrite piecewise-linear activations (LeakyRelu, PRelu, Clip, Abs, ...) as Relu + Affine."""

    def run_on_graph(self, graph: gs.Graph, model: LoweringModel) -> bool:
        namer = None
        modified = False
        for node in list(graph.nodes):
            if not is_op(node, *_HANDLERS):
                continue
            plan, whole = match(node, graph, model.opset), False
            if isinstance(plan, str) and sample_axis.whole_tensor_allowed(graph, model):
                plan_whole = match(node, graph, model.opset, whole=True)
                if not isinstance(plan_whole, (str, LoweringError)):
                    sample_axis.enter(model, node, plan)
                    plan, whole = plan_whole, True
            if isinstance(plan, (str, LoweringError)):
                continue
            namer = namer or Namer(graph)
            plan(_Builder(graph, node, namer, whole))
            modified = True
        return modified


# --- check-mlp -----------------------------------------------------------------------------------


def _live_nodes(graph: gs.Graph) -> set[int]:
    """ids of the nodes that some graph output depends on."""
    live: set[int] = set()
    stack = [t for t in graph.outputs]
    seen: set[int] = set()
    while stack:
        t = stack.pop()
        if id(t) in seen:
            continue
        seen.add(id(t))
        for n in t.inputs:
            if id(n) not in live:
                live.add(id(n))
                stack.extend(n.inputs)
                for value in n.attrs.values():  # subgraph bodies read outer tensors
                    if isinstance(value, gs.Graph):
                        stack.extend(value.outputs)
    return live


def _softmax_violation(node: gs.Node, opset: int) -> str | LoweringError | None:
    x = node.inputs[0]
    if x.shape is None:
        return f"the shape of '{x.name}' is unknown, so the {node.op} axis cannot be checked"
    try:
        xs = sample_shape(x)
    except DynamicShapeError as exc:
        return exc
    r = len(xs) + 1
    # axis default: 1 before opset 13 (coerced 2-D), -1 since
    # (https://onnx.ai/onnx/operators/onnx__Softmax.html)
    axis = int(attr(node, "axis", 1 if opset < 13 else -1))
    axis = axis + r if axis < 0 else axis
    if axis == 0:
        return f"{node.op} over axis 0 normalises across the batch"
    others = xs[: axis - 1] if opset < 13 else xs[: axis - 1] + xs[axis:]
    if math.prod(others) != 1:
        return (
            f"{node.op} over axis {axis} of a tensor of shape {[x.shape[0], *xs]} normalises "
            f"{math.prod(others)} slices of each sample separately; on flat vectors only a "
            f"{node.op} over the whole sample (the last axis) is kept"
        )
    return None


def mlp_violation(node: gs.Node, graph: gs.Graph, opset: int) -> str | LoweringError | None:
    """Why ``node`` is not allowed in the mlp form (None if it is).

    Flatten and Reshape are not allowed as such here: one still present was refused by
    lower-linear (it moves data across the batch axis), so it is not a per-sample map. The
    Flatten/Reshape of the final form are made by emission, after this check.
    """
    if is_affine(node) or is_op(node, "Relu", "Constant"):
        return None
    if is_op(node, *_AXIS_OPS):
        return _softmax_violation(node, opset)
    if is_op(node, *KEPT_ELEMENTWISE):
        return None
    if is_op(node, "MaxPool") and len(node.outputs) > 1:
        idx = node.outputs[1]
        if not is_omitted(idx) and (idx.outputs or is_graph_output(graph, idx)):
            return (
                f"its Indices output '{idx.name}' is used; the Indices output of MaxPool "
                "(argmax positions) is out of scope"
            )
    reason = linear.explain(node, graph, opset) or explain(node, graph, opset)
    if reason is None and is_op(node, *linear.LINEAR_OPS, *ACTIVATION_OPS):
        name = "lower-linear" if is_op(node, *linear.LINEAR_OPS) else "lower-activations"
        reason = f"{name} lowers this node, but the pipeline did not run it after the node appeared"
    if reason is None:
        reason = (
            f"no pass of the pipeline lowered this {node.op} to MatMul/Add/Relu, and it is not "
            "an elementwise op that works on flat vectors"
        )
    user = _float_user(node)
    if isinstance(reason, str) and user is not None:
        why = linear.explain(user, graph, opset) or explain(user, graph, opset)
        if isinstance(why, str):
            reason += (
                f"; it computes an input of {user.op} '{user.name}', which stayed because: {why}"
            )
    return reason


def _float_user(node: gs.Node, depth: int = 8) -> gs.Node | None:
    """For a node computing integers (shapes, indices): the first float op that consumes them."""
    if any(is_float(t) for t in node.outputs):
        return None
    frontier = [node]
    for _ in range(depth):
        users = [u for n in frontier for t in n.outputs for u in t.outputs]
        for u in users:
            if any(is_float(t) for t in u.outputs):
                return u
        frontier = users
    return None


@register_pass("check-mlp")
class CheckMlpPass(GraphPass):
    """Fail on the first node that is not Affine, Relu or a kept op; note the kept ops."""

    def run_on_graph(self, graph: gs.Graph, model: LoweringModel) -> bool:
        live = _live_nodes(graph)
        kept: dict[str, int] = {}
        for node in graph.nodes:
            if id(node) not in live:
                continue
            reason = mlp_violation(node, graph, model.opset)
            if isinstance(reason, LoweringError):
                raise reason
            if reason is not None:
                raise UnsupportedOpError(node.name, node.op, "mlp", reason, hint=MLP_HINT)
            if is_op(node, *KEPT_ELEMENTWISE):
                kept[node.op] = kept.get(node.op, 0) + 1
        model.note("kept_ops", dict(sorted(kept.items())))
        return False
