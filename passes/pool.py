"""Pooling as matrices and ReLU tournaments: the math behind the pooling passes.

Every function here works on one sample; ``in_shape = (C, *spatial)`` has no batch dimension and
tensors are flattened in C order, so channel ``c``, spatial flat index ``i`` sits at
``c * S_in + i``. Window arithmetic comes from :func:`onnx_lower.windows.sliding_windows` (one
window per output position; ``taps`` gives the flat input index of each tap, ``-1`` for padding).

AveragePool (https://onnx.ai/onnx/operators/onnx__AveragePool.html) is linear:
``y.ravel() = A @ x.ravel()`` with ``A[c*S_out + o, c*S_in + tap] = 1 / divisor(o)`` for every
in-bounds tap of window ``o``. Padded taps contribute 0 to the sum; the divisor is

* ``count_include_pad = 0``: the number of in-bounds taps of the window;
* ``count_include_pad = 1``: the number of taps inside the *padded* input
  ``[-pad_begin, n + pad_end)`` on every axis. The part of a ``ceil_mode`` window that overhangs
  the padded input is never counted (onnxruntime's rule; the spec is silent about it).

A window without any in-bounds tap (possible only with dilations, e.g. kernel 2, dilation 2,
pad 1 over an input of extent 1) gets an empty row, i.e. output 0.

MaxPool (https://onnx.ai/onnx/operators/onnx__MaxPool.html) is a network of pairwise maxima
``max(a, b) = b + relu(a − b)`` in ReLU levels; the plans that build it (the per-window
tournament and the separable / sliding / doubling plans that share the maxima of overlapping
windows) are in :mod:`onnx_lower.passes.pool_max`. The ``lower-pool`` pass emits the plan with
the fewest ReLUs.

``auto_pad`` SAME_UPPER/SAME_LOWER with a dilation other than 1 is refused (``ValueError``):
onnxruntime sizes those pads from the undilated kernel, contradicting the spec's
``out = ceil(n / stride)``, so no matrix can agree with both. A negative SAME total pad
(kernel shorter than the stride) is kept negative, as in the spec formula and ORT's
AveragePool: the windows shift into the input.

GlobalAveragePool / GlobalMaxPool are the same functions with ``kernel = global_pool_kernel(
in_shape)`` (the whole spatial extent) and default strides/pads.

All matrices are float64 ``scipy.sparse.csr_matrix``, built directly from vectorised index
arithmetic.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_graphsurgeon as gs
import scipy.sparse as sp

from onnx_lower import graph as g
from onnx_lower.affine import AffineMap, make_affine, replace_with_affine
from onnx_lower.errors import UnsupportedOpError
from onnx_lower.pass_manager import GraphPass, LoweringModel, register_pass
from onnx_lower.windows import Windows, resolve_pads, sliding_windows, window_attributes

from .pool_max import (
    MAX_POOL_PLANS,
    Tournament,
    TournamentLevel,
    max_pool_levels,
    max_pool_taps,
    run_tournament,
)

__all__ = [
    "MAX_POOL_PLANS",
    "avg_pool_matrix",
    "max_pool_taps",
    "max_pool_tournament",
    "run_tournament",
    "global_pool_kernel",
    "pool_windows",
    "Tournament",
    "TournamentLevel",
    "LowerPoolPass",
    "SinkActivationBelowMaxPoolPass",
]


def global_pool_kernel(in_shape: Sequence[int]) -> tuple[int, ...]:
    """Kernel of a global pool over ``in_shape = (C, *spatial)``: the whole spatial extent."""
    return tuple(int(v) for v in in_shape[1:])


def pool_windows(
    in_shape: Sequence[int],
    kernel: Sequence[int],
    *,
    strides: Sequence[int] | None = None,
    pads: Sequence[int] | None = None,
    dilations: Sequence[int] | None = None,
    ceil_mode: bool = False,
    auto_pad: str | bytes = "NOTSET",
) -> tuple[Windows, tuple[int, ...]]:
    """The windows of a pool over ``in_shape = (C, *spatial)`` and the resolved explicit pads.

    Raises ``ValueError`` for ``auto_pad`` SAME_UPPER/SAME_LOWER with a dilation other than 1:
    the spec pads for the dilated kernel so that ``out = ceil(n / s)``, while onnxruntime pads for
    the undilated kernel and yields fewer outputs (e.g. n=7, k=3, d=2, s=1: 5 outputs, not 7).
    No answer agrees with both, so the case is refused (ORT's Conv refuses it too).

    A SAME total pad below zero (kernel shorter than the stride) is kept negative, as the spec
    formula and ORT's AveragePool have it: the windows shift into the input (see
    :func:`onnx_lower.windows.resolve_pads`). ORT's MaxPool rejects such nodes outright
    ("padding values must be non-negative"); the same windows are used for it here.
    """
    spatial = tuple(int(v) for v in in_shape[1:])
    kernel = tuple(int(v) for v in kernel)
    if len(kernel) != len(spatial):
        raise ValueError(f"kernel {kernel} does not match spatial shape {spatial}")
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    if auto_pad in ("SAME_UPPER", "SAME_LOWER") and any(d != 1 for d in dilations or ()):
        raise ValueError(
            f"auto_pad={auto_pad} with dilations {tuple(dilations)}: onnxruntime sizes the pads "
            "from the undilated kernel and so breaks the spec's output = ceil(n / stride); "
            "use explicit pads"
        )
    pads_r = resolve_pads(spatial, kernel, strides, dilations, pads, auto_pad, negative_same=True)
    win = sliding_windows(spatial, kernel, strides, pads_r, dilations, bool(ceil_mode))
    return win, pads_r


def _channel_csr(
    taps: np.ndarray, data: np.ndarray, counts: np.ndarray, channels: int, s_in: int
) -> sp.csr_matrix:
    """Block-diagonal CSR repeating one channel's rows for every channel.

    ``taps``/``data`` are one channel's column indices and values in row order, ``counts`` the
    number of entries per row. Row ``c*R + r`` gets columns ``c*s_in + taps``.
    """
    rows = counts.shape[0]
    indices = (np.arange(channels, dtype=np.int64)[:, None] * s_in + taps[None, :]).ravel()
    values = np.tile(data.astype(np.float64), channels)
    indptr = np.zeros(channels * rows + 1, dtype=np.int64)
    np.cumsum(np.tile(counts, channels), out=indptr[1:])
    return sp.csr_matrix((values, indices, indptr), shape=(channels * rows, channels * s_in))


def avg_pool_matrix(
    in_shape: Sequence[int],
    kernel: Sequence[int],
    *,
    strides: Sequence[int] | None = None,
    pads: Sequence[int] | None = None,
    dilations: Sequence[int] | None = None,
    ceil_mode: bool = False,
    count_include_pad: bool = False,
    auto_pad: str | bytes = "NOTSET",
) -> tuple[sp.csr_matrix, tuple[int, ...]]:
    """Matrix ``A`` (C*S_out, C*S_in) of ONNX AveragePool and the output shape ``(C, *S_out)``.

    See the module docstring for the divisor rules.
    """
    win, pads_r = pool_windows(
        in_shape,
        kernel,
        strides=strides,
        pads=pads,
        dilations=dilations,
        ceil_mode=ceil_mode,
        auto_pad=auto_pad,
    )
    channels, r = int(in_shape[0]), len(win.kernel)
    valid = win.valid
    if count_include_pad:
        inside = [
            (pos >= -pads_r[i]) & (pos < win.in_shape[i] + pads_r[r + i])
            for i, pos in enumerate(win.positions)
        ]
        divisor = win.axis_product(inside).sum(axis=1)
    else:
        divisor = valid.sum(axis=1)
    weight = np.broadcast_to(1.0 / np.maximum(divisor, 1)[:, None], valid.shape)
    a = _channel_csr(win.taps[valid], weight[valid], valid.sum(axis=1), channels, win.in_size)
    return a, (channels, *win.out_shape)


def max_pool_tournament(
    in_shape: Sequence[int],
    kernel: Sequence[int],
    *,
    strides: Sequence[int] | None = None,
    pads: Sequence[int] | None = None,
    dilations: Sequence[int] | None = None,
    ceil_mode: bool = False,
    auto_pad: str | bytes = "NOTSET",
    plan: str = "tournament",
) -> Tournament:
    """ONNX MaxPool over ``in_shape = (C, *spatial)`` as ReLU levels built by ``plan``.

    ``plan`` is one of :data:`~onnx_lower.passes.pool_max.MAX_POOL_PLANS`; the default is the
    per-window tournament, ``"auto"`` the plan with the fewest ReLUs.
    """
    win, _ = pool_windows(
        in_shape,
        kernel,
        strides=strides,
        pads=pads,
        dilations=dilations,
        ceil_mode=ceil_mode,
        auto_pad=auto_pad,
    )
    return max_pool_levels(win, int(in_shape[0]), plan)


# --- passes ---


def _pool_attrs(node: gs.Node, in_shape: Sequence[int]) -> dict:
    """The window attributes of a pool node, validated, with the spec's defaults.

    Read through :func:`onnx_lower.windows.window_attributes` here too, not only in
    ``explicit-pads``, so that a custom ``--passes`` list without it refuses out-of-spec
    attributes by name instead of failing inside the window arithmetic.
    """
    wa = window_attributes(node, spatial=in_shape[1:], channels=int(in_shape[0]))
    return {
        "strides": wa.strides,
        "pads": wa.pads,
        "dilations": wa.dilations,
        "ceil_mode": wa.ceil_mode,
        "auto_pad": wa.auto_pad,
    }


def _indices_used(graph: gs.Graph, node: gs.Node) -> bool:
    """The MaxPool's Indices output is read by a node or is a graph output."""
    if len(node.outputs) < 2:
        return False
    idx = node.outputs[1]
    return bool(idx.outputs) or g.is_graph_output(graph, idx)


def _lower_max_pool(graph: gs.Graph, node: gs.Node, namer: g.Namer, in_shape, kernel, attrs):
    if _indices_used(graph, node):
        raise UnsupportedOpError(
            node.name,
            node.op,
            "mlp",
            "its Indices output is used, and argmax indices are out of scope",
            "Remove the Indices consumer, or keep this node with --form im2col",
        )
    t = max_pool_tournament(in_shape, kernel, plan="auto", **attrs)
    x, out = node.inputs[0], node.outputs[0]
    batch, dtype = g.batch_dim(x), x.dtype

    def new_var(suffix: str, size: int) -> gs.Variable:
        return gs.Variable(namer(f"{node.name}/{suffix}"), dtype=dtype, shape=[batch, size])

    def affine(inputs, terms, output, suffix: str) -> None:
        name = namer(f"{node.name}/{suffix}")
        # the pool's own shape, not the inferred one: onnx's inference for opsets < 22 keeps a
        # ceil_mode window that starts past the input, which onnxruntime drops
        shape = list(t.out_shape) if output is out else [output.shape[1]]
        amap = AffineMap(terms, None, shape)
        graph.nodes.append(make_affine(inputs, output, amap, name, source=node.name))

    if out.shape is None:
        out.shape = [batch, *t.out_shape]
    out.dtype = out.dtype or dtype
    candidates = new_var("taps", t.gather.shape[0]) if t.levels else out
    affine([x], [t.gather], candidates, "gather")
    for i, level in enumerate(t.levels):
        diff = new_var(f"diff{i}", level.relus)
        relu = new_var(f"relu{i}", level.relus)
        nxt = out if i == len(t.levels) - 1 else new_var(f"max{i}", level.out_size)
        affine([candidates], [level.diff], diff, f"diff{i}")
        relu_node = gs.Node("Relu", namer(f"{node.name}/Relu{i}"), inputs=[diff], outputs=[relu])
        graph.nodes.append(relu_node)
        affine([relu, candidates], [level.place, level.keep], nxt, f"max{i}")
        candidates = nxt
    g.detach(node)
    graph.nodes.remove(node)


@register_pass("lower-pool")
class LowerPoolPass(GraphPass):
    """MaxPool/GlobalMaxPool → ReLU levels (fewest-ReLU plan); AveragePool/GlobalAveragePool →
    Affine."""

    OPS = ("MaxPool", "AveragePool", "GlobalMaxPool", "GlobalAveragePool", "LpPool")

    def run_on_graph(self, graph: gs.Graph, model: LoweringModel) -> bool:
        nodes = [n for n in graph.nodes if g.is_op(n, *self.OPS)]
        namer = g.Namer(graph)
        for node in nodes:
            x = node.inputs[0]
            if x.dtype is not None and np.dtype(x.dtype).kind != "f":
                raise UnsupportedOpError(
                    node.name, node.op, "mlp",
                    f"input '{x.name}' has type {np.dtype(x.dtype)}; only float activations "
                    f"are lowered", "Use --form im2col or --form auto, which keep it as it is",
                )
            in_shape = g.sample_shape(x)
            if node.op == "LpPool":
                raise UnsupportedOpError(
                    node.name, node.op, "mlp", "LpPool is not lowered", "Use --form im2col"
                )
            global_pool = node.op.startswith("Global")
            kernel = global_pool_kernel(in_shape) if global_pool else g.attr(node, "kernel_shape")
            attrs = {} if global_pool else _pool_attrs(node, in_shape)
            try:
                if node.op.endswith("MaxPool"):
                    _lower_max_pool(graph, node, namer, in_shape, kernel, attrs)
                    continue
                include_pad = bool(g.attr(node, "count_include_pad", 0))
                matrix, out_shape = avg_pool_matrix(
                    in_shape, kernel, count_include_pad=include_pad, **attrs
                )
            except ValueError as exc:
                raise UnsupportedOpError(node.name, node.op, "mlp", str(exc)) from None
            replace_with_affine(graph, node, [x], AffineMap([matrix], None, out_shape))
        return bool(nodes)


#: Elementwise ops that are monotone non-decreasing, so ``max(f(a), f(b)) = f(max(a, b))``.
MONOTONE_OPS = ("Relu", "LeakyRelu", "Sigmoid", "Tanh", "Clip", "HardSigmoid", "Elu", "Selu")


@register_pass("sink-activation-below-maxpool")
class SinkActivationBelowMaxPoolPass(GraphPass):
    """Rewrite MaxPool(f(x)) as f(MaxPool(x)) for monotone f, so the conv before folds in.

    ``max`` commutes with any monotone non-decreasing elementwise ``f``. Applying ``f`` after the
    pool touches fewer elements and, in the mlp form, lets the conv before the activation fold
    into the tournament's first matrices instead of emitting a full conv matrix.
    """

    def run_on_graph(self, graph: gs.Graph, model: LoweringModel) -> bool:
        modified = False
        for pool in list(graph.nodes):
            if not g.is_op(pool, "MaxPool", "GlobalMaxPool") or not pool.inputs:
                continue
            if _indices_used(graph, pool):
                continue  # the Indices output pins the pool to its input
            act = g.producer(pool.inputs[0])
            if act is None or not g.is_op(act, *MONOTONE_OPS) or len(act.outputs) != 1:
                continue
            mid = act.outputs[0]
            if len(mid.outputs) != 1 or g.is_graph_output(graph, mid):
                continue
            if act.op == "LeakyRelu" and g.attr(act, "alpha", 0.01) < 0:
                continue  # a negative slope is not monotone
            x, out = act.inputs[0], pool.outputs[0]
            pooled = gs.Variable(f"{out.name}/pre_{act.op.lower()}", dtype=out.dtype)
            if out.shape is not None:
                pooled.shape = list(out.shape)
            pool.inputs[0] = x
            pool.outputs[0] = pooled
            act.inputs[0] = pooled
            act.outputs[0] = out
            modified = True
        if modified:
            graph.toposort()
        return modified
