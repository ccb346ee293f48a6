"""The whole tensor as the sample (passes/sample_axis.py), end to end through ``onnx_lower.lower``.

Every lowered model is run in onnxruntime against the original on seeded inputs. The mlp form's
consumers (verifiers, ``.nnet``-style readers) assume one flat vector from input to output; that
is checked on the graph (Flatten(axis=0) to ``(1, D)``, MatMul/Add/Relu on ``(1, ·)``, Reshape
back) and by Marabou's own ONNX reader on a ``conv_mp1``-style model.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import onnx_lower
from onnx_lower.errors import UnsupportedOpError
from tests.oracles import check_ops, run_model

HYP = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow],
               derandomize=True)
MLP_SHAPE_OPS = {"Flatten", "MatMul", "Add", "Relu", "Reshape"}


def _model(nodes, x_shape, inits=(), opset=13) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in dict(inits).items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    return onnx.shape_inference.infer_shapes(model, strict_mode=True)


def _w(*shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _signature(model: onnx.ModelProto) -> list:
    def dims(v):
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    inits = {t.name for t in model.graph.initializer}
    return [(v.name, dims(v)) for v in model.graph.input if v.name not in inits] + [
        (v.name, dims(v)) for v in model.graph.output]


def _agree(model: onnx.ModelProto, form: str, seeds=(0, 1)):
    lowered, report = onnx_lower.lower(model, form=form)
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    for seed in seeds:
        x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
        (want,), (got,) = run_model(model, {"x": x}), run_model(lowered, {"x": x})
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert [o.name for o in lowered.graph.output] == [o.name for o in model.graph.output]
    assert [i.name for i in lowered.graph.input if i.name not in
            {t.name for t in lowered.graph.initializer}] == ["x"]
    return lowered, report


def _one_flat_vector(lowered: onnx.ModelProto) -> None:
    """Flatten(axis=0) of the input to (1, D), then MatMul/Add/Relu on (1, ·) rows, Reshape."""
    ops = {n.op_type for n in lowered.graph.node}
    assert ops <= MLP_SHAPE_OPS, ops
    (first,) = [n for n in lowered.graph.node if "x" in n.input]
    assert first.op_type == "Flatten" and first.attribute[0].i == 0
    inferred = onnx.shape_inference.infer_shapes(lowered, strict_mode=True)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in inferred.graph.value_info}
    for n in inferred.graph.node:
        if n.op_type in ("MatMul", "Relu"):
            assert shapes[n.output[0]][0] == 1, (n.name, shapes[n.output[0]])


# --------------------------------------------------------------------------- conv_mp1


def conv_mp1_style(head: str = "MatMul") -> onnx.ModelProto:
    """Conv → Relu → MaxPool → Reshape([1, 8, 4, 4] → [128]) → MatMul + Add, static batch 1, as
    in Marabou's conv_mp1.onnx (``head="Gemm"``: Reshape to [128, 1] and Gemm(W, f, b))."""
    shape = [128] if head == "MatMul" else [128, 1]
    inits = {"cw": _w(8, 1, 3, 3), "cb": _w(8, seed=1), "shape": np.array(shape, np.int64)}
    nodes = [
        helper.make_node("Conv", ["x", "cw", "cb"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Reshape", ["p", "shape"], ["f"], name="flatten_reshape"),
    ]
    if head == "MatMul":
        inits |= {"w": _w(128, 10, seed=2), "b": _w(10, seed=3)}
        nodes += [helper.make_node("MatMul", ["f", "w"], ["m"]),
                  helper.make_node("Add", ["m", "b"], ["y"])]
    else:
        inits |= {"w": _w(10, 128, seed=2), "b": _w(10, 1, seed=3)}
        nodes += [helper.make_node("Gemm", ["w", "f", "b"], ["y"])]
    return _model(nodes, [1, 1, 8, 8], inits)


@pytest.mark.parametrize("head", ["MatMul", "Gemm"])
def test_conv_mp1_style_reshape_to_a_vector(head):
    model = conv_mp1_style(head)
    lowered, report = _agree(model, "mlp")
    assert _signature(lowered) == _signature(model)
    _one_flat_vector(lowered)
    note = report.notes["sample_axis"]
    assert note["mode"] == "whole-tensor" and note["node"] == "flatten_reshape"
    assert any(line.startswith("sample: the whole tensor") for line in report.summary_lines())


def test_conv_mp1_style_through_marabou(tmp_path):
    """Marabou's ONNX reader takes the lowered model as one fully-connected network and
    evaluates it like onnxruntime."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from maraboupy import Marabou
    model = conv_mp1_style()
    lowered, _ = onnx_lower.lower(model, form="mlp")
    path = tmp_path / "lowered.onnx"
    onnx.save(lowered, str(path))
    net = Marabou.read_onnx(str(path))
    x = np.random.default_rng(5).standard_normal((1, 1, 8, 8)).astype(np.float32)
    got = np.asarray(net.evaluateWithoutMarabou([x])[0]).reshape(-1)
    (want,) = run_model(model, {"x": x})
    np.testing.assert_allclose(got, want.reshape(-1), rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- when, and when not


def test_untouched_axis0_keeps_the_per_sample_lowering():
    model = _model([helper.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 1]),
                    helper.make_node("Relu", ["t"], ["y"])], [3, 4, 5])
    lowered, report = _agree(model, "mlp")
    assert "sample_axis" not in report.notes
    flatten = next(n for n in lowered.graph.node if n.op_type == "Flatten")
    assert flatten.attribute[0].i == 1  # one row per sample
    (w,) = [t for t in lowered.graph.initializer if len(t.dims) == 2]
    assert list(w.dims) == [20, 20]  # the per-sample matrix, not 3 times larger


def test_per_sample_layers_before_the_mixing_op_are_promoted():
    """Conv (per sample, batch 2) → Relu → Transpose(1, 0, 2, 3): the conv becomes I_2 ⊗ A."""
    model = _model([
        helper.make_node("Conv", ["x", "cw"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Transpose", ["r"], ["y"], perm=[1, 0, 2, 3]),
    ], [2, 1, 4, 4], {"cw": _w(3, 1, 3, 3)})
    lowered, report = _agree(model, "mlp")
    _one_flat_vector(lowered)
    assert report.notes["sample_axis"]["op"] == "Transpose"


#: The same mixing ops with a dynamic batch, and the per-sample refusal they keep.
DYNAMIC_REFUSALS = [
    ([helper.make_node("Transpose", ["x"], ["y"], perm=[1, 0])], ["N", 4], {}, "moves the batch"),
    ([helper.make_node("Flatten", ["x"], ["y"], axis=2)], ["N", 2, 3], {}, "merges the batch"),
    ([helper.make_node("Gemm", ["x", "w"], ["y"], transA=1)], ["N", 4], {"w": _w(3, 5)},
     "transA=1"),
    ([helper.make_node("MatMul", ["x", "w"], ["y"])], ["N", 3, 4], {"w": _w(2, 4, 5)},
     "differ between"),
]


@pytest.mark.parametrize(("nodes", "shape", "inits", "reason"), DYNAMIC_REFUSALS)
def test_a_dynamic_axis0_that_an_op_mixes_stays_refused(nodes, shape, inits, reason):
    model = _model(nodes, shape, inits)
    with pytest.raises(UnsupportedOpError, match=reason):
        onnx_lower.lower(model, form="mlp")


# --------------------------------------------------------------------------- random graphs


@st.composite
def mixing_graphs(draw):
    """x (static batch 2-3) → Relu? → one op that mixes axis 0 → Relu → Add(constant)."""
    batch = draw(st.integers(2, 3))
    sample = draw(st.lists(st.integers(1, 4), min_size=1, max_size=3))
    shape = [batch, *sample]
    r = len(shape)
    kind = draw(st.sampled_from(["Transpose", "Flatten", "Reshape", "Gemm", "MatMul"]))
    inits: dict[str, np.ndarray] = {}
    seed = draw(st.integers(0, 2**16))
    if kind == "Transpose":
        perm = draw(st.permutations(range(r)).filter(lambda p: p[0] != 0))
        op = helper.make_node("Transpose", ["h"], ["m"], perm=list(perm))
    elif kind == "Flatten":
        axis = draw(st.sampled_from([a for a in range(-r, r + 1) if a not in (1, 1 - r)]))
        op = helper.make_node("Flatten", ["h"], ["m"], axis=axis)
    elif kind == "Reshape":
        n = math.prod(shape)
        first = draw(st.sampled_from([d for d in range(1, n + 1) if n % d == 0 and d != batch]))
        target = [first, n // first] if draw(st.booleans()) else [n]
        inits["s"] = np.array(target, np.int64)
        op = helper.make_node("Reshape", ["h", "s"], ["m"])
    elif kind == "Gemm":
        shape = [batch, sample[0]]
        inits["w"] = _w(batch, 3, seed=seed)
        inits["c"] = _w(sample[0], 3, seed=seed + 1)  # one bias row per output row
        op = helper.make_node("Gemm", ["h", "w", "c"], ["m"], transA=1, alpha=0.7)
    else:
        t, k = (sample + [2, 2])[:2]
        shape = [batch, t, k]
        inits["w"] = _w(batch, k, 3, seed=seed)  # one matrix per batch entry
        op = helper.make_node("MatMul", ["h", "w"], ["m"])
    pre = draw(st.sampled_from(["Relu", "Identity"]))
    inits["b"] = _w(1, seed=seed + 2)
    nodes = [helper.make_node(pre, ["x"], ["h"]), op, helper.make_node("Relu", ["m"], ["q"]),
             helper.make_node("Add", ["q", "b"], ["y"])]
    return _model(nodes, shape, inits)


@HYP
@given(model=mixing_graphs(), form=st.sampled_from(["mlp", "auto"]))
def test_random_graphs_mixing_a_static_axis0_match_onnxruntime(model, form):
    lowered, report = _agree(model, form, seeds=(0,))
    check_ops(model, lowered, "mlp")
    assert report.notes["sample_axis"]["mode"] == "whole-tensor"
