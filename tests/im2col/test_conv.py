"""im2col convs (passes/im2col/conv.py, grouped.py): taps, weights, chunks, space-to-depth."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from hypothesis import given
from hypothesis import strategies as st
from onnx import helper

import onnx_lower
from onnx_lower.errors import LoweringError
from onnx_lower.passes import im2col
from onnx_lower.passes.im2col import (
    conv_transpose_taps,
    cost,
    dense_weight,
    group_weights,
    space_to_depth_taps,
)
from onnx_lower.passes.im2col.fold import fold_residual_bias
from onnx_lower.windows import resolve_pads, sliding_windows
from tests.im2col import HYP, check, make_model, ops_of, rand


def test_dense_weight_block_diagonal():
    w = rand(4, 1, 3)  # M=4, Cg=1, k=3, group 2 → C=2
    wg = group_weights(w, 2)
    d = dense_weight(wg)  # (K·C, M)
    assert d.shape == (6, 4)
    # tap t, channel c, output m: W[m, c - c0(m), t] inside the group, 0 outside
    for t in range(3):
        for c in range(2):
            for m in range(4):
                expect = w[m, 0, t] if m // 2 == c else 0.0
                assert d[t * 2 + c, m] == pytest.approx(expect)


def test_space_to_depth_taps_read_the_same_inputs():
    """Every original (window, tap) reads the same input position through the s2d layout."""
    spatial, kernel, strides, pads, dil = (9, 8), (3, 4), (2, 3), (1, 2, 2, 0), (1, 2)
    win = sliding_windows(spatial, kernel, strides, pads, dil)
    s2d = space_to_depth_taps(spatial, kernel, strides, pads, dil)
    n2 = [-(-n // s) for n, s in zip(spatial, strides)]
    # position of (q, r) in the original grid, or -1 if it is the zero padding
    q = np.indices(n2).reshape(2, -1).T
    r = np.indices(strides).reshape(2, -1).T
    pos = q[:, None, :] * np.array(strides) + r[None, :, :]  # (S2, R, 2)
    inside = np.all(pos < np.array(spatial), axis=-1)
    flat = np.where(inside, pos[..., 0] * spatial[1] + pos[..., 1], -1)
    t = np.arange(win.taps.shape[1])
    new_tap = s2d.taps[:, s2d.tap_index[t]]  # (S_out, K)
    via = np.where(new_tap >= 0, flat[np.maximum(new_tap, 0), s2d.phase_index[t]], -1)
    assert np.array_equal(via, win.taps)


def test_conv_transpose_taps_invert_the_conv_windows():
    out_spatial, kernel, strides, pads, dil = (7,), (3,), (2,), (1, 1), (1,)
    taps = conv_transpose_taps(out_spatial, kernel, strides, pads, dil, in_size=4)
    # output p, tap t reads input i with p = i·s - b + t·d
    for p in range(7):
        for t in range(3):
            i = taps[p, t]
            if i >= 0:
                assert p == i * 2 - 1 + t
            else:
                assert all(p != i2 * 2 - 1 + t for i2 in range(4))


@st.composite
def conv_cases(draw):
    rank = draw(st.integers(1, 3))
    mode = draw(st.sampled_from(["dense", "grouped", "depthwise", "depthwise_x2"]))
    groups = {"dense": 1, "grouped": draw(st.sampled_from([2, 6]))}.get(mode) or \
        draw(st.integers(2, 5))
    cg = draw(st.integers(1, 3)) if mode in ("dense", "grouped") else 1
    mg = draw(st.integers(1, 3)) if mode != "depthwise" else 1
    max_k, max_n = {1: (4, 12), 2: (3, 8), 3: (2, 5)}[rank]
    kernel = [draw(st.integers(1, max_k)) for _ in range(rank)]
    strides = [draw(st.integers(1, 3)) for _ in range(rank)]
    dilations = [draw(st.integers(1, 2)) for _ in range(rank)]
    begins = [draw(st.integers(0, k - 1)) for k in kernel]
    ends = [draw(st.integers(0, k - 1)) for k in kernel]
    spatial = []
    for k, d, b, e in zip(kernel, dilations, begins, ends):
        lo = max(1, (k - 1) * d + 1 - b - e)
        spatial.append(draw(st.integers(lo, max(lo, max_n))))
    bias = draw(st.booleans())
    return rank, groups, cg, mg, kernel, strides, dilations, begins + ends, spatial, bias


@HYP
@given(conv_cases())
def test_conv_matches_onnxruntime(case):
    rank, groups, cg, mg, kernel, strides, dilations, pads, spatial, bias = case
    c, m = groups * cg, groups * mg
    inits = {"w": rand(m, cg, *kernel)}
    inputs = ["x", "w"]
    if bias:
        inits["b"] = rand(m)
        inputs.append("b")
    node = helper.make_node("Conv", inputs, ["y"], group=groups, kernel_shape=kernel,
                            strides=strides, dilations=dilations, pads=pads)
    check(make_model([node], ["N", c, *spatial], inits), batches=(2,))


@pytest.mark.parametrize("batch", [1, "N"])
def test_chunked_convs_with_their_activation(monkeypatch, batch):
    """Tiny chunks: several Gather+MatMul (and depthwise) chunks, Relu/Clip run per chunk."""
    monkeypatch.setattr(im2col.cost, "CONV_CHUNK_BYTES", 512)
    monkeypatch.setattr(im2col.cost, "DW_CHUNK_BYTES", 512)
    monkeypatch.setattr(im2col.cost, "DW_SLICE_MAX_BYTES", 0)  # the gathered depthwise form
    monkeypatch.setattr(im2col.cost, "MIN_CHUNK_ROWS", 7)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], kernel_shape=[3, 3],
                              pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], kernel_shape=[3, 3],
                              pads=[1, 1, 1, 1], group=6),
             helper.make_node("Clip", ["c2", "lo", "hi"], ["r2"]),
             helper.make_node("Conv", ["r2", "w3"], ["y"], kernel_shape=[3, 3], strides=[2, 2])]
    inits = {"w1": rand(6, 4, 3, 3), "b1": rand(6), "w2": rand(6, 1, 3, 3), "b2": rand(6),
             "lo": np.array(0.0, np.float32), "hi": np.array(0.5, np.float32),
             "w3": rand(5, 6, 3, 3)}
    lowered = check(make_model(nodes, [batch, 4, 9, 10], inits),
                    batches=(1,) if batch == 1 else (1, 3))
    names = [n.name for n in lowered.graph.node]
    assert ops_of(lowered)["Concat"] == 3
    assert any("/c1/relu" in n for n in names) and any("/c1/clip" in n for n in names)


@pytest.mark.parametrize("c", [3, 16])
@pytest.mark.parametrize("spatial", [(11,), (10, 9), (5, 6, 7)])
def test_strided_conv_space_to_depth_and_plain(c, spatial):
    """C=3 stride 2 goes through space-to-depth, C=16 through the plain gather."""
    r = len(spatial)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], kernel_shape=[3] * r,
                            strides=[2] * r, pads=[1] * (2 * r))
    lowered = check(make_model([node], [1, c, *spatial], {"w": rand(4, c, *[3] * r),
                                                          "b": rand(4)}))
    names = [n.name for n in lowered.graph.node]
    assert any("s2d" in n for n in names) == (c == 3)


@pytest.mark.parametrize(
    "attrs, in_spatial",
    [
        (dict(strides=[2, 2], pads=[1, 1, 1, 1]), (4, 5)),
        (dict(strides=[2, 1], output_padding=[1, 0]), (3, 4)),
        (dict(strides=[3, 2], dilations=[2, 1], pads=[0, 1, 2, 0]), (3, 3)),
        (dict(group=2), (4, 4)),
        (dict(strides=[2, 2], auto_pad="SAME_UPPER"), (3, 4)),
        (dict(strides=[2, 2], output_shape=[7, 8]), (3, 4)),
    ],
)
def test_conv_transpose(attrs, in_spatial):
    group = attrs.get("group", 1)
    c = 4
    node = helper.make_node("ConvTranspose", ["x", "w", "b"], ["y"], kernel_shape=[3, 3], **attrs)
    check(make_model([node], ["N", c, *in_spatial], {"w": rand(c, 6 // group, 3, 3),
                                                     "b": rand(6)}), batches=(1, 2))


def test_conv_with_computed_weight_is_refused():
    model = make_model([helper.make_node("Conv", ["x", "x"], ["y"])], [1, 1, 3, 3])
    with pytest.raises(LoweringError, match="im2col"):
        onnx_lower.lower(model, form="im2col")


def test_conv_windows_agree_with_resolve_pads():
    pads = resolve_pads((7, 7), (3, 3), (2, 2), (1, 1), None, "SAME_UPPER")
    win = im2col.conv_windows((7, 7), (3, 3), (2, 2), None, (1, 1), "SAME_UPPER")
    assert win.out_shape == (4, 4) and math.prod(win.out_shape) == win.taps.shape[0]
    assert pads == (1, 1, 1, 1)


def _residual_block(k_main, stride, c, m, bn):
    """``relu(conv_main(x) [BN] + conv_short(x) [BN])``: a ResNet projection-shortcut block."""
    pad = k_main // 2
    nodes = [helper.make_node("Conv", ["x", "wa", "ba"], ["ya"], kernel_shape=[k_main] * 2,
                              strides=[stride] * 2, pads=[pad] * 4, name="main"),
             helper.make_node("Conv", ["x", "wb", "bb"], ["yb"], kernel_shape=[1, 1],
                              strides=[stride] * 2, name="short")]
    inits = {"wa": rand(m, c, k_main, k_main), "ba": rand(m), "wb": rand(m, c, 1, 1), "bb": rand(m)}
    summed = ["ya", "yb"]
    if bn:
        for t in ("a", "b"):
            nodes.append(helper.make_node("BatchNormalization", [f"y{t}", f"g{t}", f"be{t}",
                                                                 f"mu{t}", f"var{t}"], [f"n{t}"]))
            inits |= {f"g{t}": rand(m), f"be{t}": rand(m), f"mu{t}": rand(m),
                      f"var{t}": np.abs(rand(m)) + 0.5}
        summed = ["na", "nb"]
    nodes += [helper.make_node("Add", summed, ["s"], name="add"),
              helper.make_node("Relu", ["s"], ["y"])]
    return make_model(nodes, (1, c, 9, 9), inits)


@HYP
@given(k_main=st.sampled_from([1, 3]), stride=st.sampled_from([1, 2]),
       c=st.integers(1, 6), m=st.integers(1, 8), bn=st.booleans())
def test_residual_bias_moves_to_one_conv(k_main, stride, c, m, bn):
    """An Add of two conv outputs keeps one bias: the result still matches onnxruntime, and the
    graph has one bias-add fewer than with the fold switched off."""
    model = _residual_block(k_main, stride, c, m, bn)
    lowered = check(model)
    graph = gs.import_onnx(onnx.shape_inference.infer_shapes(model))  # as resolve-shapes does
    add = next(n for n in graph.nodes if n.op == "Add")
    if bn:  # the fold runs after BatchNormalization is folded; without BN it applies directly
        assert not fold_residual_bias(graph, add)
    else:
        assert fold_residual_bias(graph, add)
        convs = {n.name: n for n in graph.nodes if n.op == "Conv"}
        # the 1×1 stride-1 shortcut gives when the main conv is not one; else the main conv
        giver, keeper = ("short", "main") if stride == 1 and k_main == 3 else ("main", "short")
        assert len(convs[giver].inputs) == 2 and len(convs[keeper].inputs) == 3
    saved = cost.RESIDUAL_BIAS_FOLD
    try:
        cost.RESIDUAL_BIAS_FOLD = False
        unfolded, _ = onnx_lower.lower(model, form="im2col")
    finally:
        cost.RESIDUAL_BIAS_FOLD = saved
    assert ops_of(lowered)["Add"] == ops_of(unfolded)["Add"] - 1


def test_residual_bias_left_alone_for_an_identity_shortcut():
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[1, 1]),
             helper.make_node("Add", ["c", "x"], ["s"]), helper.make_node("Relu", ["s"], ["y"])]
    model = make_model(nodes, (1, 4, 5, 5), {"w": rand(4, 4, 1, 1), "b": rand(4)})
    lowered = check(model)
    assert ops_of(lowered)["Add"] >= 1
