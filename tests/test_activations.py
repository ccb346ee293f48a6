"""passes/activations.py: ``lower-activations`` against onnxruntime and the backend node tests,
and ``check-mlp``'s refusals.

Models, the numpy interpreter and the conformance runner come from tests/test_linear.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from onnx import TensorProto, helper
from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

from onnx_lower.affine import affine_of
from onnx_lower.errors import DynamicShapeError, UnsupportedOpError
from onnx_lower.graph import import_graph
from onnx_lower.pass_manager import LoweringModel, get_pass
from onnx_lower.passes.activations import KEPT_ELEMENTWISE, MLP_HINT
from tests.test_linear import (
    _INT,
    HYP,
    check,
    graph_model,
    lower,
    op_model,
    rand,
    refused,
    run_conformance,
    view_model,
)

ACT = ("lower-activations",)
ALL = ("lower-linear", "lower-activations")
MLP = ("Affine", "Relu")


def relus(lm) -> int:
    return sum(n.op == "Relu" for n in lm.graph.nodes)


# --- LeakyRelu / PRelu -------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [None, 0.1, 1.0, -0.5, 2.0])
def test_leaky_relu(alpha):
    attrs = {} if alpha is None else {"alpha": alpha}
    lm = check(op_model("LeakyRelu", [("x", (2, 3))], attrs), ACT, allowed=MLP)
    assert relus(lm) == (0 if alpha == 1.0 else 1)


@HYP
@given(st.floats(-3, 3, allow_nan=False, width=32))
def test_leaky_relu_any_alpha(alpha):
    check(op_model("LeakyRelu", [("x", (4,))], {"alpha": alpha}), ACT, allowed=MLP)


@pytest.mark.parametrize("slope_shape", [(3, 1, 1), (1,), (), (1, 3, 2, 2), (2,), (3, 2, 2)])
def test_prelu(slope_shape):
    lm = check(op_model("PRelu", [("x", (3, 2, 2)), rand(*slope_shape, seed=5)]), ACT,
               allowed=MLP)
    assert relus(lm) == 1


def test_prelu_refusals():
    refused(op_model("PRelu", [("x", (3,)), ("s", (3,))]), "activation", ACT)
    refused(op_model("PRelu", [("x", (3,)), rand(2, 3)]), "batch axis", ACT)


def test_prelu_slope_along_a_static_axis0_is_whole_tensor():
    """The (3, 4, 5) slope of the ONNX backend case varies along axis 0; static, it is exact."""
    lm = check(op_model("PRelu", [("x", (4, 5)), rand(3, 4, 5)], batch=3), ACT, allowed=MLP)
    assert relus(lm) == 1
    assert all(affine_of(n).whole for n in lm.graph.nodes if affine_of(n) is not None)


# --- Clip / HardSigmoid ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "lo,hi", [(-1.0, 1.0), (0.0, 6.0), (0.5, None), (None, 0.3), (None, None), (1.0, -1.0),
              (0.2, 0.2)]
)
@pytest.mark.parametrize("opset", [6, 11, 13])
def test_clip(lo, hi, opset):
    if opset < 11:
        attrs = {k: v for k, v in (("min", lo), ("max", hi)) if v is not None}
        model = op_model("Clip", [("x", (2, 3))], attrs, opset=opset)
    else:
        scalar = lambda v: None if v is None else np.array(v, np.float32)  # noqa: E731
        inputs = [("x", (2, 3)), scalar(lo), scalar(hi)]
        while inputs[-1] is None:
            inputs.pop()
        model = op_model("Clip", inputs, opset=opset)
    if opset < 11 and lo is not None and hi is not None and lo > hi:
        return  # onnxruntime refuses min > max in the attribute form
    lm = check(model, ACT, allowed=MLP)
    assert relus(lm) == (0 if lo is None and hi is None else 1)


@HYP
@given(st.floats(-2, 2, width=32), st.floats(-2, 2, width=32), st.booleans(), st.booleans())
def test_clip_bounds(lo, hi, has_lo, has_hi):
    inputs = [("x", (5,)), np.array(lo, np.float32) if has_lo else None,
              np.array(hi, np.float32) if has_hi else None]
    while inputs[-1] is None:
        inputs.pop()
    check(op_model("Clip", inputs, opset=13), ACT, allowed=MLP)


def test_clip_refusals():
    model = op_model("Clip", [("x", (3,)), ("lo", ())], opset=13)
    refused(model, "is an activation", ACT)


@pytest.mark.parametrize("attrs", [{}, {"alpha": 0.5, "beta": 0.1}, {"alpha": -1.0}])
def test_hard_sigmoid(attrs):
    lm = check(op_model("HardSigmoid", [("x", (2, 4))], attrs), ACT, allowed=MLP)
    assert relus(lm) == 1


# --- Abs / Max / Min ---------------------------------------------------------------------------


def test_abs():
    lm = check(op_model("Abs", [("x", (2, 3))]), ACT, allowed=MLP)
    assert relus(lm) == 1


@pytest.mark.parametrize("op", ["Max", "Min"])
@pytest.mark.parametrize(
    "inputs",
    [
        [("x", (2, 3)), "c(3)"],
        ["c(2,1)", ("x", (2, 3))],
        [("x", (2, 1)), "c(1,1,4)"],
        [("a", (2, 3)), ("b", (2, 3))],
        [("a", (2, 1)), ("b", (1, 3))],
        [("a", (3,)), ("b", (3,)), ("c", (3,))],
        [("a", (3,)), "c(3)", ("b", (1,)), "c()"],
        [("a", (3,))],
        [("a", (3,)), ("a", (3,))],
    ],
)
def test_max_min(op, inputs):
    built = [rand(*eval(f"({e[2:-1]},)" if e[2:-1] else "()"), seed=7) if isinstance(e, str)
             else e for e in inputs]
    lm = check(op_model(op, built, opset=13), ACT, allowed=MLP)
    # one Relu per pairwise step: (distinct activations - 1) + 1 if there are constants
    n_acts = len({e[0] for e in inputs if isinstance(e, tuple)})
    n_const = any(isinstance(e, str) for e in inputs)
    assert relus(lm) == n_acts - 1 + n_const


@st.composite
def max_min_shapes(draw):
    rank = draw(st.integers(1, 3))
    out = [draw(st.integers(1, 3)) for _ in range(rank)]
    a = tuple(d if draw(st.booleans()) else 1 for d in out)
    b = tuple(d if draw(st.booleans()) else 1 for d in out)
    c = tuple(d if draw(st.booleans()) else 1 for d in out)[draw(st.integers(0, rank)):]
    return a, b, c


@HYP
@given(max_min_shapes(), st.sampled_from(["Max", "Min"]), st.booleans())
def test_max_min_broadcast(shapes, op, with_const):
    a, b, c = shapes
    inputs = [("a", a), ("b", b)] + ([rand(*c, seed=8)] if with_const else [])
    check(op_model(op, inputs, opset=13), ACT, allowed=MLP)


def test_max_refusals():
    refused(op_model("Max", [("a", (3,)), ("b", (2, 3))]), "different ranks", ACT)
    refused(op_model("Max", [("x", (3,)), np.array([1.0, -np.inf, 0.0])], opset=13),
            "non-finite", ACT)


def test_network_both_passes():
    """Gemm → LeakyRelu → Gemm → Clip (ReLU6) → Max with the input's projection → Abs."""
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h1"]),
        helper.make_node("LeakyRelu", ["h1"], ["a1"], alpha=0.2),
        helper.make_node("Gemm", ["a1", "w2"], ["h2"]),
        helper.make_node("Clip", ["h2", "zero", "six"], ["a2"]),
        helper.make_node("MatMul", ["x", "w3"], ["p"]),
        helper.make_node("Max", ["a2", "p"], ["m"]),
        helper.make_node("Abs", ["m"], ["y"]),
    ]
    inits = {"w1": rand(4, 6), "b1": rand(6), "w2": rand(6, 5, seed=2), "w3": rand(4, 5, seed=3),
             "zero": np.array(0, np.float32), "six": np.array(6, np.float32)}
    lm = check(graph_model(nodes, {"x": (4,)}, inits, opset=13), ALL, allowed=MLP,
               seeds=(0, 1, 2))
    assert relus(lm) == 4


# --- check-mlp ---------------------------------------------------------------------------------


def run_check(model, pass_names=ALL, symbolic=False):
    lm = lower(model, pass_names, symbolic=symbolic)
    get_pass("check-mlp")(lm)
    return lm


def test_check_mlp_accepts_and_notes_kept_ops():
    nodes = [
        helper.make_node("Gemm", ["x", "w"], ["h"]),
        helper.make_node("Sigmoid", ["h"], ["s"]),
        helper.make_node("Tanh", ["s"], ["t"]),
        helper.make_node("Sigmoid", ["t"], ["u"]),
        helper.make_node("Softmax", ["u"], ["y"]),
    ]
    lm = run_check(graph_model(nodes, {"x": (4,)}, {"w": rand(4, 3)}, opset=13))
    assert lm.notes["kept_ops"] == [{"Sigmoid": 2, "Softmax": 1, "Tanh": 1}]
    assert {"Sigmoid", "Tanh", "Softmax", "LogSoftmax", "Erf"} <= KEPT_ELEMENTWISE


@pytest.mark.parametrize(
    "sample,axis,opset,ok",
    [((5,), -1, 13, True), ((1, 5), -1, 13, True), ((1, 5), 2, 13, True), ((2, 5), -1, 13, False),
     ((2, 5), 1, 13, False), ((2, 5), 1, 11, True), ((2, 5), 2, 11, False), ((1, 5), 2, 11, True),
     ((5,), 0, 13, False)],
)
def test_check_mlp_softmax_axis(sample, axis, opset, ok):
    model = op_model("Softmax", [("x", sample)], {"axis": axis}, opset=opset)
    if ok:
        run_check(model)
    else:
        with pytest.raises(UnsupportedOpError, match="Softmax"):
            run_check(model)


def test_check_mlp_first_offender_in_graph_order():
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("TopK", ["r", "k"], ["v", "i"], axis=-1),
        helper.make_node("Mul", ["v", "v"], ["y"]),
    ]
    model = graph_model(nodes, {"x": (5,)}, {"k": np.array([2], np.int64)}, opset=13)
    with pytest.raises(UnsupportedOpError) as info:
        run_check(model)
    msg = str(info.value)
    assert "(TopK)" in msg and "mlp form" in msg and MLP_HINT in msg


def test_check_mlp_mul_of_activations_reason():
    model = op_model("Mul", [("a", (3,)), ("b", (3,))])
    with pytest.raises(UnsupportedOpError, match="Mul of two activations is not linear"):
        run_check(model)


def test_check_mlp_refusal_reason_from_linear():
    model = op_model("Transpose", [("x", (3, 4))], {"perm": [1, 0, 2]})
    with pytest.raises(UnsupportedOpError, match="moves the batch"):
        run_check(model)


def test_check_mlp_lowerable_but_not_lowered():
    with pytest.raises(UnsupportedOpError, match="lower-activations lowers this node"):
        run_check(op_model("Abs", [("x", (3,))]), pass_names=("lower-linear",))


def test_check_mlp_maxpool_indices():
    nodes = [
        helper.make_node("MaxPool", ["x"], ["p", "idx"], kernel_shape=[2, 2]),
        helper.make_node("Cast", ["idx"], ["y"], to=TensorProto.FLOAT),
    ]
    model = graph_model(nodes, {"x": (1, 4, 4)}, opset=13)
    with pytest.raises(UnsupportedOpError, match="Indices output .* out of scope"):
        run_check(model, pass_names=())


def test_check_mlp_ignores_dead_shape_chain():
    """The Shape→Gather→Concat chain of a lowered Reshape is dead once the Reshape is lowered."""
    model = view_model((2, 3))
    with pytest.raises(UnsupportedOpError, match="symbolic shape inference"):
        run_check(model)  # ONNX's own inference cannot tell that Reshape keeps the batch
    inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    lm = LoweringModel(import_graph(inferred), template=model)
    for name in (*ALL, "check-mlp"):  # no cleanup in between: the chain is still there
        get_pass(name)(lm)


def test_check_mlp_dynamic_shape():
    run_check(op_model("Erf", [("x", ("H",))]))  # shape-agnostic ops need no static shape
    with pytest.raises(DynamicShapeError):
        run_check(op_model("LeakyRelu", [("x", ("H", 2))]))


# --- ONNX backend node tests -------------------------------------------------------------------

SKIP: dict[str, str] = {
    **{f"test_clip_default_int8_{t}": _INT for t in ("min", "max", "inbounds")},
    **{f"test_{op}_{t}": _INT for op in ("max", "min")
       for t in ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")},
}

CONFORMANCE_COUNTS: dict[str, tuple[int, int]] = {}


@pytest.mark.parametrize(
    "op", ["LeakyRelu", "PRelu", "Clip", "Relu", "Abs", "Max", "Min", "HardSigmoid"]
)
def test_backend_conformance(op):
    run_conformance(op, SKIP, CONFORMANCE_COUNTS)


def test_check_mlp_refuses_a_flatten_that_merges_the_batch():
    """Flatten(axis=0) over a dynamic batch is not per-sample: refused, not passed through."""
    model = graph_model([helper.make_node("Flatten", ["x"], ["y"], axis=0)], {"x": (3, 4)},
                        opset=13)
    with pytest.raises(UnsupportedOpError, match="Flatten"):
        run_check(model)
