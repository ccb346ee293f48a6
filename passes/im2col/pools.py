"""Pools of the im2col form: MaxPool by pairwise maxima, AveragePool and global pools.

Pools
-----
* MaxPool with dilation 1 (issue 13, :func:`slice_plan`): one **edge** Pad of the
  ``(N, *spatial, C)`` view (exact: a window reaching into the padding holds a valid tap and,
  being contiguous on each axis, the border element the pad repeats; ``max(a, a) = a``), then
  axis by axis (outer first, :data:`.cost.POOL_AXIS_ORDER`) a balanced tree of pairwise maxima
  over the window's (strided) Slices. Against the gathered plan below (BENCHMARKS.md,
  "Depthwise convs and MaxPool without gathered taps"): ShuffleNet V2 (a 24-channel 112² stem
  pool) −17 to −19 % whole-network, ResNet-18 −3 %, SqueezeNet −1 to 0 %; per layer 0.9-1.0×
  (the 3 elementwise nodes per pairwise max remain the cost, 2-3× native).
* MaxPool otherwise (dilated): padding is −inf, so padding taps repeat a valid tap of the window
  (:func:`onnx_lower.passes.pool.max_pool_taps`; ``max(a, a) = a``) and no zero row is read. Maxima
  use ``max(a, b) = b + relu(a - b)`` (Sub, Relu, Add). :func:`max_pool_plan` picks the cheapest of
  a joint plan over all K taps and separable plans (one stage per axis: the window of a product grid
  is the product of per-axis windows), each stage either a balanced tree over K gathered taps or a
  halving tournament of depth ⌈log2 K⌉ on two gathered halves (Slices of the tap axis). SqueezeNet's
  3×3/2 max pool: 3.3 ms → 1.9 ms against halving over all 9 taps.
* AveragePool: ``ReduceSum(Gather(x), axis=2) · scale[o]`` with padding taps on the zero row;
  ``scale[o] = 1/divisor(o)`` is read off :func:`onnx_lower.passes.pool.avg_pool_matrix`, the
  one place that has ONNX's ``count_include_pad`` / ``ceil_mode`` divisor rules.
* GlobalAveragePool: ``ReduceSum`` over S, then ``Mul(1/S)``. GlobalMaxPool: halving tournament
  over S.

"""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import onnx_graphsurgeon as gs

from onnx_lower import graph as g
from onnx_lower.errors import UnsupportedOpError
from onnx_lower.passes.pool import avg_pool_matrix, max_pool_taps, pool_windows
from onnx_lower.windows import Windows

from . import cost
from .conv import gather_indices
from .cost import max_stage_cost
from .layout import CL
from .ops import FORM

__all__ = ["MaxStage", "PoolOps", "SlicePlan", "avg_pool_scale", "max_pool_plan", "slice_plan"]


def avg_pool_scale(in_shape, kernel, **kw) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """``(taps, scale, out_spatial)`` of an AveragePool over ``in_shape = (C, *spatial)``.

    ``scale[o] = 1 / divisor(o)`` is read off :func:`onnx_lower.passes.pool.avg_pool_matrix`
    (one channel), whose nonzeros in row ``o`` all equal it; that function owns ONNX's divisor rules
    (``count_include_pad``, ``ceil_mode``). A window without valid taps has scale 0.
    """
    spatial = tuple(int(v) for v in in_shape[1:])
    win, _ = pool_windows((1, *spatial), kernel, strides=kw.get("strides"), pads=kw.get("pads"),
                          dilations=kw.get("dilations"), ceil_mode=kw.get("ceil_mode", False),
                          auto_pad=kw.get("auto_pad", "NOTSET"))
    a, out_shape = avg_pool_matrix((1, *spatial), kernel, **kw)
    scale = np.asarray(a.max(axis=1).todense(), dtype=np.float64).reshape(-1)
    return win.taps, scale, tuple(out_shape[1:])


@dataclasses.dataclass(frozen=True)
class MaxStage:
    """One reduction of a max pool: the max over each row of ``taps`` (indices into the grid
    before the stage) gives the grid ``shape_after``. ``mode`` is ``"tree"`` (one Gather per
    tap, a balanced tree of pairwise maxima) or ``"halves"`` (two Gathers of ``⌈k/2⌉`` taps,
    then maxima of the two halves of the tap axis, level by level)."""

    taps: np.ndarray
    shape_after: tuple[int, ...]
    mode: str = "tree"



def max_pool_plan(spatial, kernel, **kw) -> tuple[list[MaxStage], tuple[int, ...]]:
    """The cheapest way to take a MaxPool's window maxima: ``(stages, out_spatial)``.

    A window of a product grid is the product of its per-axis windows, so the max can be taken
    one axis at a time (separable) as well as over all ``K`` taps at once (joint); each stage
    takes the cheaper of its two modes (:func:`max_stage_cost`). For 3×3/2 windows on large
    maps the separable plan writes about 20 % fewer elements than the joint one, for 2×2/2 the
    joint one ~15 % fewer; on tiny maps the node count decides. Padding taps repeat a valid
    tap (:func:`onnx_lower.passes.pool.max_pool_taps`): ``max(a, a) = a``.
    """
    spatial = tuple(int(v) for v in spatial)
    r = len(spatial)
    win, _ = pool_windows((1, *spatial), kernel, **kw)
    out = tuple(win.out_shape)
    taps = max_pool_taps(win)
    best_cost, mode = max_stage_cost(taps.shape[1], taps.shape[0])
    best = [MaxStage(taps, out, mode)]
    if r == 1:
        return best, out
    per_axis = []
    for i in range(r):
        sub = {k: (None if v is None else _axis_values(k, v, i, r)) for k, v in kw.items()}
        w1, _ = pool_windows((1, spatial[i]), (kernel[i],), **sub)
        per_axis.append(max_pool_taps(w1))  # (out_i, k_i)
    for order in itertools.permutations(range(r)):
        stages, cost, shape = [], 0.0, list(spatial)
        for ax in order:
            t1 = per_axis[ax]
            if t1.shape[1] == 1 and np.array_equal(t1[:, 0], np.arange(shape[ax])):
                continue  # identity along this axis
            before = tuple(shape)
            shape[ax] = t1.shape[0]
            grid = np.indices(shape).reshape(r, -1)  # coordinates after the stage
            strides = np.cumprod((1,) + before[::-1][:-1])[::-1]
            rest = sum(grid[a] * strides[a] for a in range(r) if a != ax)
            stage_taps = (rest[:, None] + t1[grid[ax]] * strides[ax]).astype(np.int64)
            c, mode = max_stage_cost(t1.shape[1], stage_taps.shape[0])
            stages.append(MaxStage(stage_taps, tuple(shape), mode))
            cost += c
        if cost < best_cost:
            best, best_cost = stages, cost
    return best, out


@dataclasses.dataclass(frozen=True)
class SlicePlan:
    """A MaxPool as Slices of an edge-padded input: ``pads`` (ONNX layout) and, per axis,
    ``(start, k, stride, out)``: tap ``t`` of window ``o`` reads padded position
    ``start + t + o·stride``; ``order`` is the order the axes are reduced in."""

    pads: tuple[int, ...]
    axes: tuple[tuple[int, int, int, int], ...]
    order: tuple[int, ...]


def slice_plan(win: Windows, opset: int, dilations=None) -> SlicePlan | None:
    """The :class:`SlicePlan` of a MaxPool with windows ``win`` (:func:`pool_windows` of a
    ``(1, *spatial)`` input), or None where it does not apply (dilation > 1, opset < 10 with
    strides). An identity pool (1×1, stride 1) has no axis to reduce.

    Padding is −inf; an **edge** pad repeats the border value instead, which is exact: with
    dilation 1 every window is a contiguous run on each axis, so a window that reaches into the
    padding and holds a valid tap (:func:`max_pool_taps` refuses the others) also holds the
    border position whose value the pad repeats (``max(a, a) = a``); on several axes the
    repeated corner is the clamped position, inside every per-axis window. The window of a
    product grid is the product of its per-axis windows, so the axes are reduced one at a time.
    """
    spatial = tuple(int(v) for v in win.in_shape)
    r = len(spatial)
    if not cost.POOL_SLICES or any(d != 1 for d in (dilations or ())):
        return None
    max_pool_taps(win)  # raises for a window without a valid tap
    begins, ends, axes = [0] * r, [0] * r, []
    for i, pos in enumerate(win.positions):
        out, k = pos.shape
        stride = int(pos[1, 0] - pos[0, 0]) if out > 1 else 1
        want = pos[0, 0] + stride * np.arange(out)[:, None] + np.arange(k)[None, :]
        if stride < 1 or not np.array_equal(pos, want):
            return None
        begins[i] = max(0, -int(pos.min()))
        ends[i] = max(0, int(pos.max()) - (spatial[i] - 1))
        axes.append((int(pos[0, 0]) + begins[i], k, stride, out))
    if opset < 10 and any(a[2] != 1 for a in axes):
        return None
    keep = [i for i, (start, k, stride, out) in enumerate(axes)
            if not (k == 1 and stride == 1 and out == spatial[i] and start == begins[i])]
    order = tuple(keep) if cost.POOL_AXIS_ORDER == "first" else tuple(reversed(keep))
    return SlicePlan(tuple(begins + ends), tuple(axes), order)


def _axis_values(key: str, value, i: int, r: int):
    """Attribute ``value`` of a pool restricted to axis ``i`` of ``r``."""
    if key == "pads":
        return (value[i], value[r + i])
    if key in ("strides", "dilations"):
        return (value[i],)
    return value



class PoolOps:
    """MaxPool, AveragePool, GlobalAveragePool and GlobalMaxPool on channels-last tensors."""

    def _pool_kw(self, node):
        return dict(strides=g.attr(node, "strides", None), pads=g.attr(node, "pads", None),
                    dilations=g.attr(node, "dilations", None),
                    ceil_mode=bool(g.attr(node, "ceil_mode", 0)),
                    auto_pad=g.attr(node, "auto_pad", "NOTSET"))

    def _pool_out(self, node, out_t, win_out):
        """Channels and spatial output of a pool; the windows win over a declared shape.

        ONNX shape inference keeps a ``ceil_mode`` window that would start past the padded
        input (e.g. kernel 1, stride 2 over 2 elements: it says 2, onnxruntime computes 1);
        the windows follow onnxruntime, the reference, so the declared shape is corrected.
        """
        c, out_spatial = self.out_cl_shape(out_t)
        if win_out != out_spatial:
            if not g.attr(node, "ceil_mode", 0):
                raise UnsupportedOpError(node.name, node.op, FORM,
                                         f"its windows give {win_out}, the model says "
                                         f"{out_spatial}")
            out_t.shape = [out_t.shape[0], c, *win_out]
            self.model.note("im2col_shape_fixes", {"node": node.name, "declared": out_spatial,
                                                   "windows": win_out})
        return c, tuple(win_out)

    def max2(self, a, b, shape, base: str):
        """``max(a, b) = b + relu(a - b)``."""
        d = self.e.binary("Sub", a, b, shape, base + "/max_sub")
        return self.e.binary("Add", b, self.e.unary("Relu", d, shape, base + "/max_relu"), shape,
                             base + "/max_add")

    def max_tree(self, leaves, shape, base: str):
        """Pairwise maxima of equally shaped tensors, as a balanced tree."""
        level = 0
        while len(leaves) > 1:
            nxt = [self.max2(leaves[i], leaves[i + 1], shape, f"{base}/l{level}")
                   for i in range(0, len(leaves) - 1, 2)]
            leaves = nxt + leaves[len(leaves) - len(leaves) % 2:]
            level += 1
        return leaves[0]

    def tournament(self, x, k: int, shape_fn, base: str):
        """Max over axis 2 (``k`` candidates) by halving: slices ``[0, h)`` and ``[k-h, k)``."""
        while k > 1:
            h = (k + 1) // 2
            a = self.e.slice(x, [0], [h], [2], shape_fn(h), base + "/max_lo")
            b = self.e.slice(x, [k - h], [k], [2], shape_fn(h), base + "/max_hi")
            x = self.max2(a, b, shape_fn(h), base)
            k = h
        return x

    def max_pool_slices(self, x: CL, plan: SlicePlan, c: int, base: str) -> gs.Variable:
        """The max of every window as one edge Pad and, axis by axis, a balanced tree of
        pairwise maxima over the (strided) Slices of the window's taps; ``(N, S_out, C)``."""
        n = x.batch
        y, shape = self.padded_spatial(x, plan.pads, base, mode="edge")
        for ax in plan.order:
            start, k, stride, out = plan.axes[ax]
            shape = list(shape)
            shape[1 + ax] = out
            leaves = [self.e.slice(y, [start + t], [start + t + (out - 1) * stride + 1], [1 + ax],
                                   shape, f"{base}/ax{ax}_tap{t}", steps=[stride])
                      for t in range(k)]
            y = self.max_tree(leaves, shape, f"{base}/ax{ax}")
        s_out = math.prod(shape[1:-1])
        return self.e.reshape(y, [-1, s_out, c], [n, s_out, c], base + "/max_out")

    def do_MaxPool(self, node) -> bool:
        x_t, out_t = node.inputs[0], node.outputs[0]
        if not self.activation(x_t):
            return False
        if len(node.outputs) > 1 and (node.outputs[1].outputs
                                      or g.is_graph_output(self.graph, node.outputs[1])):
            raise UnsupportedOpError(node.name, node.op, FORM,
                                     "its Indices output is used; only the values can be lowered")
        x = self.to_cl(x_t)
        kernel = tuple(g.attr(node, "kernel_shape"))
        try:
            kw = self._pool_kw(node)
            win, _ = pool_windows((1, *x.spatial), kernel, **kw)
            sliced = slice_plan(win, self.e.opset, kw["dilations"])
            stages = None if sliced is not None else max_pool_plan(x.spatial, kernel, **kw)[0]
        except ValueError as exc:
            raise UnsupportedOpError(node.name, node.op, FORM, str(exc)) from exc
        c, out_spatial = self._pool_out(node, out_t, tuple(win.out_shape))
        base = node.name or out_t.name
        if sliced is not None:
            y = self.max_pool_slices(x, sliced, c, base) if sliced.order else self.primary(x)
            self.new_cl(out_t, y, out_spatial, c)
            return True
        y = self.t3(x)
        for i, stage in enumerate(stages):
            rows, k = stage.taps.shape
            shape = [x.batch, rows, c]
            tag = f"{base}/s{i}" if len(stages) > 1 else base
            if stage.mode == "tree" or k == 1:
                leaves = [self.e.gather(y, stage.taps[:, j], shape, f"{tag}/tap{j}")
                          for j in range(k)]
                y = self.max_tree(leaves, shape, tag)
                continue
            h = (k + 1) // 2

            def shape_fn(j, rows=rows):
                return [x.batch, rows, j, c]

            a = self.e.gather(y, stage.taps[:, :h], shape_fn(h), f"{tag}/gather_lo")
            b = self.e.gather(y, stage.taps[:, k - h:], shape_fn(h), f"{tag}/gather_hi")
            y = self.tournament(self.max2(a, b, shape_fn(h), tag), h, shape_fn, tag)
            y = self.e.reshape(y, [-1, rows, c], shape, f"{tag}/max_out")
        if not stages:  # a 1×1 stride-1 pool
            y = self.primary(x)
        self.new_cl(out_t, y, out_spatial, c)
        return True

    def do_AveragePool(self, node) -> bool:
        x_t, out_t = node.inputs[0], node.outputs[0]
        if not self.activation(x_t):
            return False
        x = self.to_cl(x_t)
        kernel = tuple(g.attr(node, "kernel_shape"))
        kw = self._pool_kw(node)
        kw["count_include_pad"] = bool(g.attr(node, "count_include_pad", 0))
        try:
            taps, scale, win_out = avg_pool_scale((x.channels, *x.spatial), kernel, **kw)
        except ValueError as exc:
            raise UnsupportedOpError(node.name, node.op, FORM, str(exc)) from exc
        c, out_spatial = self._pool_out(node, out_t, win_out)
        base = node.name or out_t.name
        n, dtype = x.batch, x.dtype
        s_out, k = taps.shape
        plan = gather_indices(taps, x.s)
        src = self.source(self.t3(x), plan.zero_row, base)
        uniform = bool(np.all(scale == scale[0]))
        sc_all = self.e.const(f"{base}/scale", np.asarray(scale[:1], dtype=dtype))

        def body(lo, hi, tag):
            rows = hi - lo
            gat = self.e.gather(src, plan.indices[lo:hi], [n, rows, k, c], tag + "/gather")
            y = self.e.reduce_sum(gat, [2], 0, [n, rows, c], tag + "/sum")
            if uniform and scale[0] == 1.0:
                return y
            sc = sc_all if uniform else self.e.const(
                f"{tag}/scale", scale[lo:hi].reshape(rows, 1).astype(dtype))
            return self.e.binary("Mul", y, sc, [n, rows, c], tag + "/mean")

        y = body(0, s_out, base)
        self.new_cl(out_t, y, out_spatial, c)
        return True

    def do_GlobalAveragePool(self, node) -> bool:
        x_t, out_t = node.inputs[0], node.outputs[0]
        if not self.activation(x_t):
            return False
        x = self.to_cl(x_t)
        base = node.name or out_t.name
        n, c = x.batch, x.channels
        y = self.e.reduce_sum(self.t3(x), [1], 1, [n, 1, c], base + "/sum")
        if x.s != 1:
            sc = self.e.const(f"{base}/scale", np.asarray(1.0 / x.s, dtype=x.dtype).reshape(1))
            y = self.e.binary("Mul", y, sc, [n, 1, c], base + "/mean")
        self.new_cl(out_t, y, (1,) * len(x.spatial), c)
        return True

    def do_GlobalMaxPool(self, node) -> bool:
        x_t, out_t = node.inputs[0], node.outputs[0]
        if not self.activation(x_t):
            return False
        x = self.to_cl(x_t)
        base = node.name or out_t.name
        n, c, s = x.batch, x.channels, x.s
        if s == 1:
            y = self.t3(x)
        else:
            x4 = self.e.reshape(self.primary(x), [-1, 1, s, c], [n, 1, s, c],
                                base + "/candidates")
            y4 = self.tournament(x4, s, lambda j: [n, 1, j, c], base)
            y = self.e.reshape(y4, [-1, 1, c], [n, 1, c], base + "/max_out")
        self.new_cl(out_t, y, (1,) * len(x.spatial), c)
        return True

