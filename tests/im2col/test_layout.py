"""im2col layout (passes/im2col/layout.py): the CL view, region edges, free aliases."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

import onnx_lower
from onnx_lower.passes.im2col import channels_last_constant, flatten_permutation
from onnx_lower.validate import validate
from tests.im2col import check, make_model, ops_of, rand


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
