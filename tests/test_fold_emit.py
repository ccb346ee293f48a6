"""Folding, emission and the size budget, end to end through onnx_lower.lower()."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_lower
from onnx_lower.errors import BudgetExceededError
from tests.oracles import CORPUS, run_model

RNG = np.random.default_rng(0)


def _model(nodes, inits, in_shape, out_name="y", opset=13):
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    inferred = {v.name: v for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
    inferred.update({v.name: v for v in onnx.shape_inference.infer_shapes(model).graph.output})
    model.graph.output[0].CopyFrom(inferred[out_name])
    return model


def _conv(name, x, y, c_in, c_out, k=3, **attrs):
    w = RNG.normal(0, 1 / np.sqrt(c_in * k * k), (c_out, c_in, k, k))
    b = RNG.normal(0, 0.1, c_out)
    node = helper.make_node("Conv", [x, f"{name}.w", f"{name}.b"], [y], name=name, **attrs)
    return node, {f"{name}.w": w, f"{name}.b": b}


def _ops(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in model.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


def _check(original, lowered, batch=2, rtol=1e-4):
    shape = [batch if not isinstance(d, int) else d for d in _in_shape(original)]
    x = RNG.random(shape, dtype=np.float32)
    (want,) = run_model(original, {"x": x})
    (got,) = run_model(lowered, {"x": x})
    np.testing.assert_allclose(got, want, rtol=rtol, atol=1e-5 * np.abs(want).max())


def _in_shape(model):
    dims = model.graph.input[0].type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims]


def test_conv_avgpool_conv_collapses_to_one_matmul():
    n1, i1 = _conv("c1", "x", "a", 2, 4, pads=[1, 1, 1, 1])
    pool = helper.make_node("AveragePool", ["a"], ["p"], kernel_shape=[2, 2], strides=[2, 2])
    n2, i2 = _conv("c2", "p", "y", 4, 3)
    model = _model([n1, pool, n2], {**i1, **i2}, ["N", 2, 8, 8])
    lowered, report = onnx_lower.lower(model, form="mlp")
    assert _ops(lowered).get("MatMul") == 1, _ops(lowered)
    assert report.notes["fold_summary"]["matmuls_after"] == 1
    _check(model, lowered)


def test_conv_relu_conv_keeps_two_matmuls():
    n1, i1 = _conv("c1", "x", "a", 2, 4, pads=[1, 1, 1, 1])
    relu = helper.make_node("Relu", ["a"], ["r"])
    n2, i2 = _conv("c2", "r", "y", 4, 3)
    model = _model([n1, relu, n2], {**i1, **i2}, ["N", 2, 6, 6])
    lowered, _ = onnx_lower.lower(model, form="mlp")
    assert _ops(lowered)["MatMul"] == 2
    _check(model, lowered)


def test_fold_that_would_grow_weights_is_left_alone():
    # 64 -> 2 -> 64: folded it would be 64x64 = 4096 elements, unfolded 2 * 128 = 256.
    w1, w2 = RNG.normal(size=(2, 64)), RNG.normal(size=(64, 2))
    nodes = [
        helper.make_node("Gemm", ["x", "w1"], ["h"], transB=1),
        helper.make_node("Gemm", ["h", "w2"], ["y"], transB=1),
    ]
    model = _model(nodes, {"w1": w1, "w2": w2}, ["N", 64])
    lowered, report = onnx_lower.lower(model, form="mlp")
    assert _ops(lowered)["MatMul"] == 2
    assert report.after.weight_bytes <= report.before.weight_bytes
    _check(model, lowered)


def test_folding_never_grows_the_emitted_weights():
    model = onnx.load("models/resblock_bn.onnx")
    _, folded = onnx_lower.lower(model, form="mlp")
    unfolded_passes = [p for p in onnx_lower.pipelines.PIPELINES["mlp"] if p != "fold-linear"]
    _, unfolded = onnx_lower.lower(model, passes=unfolded_passes)
    assert folded.after.weight_bytes <= unfolded.after.weight_bytes


def test_budget_refuses_before_allocating_and_names_the_layer():
    n1, i1 = _conv("big_conv", "x", "y", 3, 16, pads=[1, 1, 1, 1])
    model = _model([n1], i1, [1, 3, 32, 32])
    with pytest.raises(BudgetExceededError) as err:
        onnx_lower.lower(model, form="mlp", max_weight_mb=100)
    msg = str(err.value)
    # 3x32x32 -> 16x32x32 is a 3072 x 16384 float32 matrix: 192 MiB.
    assert "big_conv" in msg and "192.0 MB" in msg and "100.0 MB" in msg
    assert "--max-weight-mb" in msg and "--form im2col" in msg
    lowered, report = onnx_lower.lower(model, form="auto", max_weight_mb=100)
    assert report.form_used == "im2col" and "budget" in report.form_reason


@pytest.mark.parametrize("batch", [1, 7])
def test_dynamic_batch_stays_dynamic_and_matches_per_sample(batch):
    model = onnx.load("models/lenet_maxpool.onnx")
    lowered, _ = onnx_lower.lower(model, form="mlp")
    assert _in_shape(lowered)[0] == _in_shape(model)[0] == "N"
    out_dims = lowered.graph.output[0].type.tensor_type.shape.dim
    assert out_dims[0].dim_param == "N"
    x = RNG.random((batch, 1, 28, 28), dtype=np.float32)
    (got,) = run_model(lowered, {"input": x})
    for i in range(batch):
        (want,) = run_model(model, {"input": x[i : i + 1]})
        np.testing.assert_allclose(got[i : i + 1], want, rtol=1e-4, atol=1e-5)


def test_emitted_graph_keeps_names_order_and_dtypes():
    model = onnx.load("models/resblock_bn.onnx")
    lowered, _ = onnx_lower.lower(model, form="mlp")
    assert [i.name for i in lowered.graph.input] == [i.name for i in model.graph.input]
    assert [o.name for o in lowered.graph.output] == [o.name for o in model.graph.output]
    for a, b in zip(lowered.graph.output, model.graph.output):
        assert a.type == b.type
    assert set(_ops(lowered)) <= {"Flatten", "Reshape", "MatMul", "Add", "Relu"}


def test_sparse_storage_shrinks_the_file_and_computes_the_same():
    model = onnx.load("models/avgpool_strided.onnx")
    dense, _ = onnx_lower.lower(model, form="mlp")
    sparse, report = onnx_lower.lower(model, form="mlp", sparse_storage=True)
    assert report.notes["sparse_initializers"] > 0
    assert len(sparse.graph.sparse_initializer) > 0
    assert sparse.ByteSize() < 0.7 * dense.ByteSize()
    x = RNG.random((1, 3, 16, 16), dtype=np.float32)
    np.testing.assert_allclose(
        run_model(sparse, {"input": x})[0], run_model(dense, {"input": x})[0], rtol=1e-6
    )


def test_lowering_is_deterministic():
    model = onnx.load("models/lenet_maxpool.onnx")
    a, _ = onnx_lower.lower(model, form="mlp")
    b, _ = onnx_lower.lower(model, form="mlp")
    assert a.SerializeToString() == b.SerializeToString()


def test_sparse_storage_of_an_ir3_model_whose_initializers_are_inputs():
    path = CORPUS / "emclab-sinica__mnist-8.onnx"  # IR 3: initializers are graph inputs too
    if not path.exists():
        pytest.skip(f"{path} is absent (the real-model corpus lives in ../shared/corpus)")
    dense, _ = onnx_lower.lower(path, form="mlp")
    sparse, report = onnx_lower.lower(path, form="mlp", sparse_storage=True)
    assert report.notes["sparse_initializers"] > 0 and sparse.ir_version >= 6
    assert sparse.ByteSize() < 0.2 * dense.ByteSize()
    x = RNG.random((1, 1, 28, 28), dtype=np.float32)
    np.testing.assert_allclose(
        run_model(sparse, {"Input3": x})[0], run_model(dense, {"Input3": x})[0], rtol=1e-6
    )


def test_emission_ensures_no_internal_node_is_left():
    from onnx_lower.errors import LoweringError
    from onnx_lower.pass_manager import LoweringModel, get_pass
    from onnx_lower.pipelines import PIPELINES, build_pipeline

    names = PIPELINES["mlp"]
    work = LoweringModel.from_proto(onnx.load("models/avgpool_strided.onnx"))
    build_pipeline(passes=list(names[: names.index("emit-affine")]))(work)
    emit = get_pass("emit-affine")
    with pytest.raises(LoweringError, match="internal nodes are left"):
        emit.ensures(work)  # before emission the Affine nodes are still there
    emit(work)  # run + ensures: passes
    assert not any(n.domain == "ai.onnx_lower" for n in work.graph.nodes)


def test_budget_error_names_the_original_nodes_a_folded_layer_came_from():
    n1, i1 = _conv("conv_a", "x", "a", 3, 8, pads=[1, 1, 1, 1])
    scale = {"bn.s": RNG.random(8) + 0.5, "bn.b": RNG.random(8), "bn.m": RNG.random(8),
             "bn.v": RNG.random(8) + 0.5}
    bn = helper.make_node("BatchNormalization", ["a", "bn.s", "bn.b", "bn.m", "bn.v"], ["y"],
                          name="bn_a")
    model = _model([n1, bn], {**i1, **scale}, [1, 3, 32, 32])
    with pytest.raises(BudgetExceededError, match=r"folded from 2 nodes: conv_a \+ bn_a"):
        onnx_lower.lower(model, form="mlp", max_weight_mb=10)
    plan = onnx_lower.plan(model, max_weight_mb=10)
    assert plan.form == "im2col" and [la.sources for la in plan.layers] == [["conv_a", "bn_a"]]
