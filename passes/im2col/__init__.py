"""The im2col form: convs and pools as Gather + MatMul on channels-last activations.

For runtimes that lack Conv and Pool but have a fast MatMul (DESIGN.md, "The im2col form"). After
``lower-im2col`` no Conv, ConvTranspose, MaxPool, AveragePool, GlobalAveragePool, GlobalMaxPool or
BatchNormalization is left; every contraction is a MatMul (Gemm becomes MatMul + Add too), and the
only other ops are Gather, Reshape, Transpose, Concat, Slice, Split, Pad, ReduceSum, Flatten, Add,
Sub, Mul, Relu, plus the elementwise ops the model already had (Clip, Sigmoid, Tanh, ...), which
run unchanged.

Inside a lowered region an ``(N, C, *spatial)`` activation is stored channels-last,
``(N, S, C)`` with ``S = Π spatial``, or as its 2-D view ``(N·S, C)``. A conv gathers its taps
``(S_out, K)`` (padding taps read a **zero row** appended to the input) and multiplies::

    y = Reshape(Gather(x, taps, axis=1), (N·S_out, K·C)) @ W + b    W[t·C + c, m] = weight[m, c, t]

Max pools take pairwise maxima as ``max(a, b) = b + relu(a - b)``; strided convs over a tiny
channel block (RGB stems) first fold space-to-depth. Each module states its math and numbers:

=============  ==================================================================================
ops            the op sets: emitted (``ALLOWED_OPS``), kept, lowered, refused
cost           the cost model: chunk sizes, ``max_stage_cost``, tuning constants with measurements
emitter        ``Emitter``: graph building with fresh names, opset-aware Pad/Slice/ReduceSum
layout         the ``CL`` view, region entry/exit Transposes, ``channels_last_constant``,
               ``flatten_permutation``; Reshape/Squeeze/Unsqueeze/Transpose/Pad aliases
conv           ``choose_conv_algorithm`` (the one dispatch point); taps, ``gather_indices``,
               ``dense_weight``, chunked Gather + MatMul, space-to-depth, ConvTranspose taps
grouped        grouped convs (batched per-group MatMul) and depthwise convs (Mul + ReduceSum)
winograd       Winograd F(2,3)/F(4,3) convs as MatMuls, the per-conv cost model and numerics gate
pools          MaxPool plans and tournaments, AveragePool, global pools
elementwise    unary/binary ops, Concat, BatchNormalization, Gemm/MatMul
fold           pass ``im2col-fold``: BatchNormalization and constant affines into conv weights,
               and one bias per residual Add of two convs
lowering       pass ``lower-im2col``: the driver, one mixin per family over ``LayoutCore``
=============  ==================================================================================
"""

from __future__ import annotations

from . import conv, cost, elementwise, emitter, fold, grouped, layout, lowering, ops, pools
from .conv import (
    CONV_ALGORITHMS,
    GatherPlan,
    SpaceToDepth,
    choose_conv_algorithm,
    conv_transpose_taps,
    conv_windows,
    dense_weight,
    gather_indices,
    group_weights,
    space_to_depth_taps,
)
from .cost import max_stage_cost
from .fold import Im2colFold, fold_scale_shift
from .grouped import depthwise_weight
from .layout import CL, channels_last_constant, flatten_permutation, shuffle_permutation
from .lowering import LowerIm2col
from .ops import ALLOWED_OPS, ELEMENTWISE_BINARY, ELEMENTWISE_UNARY, FORM, LOWERED_OPS
from .pools import MaxStage, avg_pool_scale, max_pool_plan

__all__ = [
    "FORM",
    "ALLOWED_OPS",
    "ELEMENTWISE_UNARY",
    "ELEMENTWISE_BINARY",
    "LOWERED_OPS",
    "CL",
    "CONV_ALGORITHMS",
    "GatherPlan",
    "choose_conv_algorithm",
    "conv_windows",
    "conv_transpose_taps",
    "gather_indices",
    "group_weights",
    "dense_weight",
    "depthwise_weight",
    "avg_pool_scale",
    "flatten_permutation",
    "shuffle_permutation",
    "SpaceToDepth",
    "MaxStage",
    "max_stage_cost",
    "max_pool_plan",
    "space_to_depth_taps",
    "channels_last_constant",
    "fold_scale_shift",
    "Im2colFold",
    "LowerIm2col",
    # the family modules
    "conv",
    "cost",
    "elementwise",
    "emitter",
    "fold",
    "grouped",
    "layout",
    "lowering",
    "ops",
    "pools",
]
