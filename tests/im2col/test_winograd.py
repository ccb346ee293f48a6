"""The Winograd path of the im2col form against onnxruntime, and the per-conv algorithm choice."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnx_lower.api import lower
from onnx_lower.errors import LoweringError
from onnx_lower.passes.im2col import winograd as iw
from tests.oracles import check_ops, run_model

HYP = settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
HYP_SLOW = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
F = TensorProto.FLOAT


def conv_model(c_in, c_out, spatial, pads, *, bias=True, residual=False, act="Relu", batch=1,
               seed=0, auto_pad=None) -> onnx.ModelProto:
    """x → Conv 3×… stride 1 (+ bias) [→ Add(x') residual] [→ act] → y."""
    rng = np.random.default_rng(seed)
    rank = len(spatial)
    w = (rng.standard_normal((c_out, c_in) + (3,) * rank) / np.sqrt(3 ** rank * c_in))
    inits = [numpy_helper.from_array(w.astype(np.float32), "w")]
    ins = ["x", "w"]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(c_out).astype(np.float32), "b"))
        ins.append("b")
    attrs = {"auto_pad": auto_pad} if auto_pad else {"pads": list(pads)}
    nodes = [helper.make_node("Conv", ins, ["c"], **attrs)]
    inputs = [helper.make_tensor_value_info("x", F, [batch, c_in, *spatial])]
    last = "c"
    if residual:
        out_spatial = [n + pads[i] + pads[rank + i] - 2 for i, n in enumerate(spatial)]
        inputs.append(helper.make_tensor_value_info("r", F, [batch, c_out, *out_spatial]))
        nodes.append(helper.make_node("Add", ["c", "r"], ["s"]))
        last = "s"
    if act == "Relu":
        nodes.append(helper.make_node("Relu", [last], ["y"]))
    elif act == "Clip":
        inits += [numpy_helper.from_array(np.array(0, np.float32), "lo"),
                  numpy_helper.from_array(np.array(6, np.float32), "hi")]
        nodes.append(helper.make_node("Clip", [last, "lo", "hi"], ["y"]))
    else:
        nodes.append(helper.make_node("Identity", [last], ["y"]))
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", F, None)],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return onnx.shape_inference.infer_shapes(model)


def _check(model: onnx.ModelProto, conv_algo: str, seed: int = 1):
    lowered, report = lower(model, form="im2col", conv_algo=conv_algo)
    check_ops(model, lowered, "im2col")
    rng = np.random.default_rng(seed)
    feeds = {i.name: rng.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim])
             .astype(np.float32) for i in model.graph.input}
    want = run_model(model, feeds)[0]
    got = run_model(lowered, feeds)[0]
    assert got.shape == want.shape
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * scale)
    return report


@st.composite
def cases(draw):
    rank = draw(st.sampled_from([1, 2]))
    spatial = tuple(draw(st.integers(1, 13)) for _ in range(rank))
    pads = tuple(draw(st.integers(0, 2)) for _ in range(2 * rank))
    fixed = list(pads)
    for i, n in enumerate(spatial):  # a non-empty output
        if n + fixed[i] + fixed[rank + i] < 3:
            fixed[rank + i] = 3 - n - fixed[i]
    return dict(c_in=draw(st.integers(1, 9)), c_out=draw(st.integers(1, 9)), spatial=spatial,
                pads=tuple(fixed), bias=draw(st.booleans()), residual=draw(st.booleans()),
                act=draw(st.sampled_from(["Relu", "Clip", None])),
                batch=draw(st.sampled_from([1, 2])), seed=draw(st.integers(0, 1000)))


def _winograd_case(case):
    report = _check(conv_model(**case), "winograd")
    (note,) = report.notes["conv_algos"]
    assert note["algo"] in ("winograd-f2", "winograd-f4")


@HYP
@given(cases())
def test_winograd_convs_match_onnxruntime(case):
    _winograd_case(case)


@pytest.mark.slow
@HYP_SLOW
@given(cases())
def test_winograd_convs_match_onnxruntime_many(case):
    _winograd_case(case)


def test_same_upper_padding_and_both_tiles():
    model = conv_model(16, 8, (10, 7), None, auto_pad="SAME_UPPER", residual=False)
    report = _check(model, "winograd")
    assert report.notes["conv_algos"][0]["algo"] == "winograd-f4"


def test_conv_algo_im2col_never_uses_winograd():
    report = _check(conv_model(64, 64, (28, 28), (1, 1, 1, 1)), "im2col")
    assert report.notes["conv_algos"][0]["algo"] == "im2col"
    assert report.options["conv_algo"] == "im2col"


def test_auto_picks_by_the_cost_model():
    """Large map, many channels: F(4,3); a small map or a 3-channel stem: im2col."""
    w = np.random.default_rng(0).standard_normal((128, 128, 3, 3)).astype(np.float32) / 34
    big = iw.choose("auto", w, (28, 28), (1, 1), (1, 1), 1)
    assert big.algo == "winograd-f4" and big.probe_error < iw.ERROR_GATE
    assert iw.choose("auto", np.ones((512, 512, 3, 3), np.float32), (7, 7), (1, 1), (1, 1),
                     1).algo == "im2col"
    assert iw.choose("auto", w[:64, :3], (224, 224), (1, 1), (1, 1), 1).algo == "im2col"
    assert "strides" in iw.choose("auto", w, (14, 14), (2, 2), (1, 1), 1).reason


def test_numerics_gate_refuses_f4(monkeypatch):
    """A layer whose measured F(4,3) float32 error is over the gate gets F(2,3)."""
    w = np.random.default_rng(0).standard_normal((8, 8, 3, 3)).astype(np.float32)
    err = iw.choose("winograd", w, (16, 16), (1, 1), (1, 1), 1).probe_error
    assert 0 < err < iw.ERROR_GATE
    monkeypatch.setattr(iw, "ERROR_GATE", err / 2)
    choice = iw.choose("winograd", w, (16, 16), (1, 1), (1, 1), 1)
    assert choice.algo == "winograd-f2" and "refused" in choice.reason
    assert "winograd-f4" not in choice.estimates


def test_unknown_conv_algo_is_a_user_error():
    with pytest.raises(LoweringError, match="conv algorithm"):
        lower(conv_model(2, 2, (5, 5), (1, 1, 1, 1)), form="im2col", conv_algo="fft")


def test_tiles_in_chunks(monkeypatch):
    """Many tiles are lowered in chunks (each Gather … output transform), then concatenated."""
    monkeypatch.setattr(iw, "_CHUNK_BYTES", 1)
    model = conv_model(4, 5, (41, 38), (1, 1, 1, 1), residual=True, batch=2)
    _check(model, "winograd")
    lowered, _ = lower(model, form="im2col", conv_algo="winograd")
    assert sum(n.op_type == "Split" for n in lowered.graph.node) > 1
