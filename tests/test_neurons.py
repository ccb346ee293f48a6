"""onnx_lower.cost.count_neurons against the elements onnxruntime computes, before and after.

The oracle exposes every counted node's output as a graph output, runs the model in
onnxruntime at batch 1 and counts the elements it returns; the report (``before``/``after``) and
the ``--dry-run`` plan must agree with it.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnx_lower import api, cost
from onnx_lower.passes.pool import pool_windows
from onnx_lower.passes.pool_max import max_pool_relu_counts
from tests.oracles import run_model


def _cnn() -> onnx.ModelProto:
    """Conv → Relu → MaxPool 3×3/2 pad 1 → LeakyRelu → Clip → Max(·, ·) → MaxPool 3×3/1."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((3, 2, 3, 3)).astype(np.float32), "w")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[3, 3], strides=[2, 2],
                         pads=[1, 1, 1, 1]),
        helper.make_node("LeakyRelu", ["p"], ["l"], alpha=0.1),
        helper.make_node("Clip", ["l", "lo", "hi"], ["k"]),
        helper.make_node("Max", ["k", "l"], ["m"]),
        helper.make_node("MaxPool", ["m"], ["y"], kernel_shape=[3, 3]),
    ]
    inits = [w, numpy_helper.from_array(np.float32(-0.5), "lo"),
             numpy_helper.from_array(np.float32(2.0), "hi")]
    graph = helper.make_graph(
        nodes, "neurons", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT,
                                                         ["N", 2, 11, 11])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 3, 4, 4])],
        initializer=inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _ort_elements(model: onnx.ModelProto, ops: tuple[str, ...]) -> dict[str, int]:
    """Elements of each ``ops`` node's first output, per op type, as onnxruntime computes them."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    wanted = [n for n in probe.graph.node if n.op_type in ops]
    have = {o.name for o in probe.graph.output}
    for n in wanted:
        if n.output[0] not in have:
            probe.graph.output.append(helper.make_empty_tensor_value_info(n.output[0]))
    names = [o.name for o in probe.graph.output]
    x = probe.graph.input[0]
    shape = [d.dim_value or 1 for d in x.type.tensor_type.shape.dim]
    outs = dict(zip(names, run_model(probe, {x.name: np.zeros(shape, np.float32)})))
    counts: dict[str, int] = {}
    for n in wanted:
        extra = max(len(n.input) - 1, 1) if n.op_type in ("Max", "Min") else 1
        counts[n.op_type] = counts.get(n.op_type, 0) + outs[n.output[0]].size * extra
    return counts


def test_count_neurons_of_the_original():
    model = _cnn()
    seen = _ort_elements(model, ("Relu", "MaxPool", "LeakyRelu", "Clip", "Max"))
    got = cost.count_neurons(model)
    assert got == {
        "relu": seen["Relu"],
        "max": seen["MaxPool"],
        "piecewise": seen["LeakyRelu"] + seen["Clip"] + seen["Max"],
    }


def test_lowered_relu_neurons_report_and_plan_agree():
    model = _cnn()
    lowered, report = api.lower(model, form="mlp")
    seen = _ort_elements(lowered, ("Relu",))
    assert report.after.relu_neurons == seen["Relu"]
    assert report.after.max_neurons == report.after.piecewise_neurons == 0
    assert report.before.relu_neurons == cost.count_neurons(model)["relu"]
    plan = api.plan(model, per_region=False)
    assert plan.mlp_relu_neurons == seen["Relu"]
    assert plan.neurons == cost.count_neurons(model)
    assert any("ReLU" in line for line in plan.summary_lines())
    assert any("ReLU neurons" in line for line in report.summary_lines())


@pytest.mark.parametrize("stride", [1, 2])
def test_maxpool_relus_below_the_tournament_in_a_model(stride):
    # a lone 3x3 MaxPool: the lowered model's Relu elements are the auto plan's count
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2, 9, 9])
    node = helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[3, 3], strides=[stride] * 2)
    out = (9 - 3) // stride + 1
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 2, out, out])
    graph = helper.make_graph([node], "pool", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    lowered, report = api.lower(model, form="mlp")
    win, _ = pool_windows((2, 9, 9), (3, 3), strides=(stride, stride))
    counts = max_pool_relu_counts(win)
    assert report.after.relu_neurons == _ort_elements(lowered, ("Relu",))["Relu"]
    assert report.after.relu_neurons == 2 * counts["auto"] < 2 * counts["tournament"]
    assert counts["tournament"] == math.prod(win.out_shape) * 8
