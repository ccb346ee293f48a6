"""im2col grouped convs and channel shuffles (passes/im2col/grouped.py, layout.py) vs onnxruntime.

A channel shuffle (Reshape ``(N, s, C/s, *sp)``, Transpose of the two channel axes, Reshape
back) right after a conv, possibly through a channelwise activation, is absorbed into that conv:
its dense weight columns (g = 1) or the Transpose that merges its groups (batched grouped MatMul,
s = g); after a Concat of s equal inputs, into the Concat. Any other shuffle of a channels-last
tensor is one Transpose of the ``(N·S, s, C/s)`` view. A 1×1 grouped conv gathers nothing.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

from onnx_lower.passes.im2col import shuffle_permutation
from tests.im2col import HYP, check, make_model, ops_of, rand


def _shuffle_nodes(x: str, y: str, groups: int, c: int, spatial, batch) -> tuple[list, dict]:
    n = -1 if batch == "N" else 1  # Reshape's -1 keeps a dynamic batch
    inits = {f"{y}_split": np.array([n, groups, c // groups, *spatial], np.int64),
             f"{y}_merge": np.array([n, c, *spatial], np.int64)}
    nodes = [helper.make_node("Reshape", [x, f"{y}_split"], [f"{y}_5d"]),
             helper.make_node("Transpose", [f"{y}_5d"], [f"{y}_t"],
                              perm=[0, 2, 1, *range(3, len(spatial) + 3)]),
             helper.make_node("Reshape", [f"{y}_t", f"{y}_merge"], [y])]
    return nodes, inits


def _divisors(n: int) -> list[int]:
    return [d for d in range(2, n) if n % d == 0]


def test_shuffle_permutation_is_the_reshape_transpose_reshape():
    x = np.arange(2 * 12 * 5).reshape(2, 12, 5)
    for g in (2, 3, 4, 6):
        want = x.reshape(2, g, 12 // g, 5).transpose(0, 2, 1, 3).reshape(2, 12, 5)
        assert np.array_equal(x[:, shuffle_permutation(12, g)], want)


@st.composite
def shuffle_cases(draw):
    rank = draw(st.integers(1, 2))
    groups = draw(st.sampled_from([1, 2, 3, 4]))
    cg, mg = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    m = groups * mg
    shuffle = draw(st.sampled_from(_divisors(m) or [0]))
    k = draw(st.sampled_from([1, 3]))
    spatial = [draw(st.integers(3, 7)) for _ in range(rank)]
    act = draw(st.sampled_from([None, "Relu", "Clip"]))
    after = draw(st.sampled_from(["output", "conv", "depthwise", "add"]))
    batch = draw(st.sampled_from([1, "N"]))
    return rank, groups, cg, mg, shuffle, k, spatial, act, after, batch


@settings(HYP, max_examples=20)
@given(shuffle_cases())
def test_grouped_conv_then_shuffle_matches_onnxruntime(case):
    rank, groups, cg, mg, shuffle, k, spatial, act, after, batch = case
    c, m = groups * cg, groups * mg
    pads = [k // 2] * (2 * rank)
    inits = {"w": rand(m, cg, *[k] * rank), "b": rand(m)}
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], group=groups,
                              kernel_shape=[k] * rank, pads=pads)]
    y = "c"
    if act == "Relu":
        nodes.append(helper.make_node("Relu", ["c"], ["a"]))
        y = "a"
    elif act == "Clip":
        inits.update(lo=np.array(-0.5, np.float32), hi=np.array(0.5, np.float32))
        nodes.append(helper.make_node("Clip", ["c", "lo", "hi"], ["a"]))
        y = "a"
    if shuffle:
        more, extra = _shuffle_nodes(y, "s", shuffle, m, spatial, batch)
        nodes += more
        inits.update(extra)
        y = "s"
    if after == "conv":
        inits["w2"] = rand(2, m, *[1] * rank)
        nodes.append(helper.make_node("Conv", [y, "w2"], ["y"], kernel_shape=[1] * rank))
    elif after == "depthwise":
        inits["w2"] = rand(m, 1, *[3] * rank)
        nodes.append(helper.make_node("Conv", [y, "w2"], ["y"], kernel_shape=[3] * rank,
                                      pads=[1] * (2 * rank), group=m))
    elif after == "add":
        inits["z"] = rand(1, m, *[1] * rank)
        nodes.append(helper.make_node("Add", [y, "z"], ["y"]))
    else:
        nodes[-1].output[0] = "y"
    lowered = check(make_model(nodes, [batch, c, *spatial], inits),
                    batches=(1,) if batch == 1 else (1, 2))
    transposes = [n.name for n in lowered.graph.node if n.op_type == "Transpose"]
    depthwise = groups > 1 and cg == 1  # Mul + ReduceSum: its channels cannot be reordered
    if shuffle and (groups == 1 or (shuffle == groups and not depthwise)):
        assert not any("/shuffle/" in t for t in transposes), transposes  # absorbed


@pytest.mark.parametrize("groups", [2, 3])
def test_grouped_1x1_conv_gathers_nothing(groups):
    node = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[1, 1], group=groups)
    lowered = check(make_model([node], [1, 6, 5, 4], {"w": rand(3 * groups, 6 // groups, 1, 1)}))
    assert ops_of(lowered)["Gather"] == 0


@pytest.mark.parametrize("conv_channels", [4, 6])
def test_shuffle_after_concat(conv_channels):
    """ShuffleNet V2: Concat of two branches, shuffle of 2 groups, then a 1×1 conv. Equal
    halves interleave in the Concat (no shuffle Transpose), unequal ones need one Transpose."""
    c = 4 + conv_channels
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], kernel_shape=[1, 1]),
             helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Concat", ["r", "a"], ["cat"], axis=1)]
    more, inits = _shuffle_nodes("cat", "s", 2, c, (5, 5), 1)
    nodes += [*more, helper.make_node("Conv", ["s", "w2"], ["y"], kernel_shape=[1, 1])]
    inits.update(w1=rand(conv_channels, 4, 1, 1), w2=rand(3, c, 1, 1))
    lowered = check(make_model(nodes, [1, 4, 5, 5], inits))
    names = [n.name for n in lowered.graph.node if n.op_type == "Transpose"]
    shuffles = [n for n in names if "/shuffle" in n]
    assert len(names) == 2 + len(shuffles), names  # entry and exit
    assert len(shuffles) == (conv_channels != 4), names


@settings(max_examples=10, deadline=None)
@given(st.sampled_from([(3, 6), (2, 4)]), st.booleans())
def test_shufflenet_unit(gm, stride2):
    """ShuffleNet V1 unit: gconv 1×1 + Relu, shuffle, depthwise 3×3, gconv 1×1, residual."""
    groups, mid = gm
    c = 2 * mid
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], kernel_shape=[1, 1], group=groups),
             helper.make_node("Relu", ["c1"], ["r1"])]
    more, inits = _shuffle_nodes("r1", "s", groups, mid, (6, 6), 1)
    stride = 2 if stride2 else 1
    nodes += [*more,
              helper.make_node("Conv", ["s", "w2"], ["d"], kernel_shape=[3, 3],
                               pads=[1, 1, 1, 1], group=mid, strides=[stride, stride]),
              helper.make_node("Conv", ["d", "w3"], ["c3"], kernel_shape=[1, 1], group=groups)]
    if stride2:
        nodes += [helper.make_node("AveragePool", ["x"], ["p"], kernel_shape=[3, 3],
                                   strides=[2, 2], pads=[1, 1, 1, 1]),
                  helper.make_node("Concat", ["p", "c3"], ["y0"], axis=1)]
    else:
        nodes.append(helper.make_node("Add", ["c3", "x"], ["y0"]))
    nodes.append(helper.make_node("Relu", ["y0"], ["y"]))
    inits.update(w1=rand(mid, c // groups, 1, 1), w2=rand(mid, 1, 3, 3),
                 w3=rand(c, mid // groups, 1, 1))
    check(make_model(nodes, [1, c, 6, 6], inits))


@st.composite
def depthwise_cases(draw):
    rank = draw(st.integers(1, 3))
    max_k, max_n = {1: (5, 13), 2: (3, 9), 3: (2, 5)}[rank]
    kernel = [draw(st.integers(1, max_k)) for _ in range(rank)]
    strides = [draw(st.integers(1, 3)) for _ in range(rank)]
    dilations = [draw(st.integers(1, 2)) for _ in range(rank)]
    pads = [draw(st.integers(0, k - 1)) for k in kernel] + \
        [draw(st.integers(0, k - 1)) for k in kernel]
    spatial = []
    for i, (k, d) in enumerate(zip(kernel, dilations)):
        lo = max(1, (k - 1) * d + 1 - pads[i] - pads[rank + i])
        spatial.append(draw(st.integers(lo, max(lo, max_n))))
    c = draw(st.integers(2, 6))
    bias = draw(st.booleans())
    act = draw(st.sampled_from([None, "Relu", "Clip"]))
    sliced = draw(st.booleans())
    batch = draw(st.sampled_from([1, "N"]))
    return rank, kernel, strides, dilations, pads, spatial, c, bias, act, sliced, batch


@settings(HYP, max_examples=30)
@given(depthwise_cases())
def test_depthwise_slices_and_gather_match_onnxruntime(case):
    """Depthwise convs as tap Slices + Mul + Add (thin channel blocks) and as Gather + Mul +
    ReduceSum: random ranks, kernels, strides, dilations, asymmetric pads, odd sizes, with a
    bias and a following Relu/Clip (ReLU6-like), static and dynamic batch."""
    from onnx_lower.passes.im2col import cost

    rank, kernel, strides, dilations, pads, spatial, c, bias, act, sliced, batch = case
    inits = {"w": rand(c, 1, *kernel)}
    inputs = ["x", "w"]
    if bias:
        inits["b"] = rand(c)
        inputs.append("b")
    nodes = [helper.make_node("Conv", inputs, ["c"], group=c, kernel_shape=kernel,
                              strides=strides, dilations=dilations, pads=pads)]
    if act == "Relu":
        nodes.append(helper.make_node("Relu", ["c"], ["y"]))
    elif act == "Clip":
        inits.update(lo=np.array(0.0, np.float32), hi=np.array(0.6, np.float32))
        nodes.append(helper.make_node("Clip", ["c", "lo", "hi"], ["y"]))
    else:
        nodes[-1].output[0] = "y"
    saved = cost.DW_SLICE_MAX_BYTES, cost.DW_SLICE_MIN_ROWS
    cost.DW_SLICE_MAX_BYTES, cost.DW_SLICE_MIN_ROWS = (1 << 30, 1) if sliced else (0, 1)
    try:
        lowered = check(make_model(nodes, [batch, c, *spatial], inits),
                        batches=(1,) if batch == 1 else (1, 2))
    finally:
        cost.DW_SLICE_MAX_BYTES, cost.DW_SLICE_MIN_ROWS = saved
    ops = ops_of(lowered)
    assert (ops["ReduceSum"] == 0) == sliced, ops
    assert ops["Gather"] == 0 or not sliced, ops
