"""Tests of onnx_lower.validate: numerical comparison of original vs lowered models."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_lower.errors import LoweringError
from onnx_lower.validate import (
    ValidationReport,
    load_inputs,
    make_session,
    random_inputs,
    validate,
)

RNG = np.random.default_rng(1234)
W1 = RNG.standard_normal((8, 8)).astype(np.float32)
W2 = RNG.standard_normal((8, 4)).astype(np.float32)


def _model(nodes, inits, outputs, x_dims=(1, 8), x_type=TensorProto.FLOAT) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", x_type, list(x_dims))],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT if t is None else t, None)
         for n, t in outputs],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def two_output_model(w1=W1, w2=W2, x_dims=(1, 8), y2_tail=None) -> onnx.ModelProto:
    """x -> MatMul W1 -> Relu -> y1;  x -> MatMul W2 -> y2 (optionally via extra tail nodes)."""
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["y1"]),
        helper.make_node("MatMul", ["x", "W2"], ["y2" if y2_tail is None else "h2"]),
    ]
    inits = {"W1": w1, "W2": w2}
    if y2_tail is not None:
        tail_nodes, tail_inits = y2_tail
        nodes += tail_nodes
        inits.update(tail_inits)
    return _model(nodes, inits, [("y1", None), ("y2", None)], x_dims=x_dims)


def split_matmul_model() -> onnx.ModelProto:
    """Equivalent to two_output_model: W1 = Wa + Wb, x@W1 = x@Wa + x@Wb."""
    wa = (W1 * 0.25).astype(np.float32)
    wb = (W1 - wa).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "Wa"], ["a"]),
        helper.make_node("MatMul", ["x", "Wb"], ["b"]),
        helper.make_node("Add", ["a", "b"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["y1"]),
        helper.make_node("MatMul", ["x", "W2"], ["y2"]),
    ]
    return _model(nodes, {"Wa": wa, "Wb": wb, "W2": W2}, [("y1", None), ("y2", None)])


def unary_model(op: str) -> onnx.ModelProto:
    """y = op(x) for x[1, 8]."""
    return _model([helper.make_node(op, ["x"], ["y"])], {}, [("y", None)])


# --------------------------------------------------------------------------- verdicts


def test_same_model_passes():
    m = two_output_model()
    rep = validate(m, m)
    assert rep.passed
    assert [o.name for o in rep.outputs] == ["y1", "y2"]
    assert all(o.passed and o.max_abs_err == 0.0 for o in rep.outputs)
    assert rep.failures() == []
    assert rep.samples == 4


def test_equivalent_lowering_passes_with_small_error():
    rep = validate(two_output_model(), split_matmul_model(), samples=3)
    assert rep.passed, rep.failures()
    y1 = rep.outputs[0]
    assert y1.elements == 3 * 8
    assert y1.max_abs_err < 1e-5
    assert y1.required_atol == y1.max_abs_err
    assert y1.required_rtol == 0.0


def test_corrupted_weight_fails_and_names_output():
    w2 = W2.copy()
    w2[3, 1] += 1e-2
    rep = validate(two_output_model(), two_output_model(w2=w2))
    assert not rep.passed
    by = {o.name: o for o in rep.outputs}
    assert by["y1"].passed
    assert not by["y2"].passed
    assert by["y2"].out_of_tolerance > 0
    assert 1e-3 < by["y2"].max_abs_err <= 1e-2 + 1e-6
    assert by["y2"].required_atol == by["y2"].max_abs_err
    assert by["y2"].required_rtol > 1e-4
    fails = rep.failures()
    assert len(fails) == 1 and "'y2'" in fails[0] and "y1" not in fails[0]
    # the suggested tolerances do make it pass
    assert validate(two_output_model(), two_output_model(w2=w2), rtol=0.0,
                    atol=by["y2"].required_atol * 1.001).passed
    assert validate(two_output_model(), two_output_model(w2=w2), atol=1e-5,
                    rtol=by["y2"].required_rtol * 1.001).passed


def test_scaled_err_is_the_max_error_over_the_largest_magnitude():
    """An added constant shifts y2 by exactly 1e-3: scaled_err = 1e-3 / max |y2|, and it stays
    small where the elementwise max_rel_err explodes on a near-zero element."""
    shift = np.full((1, 4), 1e-3, dtype=np.float32)
    tail = ([helper.make_node("Add", ["h2", "shift"], ["y2"])], {"shift": shift})
    inputs = {"x": RNG.standard_normal((1, 8)).astype(np.float32)}
    rep = validate(two_output_model(), two_output_model(y2_tail=tail), inputs=inputs, atol=1e-2)
    y2 = rep.outputs[1]
    want = np.abs(inputs["x"] @ W2).max()
    assert y2.scaled_err == pytest.approx(y2.max_abs_err / want, rel=1e-3)
    assert y2.max_abs_err == pytest.approx(1e-3, rel=1e-2)
    assert rep.outputs[0].scaled_err == 0.0
    near_zero = two_output_model(w2=np.zeros_like(W2))
    rep = validate(near_zero, two_output_model(w2=np.zeros_like(W2), y2_tail=tail),
                   inputs=inputs, atol=1e-2)
    assert rep.outputs[1].scaled_err == pytest.approx(1e-3, rel=1e-2)  # all-zero original


def test_nan_in_one_model_fails():
    # lowered y2 = Sqrt(x@W2 - 100) is NaN everywhere; the original is finite
    tail = ([helper.make_node("Sub", ["h2", "c"], ["s"]), helper.make_node("Sqrt", ["s"], ["y2"])],
            {"c": np.array(100.0, np.float32)})
    rep = validate(two_output_model(), two_output_model(y2_tail=tail), samples=2)
    assert not rep.passed
    by = {o.name: o for o in rep.outputs}
    assert by["y1"].passed
    assert by["y2"].nan_mismatch == 2 * 4
    assert "y2" in rep.failures()[0] and "NaN" in rep.failures()[0]


def test_identical_nan_positions_pass():
    m = unary_model("Log")  # Log(x) for x in [-1, 1]: NaN for negatives, in both models alike
    rep = validate(m, m, input_range=(-1.0, 1.0))
    assert rep.passed
    assert rep.outputs[0].nan_mismatch == 0
    assert rep.outputs[0].elements < 4 * 8  # NaN positions are left out of the stats


def test_inf_mismatch_fails():
    # Reciprocal(x) vs x at x == 0: inf vs 0
    x = {"x": np.array([[0, 1, 1, 1, 1, 1, 1, 1]], np.float32)}
    rep = validate(unary_model("Reciprocal"), unary_model("Identity"), inputs=x)
    assert not rep.passed
    assert rep.outputs[0].inf_mismatch == 1
    assert rep.outputs[0].nan_mismatch == 0


def test_shape_mismatch_fails_with_clear_message():
    lowered = two_output_model(w2=W2[:, :3].copy())
    rep = validate(two_output_model(), lowered)
    assert not rep.passed
    y2 = rep.outputs[1]
    assert not y2.passed and y2.shape == [1, 4] and y2.lowered_shape == [1, 3]
    msg = rep.failures()[0]
    assert "y2" in msg and "shape" in msg and "(1, 4)" in msg and "(1, 3)" in msg


def test_missing_output_fails():
    m = two_output_model()
    lowered = onnx.ModelProto()
    lowered.CopyFrom(m)
    lowered.graph.output[1].name = "z"
    lowered.graph.node[2].output[0] = "z"
    rep = validate(m, lowered)
    assert not rep.passed
    assert "y2" in rep.failures()[0] and "missing" in rep.failures()[0]
    assert rep.extra_outputs == ["z"]


def test_dtype_mismatch_fails():
    tail = ([helper.make_node("Cast", ["h2"], ["y2"], to=TensorProto.DOUBLE)], {})
    lowered = two_output_model(y2_tail=tail)
    lowered.graph.output[1].type.tensor_type.elem_type = TensorProto.DOUBLE
    rep = validate(two_output_model(), lowered)
    assert not rep.passed
    assert "dtype" in rep.failures()[0] and "float64" in rep.failures()[0]


# --------------------------------------------------------------------------- inputs


NEG = np.array([[-1, 2, -3, 4, -5, 6, -7, 8]], np.float32)
POS = np.abs(NEG)


def test_relu_vs_abs_agree_on_random_inputs():
    # Relu and Abs agree on the default [0, 1) range: the given-input tests below rely on it
    assert validate(unary_model("Relu"), unary_model("Abs")).passed


def test_given_dict_is_used_as_given():
    relu, absm = unary_model("Relu"), unary_model("Abs")
    assert validate(relu, absm, inputs={"x": POS}).passed
    rep = validate(relu, absm, inputs={"x": NEG})
    assert not rep.passed and rep.samples == 1 and rep.input_source == "given"
    assert rep.outputs[0].max_abs_err == 7.0  # Abs(-7) - Relu(-7)
    rep = validate(relu, absm, inputs=[{"x": POS}, {"x": NEG}])
    assert rep.samples == 2 and not rep.passed


def test_given_npy_npz_pb_files(tmp_path):
    relu, absm = unary_model("Relu"), unary_model("Abs")
    np.save(tmp_path / "anything.npy", NEG)
    np.savez(tmp_path / "s.npz", x=NEG)
    pb = numpy_helper.from_array(NEG, "x")
    (tmp_path / "input_0.pb").write_bytes(pb.SerializeToString())
    for name in ("anything.npy", "s.npz", "input_0.pb"):
        path = tmp_path / name
        feeds = load_inputs([path], relu)
        assert len(feeds) == 1
        np.testing.assert_array_equal(feeds[0]["x"], NEG)
        rep = validate(relu, absm, inputs=[str(path)])
        assert not rep.passed and rep.outputs[0].max_abs_err == 7.0
    # a folder in natural order; one .npy per sample for a single-input model
    np.save(tmp_path / "p.npy", POS)
    feeds = load_inputs([tmp_path / "p.npy", tmp_path / "anything.npy"], relu)
    assert len(feeds) == 2
    np.testing.assert_array_equal(feeds[1]["x"], NEG)


def test_multi_input_files_named_by_stem_and_tensor_name(tmp_path):
    nodes = [helper.make_node("Add", ["x", "z"], ["y"])]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    np.save(tmp_path / "x.npy", POS)
    (tmp_path / "t.pb").write_bytes(numpy_helper.from_array(NEG, "z").SerializeToString())
    feeds = load_inputs([tmp_path / "x.npy", tmp_path / "t.pb"], model)
    assert len(feeds) == 1
    np.testing.assert_array_equal(feeds[0]["x"], POS)
    np.testing.assert_array_equal(feeds[0]["z"], NEG)
    np.save(tmp_path / "what.npy", POS)
    with pytest.raises(LoweringError, match=r"what\.npy"):
        load_inputs([tmp_path / "what.npy"], model)
    with pytest.raises(LoweringError, match="missing 'z'"):
        load_inputs([tmp_path / "x.npy"], model)


def test_mismatched_inputs_raise():
    m = unary_model("Relu")
    with pytest.raises(LoweringError, match=r"missing 'x'.*unknown 'q'"):
        validate(m, m, inputs={"q": POS})
    with pytest.raises(LoweringError, match="rank"):
        validate(m, m, inputs={"x": POS[0]})
    with pytest.raises(LoweringError, match="axis 1"):
        validate(m, m, inputs={"x": POS[:, :5]})
    with pytest.raises(LoweringError, match="complex64"):
        validate(m, m, inputs={"x": np.ones((1, 8), np.complex64)})


def test_float64_inputs_are_cast_to_model_dtype():
    m = unary_model("Relu")
    assert validate(m, m, inputs={"x": NEG.astype(np.float64)}).passed


def test_same_seed_same_inputs_different_seed_differs():
    m = two_output_model()
    a = random_inputs(m, seed=7)
    b = random_inputs(m, seed=7)
    c = random_inputs(m, seed=8)
    np.testing.assert_array_equal(a["x"], b["x"])
    assert not np.array_equal(a["x"], c["x"])
    assert a["x"].dtype == np.float32 and a["x"].shape == (1, 8)
    assert a["x"].min() >= 0.0 and a["x"].max() < 1.0
    lo = random_inputs(m, seed=7, input_range=(-5.0, -4.0))
    assert lo["x"].min() >= -5.0 and lo["x"].max() <= -4.0
    # successive samples of one rng are independent
    rng = np.random.default_rng(7)
    s0, s1 = random_inputs(m, rng=rng), random_inputs(m, rng=rng)
    np.testing.assert_array_equal(s0["x"], a["x"])
    assert not np.array_equal(s0["x"], s1["x"])
    assert validate(m, m, seed=3).to_dict() == validate(m, m, seed=3).to_dict()


def test_integer_and_bool_inputs():
    for t, dt in ((TensorProto.INT64, np.int64), (TensorProto.INT32, np.int32),
                  (TensorProto.BOOL, np.bool_), (TensorProto.FLOAT16, np.float16)):
        graph = helper.make_graph(
            [helper.make_node("Identity", ["x"], ["y"])], "g",
            [helper.make_tensor_value_info("x", t, [2, 3])],
            [helper.make_tensor_value_info("y", t, None)])
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = 9
        feed = random_inputs(m, seed=0, input_range=(0, 5))
        assert feed["x"].dtype == dt and feed["x"].shape == (2, 3)
        if dt in (np.int64, np.int32):
            assert feed["x"].min() >= 0 and feed["x"].max() <= 5
        assert validate(m, m).passed


def test_dynamic_batch():
    m = two_output_model(x_dims=("N", 8))
    assert random_inputs(m, seed=0, batch=3)["x"].shape == (3, 8)
    rep = validate(m, split_matmul_model_dynamic(), batch=3)
    assert rep.passed, rep.failures()
    assert rep.outputs[0].shape == [3, 8] and rep.outputs[0].elements == 4 * 3 * 8


def split_matmul_model_dynamic() -> onnx.ModelProto:
    m = split_matmul_model()
    d = m.graph.input[0].type.tensor_type.shape.dim[0]
    d.Clear()
    d.dim_param = "N"
    return m


def test_dynamic_non_batch_dim_raises_naming_input():
    m = two_output_model(x_dims=(1, "K"))
    with pytest.raises(LoweringError, match=r"'x'.*dimension 1.*--inputs"):
        validate(m, m)
    # concrete inputs make it work
    assert validate(m, m, inputs={"x": np.ones((1, 8), np.float32)}).passed


def test_model_paths(tmp_path):
    p1, p2 = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(two_output_model(), p1)
    onnx.save(split_matmul_model(), p2)
    assert validate(str(p1), p2).passed
    make_session(p1)  # paths go to onnxruntime as paths
    with pytest.raises(LoweringError, match="does not exist"):
        validate(tmp_path / "nope.onnx", p2)


# --------------------------------------------------------------------------- report


def test_report_to_dict_is_json_and_has_keys():
    w2 = W2.copy()
    w2[0, 0] += 1e-2
    rep = validate(two_output_model(), two_output_model(w2=w2), samples=2, seed=5)
    assert isinstance(rep, ValidationReport)
    d = json.loads(json.dumps(rep.to_dict(), allow_nan=False))
    assert {"passed", "outputs", "samples", "seed", "rtol", "atol", "input_range",
            "failures"} <= d.keys()
    assert d["passed"] is False and d["samples"] == 2 and d["seed"] == 5
    assert d["input_range"] == [0.0, 1.0]
    out = d["outputs"][1]
    assert {"name", "dtype", "shape", "max_abs_err", "max_rel_err", "mean_abs_err",
            "p99_abs_err", "required_atol", "required_rtol", "nan_mismatch", "inf_mismatch",
            "passed", "message"} <= out.keys()
    assert out["name"] == "y2" and out["passed"] is False and out["dtype"] == "float32"
    lines = rep.summary_lines()
    assert "FAIL" in lines[0]
    assert lines[1].split()[0] == "output"
    assert lines[2].startswith("y1") and lines[2].endswith("ok")
    assert lines[3].startswith("y2") and lines[3].endswith("FAIL")
    cut = lines[1].index("status")  # aligned: status column starts, numbers end, at one place
    assert all(line[cut - 2:cut] == "  " and line[cut] != " " for line in lines[1:4])
    assert all(line[cut - 3] != " " for line in lines[1:4])


def test_infinite_required_rtol_is_json_safe():
    # original 0, lowered 1 -> no rtol can pass: required_rtol is inf, reported as "inf"
    x = {"x": np.zeros((1, 8), np.float32)}
    shift = _model([helper.make_node("Add", ["x", "one"], ["y"])],
                   {"one": np.array(1.0, np.float32)}, [("y", None)])
    rep = validate(unary_model("Identity"), shift, inputs=x)
    assert rep.outputs[0].required_rtol == float("inf")
    d = json.loads(json.dumps(rep.to_dict(), allow_nan=False))
    assert d["outputs"][0]["required_rtol"] == "inf"
