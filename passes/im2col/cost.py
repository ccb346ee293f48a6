"""The im2col cost model: chunk sizes, the max-pool stage cost, tuning constants.

Every constant here was measured (``tools/bench_layers.py``, ``tools/bench_im2col.py``; AMD
EPYC, 1 thread, onnxruntime 1.32); the numbers behind each are below.

Chunks. The gathered ``(S_out, K·C)`` matrix of a large layer is tens of MB (VGG-11's 3×3/256
at 56²: 29 MB) and was written to memory and streamed back by the MatMul. The output rows are
therefore split into chunks of about 2 MB of taps (1 MB for depthwise); each chunk is Gather +
MatMul (+ the conv's single consumer activation, applied per chunk so onnxruntime still fuses
it), and the chunks are concatenated. Per layer (interleaved A/B vs onnxruntime's Conv+Relu):
VGG 3×3 256→256 at 56², 1.30× → 1.10×; 64→128 at 112², 1.46× → 1.19×; ResNet 64→64 at 56²,
1.54× → 1.16×. Whole networks: VGG-11 −9 %, ResNet-18 −12 %; 2 MB beat 1 MB and 4 MB by 2-3 %.
Depthwise chunks: MobileNetV2 1.4× faster than unchunked. Running the following Clip and 1×1
projection per depthwise chunk as well gained only 2 % and is not done.

Depthwise and max-pool taps as Slices (issue 13, BENCHMARKS.md "Depthwise convs and MaxPool
without gathered taps"; interleaved whole-network A/B, 1 thread, load 4-7): depthwise convs with
``C·itemsize ≤ DW_SLICE_MAX_BYTES`` (1 KB) and ``S_out ≥ DW_SLICE_MIN_ROWS`` (1024) take their
taps as Slices (MobileNetV2 2.73-3.23 → 2.47-2.78 × native over 8 rounds; on ShuffleNet V2's
28² and smaller maps slices lost 2-10 %, so those keep the Gather; 384+ channels lost 0-19 % per
layer). ``POOL_SLICES``: dilation-1 MaxPools as Slices of an edge-padded input (ShuffleNet V2
−17 to −19 %, ResNet-18 −3 %, the rest within noise), reducing the outer axis first
(``POOL_AXIS_ORDER``; last-first measured 0.97-1.03×).

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
* Depthwise convs (:mod:`.grouped`): MobileNetV2's depthwise layers take ~60 % of its lowered time.
* Max pools: 3 elementwise ops per pairwise max against one fused kernel (SqueezeNet's three
  max pools take ~25 % of its lowered time).
* Small models (the samples and corpus, < 1 ms): onnxruntime's per-node overhead (~2-5 µs)
  and single-channel inputs (Gathers of 4-byte blocks) dominate: 1.0-4.6×.
* With 2 threads chunks of 2 MB split the MatMuls finer than onnxruntime's threading likes
  (VGG-11 up to 1.2× slower than unchunked at 2 threads in some runs); 1 thread is the target.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "OP_COST",
    "INDEX_DTYPE",
    "DEPTHWISE",
    "DENSE_GROUPS",
    "DW_CHUNK_BYTES",
    "DW_SLICE_MAX_BYTES",
    "DW_SLICE_MIN_ROWS",
    "POOL_AXIS_ORDER",
    "POOL_SLICES",
    "CONV_CHUNK_BYTES",
    "MIN_CHUNK_ROWS",
    "MAX_CHUNKS",
    "RESIDUAL_BIAS_FOLD",
    "S2D_MAX_BYTES",
    "S2D_AXES",
    "chunk_bounds",
    "max_stage_cost",
]

#: onnxruntime's fixed cost of one node, in element passes (≈ 4 µs at ≈ 0.25 ns per element).
OP_COST = 16000

# Tuning constants (measured: the module docstring has the numbers).
INDEX_DTYPE = np.int64  # Gather indices (int32 measured no faster in onnxruntime)
DEPTHWISE = "mul"  # depthwise as Mul + ReduceSum ("mul") or as the grouped MatMul ("matmul")
DENSE_GROUPS = 1  # more groups than this: batched per-group MatMul, not block-diagonal
DW_CHUNK_BYTES = 1 << 20  # target size of one chunk of gathered depthwise taps
DW_SLICE_MAX_BYTES = 1024  # depthwise taps as Slices (not a Gather) up to this channel block
DW_SLICE_MIN_ROWS = 1024  # ... and from this many output positions (32²)
POOL_SLICES = True  # MaxPool (dilation 1) as Slices of an edge-padded input, not Gathers
POOL_AXIS_ORDER = "first"  # MaxPool slices: reduce the outer ("first") or the last axis first
CONV_CHUNK_BYTES = 2 << 20  # ... and of an im2col chunk (Gather + MatMul)
MIN_CHUNK_ROWS = 64  # keep MatMuls tall enough to run at full speed
MAX_CHUNKS = 64
RESIDUAL_BIAS_FOLD = True  # an Add of two conv outputs: one conv takes both biases (fold.py)
S2D_MAX_BYTES = 32  # space-to-depth for strided convs whose channel block is this small
S2D_AXES = "last"  # fold "last" spatial axis only (a free Reshape) or "all" (one Transpose)


def chunk_bounds(rows: int, row_bytes: int, chunk_bytes: int) -> list[tuple[int, int]]:
    """Row ranges of about ``chunk_bytes`` each (at least :data:`MIN_CHUNK_ROWS` rows)."""
    per = max(MIN_CHUNK_ROWS, chunk_bytes // max(row_bytes, 1))
    n = max(1, min(MAX_CHUNKS, -(-rows // per)))
    b = np.linspace(0, rows, n + 1).round().astype(int)
    return [(int(b[i]), int(b[i + 1])) for i in range(n)]


def max_stage_cost(k: int, rows: int) -> tuple[float, str]:
    """``(cost, mode)`` of the cheaper way to take the max of ``k`` taps for ``rows`` outputs.

    Cost counts written elements per channel plus :data:`OP_COST` per node: a tree writes
    ``k`` gathered + ``3(k - 1)`` max-op elements per output in ``4k - 3`` nodes; halves write
    ``2h + 3h`` for the first level and ``2h' + 3h'`` per further level (two Slices and a max),
    in 5 nodes per level. Trees move fewer elements, halves need fewer nodes.
    """
    if k == 1:
        return rows + OP_COST, "tree"
    tree = (4 * k - 3) * rows + OP_COST * (4 * k - 3)
    h = (k + 1) // 2
    elems, ops = 5 * h * rows, 5
    while h > 1:
        h = (h + 1) // 2
        elems, ops = elems + 5 * h * rows, ops + 5
    halves = elems + OP_COST * ops
    return (tree, "tree") if tree <= halves else (halves, "halves")

