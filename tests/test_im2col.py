"""The im2col form (passes/im2col.py) against onnxruntime.

Every lowered model must validate against the original (rtol = atol = 1e-4, on batch 1 and on a
batch of several samples when the batch is dynamic), contain no Conv, pool or
BatchNormalization, and use only the im2col ops plus elementwise ops the original already had.
Inputs are drawn from [-1, 1) so that max pooling over padding (which is -inf, never 0) is
exercised.
"""

from __future__ import annotations

import collections
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import onnx_lower
from onnx_lower.errors import LoweringError
from onnx_lower.passes import im2col
from onnx_lower.passes.im2col import (
    ALLOWED_OPS,
    ELEMENTWISE_BINARY,
    ELEMENTWISE_UNARY,
    LOWERED_OPS,
    channels_last_constant,
    conv_transpose_taps,
    dense_weight,
    flatten_permutation,
    group_weights,
    max_pool_plan,
    space_to_depth_taps,
)
from onnx_lower.validate import validate
from onnx_lower.windows import output_extent, resolve_pads, sliding_windows

REPO = Path(__file__).resolve().parents[1]
SAMPLES = sorted((REPO / "models").glob("*.onnx"))
CORPUS_DIR = Path(__file__).resolve().parents[2] / "shared" / "corpus"
CORPUS = sorted(CORPUS_DIR.glob("*.onnx")) if CORPUS_DIR.is_dir() else []
KEPT = ELEMENTWISE_UNARY | ELEMENTWISE_BINARY | {"Softmax", "LogSoftmax"}
HYP = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
RNG = np.random.default_rng(0)


# --- helpers -------------------------------------------------------------------------------------


def make_model(nodes, x_shape, inits=(), *, out_name="y", opset=17, x_name="x"):
    graph = helper.make_graph(
        nodes, "t", [helper.make_tensor_value_info(x_name, TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(np.asarray(v, dtype=np.float32), k)
                     if np.asarray(v).dtype.kind == "f" else numpy_helper.from_array(v, k)
                     for k, v in dict(inits).items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    model.graph.output[0].CopyFrom(inferred.graph.output[0])
    return model


def ops_of(model: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph.node)


def check(model: onnx.ModelProto, *, batches=(1,), input_range=(-1.0, 1.0)) -> onnx.ModelProto:
    """Lower ``model`` to im2col, check its ops and validate it against onnxruntime."""
    lowered, _ = onnx_lower.lower(model, form="im2col")
    ops = ops_of(lowered)
    assert not set(ops) & LOWERED_OPS, ops
    extra = set(ops) - ALLOWED_OPS
    assert extra <= set(ops_of(model)) & KEPT, f"unexpected ops {extra}"
    assert [o.name for o in lowered.graph.output] == [o.name for o in model.graph.output]
    for batch in batches:
        report = validate(model, lowered, rtol=1e-4, atol=1e-4, batch=batch, samples=2,
                          input_range=input_range)
        assert report.passed, "\n".join(report.summary_lines())
    return lowered


def rand(*shape, scale=1.0):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


# --- index and weight math -----------------------------------------------------------------------


def test_flatten_permutation_maps_channels_last_to_nchw():
    c, s = 3, 5
    x = np.arange(c * s).reshape(c, s)  # NCHW flatten order is x.ravel()
    cl = x.T.ravel()  # channels-last flatten order
    assert np.array_equal(x.ravel()[flatten_permutation(c, s)], cl)


def test_channels_last_constant():
    v = np.arange(3.0).reshape(3, 1, 1)
    assert channels_last_constant(v, 4, 3, (2, 2)).shape == (1, 1, 3)
    full = np.arange(12.0).reshape(1, 3, 2, 2)
    cl = channels_last_constant(full, 4, 3, (2, 2))
    assert np.array_equal(cl[0], full[0].reshape(3, 4).T)
    assert channels_last_constant(np.ones((2, 3, 1, 1)), 4, 3, (2, 2)) is None  # per batch


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


def test_max_pool_plan_separable_cheaper_for_overlapping_windows():
    stages, out = max_pool_plan((12, 12), (3, 3), strides=(2, 2), pads=(1, 1, 1, 1))
    assert out == (6, 6) and len(stages) == 2
    stages, out = max_pool_plan((12, 12), (2, 2), strides=(2, 2))
    assert out == (6, 6) and len(stages) == 1 and stages[0].taps.shape == (36, 4)


# --- single ops ----------------------------------------------------------------------------------


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
    monkeypatch.setattr(im2col, "_CONV_CHUNK_BYTES", 512)
    monkeypatch.setattr(im2col, "_DW_CHUNK_BYTES", 512)
    monkeypatch.setattr(im2col, "_MIN_CHUNK_ROWS", 7)
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


@st.composite
def pool_cases(draw, *, dilate: bool):
    rank = draw(st.integers(1, 3))
    max_n = {1: 12, 2: 8, 3: 5}[rank]
    kernel = [draw(st.integers(1, 3)) for _ in range(rank)]
    strides = [draw(st.integers(1, 3)) for _ in range(rank)]
    dilations = [draw(st.integers(1, 2)) if dilate else 1 for _ in range(rank)]
    begins = [draw(st.integers(0, k - 1)) for k in kernel]
    ends = [draw(st.integers(0, k - 1)) for k in kernel]
    ceil_mode = draw(st.booleans())
    spatial = [draw(st.integers(max(1, (k - 1) * d + 1 - b - e), max_n))
               for k, d, b, e in zip(kernel, dilations, begins, ends)]
    return kernel, strides, dilations, begins + ends, ceil_mode, spatial


@HYP
@given(pool_cases(dilate=True))
def test_max_pool_matches_onnxruntime(case):
    kernel, strides, dilations, pads, ceil_mode, spatial = case
    r = len(kernel)
    for i in range(r):  # every window needs a tap inside the input (else its max is -inf)
        n = spatial[i]
        out = output_extent(n, kernel[i], strides[i], dilations[i], pads[i], pads[r + i],
                            ceil_mode)
        last = (out - 1) * strides[i] - pads[i]
        assume(out >= 1 and any(0 <= last + t * dilations[i] < n for t in range(kernel[i])))
    node = helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=kernel, strides=strides,
                            dilations=dilations, pads=pads, ceil_mode=int(ceil_mode))
    check(make_model([node], ["N", 3, *spatial]), batches=(2,))


@HYP
@given(pool_cases(dilate=False), st.booleans())
def test_average_pool_matches_onnxruntime(case, count_include_pad):
    kernel, strides, _, pads, ceil_mode, spatial = case
    node = helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=kernel, strides=strides,
                            pads=pads, ceil_mode=int(ceil_mode),
                            count_include_pad=int(count_include_pad))
    check(make_model([node], ["N", 3, *spatial]), batches=(2,))


@pytest.mark.parametrize("op", ["GlobalAveragePool", "GlobalMaxPool"])
@pytest.mark.parametrize("spatial", [(7,), (5, 6), (3, 4, 2), (1, 1)])
def test_global_pools(op, spatial):
    check(make_model([helper.make_node(op, ["x"], ["y"])], ["N", 4, *spatial]), batches=(1, 3))


def _bn_inits(prefix, c):
    return {f"{prefix}s": rand(c), f"{prefix}b": rand(c), f"{prefix}m": rand(c),
            f"{prefix}v": np.abs(rand(c)) + 0.5}


def _bn(x, y, prefix):
    return helper.make_node("BatchNormalization", [x, f"{prefix}s", f"{prefix}b", f"{prefix}m",
                                                   f"{prefix}v"], [y], epsilon=1e-3)


def test_batchnorm_after_conv_folds_into_the_matmul():
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             _bn("c", "y", "bn")]
    lowered = check(make_model(nodes, ["N", 3, 6, 6], {"w": rand(5, 3, 3, 3),
                                                       **_bn_inits("bn", 5)}), batches=(1, 2))
    assert ops_of(lowered)["Mul"] == 0  # folded, no separate scale


def test_standalone_batchnorm_and_constant_affines():
    nodes = [_bn("x", "a", "bn"),
             helper.make_node("Conv", ["a", "w"], ["c"], kernel_shape=[1, 1]),
             helper.make_node("Mul", ["c", "k"], ["d"]),
             helper.make_node("Sub", ["d", "z"], ["y"])]
    inits = {"w": rand(5, 3, 1, 1), "k": rand(5, 1, 1), "z": rand(1, 5, 1, 1),
             **_bn_inits("bn", 3)}
    check(make_model(nodes, ["N", 3, 4, 5], inits), batches=(1, 2))


def test_residual_add_concat_and_flatten_gemm():
    """conv→relu→conv + skip, concat on channels, flatten → Gemm (weights rows permuted)."""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], kernel_shape=[3, 3],
                         pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "x"], ["s"]),
        helper.make_node("Relu", ["s"], ["r2"]),
        helper.make_node("Conv", ["r2", "w3"], ["c3"], kernel_shape=[1, 1]),
        helper.make_node("Concat", ["r2", "c3"], ["cat"], axis=1),
        helper.make_node("MaxPool", ["cat"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fc", "fcb"], ["y"], transB=1, alpha=0.5),
    ]
    inits = {"w1": rand(4, 4, 3, 3), "b1": rand(4), "w2": rand(4, 4, 3, 3), "w3": rand(2, 4, 1, 1),
             "fc": rand(10, 6 * 3 * 3), "fcb": rand(10)}
    lowered = check(make_model(nodes, ["N", 4, 6, 6], inits), batches=(1, 3))
    ops = ops_of(lowered)
    assert ops["Transpose"] == 1  # only at the entry: no layout change before the classifier
    assert ops["Concat"] == 1


def test_reshape_then_matmul_classifier():
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3]),
             helper.make_node("Reshape", ["c", "shape"], ["f"]),
             helper.make_node("MatMul", ["f", "fc"], ["y"])]
    inits = {"w": rand(3, 2, 3, 3), "shape": np.array([-1, 3 * 4 * 4], np.int64),
             "fc": rand(48, 5)}
    lowered = check(make_model(nodes, ["N", 2, 6, 6], inits), batches=(1, 2))
    assert ops_of(lowered)["Transpose"] == 1


def test_nhwc_input_needs_no_transpose():
    """tf2onnx: NHWC input, Transpose to NCHW, conv, Transpose back, Reshape, MatMul."""
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[0, 3, 1, 2]),
             helper.make_node("Conv", ["t", "w"], ["c"], kernel_shape=[3, 3], strides=[2, 2]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Transpose", ["r"], ["u"], perm=[0, 2, 3, 1]),
             helper.make_node("Reshape", ["u", "shape"], ["f"]),
             helper.make_node("MatMul", ["f", "fc"], ["y"])]
    inits = {"w": rand(8, 3, 3, 3), "shape": np.array([-1, 8 * 4 * 4], np.int64),
             "fc": rand(128, 5)}
    lowered = check(make_model(nodes, ["N", 9, 9, 3], inits), batches=(1, 3))
    transposes = [n for n in lowered.graph.node if n.op_type == "Transpose"]
    # the only Transpose left is the space-to-depth interleave of the stride-2 stem
    assert all("s2d" in n.name for n in transposes)


def test_unsqueeze_conv2d_squeeze_1d_network():
    """HAR-CNN style: Unsqueeze to (N, C, 1, W), Conv2D (1, k), Squeeze, bias Add, pool."""
    nodes = [helper.make_node("Unsqueeze", ["x", "ax2"], ["u"]),
             helper.make_node("Conv", ["u", "w"], ["c"], kernel_shape=[1, 3], pads=[0, 1, 0, 1]),
             helper.make_node("Squeeze", ["c", "ax2"], ["s"]),
             helper.make_node("Add", ["s", "bias"], ["a"]),
             helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("Unsqueeze", ["r", "ax2"], ["u2"]),
             helper.make_node("MaxPool", ["u2"], ["p"], kernel_shape=[1, 2], strides=[1, 2]),
             helper.make_node("Squeeze", ["p", "ax2"], ["q"]),
             helper.make_node("Reshape", ["q", "shape"], ["f"]),
             helper.make_node("MatMul", ["f", "fc"], ["y"])]
    inits = {"ax2": np.array([2], np.int64), "w": rand(6, 4, 1, 3), "bias": rand(6, 1),
             "shape": np.array([-1, 6 * 5], np.int64), "fc": rand(30, 3)}
    lowered = check(make_model(nodes, ["N", 4, 10], inits, opset=13), batches=(1, 3))
    assert ops_of(lowered)["Transpose"] == 1


@pytest.mark.parametrize("opset", [9, 11])
def test_old_opsets(opset):
    """Pad, Slice and ReduceSum take attributes before opsets 11/10/13."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("AveragePool", ["c"], ["a"], kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                              strides=[2, 2]),
             helper.make_node("MaxPool", ["a"], ["m"], kernel_shape=[2, 2], pads=[0, 0, 1, 1]),
             helper.make_node("GlobalAveragePool", ["m"], ["y"])]
    check(make_model(nodes, ["N", 2, 7, 7], {"w": rand(3, 2, 3, 3)}, opset=opset),
          batches=(1, 2))


def test_tensor_read_by_a_subgraph_keeps_its_layout():
    """A conv output that an If branch reads from the outer graph is converted back."""
    then_g = helper.make_graph([helper.make_node("Relu", ["c"], ["t"])], "then", [],
                               [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    else_g = helper.make_graph([helper.make_node("Neg", ["c"], ["e"])], "else", [],
                               [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)]
    graph = helper.make_graph(
        nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 5, 5]),
                     helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 5, 5])],
        initializer=[numpy_helper.from_array(rand(3, 2, 3, 3), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    lowered, _ = onnx_lower.lower(model, form="im2col")
    assert "Conv" not in ops_of(lowered)
    for cond in (True, False):
        feed = {"x": rand(1, 2, 5, 5), "cond": np.array(cond)}
        report = validate(model, lowered, inputs=feed, rtol=1e-4, atol=1e-4)
        assert report.passed, "\n".join(report.summary_lines())


def test_maxpool_indices_output_is_refused():
    node = helper.make_node("MaxPool", ["x"], ["y", "idx"], kernel_shape=[2, 2], strides=[2, 2])
    model = make_model([node], [1, 2, 4, 4])
    model.graph.output.append(helper.make_tensor_value_info("idx", TensorProto.INT64, [1, 2, 2, 2]))
    with pytest.raises(LoweringError, match="Indices"):
        onnx_lower.lower(model, form="im2col")


def test_conv_with_computed_weight_is_refused():
    model = make_model([helper.make_node("Conv", ["x", "x"], ["y"])], [1, 1, 3, 3])
    with pytest.raises(LoweringError, match="im2col"):
        onnx_lower.lower(model, form="im2col")


# --- networks ------------------------------------------------------------------------------------


def _dynamic_batch(model: onnx.ModelProto) -> bool:
    inits = {t.name for t in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name not in inits:
            d = vi.type.tensor_type.shape.dim
            return bool(d) and not d[0].HasField("dim_value")
    return False


@pytest.mark.parametrize("path", SAMPLES, ids=[p.stem for p in SAMPLES])
def test_sample_models(path):
    model = onnx.load(path)
    check(model, batches=(1, 3) if _dynamic_batch(model) else (1,), input_range=(0.0, 1.0))


@pytest.mark.corpus
@pytest.mark.parametrize("path", CORPUS, ids=[p.stem for p in CORPUS])
def test_corpus_models(path):
    model = onnx.load(path)
    check(model, batches=(1, 3) if _dynamic_batch(model) else (1,), input_range=(0.0, 1.0))


def test_corpus_present():
    if not CORPUS:
        pytest.skip(f"the real-model corpus is not at {CORPUS_DIR} (../shared/corpus)")
    assert len(CORPUS) >= 10


@pytest.mark.parametrize("name", [
    "resnet18", "mobilenetv2", "squeezenet",
    pytest.param("resnet50", marks=pytest.mark.slow), pytest.param("vgg11", marks=pytest.mark.slow),
])
def test_imagenet_models(name):
    path = REPO / "models" / "imagenet" / f"{name}.onnx"
    if not path.is_file():
        pytest.skip(f"{path} is missing: run python tools/make_models.py --imagenet")
    check(onnx.load(path), input_range=(0.0, 1.0))


def test_module_docstring_states_the_math():
    doc = im2col.__doc__
    for phrase in ("(N, S, C)", "zero row", "relu(a - b)", "space-to-depth"):
        assert phrase in doc, phrase


def test_conv_windows_agree_with_resolve_pads():
    pads = resolve_pads((7, 7), (3, 3), (2, 2), (1, 1), None, "SAME_UPPER")
    win = im2col.conv_windows((7, 7), (3, 3), (2, 2), None, (1, 1), "SAME_UPPER")
    assert win.out_shape == (4, 4) and math.prod(win.out_shape) == win.taps.shape[0]
    assert pads == (1, 1, 1, 1)


def test_integer_maxpool_refusal_names_the_dtype():
    from onnx import TensorProto, helper

    from onnx_lower.errors import UnsupportedOpError

    node = helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2])
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 1, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, [1, 1, 3, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    with pytest.raises(UnsupportedOpError, match="type uint8; only float activations"):
        onnx_lower.lower(model, form="im2col")


@pytest.mark.parametrize("n,c,s", [(7, 3, 5), (300, 70, 9), (5, 40, 1), (129, 33, 2)])
@pytest.mark.parametrize("trans", [False, True])
def test_cl_rows_reorders_classifier_rows(n, c, s, trans):
    """``_cl_rows``: rows ``c·S + s`` of the (transposed) weight become rows ``s·C + c``."""
    rng = np.random.default_rng(n)
    b = rng.standard_normal((n, c * s) if trans else (c * s, n)).astype(np.float32)
    dense = b.T if trans else b
    want = dense.reshape(c, s, n).transpose(1, 0, 2).reshape(c * s, n)
    got = im2col._cl_rows(b, (c, s), trans)
    assert got.flags.c_contiguous and np.array_equal(got, want)
    assert np.array_equal(im2col._cl_rows(b, None, trans), dense)
