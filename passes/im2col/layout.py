"""Channels-last layout of the im2col form: the ``CL`` view, region edges, free aliases.

Layout
------
Inside a lowered region an ``(N, C, *spatial)`` activation is stored channels-last with the
spatial dims flattened, ``(N, S, C)`` with ``S = Π spatial`` (C-order), or as its free 2-D view
``(N·S, C)``. Convs write the 2-D view: onnxruntime fuses a 2-D MatMul with its bias Add and a
following Relu into one FusedGemm, which it never does for 3-D MatMuls (static batch: Reshape,
Gemm, Reshape, then a separate Relu; dynamic batch: nothing fused).

* Region entry: ``Reshape(N, C, S)`` + ``Transpose(0, 2, 1)``; a tensor produced by an
  NHWC→NCHW Transpose (tf2onnx) enters with a Reshape of that Transpose's input. C = 1 or S = 1
  needs no Transpose at all (the two orders coincide).
* Region exit, only where an op needs the original layout or at a graph output (same name):
  ``Transpose(0, 2, 1)`` + Reshape. An NCHW→NHWC Transpose of a region tensor becomes a Reshape.
* ``Flatten``/``Reshape`` to ``(N, C·S)`` feeding only Gemm/MatMul with a constant matrix is
  absorbed: the flatten becomes ``Reshape(N, S·C)`` and the matrix rows are permuted from
  ``c·S + s`` to ``s·C + c``, so no Transpose precedes the classifier.
* Layout-agnostic ops follow the activation: unary elementwise ops; Add/Sub/Mul/Div/... of two
  region tensors (residuals; ``(N, 1, C)`` broadcasts as SE blocks need) or with a constant
  rewritten for ``(N, S, C)`` (:func:`channels_last_constant`); Concat on channels → on the last
  axis; Reshape/Squeeze/Unsqueeze that keep batch and channels (HAR-CNN's Conv2D over
  ``(N, C, 1, W)``) are free aliases; a Pad of spatial axes runs on the ``(N, *spatial, C)`` view.
  Elsewhere Squeeze/Unsqueeze become Reshape (an im2col op); Identity/Dropout pass through.
* A channel shuffle (Reshape ``(N, g, C/g, *sp)``, Transpose of the channel axes, Reshape back:
  channel ``i·g + a`` reads ``a·C/g + i``, :func:`shuffle_permutation`) is absorbed by the conv
  that produces it (through channelwise activations), else it is one Transpose of the
  ``(N·S, g, C/g)`` view.
* Split and Slice of the channels (ShuffleNet V2's channel split) are Slices of the last axis.

"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
import onnx_graphsurgeon as gs

from onnx_lower import graph as g
from onnx_lower.errors import LoweringError
from onnx_lower.pass_manager import LoweringModel

from .emitter import Emitter, float_dtype, is_static
from .fold import single_consumer
from .ops import FORM, SINKABLE

__all__ = ["CL", "LayoutCore", "LayoutOps", "channels_last_constant", "flatten_permutation",
           "names_used_by_subgraphs_of", "shuffle_permutation"]


def flatten_permutation(channels: int, s: int) -> np.ndarray:
    """``perm`` with ``flat_cl[:, j] = flat_nchw[:, perm[j]]`` (``j = s·C + c`` ↔ ``c·S + s``)."""
    return np.arange(channels * s).reshape(channels, s).T.reshape(-1)



def shuffle_permutation(channels: int, groups: int) -> np.ndarray:
    """``perm`` with ``shuffled[..., j] = x[..., perm[j]]`` for ShuffleNet's channel shuffle
    (Reshape to ``(g, C/g)``, swap the two, Reshape back): ``j = i·g + a`` reads ``a·C/g + i``."""
    j = np.arange(channels)
    return (j % groups) * (channels // groups) + j // groups


def channels_last_constant(value: np.ndarray, rank: int, channels: int,
                           spatial: Sequence[int]) -> np.ndarray | None:
    """A constant broadcasting against ``(N, C, *spatial)`` rewritten for ``(N, S, C)``.

    Returns None when the constant varies along the batch axis or does not broadcast.
    """
    v = np.asarray(value)
    if v.ndim > rank:
        return None
    v = v.reshape((1,) * (rank - v.ndim) + v.shape)
    if v.shape[0] != 1 or v.shape[1] not in (1, channels):
        return None
    c = v.shape[1]
    if all(d == 1 for d in v.shape[2:]):
        return v.reshape(1, 1, c)
    try:
        full = np.broadcast_to(v[0], (c, *spatial))
    except ValueError:
        return None
    return np.ascontiguousarray(full.reshape(c, -1).T)[None]



@dataclasses.dataclass
class CL:
    """The channels-last form of an ``(N, C, *spatial)`` tensor.

    It exists as ``tensor`` ``(N, S, C)`` and/or ``rows`` ``(N·S, C)``: the same buffer, two
    Reshape-related views. Convs produce ``rows`` (a 2-D MatMul, which onnxruntime fuses with
    its bias and activation into one Gemm); gathers and pools read ``tensor``.
    """

    tensor: gs.Variable | None
    spatial: tuple[int, ...]
    channels: int
    batch: object = None
    dtype: np.dtype = np.dtype(np.float32)
    rows: gs.Variable | None = None

    @property
    def s(self) -> int:
        return math.prod(self.spatial)

    @property
    def rows_dim(self):
        return self.batch * self.s if isinstance(self.batch, (int, np.integer)) else None



def _is_to_nchw(node: gs.Node, rank: int) -> bool:
    """``node`` is a Transpose whose output, made channels-last, is its input (NHWC → NCHW)."""
    if not g.is_op(node, "Transpose"):
        return False
    perm = list(g.attr(node, "perm", None) or [])
    return len(perm) == rank and [perm[i] for i in [0, *range(2, rank), 1]] == list(range(rank))


def names_used_by_subgraphs_of(body: gs.Graph) -> set[str]:
    """Names of the tensors that the nodes of ``body`` (at any depth) read."""
    return {t.name for sub in g.all_graphs(body) for n in sub.nodes for t in n.inputs}


def names_used_by_subgraphs(graph: gs.Graph) -> set[str]:
    return {name for node in graph.nodes for v in node.attrs.values() if isinstance(v, gs.Graph)
            for name in names_used_by_subgraphs_of(v)}



class LayoutCore:
    """The layout state of one graph's rewrite and the conversions between NCHW and CL."""

    def __init__(self, graph: gs.Graph, model: LoweringModel):
        self.graph, self.model = graph, model
        self.e = Emitter(graph, model.opset)
        self.cl: dict[str, CL] = {}
        self.padded: dict[tuple[str, int], gs.Variable] = {}
        self.s2d: dict[tuple[str, tuple[int, ...]], CL] = {}
        self.flat: dict[str, tuple[gs.Variable, tuple[int, int]]] = {}
        self.sunk: dict[str, gs.Node] = {}  # conv output -> its activation, run per chunk
        self.originals: dict[str, gs.Tensor] = {}  # name -> tensor, for every CL/flat entry
        # tensors whose CL data a producer conv already wrote in the order of the channel
        # shuffle that follows (the shuffle is then free)
        self.shuffled: set[str] = set()
        graph_outputs = {t.name for t in graph.outputs}
        self.keep_nchw = names_used_by_subgraphs(graph) | graph_outputs

    # -- the two views of a channels-last tensor --------------------------------------------

    def t3(self, x: CL) -> gs.Variable:
        """``(N, S, C)``."""
        if x.tensor is None:
            x.tensor = self.e.reshape(x.rows, [-1, x.s, x.channels], [x.batch, x.s, x.channels],
                                      f"{x.rows.name}/3d")
        return x.tensor

    def t2(self, x: CL) -> gs.Variable:
        """``(N·S, C)``: what a 2-D MatMul reads and writes."""
        if x.rows is None:
            x.rows = self.e.reshape(x.tensor, [-1, x.channels], [x.rows_dim, x.channels],
                                    f"{x.tensor.name}/2d")
        return x.rows

    def primary(self, x: CL) -> gs.Variable:
        """The view that exists already (2-D preferred: it lets onnxruntime fuse into Gemm)."""
        return x.rows if x.rows is not None else x.tensor

    def padded_spatial(self, x: CL, pads, base: str, mode: str = "constant"
                       ) -> tuple[gs.Variable, list]:
        """``x`` as ``(N, *spatial, C)``, padded by ``pads`` (ONNX layout over the spatial axes)
        when any is nonzero; the tensor and its shape. What the tap-Slice forms (depthwise
        convs, MaxPool) read."""
        n, c, r = x.batch, x.channels, len(x.spatial)
        shape = [n, *x.spatial, c]
        view = self.e.reshape(self.primary(x), [-1, *x.spatial, c], list(shape),
                              base + "/spatial")
        if any(pads):
            shape = [n, *(a + pads[i] + pads[r + i] for i, a in enumerate(x.spatial)), c]
            view = self.e.pad(view, [0, *pads[:r], 0, 0, *pads[r:], 0], shape,
                              base + ("/edge_pad" if mode == "edge" else "/dw_pad"), mode=mode)
        return view, shape

    # -- layout conversions -----------------------------------------------------------------

    def has_nchw(self, t: gs.Tensor) -> bool:
        """``t`` itself is (still) computed: not only present in a channels-last form."""
        return isinstance(t, gs.Constant) or bool(t.inputs) or (
            t.name not in self.cl and t.name not in self.flat)

    def to_cl(self, t: gs.Tensor) -> CL:
        """The channels-last form of ``t``; an entry conversion if it has none yet."""
        if t.name in self.cl:
            return self.cl[t.name]
        if t.shape is None or len(t.shape) < 3:
            raise LoweringError(f"tensor '{t.name}' needs a rank >= 3 shape for the im2col form")
        dims = g.sample_shape(t, FORM)
        c, spatial = dims[0], tuple(dims[1:])
        s = math.prod(spatial)
        base = f"{t.name}/to_cl"
        shape = [t.shape[0], s, c]
        src = g.producer(t)
        if src is not None and _is_to_nchw(src, len(t.shape)):
            # t = Transpose(u) with u already channels-last (tf2onnx's NHWC input)
            v = self.e.reshape(src.inputs[0], [-1, s, c], shape, base)
        elif c == 1 or s == 1:
            v = self.e.reshape(t, [-1, s, c], shape, base)
        else:
            flat = self.e.reshape(t, [-1, c, s], [t.shape[0], c, s], base)
            v = self.e.transpose(flat, [0, 2, 1], shape, base)
        return self.new_cl(t, v, spatial, c)

    def ensure_nchw(self, t: gs.Tensor) -> None:
        """Make ``t`` itself (same name) exist again: an exit conversion from its CL form."""
        if self.has_nchw(t):
            return
        if t.name in self.flat:
            flat, (c, s) = self.flat[t.name]
            # NCHW flatten order from the CL flatten: one Gather along the feature axis.
            perm = flatten_permutation(c, s)
            idx = self.e.const(f"{t.name}/unflatten", np.argsort(perm).astype(np.int64))
            node = gs.Node("Gather", self.e.namer(f"{t.name}/from_cl"), {"axis": 1}, [flat, idx],
                           [t])
            self.graph.nodes.append(node)
            return
        x = self.cl[t.name]
        base = f"{t.name}/from_cl"
        if x.channels == 1 or x.s == 1:
            self.e.reshape(self.primary(x), [-1, x.channels, *x.spatial], t.shape, base, out=t)
            return
        tr = self.e.transpose(self.t3(x), [0, 2, 1], [t.shape[0], x.channels, x.s], base)
        self.e.reshape(tr, [-1, x.channels, *x.spatial], t.shape, base, out=t)

    def cl_view(self, t: gs.Tensor) -> CL:
        """Shape facts of ``t``'s channels-last form, without emitting a conversion."""
        if t.name in self.cl:
            return self.cl[t.name]
        dims = g.sample_shape(t, FORM)
        return CL(None, tuple(dims[1:]), dims[0], t.shape[0], float_dtype(t))

    def new_cl(self, t: gs.Tensor, v: gs.Variable, spatial, channels) -> CL:
        """Record ``v`` (3-D ``(N, S, C)`` or 2-D ``(N·S, C)``) as the CL form of ``t``."""
        info = CL(None, tuple(spatial), int(channels), t.shape[0], float_dtype(v))
        if len(v.shape) == 2:
            info.rows = v
        else:
            info.tensor = v
        self.cl[t.name] = info
        self.originals[t.name] = t
        return info

    # -- helpers ----------------------------------------------------------------------------

    def activation(self, t: gs.Tensor) -> bool:
        """``t`` is (or can be) channels-last: rank >= 3, static non-batch dims, float."""
        if t.name in self.cl:
            return True
        if isinstance(t, gs.Constant) or t.shape is None or len(t.shape) < 3:
            return False
        if not is_static(t.shape[1:]):
            return False
        return t.dtype is None or np.dtype(t.dtype).kind == "f"

    def out_cl_shape(self, t: gs.Tensor):
        dims = g.sample_shape(t, FORM)
        return dims[0], tuple(dims[1:])

    # -- gathers, chunks --------------------------------------------------------------------

    def source(self, t: gs.Variable, zero_row: bool, base: str, axis: int = 1) -> gs.Variable:
        """``t``, with one zero row appended on ``axis`` if padding taps read it."""
        if not zero_row:
            return t
        key = (t.name, axis)
        if key not in self.padded:
            shape = list(t.shape)
            shape[axis] = int(shape[axis]) + 1
            pads = [0] * (2 * len(shape))
            pads[len(shape) + axis] = 1
            self.padded[key] = self.e.pad(t, pads, shape, base + "/zero_row")
        return self.padded[key]


class LayoutOps:
    """Reshape, Flatten, Squeeze, Unsqueeze, Transpose and Pad of channels-last tensors."""

    def _alias(self, node) -> bool:
        """Reshape/Squeeze/Unsqueeze/Flatten that keep batch and channels: same CL data."""
        x_t, out_t = node.inputs[0], node.outputs[0]
        if x_t.name not in self.cl or out_t.shape is None or x_t.shape is None:
            return False
        x = self.cl[x_t.name]
        if len(out_t.shape) >= 3 and is_static(out_t.shape[1:]):
            c, spatial = self.out_cl_shape(out_t)
            if (c == x.channels and math.prod(spatial) == x.s
                    and out_t.shape[0] == x_t.shape[0]):
                self.cl[out_t.name] = dataclasses.replace(x, spatial=tuple(spatial))
                self.originals[out_t.name] = out_t
                return True
            return False
        if len(out_t.shape) == 2 and is_static(out_t.shape[1:]) and out_t.shape[0] == x_t.shape[0]:
            size = x.s * x.channels
            if int(out_t.shape[1]) != size:
                return False
            base = node.name or out_t.name
            if x.s == 1 or x.channels == 1:
                self.e.reshape(self.primary(x), [-1, size], out_t.shape, base, out=out_t)
                return True
            if self._absorbable(out_t):
                flat = self.e.reshape(self.primary(x), [-1, size], [out_t.shape[0], size],
                                      base + "/cl")
                self.flat[out_t.name] = (flat, (x.channels, x.s))
                self.originals[out_t.name] = out_t
                return True
        return False

    def _absorbable(self, t: gs.Tensor) -> bool:
        """Every consumer of ``t`` takes it as the left operand against a constant matrix."""
        if not t.outputs or t.name in self.keep_nchw:
            return False
        for c in t.outputs:
            if g.is_op(c, "Gemm"):
                if c.inputs[0] is not t or g.attr(c, "transA", 0) or \
                        g.const_value(c.inputs[1]) is None:
                    return False
            elif g.is_op(c, "MatMul"):
                b = g.const_value(c.inputs[1])
                if c.inputs[0] is not t or b is None or b.ndim != 2:
                    return False
            else:
                return False
        return True

    def do_Reshape(self, node) -> bool:
        return self._alias(node) or self._shuffle(node)

    def channel_shuffle(self, node) -> tuple[int, gs.Node, gs.Node] | None:
        """``(g, transpose, merge)`` if the Reshape ``node`` opens a channel shuffle.

        The pattern (PyTorch's ``channel_shuffle``): Reshape ``(N, C, *sp)`` → ``(N, g, C/g,
        *sp)``, Transpose swapping axes 1 and 2, Reshape back to ``(N, C, *sp)``, each the sole
        consumer of the one before, with ``1 < g < C``.
        """
        x_t, mid = node.inputs[0], node.outputs[0]
        if not g.is_op(node, "Reshape") or x_t.shape is None or mid.shape is None:
            return None
        rank = len(x_t.shape)
        if rank < 3 or len(mid.shape) != rank + 1 or not is_static(x_t.shape[1:]) \
                or not is_static(mid.shape[1:]) or mid.shape[0] != x_t.shape[0]:
            return None
        c, grp = int(x_t.shape[1]), int(mid.shape[1])
        if not 1 < grp < c or grp * int(mid.shape[2]) != c or \
                list(mid.shape[3:]) != list(x_t.shape[2:]):
            return None
        tr = single_consumer(self.graph, mid)
        if (tr is None or mid.name in self.keep_nchw or not g.is_op(tr, "Transpose")
                or list(g.attr(tr, "perm", [])) != [0, 2, 1, *range(3, rank + 1)]):
            return None
        swapped = tr.outputs[0]
        merge = single_consumer(self.graph, swapped)
        if (merge is None or swapped.name in self.keep_nchw or not g.is_op(merge, "Reshape")
                or merge.inputs[0] is not swapped):
            return None
        out = merge.outputs[0]
        if out.shape is None or list(out.shape) != list(x_t.shape):
            return None
        return grp, tr, merge

    def shuffle_after(self, t: gs.Tensor) -> tuple[int, gs.Tensor] | None:
        """``(g, u)`` when ``t`` reaches a channel shuffle of ``g`` groups through sole-consumer
        channelwise activations (which commute with a channel permutation); ``u`` is the
        shuffle's input."""
        while True:
            nxt = single_consumer(self.graph, t)
            if nxt is None or t.name in self.keep_nchw or nxt.inputs[0] is not t:
                return None
            if g.is_op(nxt, "Reshape"):
                found = self.channel_shuffle(nxt)
                return None if found is None else (found[0], t)
            if (nxt.op not in SINKABLE or nxt.domain not in g.DEFAULT_DOMAINS
                    or len(nxt.outputs) != 1
                    or any(g.const_value(i) is None for i in nxt.inputs[1:] if i.name)):
                return None
            t = nxt.outputs[0]

    def _shuffle(self, node) -> bool:
        """A channel shuffle of a CL tensor: free when the producer conv wrote its channels in
        shuffled order (:attr:`shuffled`), else one Transpose of the ``(N·S, g, C/g)`` view
        (the NCHW round trip took three: exit, the shuffle itself, entry)."""
        x_t = node.inputs[0]
        found = self.channel_shuffle(node) if x_t.name in self.cl else None
        if found is None:
            return False
        grp, tr, merge = found
        x, out_t = self.cl[x_t.name], merge.outputs[0]
        if x_t.name in self.shuffled:
            self.cl[out_t.name] = x
            self.originals[out_t.name] = out_t
        else:
            base = node.name or out_t.name
            c, rows = x.channels, x.rows_dim
            v = self.e.reshape(self.t2(x), [-1, grp, c // grp], [rows, grp, c // grp],
                               base + "/groups")
            v = self.e.transpose(v, [0, 2, 1], [rows, c // grp, grp], base + "/shuffle")
            y = self.e.reshape(v, [-1, c], [rows, c], base + "/merge")
            self.new_cl(out_t, y, x.spatial, c)
        g.detach(tr)
        g.detach(merge)
        return True

    def do_Flatten(self, node) -> bool:
        rank = len(node.inputs[0].shape or [])
        if int(g.attr(node, "axis", 1)) % max(rank, 1) != 1:
            return False
        return self._alias(node)

    def do_Squeeze(self, node) -> bool:
        return self._alias(node) or self._as_reshape(node)

    def do_Unsqueeze(self, node) -> bool:
        return self._alias(node) or self._as_reshape(node)

    def _as_reshape(self, node) -> bool:
        """Squeeze/Unsqueeze that keep the batch axis become a Reshape (an allowed op)."""
        x_t, out_t = node.inputs[0], node.outputs[0]
        if (x_t.shape is None or out_t.shape is None or len(x_t.shape) < 1
                or len(out_t.shape) < 1 or out_t.shape[0] != x_t.shape[0]
                or not is_static(out_t.shape[1:])):
            return False
        self.ensure_nchw(x_t)
        self.e.reshape(x_t, [-1, *out_t.shape[1:]] if len(out_t.shape) > 1 else [-1],
                       out_t.shape, node.name or out_t.name, out=out_t)
        return True

    def do_Transpose(self, node) -> bool:
        """NCHW -> NHWC of a CL tensor is a Reshape (tf2onnx's exit before Flatten)."""
        x_t, out_t = node.inputs[0], node.outputs[0]
        if x_t.name not in self.cl or self.has_nchw(x_t):
            return False
        x = self.cl[x_t.name]
        rank = len(x.spatial) + 2
        if list(g.attr(node, "perm", [])) != [0, *range(2, rank), 1]:
            return False
        self.e.reshape(self.primary(x), [-1, *x.spatial, x.channels], out_t.shape,
                       node.name or out_t.name, out=out_t)
        return True

    def do_Split(self, node) -> bool:
        """A Split of the channels of a CL tensor (ShuffleNet V2's channel split): one Slice of
        the last axis per output (Split is not an im2col op). ``axis`` defaults to 0:
        https://onnx.ai/onnx/operators/onnx__Split.html"""
        x_t = node.inputs[0]
        if x_t.name not in self.cl:
            return False
        x = self.cl[x_t.name]
        rank = len(x.spatial) + 2
        if int(g.attr(node, "axis", 0)) % rank != 1:
            return False
        sizes = []
        for o in node.outputs:
            if (o.shape is None or len(o.shape) != rank or not is_static(o.shape[1:])
                    or tuple(o.shape[2:]) != x.spatial):
                return False
            sizes.append(int(o.shape[1]))
        if sum(sizes) != x.channels:
            return False
        self._channel_slices(x, list(zip(node.outputs, np.cumsum([0, *sizes[:-1]]), sizes)),
                             node.name or node.outputs[0].name)
        return True

    def do_Slice(self, node) -> bool:
        """A Slice of the channels only (step 1) of a CL tensor: a Slice of the last axis."""
        x_t, out_t = node.inputs[0], node.outputs[0]
        if x_t.name not in self.cl or out_t.shape is None:
            return False
        x = self.cl[x_t.name]
        rank = len(x.spatial) + 2
        if self.e.opset >= 10:
            vals = [g.const_value(t) if t.name else None for t in node.inputs[1:]]
            if len(vals) < 2 or any(v is None for v in vals) or \
                    (len(vals) > 3 and np.any(vals[3] != 1)):
                return False
            starts, axes = vals[0], vals[2] if len(vals) > 2 else np.arange(len(vals[0]))
        else:
            starts = g.attr(node, "starts")
            axes = g.attr(node, "axes", None) or list(range(len(starts)))
        if [int(a) % rank for a in np.ravel(axes)] != [1] or len(out_t.shape) != rank \
                or not is_static(out_t.shape[1:]) or tuple(out_t.shape[2:]) != x.spatial:
            return False
        c = x.channels
        start = int(np.ravel(starts)[0])
        start = min(max(start + c if start < 0 else start, 0), c)
        size = int(out_t.shape[1])
        if start + size > c:
            return False
        self._channel_slices(x, [(out_t, start, size)], node.name or out_t.name)
        return True

    def _channel_slices(self, x: CL, parts, base: str) -> None:
        """``(tensor, start, size)`` parts: CL forms sliced from ``x``'s channels."""
        v = self.primary(x)
        axis = len(v.shape) - 1
        for out_t, start, size in parts:
            y = self.e.slice(v, [int(start)], [int(start + size)], [axis],
                             [*v.shape[:-1], size], f"{base}/{out_t.name}")
            self.new_cl(out_t, y, x.spatial, size)

    def do_Pad(self, node) -> bool:
        """A Pad of spatial axes only works on the ``(N, *spatial, C)`` view."""
        x_t, out_t = node.inputs[0], node.outputs[0]
        if x_t.name not in self.cl or out_t.shape is None or not is_static(out_t.shape[1:]):
            return False
        x = self.cl[x_t.name]
        rank = len(x.spatial) + 2
        if self.e.opset >= 11:
            pads = g.const_value(node.inputs[1]) if len(node.inputs) > 1 else None
            if pads is None or (len(node.inputs) > 3 and node.inputs[3].name):
                return False  # computed pads, or the axes input
            value = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
            if value is not None and g.const_value(value) is None:
                return False
        else:
            pads, value = g.attr(node, "pads"), None
        pads = [int(p) for p in pads]
        if len(pads) != 2 * rank or pads[0] or pads[1] or pads[rank] or pads[rank + 1]:
            return False
        c, spatial = self.out_cl_shape(out_t)
        n = x.batch
        base = node.name or out_t.name
        view = self.e.reshape(self.primary(x), [-1, *x.spatial, x.channels],
                              [n, *x.spatial, c], base + "/spatial")
        cl_pads = [0, *pads[2:rank], 0, 0, *pads[rank + 2:], 0]
        attrs = {k: v for k, v in node.attrs.items() if k != "pads"}
        if self.e.opset >= 11:
            inputs = [view, self.e.ints(base + "/pads", cl_pads)]
            if value is not None:
                inputs.append(value)
        else:
            inputs = [view]
            attrs["pads"] = cl_pads
        padded = self.e.op("Pad", inputs, [n, *spatial, c], x.dtype, base, attrs)
        s = math.prod(spatial)
        v = self.e.reshape(padded, [-1, s, c], [n, s, c], base + "/flat")
        self.new_cl(out_t, v, spatial, c)
        return True

