"""The im2col form: convs and pools as Gather + MatMul on channels-last activations.

For runtimes that lack Conv and Pool but have a fast MatMul (DESIGN.md, "The im2col form"). After
``lower-im2col`` no Conv, ConvTranspose, MaxPool, AveragePool, GlobalAveragePool, GlobalMaxPool
or BatchNormalization is left; every contraction is a MatMul (Gemm becomes MatMul + Add too),
and the only other ops are Gather, Reshape, Transpose, Concat, Slice, Pad, ReduceSum, Flatten,
Add, Sub, Mul, Relu, plus the elementwise ops the model already had (Clip, Sigmoid, Tanh, ...),
which run unchanged.

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

Conv (1-D/2-D/3-D, any strides, dilations, asymmetric pads, groups)
-------------------------------------------------------------------
:func:`onnx_lower.windows.sliding_windows` gives the taps ``(S_out, K)``: the flat input row
that tap ``t`` of output position ``o`` reads, ``-1`` for padding. Padding taps read a **zero
row** appended to the input with one ``Pad`` on axis 1. Then::

    G = Gather(x, taps, axis=1)               (N, S_out, K, C)
    y = Reshape(G, (N·S_out, K·C)) @ W + b    W[t·C + c, m] = weight[m, c, t]

A 1×1 stride-1 unpadded conv (taps = ``arange(S)``) is a bare MatMul; a kernel that covers the
whole input is a Reshape + MatMul. BatchNormalization and per-channel constant Mul/Add/Sub/Div
after a Conv or ConvTranspose are folded into its weight columns and bias first (pass
``im2col-fold``, in float64, cast once); a BatchNormalization elsewhere is Mul + Add.

* groups (not depthwise): ``(N, g, S, C/g)`` (one Transpose), Gather on axis 2, batched
  MatMul with ``(g, K·C/g, M/g)``, Transpose back. One block-diagonal ``(K·C, M)`` matrix
  (g× the FLOPs, no Transposes) measured slower at every group count: 3×3 convs, 128 channels
  at 28², vs onnxruntime: g=2 2.16× vs 1.25×, g=4 4.04× vs 1.67×, g=32 5.75× vs 4.65×.
* depthwise (``C/g = 1``): ``ReduceSum(Gather(x) · w[K, C], axis=2)`` (a channel multiplier
  adds an axis). Measured per layer against onnxruntime's NCHWc depthwise kernel: 3-15× slower
  whatever the formulation: this one; one Gather + Mul + Add per tap; Slices of the padded
  ``(N, H, W, C)`` view; channel blocks of 16 with a batched block-diagonal MatMul (B× the
  FLOPs, two Transposes); one dense per-tap-diagonal MatMul (C× the FLOPs); NCHW rows gathered
  with a banded Toeplitz MatMul per channel (tiles of 1-16 rows: 5-8×); the grouped batched
  MatMul above (a GEMV per channel): MobileNetV2 5.7× slower than this; taps gathered tap-major
  ``(K, rows, C)`` with the sum over K as ``MatMul(ones(1, K), ·)``: 0.92-1.28× this, chunked
  (``tools/bench_layers.py``). Every formulation writes
  the K-fold tap tensor and runs ~4 elementwise passes over it, where the native kernel reads x
  once: this is what limits MobileNetV2 (see below).
* strided convs whose channel block is tiny (``C·itemsize ≤ 32`` bytes: RGB stems) gather
  copies of 12 bytes, ~12 ns each in onnxruntime. **space-to-depth** folds the last spatial axis
  by its stride into the channels, a free Reshape (``(w, r, c)`` is contiguous): input position
  ``p = s·q + r`` becomes row ``q``, channel block ``r``, and tap ``t`` reads
  ``q = o + ⌊(t·d - b)/s⌋``, ``r = (t·d - b) mod s`` — a stride-1 conv along that axis
  (:class:`SpaceToDepth`; folding every axis needs a Transpose and measured no better).
  ResNet-18's 7×7/2 stem: 614 k copies of 12 B become 351 k of 24 B, −5 % whole-network.
* ConvTranspose: the transpose of the conv from its output space back to its input space; for a
  fixed tap ``t``, output position ``p`` is read by at most one input ``i``, so inverting that
  conv's window table gives ``(S_out, K)`` taps with ``-1`` where no input contributes
  (:func:`conv_transpose_taps`), then the same Gather + MatMul (geometry from
  :func:`onnx_lower.passes.conv.conv_transpose_geometry`).

Chunks. The gathered ``(S_out, K·C)`` matrix of a large layer is tens of MB (VGG-11's 3×3/256
at 56²: 29 MB) and was written to memory and streamed back by the MatMul. The output rows are
therefore split into chunks of about 2 MB of taps (1 MB for depthwise); each chunk is Gather +
MatMul (+ the conv's single consumer activation, applied per chunk so onnxruntime still fuses
it), and the chunks are concatenated. Per layer (interleaved A/B vs onnxruntime's Conv+Relu):
VGG 3×3 256→256 at 56², 1.30× → 1.10×; 64→128 at 112², 1.46× → 1.19×; ResNet 64→64 at 56²,
1.54× → 1.16×. Whole networks: VGG-11 −9 %, ResNet-18 −12 %; 2 MB beat 1 MB and 4 MB by 2-3 %.
Depthwise chunks: MobileNetV2 1.4× faster than unchunked. Running the following Clip and 1×1
projection per depthwise chunk as well gained only 2 % and is not done.

Pools
-----
* MaxPool: padding is −inf, so padding taps repeat a valid tap of the window
  (:func:`.pool.max_pool_taps`; ``max(a, a) = a``) and no zero row is read. Maxima use
  ``max(a, b) = b + relu(a - b)`` (Sub, Relu, Add). :func:`max_pool_plan` picks the cheapest of
  a joint plan over all K taps and separable plans (one stage per axis: the window of a product
  grid is the product of per-axis windows), each stage either a balanced tree over K gathered
  taps or a halving tournament of depth ⌈log2 K⌉ on two gathered halves (Slices of the tap
  axis). SqueezeNet's 3×3/2 max pool: 3.3 ms → 1.9 ms against halving over all 9 taps.
* AveragePool: ``ReduceSum(Gather(x), axis=2) · scale[o]`` with padding taps on the zero row;
  ``scale[o] = 1/divisor(o)`` is read off :func:`.pool.avg_pool_matrix`, the one place
  that has ONNX's ``count_include_pad`` / ``ceil_mode`` divisor rules.
* GlobalAveragePool: ``ReduceSum`` over S, then ``Mul(1/S)``. GlobalMaxPool: halving tournament
  over S.

Measured and rejected: int32 Gather indices (1.006× / 0.993× on ResNet-18 / MobileNetV2);
``Concat`` with a zero constant instead of ``Pad`` for the zero row (equal); chunking pools
(0.98-1.01×); one 6-D Transpose from NCHW for space-to-depth (10× slower than two simple ones).

What limits the ratio (tools/bench_im2col.py; AMD EPYC, 1 thread, onnxruntime 1.32)
-----------------------------------------------------------------------------------
Lowered/original latency, batch 1: ResNet-18 1.27, ResNet-50 1.20, VGG-11 1.18, SqueezeNet
1.53, MobileNetV2 2.9-3.2; geometric mean 1.54 (the 2-core machine is shared: ratios move by
±0.1 between runs, MobileNetV2's most, as it is the most memory-bound).

* MLAS SGEMM on the im2col matrix is slower than onnxruntime's NCHWc direct convolution even
  before any data movement: the MatMul alone is 1.31× the native conv for 64 output channels at
  56², 1.10× at 128, 1.04-1.06× at 256-512 (1×1 convs: 0.95-1.12×). ResNet-50's GEMMs take about
  what its native convs take in all; the rest of its 20 % is the im2col Gathers (~6 %), Pad, and
  the residual Add + Relu that onnxruntime fuses into its Conv but not into a Gemm (also Clip).
* The im2col copy itself: +5-15 % per 3×3 layer with chunking. Gather runs at ~12 ns per copied
  block for 12-byte blocks and ~5 GB/s for large ones, so RGB stems stay 2-3× the native conv.
* Depthwise convs (above): MobileNetV2's depthwise layers take ~60 % of its lowered time.
* Max pools: 3 elementwise ops per pairwise max against one fused kernel (SqueezeNet's three
  max pools take ~25 % of its lowered time).
* Small models (the samples and corpus, < 1 ms): onnxruntime's per-node overhead (~2-5 µs)
  and single-channel inputs (Gathers of 4-byte blocks) dominate: 1.0-4.6×.
* With 2 threads chunks of 2 MB split the MatMuls finer than onnxruntime's threading likes
  (VGG-11 up to 1.2× slower than unchunked at 2 threads in some runs); 1 thread is the target.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence

import numpy as np
import onnx_graphsurgeon as gs

from onnx_lower import graph as g
from onnx_lower.errors import LoweringError, UnsupportedOpError
from onnx_lower.pass_manager import GraphPass, LoweringModel, register_pass
from onnx_lower.passes.conv import conv_transpose_geometry
from onnx_lower.passes.im2col_winograd import lower_conv as lower_winograd
from onnx_lower.passes.linear import batch_norm_scale_shift
from onnx_lower.passes.pool import avg_pool_matrix, max_pool_taps, pool_windows
from onnx_lower.windows import resolve_pads, sliding_windows

__all__ = [
    "FORM",
    "ALLOWED_OPS",
    "ELEMENTWISE_UNARY",
    "LOWERED_OPS",
    "conv_windows",
    "conv_transpose_taps",
    "gather_indices",
    "group_weights",
    "dense_weight",
    "depthwise_weight",
    "avg_pool_scale",
    "flatten_permutation",
    "SpaceToDepth",
    "MaxStage",
    "max_stage_cost",
    "max_pool_plan",
    "space_to_depth_taps",
    "channels_last_constant",
    "fold_scale_shift",
    "Im2colFold",
    "LowerIm2col",
]

FORM = "im2col"

#: Ops the im2col form emits (besides the elementwise ops it keeps from the input model).
ALLOWED_OPS = frozenset(
    {"MatMul", "Add", "Sub", "Mul", "Relu", "Gather", "Reshape", "Transpose", "Concat", "Slice",
     "Pad", "ReduceSum", "Flatten", "Split"}
)
#: Layout-agnostic unary ops: they run unchanged on channels-last tensors.
ELEMENTWISE_UNARY = frozenset(
    {"Relu", "Clip", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Elu", "Selu",
     "Celu", "Softplus", "Softsign", "Abs", "Neg", "Exp", "Log", "Sqrt", "Reciprocal", "Erf",
     "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "Gelu", "Mish", "ThresholdedRelu", "Cast",
     "Identity", "Dropout", "IsNaN", "IsInf", "Not"}
)
#: Elementwise binary (and variadic) ops with numpy broadcasting.
ELEMENTWISE_BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Max", "Min", "Pow", "PRelu", "Sum"})
#: Ops this pass removes.
LOWERED_OPS = frozenset(
    {"Conv", "ConvTranspose", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool",
     "BatchNormalization"}
)
_REFUSED = frozenset({"LpPool", "GlobalLpPool", "MaxRoiPool", "MaxUnpool", "ConvInteger",
                      "QLinearConv", "DeformConv"})
#: Unary ops a chunked conv applies per chunk when they are its only consumer.
_SINKABLE = frozenset({"Relu", "Clip", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid",
                       "HardSwish", "Elu", "Selu", "Celu", "Softplus", "Softsign"})
#: onnxruntime's fixed cost of one node, in element passes (≈ 4 µs at ≈ 0.25 ns per element).
_OP_COST = 16000

# Tuning constants (measured; see the module docstring).
_INDEX_DTYPE = np.int64  # Gather indices (int32 measured no faster in onnxruntime)
_DEPTHWISE = "mul"  # depthwise as Mul + ReduceSum ("mul") or as the grouped MatMul ("matmul")
_DENSE_GROUPS = 1  # more groups than this: batched per-group MatMul, not block-diagonal
_DW_CHUNK_BYTES = 1 << 20  # target size of one chunk of gathered depthwise taps
_CONV_CHUNK_BYTES = 2 << 20  # ... and of an im2col chunk (Gather + MatMul)
_MIN_CHUNK_ROWS = 64  # keep MatMuls tall enough to run at full speed
_MAX_CHUNKS = 64
_S2D_MAX_BYTES = 32  # space-to-depth for strided convs whose channel block is this small
_S2D_AXES = "last"  # fold "last" spatial axis only (a free Reshape) or "all" (one Transpose)


# ------------------------------------------------------------------------------------------------
# index and weight math (pure numpy, one sample, no batch dimension)
# ------------------------------------------------------------------------------------------------


def _strides_dilations(node: gs.Node, r: int):
    strides = tuple(g.attr(node, "strides", None) or (1,) * r)
    dilations = tuple(g.attr(node, "dilations", None) or (1,) * r)
    return strides, dilations


def conv_windows(spatial, kernel, strides=None, pads=None, dilations=None, auto_pad="NOTSET"):
    """Windows of a Conv over ``spatial`` (``auto_pad`` resolved as onnxruntime's Conv does)."""
    pads = resolve_pads(spatial, kernel, strides, dilations, pads, auto_pad)
    return sliding_windows(spatial, kernel, strides, pads, dilations)


def conv_transpose_taps(out_spatial, kernel, strides, pads, dilations, in_size: int) -> np.ndarray:
    """``(S_out, K)`` taps of a ConvTranspose: the input position each output tap reads, or -1.

    The ConvTranspose is the transpose of the Conv that maps its output space back to its input
    space: Conv window ``i`` (an input position) tap ``t`` reads output position ``p``. For a
    fixed ``t``, ``p = i·s - b + t·d`` determines ``i``, so inverting the window table gives at
    most one input position per (output position, tap).
    """
    win = sliding_windows(out_spatial, kernel, strides, pads, dilations)
    fwd = win.taps[:in_size]
    s_out, k = math.prod(out_spatial), fwd.shape[1]
    taps = np.full((s_out, k), -1, dtype=np.int64)
    i_idx, t_idx = np.nonzero(fwd >= 0)
    taps[fwd[i_idx, t_idx], t_idx] = i_idx
    return taps


@dataclasses.dataclass(frozen=True)
class GatherPlan:
    """How to read the taps of a layer from an ``(N, S_in, C)`` tensor.

    ``indices`` is ``(S_out, K)`` into ``S_in`` rows, or into ``S_in + 1`` rows when
    ``zero_row`` (padding taps read an appended zero row). ``identity`` means the taps are
    ``arange(S_in).reshape(S_out, K)``: a Reshape does the job, no Gather.
    """

    indices: np.ndarray
    zero_row: bool
    identity: bool

    @property
    def shape(self) -> tuple[int, int]:
        return self.indices.shape


def gather_indices(taps: np.ndarray, s_in: int) -> GatherPlan:
    """Gather plan for ``taps`` (``-1`` = padding, read from a zero row at index ``s_in``)."""
    taps = np.asarray(taps, dtype=np.int64)
    valid = taps >= 0
    zero_row = not bool(valid.all())
    indices = np.where(valid, taps, s_in).astype(np.int64)
    identity = (not zero_row and indices.size == s_in
                and bool(np.array_equal(indices.ravel(), np.arange(s_in))))
    return GatherPlan(indices, zero_row, identity)


def group_weights(weight: np.ndarray, group: int, transpose: bool = False) -> np.ndarray:
    """Conv weights ``(M, C/g, *k)`` (or ConvTranspose ``(C, M/g, *k)`` with ``transpose``) as
    ``(g, K, C/g, M/g)`` float64: group, tap, input channel, output channel."""
    w = np.asarray(weight, dtype=np.float64)
    k = math.prod(w.shape[2:])
    if transpose:
        c, mg = w.shape[:2]
        return w.reshape(group, c // group, mg, k).transpose(0, 3, 1, 2)
    m, cg = w.shape[:2]
    return w.reshape(group, m // group, cg, k).transpose(0, 3, 2, 1)


def dense_weight(wg: np.ndarray) -> np.ndarray:
    """``(K·C, M)`` MatMul weight from ``(g, K, Cg, Mg)``; block diagonal when ``g > 1``.

    Row ``t·C + c`` matches the gathered ``(K, C)`` taps flattened in C order.
    """
    grp, k, cg, mg = wg.shape
    if grp == 1:
        return wg[0].reshape(k * cg, mg)
    dense = np.zeros((k, grp, cg, grp, mg))
    ar = np.arange(grp)
    dense[:, ar, :, ar, :] = wg  # (g, K, Cg, Mg) lands on the diagonal blocks
    return dense.reshape(k * grp * cg, grp * mg)


def depthwise_weight(wg: np.ndarray) -> np.ndarray:
    """``(K, C, Mg)`` per-tap, per-channel weights of a depthwise conv (``C/g == 1``)."""
    return wg[:, :, 0, :].transpose(1, 0, 2)


def avg_pool_scale(in_shape, kernel, **kw) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """``(taps, scale, out_spatial)`` of an AveragePool over ``in_shape = (C, *spatial)``.

    ``scale[o] = 1 / divisor(o)`` is read off :func:`.pool.avg_pool_matrix` (one channel),
    whose nonzeros in row ``o`` all equal it; that function owns ONNX's divisor rules
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


def max_stage_cost(k: int, rows: int) -> tuple[float, str]:
    """``(cost, mode)`` of the cheaper way to take the max of ``k`` taps for ``rows`` outputs.

    Cost counts written elements per channel plus :data:`_OP_COST` per node: a tree writes
    ``k`` gathered + ``3(k - 1)`` max-op elements per output in ``4k - 3`` nodes; halves write
    ``2h + 3h`` for the first level and ``2h' + 3h'`` per further level (two Slices and a max),
    in 5 nodes per level. Trees move fewer elements, halves need fewer nodes.
    """
    if k == 1:
        return rows + _OP_COST, "tree"
    tree = (4 * k - 3) * rows + _OP_COST * (4 * k - 3)
    h = (k + 1) // 2
    elems, ops = 5 * h * rows, 5
    while h > 1:
        h = (h + 1) // 2
        elems, ops = elems + 5 * h * rows, ops + 5
    halves = elems + _OP_COST * ops
    return (tree, "tree") if tree <= halves else (halves, "halves")


def max_pool_plan(spatial, kernel, **kw) -> tuple[list[MaxStage], tuple[int, ...]]:
    """The cheapest way to take a MaxPool's window maxima: ``(stages, out_spatial)``.

    A window of a product grid is the product of its per-axis windows, so the max can be taken
    one axis at a time (separable) as well as over all ``K`` taps at once (joint); each stage
    takes the cheaper of its two modes (:func:`max_stage_cost`). For 3×3/2 windows on large
    maps the separable plan writes about 20 % fewer elements than the joint one, for 2×2/2 the
    joint one ~15 % fewer; on tiny maps the node count decides. Padding taps repeat a valid
    tap (:func:`.pool.max_pool_taps`): ``max(a, a) = a``.
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


def _axis_values(key: str, value, i: int, r: int):
    """Attribute ``value`` of a pool restricted to axis ``i`` of ``r``."""
    if key == "pads":
        return (value[i], value[r + i])
    if key in ("strides", "dilations"):
        return (value[i],)
    return value


def flatten_permutation(channels: int, s: int) -> np.ndarray:
    """``perm`` with ``flat_cl[:, j] = flat_nchw[:, perm[j]]`` (``j = s·C + c`` ↔ ``c·S + s``)."""
    return np.arange(channels * s).reshape(channels, s).T.reshape(-1)


@dataclasses.dataclass(frozen=True)
class SpaceToDepth:
    """A strided conv rewritten as a conv over a space-to-depth input.

    With block ``s`` on an axis (its stride), input position ``p = s·q + r`` becomes position
    ``q``, channel block ``r`` of the rearranged input. Tap ``t`` of window ``o`` reads
    ``p = o·s - b + t·d``, i.e. ``q = o + δ_t`` with ``δ_t = ⌊(t·d - b)/s⌋`` and
    ``r_t = (t·d - b) mod s``: along that axis a stride-1 conv with kernel
    ``δ_max - δ_min + 1`` and pad ``-δ_min``, whose weight holds ``W[·, ·, t]`` at
    ``(δ_t - δ_min, r_t)`` and zeros elsewhere. An axis with block 1 keeps its conv as it is.
    """

    taps: np.ndarray  # (S_out, K2) over the space-to-depth grid, -1 = padding
    kernel: tuple[int, ...]  # K2 per axis
    grid: tuple[int, ...]  # spatial extent of the space-to-depth input
    tap_index: np.ndarray  # (K,) new tap of each original tap
    phase_index: np.ndarray  # (K,) channel block of each original tap
    blocks: int  # Π block

    def weights(self, wg: np.ndarray) -> np.ndarray:
        """``(1, K2, R·C, M)`` from the original ``(1, K, C, M)``."""
        _, k, c, m = wg.shape
        k2 = math.prod(self.kernel)
        out = np.zeros((k2, self.blocks, c, m))
        out[self.tap_index, self.phase_index] = wg[0]
        return out.reshape(1, k2, self.blocks * c, m)


def space_to_depth_taps(spatial, kernel, strides, pads, dilations, block=None) -> SpaceToDepth:
    """The :class:`SpaceToDepth` form of a conv (all its windows from ``sliding_windows``).

    ``block`` per axis is the stride (fold the axis) or 1 (keep it); default: every stride.
    """
    r = len(kernel)
    block = tuple(strides) if block is None else tuple(block)
    win = sliding_windows(spatial, kernel, strides, pads, dilations)
    grid, k2, s2, d2, b2, e2, taps_ax, phases = [], [], [], [], [], [], [], []
    for i in range(r):
        if block[i] == 1:
            grid.append(spatial[i])
            k2.append(kernel[i])
            s2.append(strides[i])
            d2.append(dilations[i])
            b2.append(pads[i])
            e2.append(pads[r + i])
            taps_ax.append(np.arange(kernel[i]))
            phases.append(np.zeros(kernel[i], dtype=np.int64))
            continue
        if block[i] != strides[i]:
            raise ValueError(f"space-to-depth block {block[i]} must be 1 or the stride")
        n2 = -(-spatial[i] // strides[i])
        first = win.positions[i][0]  # window 0: positions -b + t·d
        delta, phase = np.floor_divide(first, strides[i]), np.mod(first, strides[i])
        lo, hi = int(delta.min()), int(delta.max())
        grid.append(n2)
        k2.append(hi - lo + 1)
        s2.append(1)
        d2.append(1)
        b2.append(-lo)
        e2.append(win.out_shape[i] - 1 - n2 + lo + k2[-1])
        taps_ax.append(delta - lo)
        phases.append(phase)
    new = sliding_windows(grid, k2, s2, b2 + e2, d2)
    if new.out_shape != win.out_shape:  # pragma: no cover - guarded by the algebra above
        raise ValueError("space-to-depth windows disagree with the conv's")
    t_axes = np.indices(kernel).reshape(r, -1)  # per-axis tap index of each flat tap
    tap_index = np.ravel_multi_index([taps_ax[i][t_axes[i]] for i in range(r)], k2)
    phase_index = np.ravel_multi_index([phases[i][t_axes[i]] for i in range(r)], block)
    return SpaceToDepth(new.taps, tuple(k2), tuple(grid), tap_index, phase_index,
                        math.prod(block))


def _refusal_reason(node: gs.Node) -> str:
    """Why a conv/pool/BN node was not lowered: a non-float input, else an unknown shape."""
    x = node.inputs[0]
    if x.dtype is not None and np.dtype(x.dtype).kind != "f":
        dtype = np.dtype(x.dtype)
        return f"its input '{x.name}' has type {dtype}; only float activations are lowered"
    return "its input needs a known rank >= 3 and static non-batch dimensions"


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


# ------------------------------------------------------------------------------------------------
# graph emission
# ------------------------------------------------------------------------------------------------


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


class _Emitter:
    """Appends nodes to a graph with fresh names, in ops valid for the model's opset."""

    def __init__(self, graph: gs.Graph, opset: int):
        self.graph, self.opset = graph, opset
        self.namer = g.Namer(graph)
        self.consts: dict[tuple, gs.Constant] = {}

    def const(self, base: str, value: np.ndarray) -> gs.Constant:
        value = np.ascontiguousarray(value)
        key = None
        if value.size <= 16:
            key = (value.dtype.str, value.shape, value.tobytes())
            if key in self.consts:
                return self.consts[key]
        c = gs.Constant(self.namer(base), value)
        if key is not None:
            self.consts[key] = c
        return c

    def ints(self, base: str, values) -> gs.Constant:
        return self.const(base, np.asarray(values, dtype=np.int64))

    def op(self, op: str, inputs, shape, dtype, base: str, attrs=None,
           out: gs.Variable | None = None) -> gs.Variable:
        if out is None:
            out = gs.Variable(self.namer(base), dtype=dtype,
                              shape=None if shape is None else list(shape))
        node = gs.Node(op, self.namer(base + "/" + op), dict(attrs or {}), list(inputs), [out])
        self.graph.nodes.append(node)
        return out

    # -- ops ----------------------------------------------------------------------------------

    def reshape(self, x, shape, out_shape, base, out=None):
        return self.op("Reshape", [x, self.ints(base + "/shape", shape)], out_shape, x.dtype,
                       base, out=out)

    def transpose(self, x, perm, out_shape, base, out=None):
        return self.op("Transpose", [x], out_shape, x.dtype, base, {"perm": list(perm)}, out=out)

    def gather(self, x, indices, out_shape, base, axis=1):
        idx = self.const(base + "/taps", np.asarray(indices, dtype=_INDEX_DTYPE))
        return self.op("Gather", [x, idx], out_shape, x.dtype, base, {"axis": axis})

    def pad(self, x, pads, out_shape, base):
        """Zero padding (ONNX ``pads`` layout: all begins, then all ends)."""
        pads = [int(p) for p in pads]
        if self.opset >= 11:
            return self.op("Pad", [x, self.ints(base + "/pads", pads)], out_shape, x.dtype, base)
        return self.op("Pad", [x], out_shape, x.dtype, base,
                       {"mode": "constant", "pads": pads, "value": 0.0})

    def slice(self, x, starts, ends, axes, out_shape, base):
        if self.opset >= 10:
            inputs = [x, self.ints(base + "/starts", starts), self.ints(base + "/ends", ends),
                      self.ints(base + "/axes", axes)]
            return self.op("Slice", inputs, out_shape, x.dtype, base)
        return self.op("Slice", [x], out_shape, x.dtype, base,
                       {"starts": list(starts), "ends": list(ends), "axes": list(axes)})

    def reduce_sum(self, x, axes, keepdims, out_shape, base):
        if self.opset >= 13:
            return self.op("ReduceSum", [x, self.ints(base + "/axes", axes)], out_shape, x.dtype,
                           base, {"keepdims": int(keepdims)})
        return self.op("ReduceSum", [x], out_shape, x.dtype, base,
                       {"axes": list(axes), "keepdims": int(keepdims)})

    def binary(self, op, a, b, out_shape, base, out=None):
        dtype = a.dtype if isinstance(a, gs.Variable) else b.dtype
        return self.op(op, [a, b], out_shape, dtype, base, out=out)

    def unary(self, op, x, out_shape, base):
        return self.op(op, [x], out_shape, x.dtype, base)

    def concat(self, xs, axis, out_shape, base):
        return self.op("Concat", list(xs), out_shape, xs[0].dtype, base, {"axis": axis})


def _float_dtype(t: gs.Tensor) -> np.dtype:
    dtype = np.dtype(t.dtype) if t.dtype is not None else np.dtype(np.float32)
    return dtype if dtype.kind == "f" else np.dtype(np.float32)


def _static(shape) -> bool:
    return shape is not None and all(isinstance(d, (int, np.integer)) and d >= 0 for d in shape)


# ------------------------------------------------------------------------------------------------
# pass 1: fold BatchNormalization and per-channel constant Mul/Add/Sub/Div into conv weights
# ------------------------------------------------------------------------------------------------


def _single_consumer(graph: gs.Graph, t: gs.Tensor) -> gs.Node | None:
    if len(t.outputs) != 1 or g.is_graph_output(graph, t):
        return None
    return t.outputs[0]


def _bn_scale_shift(node: gs.Node) -> tuple[np.ndarray, np.ndarray] | None:
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
    nxt = _single_consumer(graph, out)
    if nxt is None:
        return None
    if g.is_op(nxt, "BatchNormalization") and nxt.inputs[0] is out:
        ss = _bn_scale_shift(nxt)
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


# ------------------------------------------------------------------------------------------------
# pass 2: the layout rewrite
# ------------------------------------------------------------------------------------------------


class _Lowering:
    """One graph's rewrite into channels-last regions (see the module docstring)."""

    def __init__(self, graph: gs.Graph, model: LoweringModel):
        self.graph, self.model = graph, model
        self.e = _Emitter(graph, model.opset)
        self.cl: dict[str, CL] = {}
        self.padded: dict[tuple[str, int], gs.Variable] = {}
        self.s2d: dict[tuple[str, tuple[int, ...]], CL] = {}
        self.flat: dict[str, tuple[gs.Variable, tuple[int, int]]] = {}
        self.sunk: dict[str, gs.Node] = {}  # conv output -> its activation, run per chunk
        self.originals: dict[str, gs.Tensor] = {}  # name -> tensor, for every CL/flat entry
        graph_outputs = {t.name for t in graph.outputs}
        self.keep_nchw = _names_used_by_subgraphs(graph) | graph_outputs

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
        return CL(None, tuple(dims[1:]), dims[0], t.shape[0], _float_dtype(t))

    def new_cl(self, t: gs.Tensor, v: gs.Variable, spatial, channels) -> CL:
        """Record ``v`` (3-D ``(N, S, C)`` or 2-D ``(N·S, C)``) as the CL form of ``t``."""
        info = CL(None, tuple(spatial), int(channels), t.shape[0], _float_dtype(v))
        if len(v.shape) == 2:
            info.rows = v
        else:
            info.tensor = v
        self.cl[t.name] = info
        self.originals[t.name] = t
        return info

    # -- driver -----------------------------------------------------------------------------

    def run(self) -> bool:
        changed = False
        for node in list(self.graph.nodes):
            if not node.outputs and not node.inputs:
                continue
            if node.domain not in g.DEFAULT_DOMAINS:
                self.generic(node)
                continue
            if node.op in _REFUSED:
                raise UnsupportedOpError(node.name, node.op, FORM, "it has no im2col lowering")
            handler = getattr(self, f"do_{node.op}", None)
            done = False
            if handler is not None:
                done = handler(node)
            elif node.op in ELEMENTWISE_UNARY:
                done = self.unary(node)
            elif node.op in ELEMENTWISE_BINARY:
                done = self.binary(node)
            if done:
                changed = True
                g.detach(node)
            else:
                if node.op in LOWERED_OPS:
                    raise UnsupportedOpError(node.name, node.op, FORM, _refusal_reason(node))
                self.generic(node)
        for t in self.graph.outputs:
            self.ensure_nchw(t)
        return changed

    def generic(self, node: gs.Node) -> None:
        """A node that needs its inputs in their original layout (also those its subgraphs
        read from this graph)."""
        for t in node.inputs:
            if isinstance(t, gs.Variable) and t.name:
                self.ensure_nchw(t)
        captured = {n for v in node.attrs.values() if isinstance(v, gs.Graph)
                    for n in _names_used_by_subgraphs_of(v)}
        for name in sorted(captured & set(self.originals)):
            self.ensure_nchw(self.originals[name])

    # -- helpers ----------------------------------------------------------------------------

    def activation(self, t: gs.Tensor) -> bool:
        """``t`` is (or can be) channels-last: rank >= 3, static non-batch dims, float."""
        if t.name in self.cl:
            return True
        if isinstance(t, gs.Constant) or t.shape is None or len(t.shape) < 3:
            return False
        if not _static(t.shape[1:]):
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

    def per_chunk(self, rows: int, row_bytes: int, body, out_shape_fn, base: str,
                  chunk_bytes: int, axis: int = 1):
        """Run ``body(lo, hi, tag)`` on row ranges of about ``chunk_bytes``; Concat them.

        A layer's gathered taps are ``row_bytes`` per output row. Producing and consuming them
        chunk by chunk keeps each chunk in cache between the Gather and its consumers (see the
        module docstring for the measurements).
        """
        chunks = self.chunk_bounds(rows, row_bytes, chunk_bytes)
        outs = [body(lo, hi, f"{base}/c{i}" if len(chunks) > 1 else base)
                for i, (lo, hi) in enumerate(chunks)]
        if len(chunks) == 1:
            return outs[0]
        return self.e.concat(outs, axis, out_shape_fn(rows), base + "/concat")

    @staticmethod
    def chunk_bounds(rows: int, row_bytes: int, chunk_bytes: int) -> list[tuple[int, int]]:
        """Row ranges of about ``chunk_bytes`` each (at least :data:`_MIN_CHUNK_ROWS` rows)."""
        per = max(_MIN_CHUNK_ROWS, chunk_bytes // max(row_bytes, 1))
        n = max(1, min(_MAX_CHUNKS, -(-rows // per)))
        b = np.linspace(0, rows, n + 1).round().astype(int)
        return [(int(b[i]), int(b[i + 1])) for i in range(n)]

    # -- conv and friends -------------------------------------------------------------------

    def emit_conv(self, node, x: CL, wg: np.ndarray, bias, taps, out_t) -> gs.Variable:
        """Gather + contraction for a conv-like op with weights ``(g, K, Cg, Mg)``.

        Returns ``(N·S_out, M)`` (dense and identity cases, a 2-D MatMul) or ``(N, S_out, M)``.
        """
        grp, k, cg, mg = wg.shape
        n, m, dtype = x.batch, grp * mg, x.dtype
        base = node.name or out_t.name
        plan = gather_indices(taps, x.s)
        s_out = plan.shape[0]
        rows_dim = n * s_out if isinstance(n, int) else None
        b = None
        if bias is not None and np.any(bias):
            b = self.e.const(f"{base}/bias", np.asarray(bias, dtype=np.float64).astype(dtype))

        def add_bias(y, shape, tag):
            return y if b is None else self.e.binary("Add", y, b, shape, tag + "/bias")

        if cg == 1 and grp > 1 and _DEPTHWISE == "mul":
            # depthwise: Mul by (K, C[, Mg]) and ReduceSum over the taps
            wd = depthwise_weight(wg)
            src = self.source(self.t3(x), plan.zero_row, base)
            w = self.e.const(f"{base}/dw_weight",
                             (wd[:, :, 0] if mg == 1 else wd).astype(dtype))

            chunks = self.chunk_bounds(s_out, k * grp * mg * dtype.itemsize, _DW_CHUNK_BYTES)
            act = self.sinkable_activation(out_t) if len(chunks) > 1 else None
            if act is not None:
                self.sunk[out_t.name] = act

            def dw_body(lo, hi, tag):
                rows = hi - lo
                gat = self.e.gather(src, plan.indices[lo:hi], [n, rows, k, grp], tag + "/gather")
                if mg == 1:
                    prod = self.e.binary("Mul", gat, w, [n, rows, k, grp], tag + "/dw_mul")
                    y = self.e.reduce_sum(prod, [2], 0, [n, rows, m], tag + "/dw_sum")
                else:
                    g5 = self.e.reshape(gat, [-1, rows, k, grp, 1], [n, rows, k, grp, 1],
                                        tag + "/dw_expand")
                    prod = self.e.binary("Mul", g5, w, [n, rows, k, grp, mg], tag + "/dw_mul")
                    y4 = self.e.reduce_sum(prod, [2], 0, [n, rows, grp, mg], tag + "/dw_sum")
                    y = self.e.reshape(y4, [-1, rows, m], [n, rows, m], tag + "/dw_out")
                y = add_bias(y, [n, rows, m], tag)
                if act is not None:
                    y = self.e.op(act.op, [y, *act.inputs[1:]], y.shape, y.dtype,
                                  f"{tag}/{act.op.lower()}", dict(act.attrs))
                return y

            return self.per_chunk(s_out, k * grp * mg * dtype.itemsize, dw_body,
                                  lambda r: [n, r, m], base, _DW_CHUNK_BYTES)
        if grp > _DENSE_GROUPS:
            # grouped: (N, g, S, Cg) so each group's taps are contiguous, batched MatMul
            x4 = self.e.reshape(self.primary(x), [-1, x.s, grp, cg], [n, x.s, grp, cg],
                                base + "/groups")
            xt = self.e.transpose(x4, [0, 2, 1, 3], [n, grp, x.s, cg], base + "/group_major")
            src = self.source(xt, plan.zero_row, base, axis=2)
            gat = self.e.gather(src, plan.indices, [n, grp, s_out, k, cg], base + "/gather",
                                axis=2)
            flat = self.e.reshape(gat, [-1, grp, s_out, k * cg], [n, grp, s_out, k * cg],
                                  base + "/im2col")
            w = self.e.const(f"{base}/weight", wg.reshape(grp, k * cg, mg).astype(dtype))
            yg = self.e.binary("MatMul", flat, w, [n, grp, s_out, mg], base + "/matmul")
            yt = self.e.transpose(yg, [0, 2, 1, 3], [n, s_out, grp, mg], base + "/channel_last")
            y = self.e.reshape(yt, [-1, s_out, m], [n, s_out, m], base + "/merge_groups")
            return add_bias(y, [n, s_out, m], base)
        w = self.e.const(f"{base}/weight", dense_weight(wg).astype(dtype))
        kc = k * x.channels
        if plan.identity:
            flat = self.t2(x) if k == 1 else self.e.reshape(
                self.primary(x), [-1, kc], [rows_dim, kc], base + "/im2col")
            y = self.e.binary("MatMul", flat, w, [rows_dim, m], base + "/matmul")
            return add_bias(y, [rows_dim, m], base)
        src = self.source(self.t3(x), plan.zero_row, base)
        chunks = self.chunk_bounds(s_out, kc * dtype.itemsize, _CONV_CHUNK_BYTES)
        act = self.sinkable_activation(out_t) if len(chunks) > 1 else None
        rows2d = isinstance(n, (int, np.integer)) and n == 1  # chunks join as 2-D rows

        def body(lo, hi, tag):
            rows = hi - lo
            r2 = n * rows if isinstance(n, (int, np.integer)) else None
            gat = self.e.gather(src, plan.indices[lo:hi], [n, rows, k, x.channels],
                                tag + "/gather")
            flat = self.e.reshape(gat, [-1, kc], [r2, kc], tag + "/im2col")
            y = add_bias(self.e.binary("MatMul", flat, w, [r2, m], tag + "/matmul"), [r2, m], tag)
            if act is not None:
                y = self.e.op(act.op, [y, *act.inputs[1:]], y.shape, y.dtype,
                              f"{tag}/{act.op.lower()}", dict(act.attrs))
            if len(chunks) > 1 and not rows2d:
                y = self.e.reshape(y, [-1, rows, m], [n, rows, m], tag + "/rows")
            return y

        outs = [body(lo, hi, f"{base}/c{i}" if len(chunks) > 1 else base)
                for i, (lo, hi) in enumerate(chunks)]
        if len(chunks) == 1:
            return outs[0]
        y = (self.e.concat(outs, 0, [rows_dim, m], base + "/concat") if rows2d else
             self.e.concat(outs, 1, [n, s_out, m], base + "/concat"))
        if act is not None:
            self.sunk[out_t.name] = act
        return y

    def sinkable_activation(self, t: gs.Tensor) -> gs.Node | None:
        """The unary elementwise op that is ``t``'s only consumer, if any (constant extras)."""
        nxt = _single_consumer(self.graph, t)
        if (nxt is None or nxt.op not in _SINKABLE or nxt.domain not in g.DEFAULT_DOMAINS
                or nxt.inputs[0] is not t or len(nxt.outputs) != 1):
            return None
        if any(g.const_value(i) is None for i in nxt.inputs[1:] if i.name):
            return None
        return nxt

    def to_s2d(self, x_t: gs.Tensor, block: tuple[int, ...], base: str) -> CL:
        """Space-to-depth of ``x_t``: ``(N, S', R·C)``, ``R = Π block``, channels ``(r, c)``.

        From the channels-last ``(N, *spatial, C)`` view (zero-padded at the ends to multiples
        of ``block``): the last spatial axis folds into the channels for free (``(w, r, c)`` is
        contiguous), and one Transpose that moves blocks of ``s_last·C`` elements interleaves the
        others, if they fold too. (A single 6-D Transpose straight from NCHW measured 10× slower
        in onnxruntime than the plain (N, C, S) → (N, S, C) entry Transpose plus this one.)
        """
        key = (x_t.name, block)
        if key in self.s2d:
            return self.s2d[key]
        x = self.to_cl(x_t)
        c, spatial, n = x.channels, x.spatial, x.batch
        r = len(spatial)
        n2 = tuple(-(-a // s) for a, s in zip(spatial, block))
        extra = [a2 * s - a for a2, s, a in zip(n2, block, spatial)]
        rr = math.prod(block)
        s2 = math.prod(n2)
        view = self.primary(x)
        if any(extra):
            view = self.e.reshape(view, [-1, *spatial, c], [n, *spatial, c], base + "/spatial")
            view = self.e.pad(view, [0] * (r + 2) + [0, *extra, 0],
                              [n, *(a2 * s for a2, s in zip(n2, block)), c], base + "/s2d_pad")
        if all(b == 1 for b in block[:-1]):  # only the last axis folds: a free Reshape
            v = self.e.reshape(view, [-1, s2, rr * c], [n, s2, rr * c], base + "/s2d_flat")
        else:
            split = [d for a2, s in zip(n2[:-1], block[:-1]) for d in (a2, s)]
            inner = block[-1] * c
            shape = [n, *split, n2[-1], inner]
            v = self.e.reshape(view, [-1, *split, n2[-1], inner], shape, base + "/s2d_split")
            perm = [0, *range(1, 2 * r - 1, 2), 2 * r - 1, *range(2, 2 * r - 1, 2), 2 * r]
            tr = self.e.transpose(v, perm, [n, *n2, *block[:-1], inner], base + "/s2d")
            v = self.e.reshape(tr, [-1, s2, rr * c], [n, s2, rr * c], base + "/s2d_flat")
        info = CL(v, n2, rr * c, n, x.dtype)
        self.s2d[key] = info
        return info

    def _weights(self, node):
        w = g.const_value(node.inputs[1]) if len(node.inputs) > 1 else None
        if w is None:
            raise UnsupportedOpError(node.name, node.op, FORM, "its weight is not a constant")
        b = None
        if len(node.inputs) > 2 and node.inputs[2].name:
            b = g.const_value(node.inputs[2])
            if b is None:
                raise UnsupportedOpError(node.name, node.op, FORM, "its bias is not a constant")
        return w, b

    def do_Conv(self, node) -> bool:
        x_t, out_t = node.inputs[0], node.outputs[0]
        if not self.activation(x_t) or not _static(out_t.shape[1:] if out_t.shape else None):
            return False
        w, b = self._weights(node)
        x = self.cl_view(x_t)
        kernel = tuple(w.shape[2:])
        group = int(g.attr(node, "group", 1))
        strides, dilations = _strides_dilations(node, len(kernel))
        pads = g.attr(node, "pads", None)
        auto_pad = g.attr(node, "auto_pad", "NOTSET")
        try:
            win = conv_windows(x.spatial, kernel, strides, pads, dilations, auto_pad)
        except ValueError as exc:
            raise UnsupportedOpError(node.name, node.op, FORM, str(exc)) from exc
        m, out_spatial = self.out_cl_shape(out_t)
        if tuple(win.out_shape) != out_spatial or m != w.shape[0]:
            raise UnsupportedOpError(node.name, node.op, FORM,
                                     f"its windows give {win.out_shape}, the model says "
                                     f"{out_spatial}")
        y = lower_winograd(self, node, x_t, w, b, strides, dilations, group, pads, auto_pad)
        if y is not None:  # issue 13: the conv-algorithm choice and the Winograd emission
            self.conv_out(out_t, y, out_spatial, m)
            return True
        wg = group_weights(w, group)
        block = _space_to_depth_block(x.channels, strides, x.dtype) if group == 1 else None
        if block is not None:
            pads = resolve_pads(x.spatial, kernel, strides, dilations, pads, auto_pad)
            s2d = space_to_depth_taps(x.spatial, kernel, strides, pads, dilations, block)
            x2 = self.to_s2d(x_t, block, node.name or out_t.name)
            y = self.emit_conv(node, x2, s2d.weights(wg), b, s2d.taps, out_t)
        else:
            y = self.emit_conv(node, self.to_cl(x_t), wg, b, win.taps, out_t)
        self.conv_out(out_t, y, out_spatial, m)
        return True

    def conv_out(self, out_t: gs.Tensor, y: gs.Variable, spatial, channels) -> None:
        """Record a conv's output; if its activation ran per chunk, that op is done too."""
        act = self.sunk.pop(out_t.name, None)
        if act is None:
            self.new_cl(out_t, y, spatial, channels)
            return
        self.new_cl(act.outputs[0], y, spatial, channels)
        g.detach(act)

    def do_ConvTranspose(self, node) -> bool:
        x_t, out_t = node.inputs[0], node.outputs[0]
        if not self.activation(x_t) or not _static(out_t.shape[1:] if out_t.shape else None):
            return False
        w, b = self._weights(node)
        x = self.to_cl(x_t)
        kernel = tuple(w.shape[2:])
        group = int(g.attr(node, "group", 1))
        strides, dilations = _strides_dilations(node, len(kernel))
        try:
            pads, out_shape = conv_transpose_geometry(
                (x.channels, *x.spatial), w.shape, strides=strides,
                pads=g.attr(node, "pads", None), dilations=dilations, group=group,
                output_padding=g.attr(node, "output_padding", None),
                output_shape=g.attr(node, "output_shape", None),
                auto_pad=g.attr(node, "auto_pad", "NOTSET"),
                kernel_shape=g.attr(node, "kernel_shape", None))
        except ValueError as exc:
            raise UnsupportedOpError(node.name, node.op, FORM, str(exc)) from exc
        m, out_spatial = self.out_cl_shape(out_t)
        if tuple(out_shape[1:]) != out_spatial:
            raise UnsupportedOpError(node.name, node.op, FORM,
                                     f"its geometry gives {out_shape[1:]}, the model says "
                                     f"{out_spatial}")
        taps = conv_transpose_taps(out_spatial, kernel, strides, pads, dilations, x.s)
        wg = group_weights(w, group, transpose=True)
        y = self.emit_conv(node, x, wg, b, taps, out_t)
        self.conv_out(out_t, y, out_spatial, m)
        return True

    # -- pools ------------------------------------------------------------------------------

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
            stages, win_out = max_pool_plan(x.spatial, kernel, **self._pool_kw(node))
        except ValueError as exc:
            raise UnsupportedOpError(node.name, node.op, FORM, str(exc)) from exc
        c, out_spatial = self._pool_out(node, out_t, win_out)
        base = node.name or out_t.name
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

    def do_BatchNormalization(self, node) -> bool:
        x_t, out_t = node.inputs[0], node.outputs[0]
        if not self.activation(x_t):
            return False
        ss = _bn_scale_shift(node)
        if ss is None:
            raise UnsupportedOpError(node.name, node.op, FORM,
                                     "only inference-mode BatchNormalization with constant "
                                     "per-channel parameters can be lowered")
        x = self.to_cl(x_t)
        base = node.name or out_t.name
        v = self.primary(x)
        y = self.e.binary("Mul", v, self.e.const(f"{base}/scale", ss[0].astype(x.dtype)),
                          v.shape, base + "/scale")
        y = self.e.binary("Add", y, self.e.const(f"{base}/shift", ss[1].astype(x.dtype)),
                          v.shape, base + "/shift")
        self.new_cl(out_t, y, x.spatial, x.channels)
        return True

    # -- layout-agnostic ops ----------------------------------------------------------------

    def unary(self, node) -> bool:
        if not node.inputs or node.inputs[0].name not in self.cl:
            return False
        if g.is_op(node, "Dropout") and any(o.outputs for o in node.outputs[1:]):
            return False
        x = self.cl[node.inputs[0].name]
        out_t = node.outputs[0]
        if g.is_op(node, "Identity", "Dropout"):
            self.cl[out_t.name] = x
            self.originals[out_t.name] = out_t
            return True
        v = self.primary(x)
        dtype = out_t.dtype if out_t.dtype is not None else v.dtype
        y = self.e.op(node.op, [v, *node.inputs[1:]], v.shape, dtype, node.name or out_t.name,
                      dict(node.attrs))
        self.graph.nodes[-1].domain = node.domain
        self.new_cl(out_t, y, x.spatial, x.channels)
        return True

    def binary(self, node) -> bool:
        ins = list(node.inputs)
        out_t = node.outputs[0]
        if not any(t.name in self.cl for t in ins) or out_t.shape is None:
            return False
        rank = len(out_t.shape)
        if rank < 3 or not _static(out_t.shape[1:]):
            return False
        c, spatial = self.out_cl_shape(out_t)
        s = math.prod(spatial)
        consts: dict[int, np.ndarray] = {}
        for i, t in enumerate(ins):
            cv = g.const_value(t)
            if cv is not None:
                v = channels_last_constant(cv, rank, c, spatial)
                if v is None:
                    return False
                consts[i] = v.astype(cv.dtype)
                continue
            if t.shape is None or len(t.shape) != rank or not _static(t.shape[1:]):
                return False
            tc, tsp = t.shape[1], tuple(t.shape[2:])
            if tc not in (1, c) or (tsp != tuple(spatial) and any(d != 1 for d in tsp)):
                return False
        acts = [self.to_cl(t) for i, t in enumerate(ins) if i not in consts]
        # 2-D (N·S, C) if every activation is full-size and has a 2-D view and every constant
        # is per channel: then onnxruntime can fuse the op with a preceding Gemm.
        flat = (all(a.rows is not None and a.s == s for a in acts)
                and all(v.shape[1] == 1 for v in consts.values()))
        new_inputs = []
        for i, t in enumerate(ins):
            if i in consts:
                v = consts[i].reshape(1, -1) if flat else consts[i]
                new_inputs.append(self.e.const(f"{node.name}/{t.name}_cl", v))
            else:
                a = self.cl[t.name]
                new_inputs.append(self.t2(a) if flat else self.t3(a))
        shape = [acts[0].rows_dim, c] if flat else [out_t.shape[0], s, c]
        y = self.e.op(node.op, new_inputs, shape, out_t.dtype, node.name or out_t.name,
                      dict(node.attrs))
        self.new_cl(out_t, y, spatial, c)
        return True

    def do_Concat(self, node) -> bool:
        out_t = node.outputs[0]
        if out_t.shape is None or len(out_t.shape) < 3 or not _static(out_t.shape[1:]):
            return False
        rank = len(out_t.shape)
        if int(g.attr(node, "axis", 1)) % rank != 1:
            return False
        if not any(t.name in self.cl for t in node.inputs):
            return False
        if not all(self.activation(t) for t in node.inputs):
            return False
        xs = [self.to_cl(t) for t in node.inputs]
        c, spatial = self.out_cl_shape(out_t)
        s = math.prod(spatial)
        base = node.name or out_t.name
        if all(x.rows is not None for x in xs):
            v = self.e.concat([x.rows for x in xs], 1, [xs[0].rows_dim, c], base)
        else:
            v = self.e.concat([self.t3(x) for x in xs], 2, [out_t.shape[0], s, c], base)
        self.new_cl(out_t, v, spatial, c)
        return True

    def _alias(self, node) -> bool:
        """Reshape/Squeeze/Unsqueeze/Flatten that keep batch and channels: same CL data."""
        x_t, out_t = node.inputs[0], node.outputs[0]
        if x_t.name not in self.cl or out_t.shape is None or x_t.shape is None:
            return False
        x = self.cl[x_t.name]
        if len(out_t.shape) >= 3 and _static(out_t.shape[1:]):
            c, spatial = self.out_cl_shape(out_t)
            if (c == x.channels and math.prod(spatial) == x.s
                    and out_t.shape[0] == x_t.shape[0]):
                self.cl[out_t.name] = dataclasses.replace(x, spatial=tuple(spatial))
                self.originals[out_t.name] = out_t
                return True
            return False
        if len(out_t.shape) == 2 and _static(out_t.shape[1:]) and out_t.shape[0] == x_t.shape[0]:
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
        return self._alias(node)

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
                or not _static(out_t.shape[1:])):
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

    def do_Pad(self, node) -> bool:
        """A Pad of spatial axes only works on the ``(N, *spatial, C)`` view."""
        x_t, out_t = node.inputs[0], node.outputs[0]
        if x_t.name not in self.cl or out_t.shape is None or not _static(out_t.shape[1:]):
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

    # -- contractions -----------------------------------------------------------------------

    def do_Gemm(self, node) -> bool:
        """Gemm → MatMul (+ Add); a CL flatten input permutes the weight rows."""
        a_t, b_t = node.inputs[0], node.inputs[1]
        c_t = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
        out_t = node.outputs[0]
        alpha = float(g.attr(node, "alpha", 1.0))
        beta = float(g.attr(node, "beta", 1.0))
        trans_a, trans_b = g.attr(node, "transA", 0), g.attr(node, "transB", 0)
        b = g.const_value(b_t)
        base = node.name or out_t.name
        dtype = _float_dtype(out_t)
        perm = None
        if a_t.name in self.flat and not trans_a and b is not None:
            a, perm = self.flat[a_t.name]
        else:
            self.ensure_nchw(a_t)
            a = a_t
            if trans_a:
                shape = list(reversed(a_t.shape)) if a_t.shape else None
                a = self.e.transpose(a_t, [1, 0], shape, base + "/transA")
        scale_after = None
        if b is not None:
            bm = _cl_rows(b, perm, trans_b)
            if alpha != 1.0:
                bm = (np.asarray(bm, dtype=np.float64) * alpha).astype(b.dtype)
            b_in = self.e.const(f"{base}/weight", np.ascontiguousarray(bm))
        else:
            self.ensure_nchw(b_t)
            b_in = b_t
            if trans_b:
                shape = list(reversed(b_t.shape)) if b_t.shape else None
                b_in = self.e.transpose(b_t, [1, 0], shape, base + "/transB")
            scale_after = alpha if alpha != 1.0 else None
        last = c_t is None and scale_after is None
        y = self.e.op("MatMul", [a, b_in], out_t.shape, out_t.dtype, base,
                      out=out_t if last else None)
        if scale_after is not None:
            y = self.e.binary("Mul", y, self.e.const(f"{base}/alpha",
                                                     np.asarray(alpha, dtype=dtype)),
                              out_t.shape, base + "/alpha", out=out_t if c_t is None else None)
        if c_t is not None:
            cv = g.const_value(c_t)
            if cv is not None:
                cv2 = cv if beta == 1.0 else (np.asarray(cv, np.float64) * beta).astype(cv.dtype)
                c_in = self.e.const(f"{base}/bias", cv2)
            else:
                self.ensure_nchw(c_t)
                c_in = c_t
                if beta != 1.0:
                    c_in = self.e.binary("Mul", c_t, self.e.const(
                        f"{base}/beta", np.asarray(beta, dtype=dtype)), c_t.shape, base + "/beta")
            self.e.binary("Add", y, c_in, out_t.shape, base + "/bias", out=out_t)
        return True

    def do_MatMul(self, node) -> bool:
        a_t = node.inputs[0]
        if a_t.name not in self.flat:
            return False
        b = g.const_value(node.inputs[1])
        a, perm = self.flat[a_t.name]
        out_t = node.outputs[0]
        w = self.e.const(f"{node.name or out_t.name}/weight", _cl_rows(b, perm, False))
        self.e.op("MatMul", [a, w], out_t.shape, out_t.dtype, node.name or out_t.name,
                  out=out_t)
        return True


def _space_to_depth_block(channels: int, strides, dtype: np.dtype) -> tuple[int, ...] | None:
    """Per-axis space-to-depth factors for a strided conv with a tiny channel block, or None."""
    if channels * dtype.itemsize > _S2D_MAX_BYTES or all(s == 1 for s in strides):
        return None
    if _S2D_AXES == "all":
        return tuple(strides)
    if strides[-1] == 1:
        return None
    return (*(1,) * (len(strides) - 1), strides[-1])


def _transpose2d(b: np.ndarray, tile: int = 512) -> np.ndarray:
    """``b.T`` as a contiguous array, copied tile by tile (2× faster than numpy's one-shot copy
    on classifier-sized matrices, whose strided reads thrash the cache)."""
    n, k = b.shape
    out = np.empty((k, n), dtype=b.dtype)
    for i in range(0, n, tile):
        for j in range(0, k, tile):
            out[j:j + tile, i:i + tile] = b[i:i + tile, j:j + tile].T
    return out


def _cl_rows(b: np.ndarray, perm: tuple[int, int] | None, trans: bool) -> np.ndarray:
    """Contiguous ``(K, N)`` weight (``b.T`` if ``trans``) with rows in channels-last order.

    One new array, whatever the flags: classifier weights are the largest of a CNN.

    ``perm = (C, S)`` reorders rows ``c·S + s`` to ``s·C + c`` (one transpose-copy in numpy,
    much faster than fancy indexing on 100 M-element classifier weights).
    """
    if perm is None:
        return _transpose2d(b) if trans else np.ascontiguousarray(b)
    c, s = perm
    if not trans:
        return np.ascontiguousarray(b.reshape(c, s, -1).transpose(1, 0, 2)).reshape(c * s, -1)
    # b is (N, C·S): out[s·C + c, n] = b[n, c·S + s] in one copy (a transpose then a
    # permutation would hold a third classifier-sized array), tiled over (n, c) so the strided
    # side stays in cache: VGG-11's 4096 × 25088 classifier in 0.42 s against 0.96 s before
    src = b.reshape(-1, c, s)
    out = np.empty((s, c, src.shape[0]), dtype=b.dtype)
    for i in range(0, src.shape[0], 128):
        for j in range(0, c, 32):
            out[:, j:j + 32, i:i + 128] = src[i:i + 128, j:j + 32].transpose(2, 1, 0)
    return out.reshape(s * c, -1)


def _is_to_nchw(node: gs.Node, rank: int) -> bool:
    """``node`` is a Transpose whose output, made channels-last, is its input (NHWC → NCHW)."""
    if not g.is_op(node, "Transpose"):
        return False
    perm = list(g.attr(node, "perm", None) or [])
    return len(perm) == rank and [perm[i] for i in [0, *range(2, rank), 1]] == list(range(rank))


def _names_used_by_subgraphs_of(body: gs.Graph) -> set[str]:
    """Names of the tensors that the nodes of ``body`` (at any depth) read."""
    return {t.name for sub in g.all_graphs(body) for n in sub.nodes for t in n.inputs}


def _names_used_by_subgraphs(graph: gs.Graph) -> set[str]:
    return {name for node in graph.nodes for v in node.attrs.values() if isinstance(v, gs.Graph)
            for name in _names_used_by_subgraphs_of(v)}


@register_pass("lower-im2col")
class LowerIm2col(GraphPass):
    """Lower Conv, ConvTranspose, pools and BatchNormalization to Gather + MatMul on (N, S, C)."""

    def run_on_graph(self, graph: gs.Graph, model: LoweringModel) -> bool:
        folded = Im2colFold().run_on_graph(graph, model)
        changed = _Lowering(graph, model).run()
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return bool(folded or changed)

    def ensures(self, model: LoweringModel) -> None:
        for graph in g.all_graphs(model.graph):
            for node in graph.nodes:
                if g.is_op(node, *LOWERED_OPS):
                    raise UnsupportedOpError(node.name, node.op, FORM, "it was left in the graph")
