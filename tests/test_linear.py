"""passes/linear.py (``lower-linear``) against onnxruntime and the ONNX backend node tests.

Each test builds a small model (batch ``N`` symbolic, weights as initializers), runs the pass,
evaluates the lowered graph with the numpy interpreter below (Affine via ``AffineMap.apply``,
Relu via ``np.maximum``) and compares with onnxruntime on the original model. Refusals are
checked by their reason. The conformance tests treat axis 0 of a backend test's first input as
the batch and turn every other input into an initializer.
"""

from __future__ import annotations

import functools
import math
import warnings

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import onnx_lower.passes.activations  # noqa: F401 - registers lower-activations
from onnx_lower.affine import affine_of, is_affine
from onnx_lower.errors import DynamicShapeError
from onnx_lower.graph import const_value, import_graph, is_op
from onnx_lower.pass_manager import LoweringModel, get_pass
from onnx_lower.passes import linear
from onnx_lower.passes.linear import (
    Refused,
    matmul_map,
    pad_map,
    reshape_target,
    slice_map,
    transpose_map,
)
from tests.oracles import CORPUS, run_model

HYP = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
RTOL, ATOL = 1e-5, 1e-5
BATCH = 3
_ELEM = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float64): TensorProto.DOUBLE}


# --- building, lowering and evaluating models ---------------------------------------------------


def graph_model(
    nodes,
    acts: dict[str, tuple],
    inits: dict[str, np.ndarray] | None = None,
    outputs=("y",),
    *,
    opset: int = 17,
    dtype=np.float32,
    batch="N",
) -> onnx.ModelProto:
    """A model with graph inputs ``acts`` (name -> per-sample shape, batch ``batch`` first)."""
    elem = _ELEM[np.dtype(dtype)]
    inits = inits or {}
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(k, elem, [batch, *s]) for k, s in acts.items()],
        [helper.make_tensor_value_info(o, elem, None) for o in outputs],
        [
            numpy_helper.from_array(
                np.asarray(v).astype(dtype) if np.asarray(v).dtype.kind == "f" else np.asarray(v),
                k,
            )
            for k, v in inits.items()
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def op_model(op, inputs, attrs=None, *, n_outputs=1, **kw) -> onnx.ModelProto:
    """One node ``op``: ``inputs`` entries are ``(name, per-sample shape)`` activations, arrays
    (initializers) or None (an omitted optional input)."""
    acts, inits, names = {}, {}, []
    for i, entry in enumerate(inputs):
        if entry is None:
            names.append("")
        elif isinstance(entry, tuple) and isinstance(entry[0], str):
            acts[entry[0]] = tuple(entry[1])
            names.append(entry[0])
        else:
            names.append(f"p{i}")
            inits[f"p{i}"] = np.asarray(entry)
    outs = [f"y{i}" if n_outputs > 1 else "y" for i in range(n_outputs)]
    node = helper.make_node(op, names, outs, name=f"{op.lower()}_node", **(attrs or {}))
    return graph_model([node], acts, inits, outs, **kw)


def random_feeds(model: onnx.ModelProto, batch: int = BATCH, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    inits = {i.name for i in model.graph.initializer}
    feeds = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else batch for d in
                vi.type.tensor_type.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        feeds[vi.name] = rng.standard_normal(dims).astype(dtype) * 2
    return feeds


def lower(model: onnx.ModelProto, pass_names=("lower-linear",), *, symbolic=False):
    """Shape inference, import, the passes; returns the LoweringModel (graph cleaned up)."""
    if symbolic:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    else:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    lm = LoweringModel(import_graph(inferred), template=model)
    for name in pass_names:
        get_pass(name)(lm)
    lm.graph.cleanup()
    return lm


def evaluate(graph, feeds: dict[str, np.ndarray], fallback=None) -> list[np.ndarray]:
    """The tiny interpreter: Affine and Relu (and constants); other ops go to ``fallback``."""
    values = {k: np.asarray(v, dtype=np.float64) for k, v in feeds.items()}
    pending = list(graph.nodes)

    def value(t):
        if t.name in values:
            return values[t.name]
        c = const_value(t)
        if c is None:
            raise KeyError(t.name)
        return np.asarray(c)

    while pending:
        progress = False
        for node in list(pending):
            try:
                ins = [None if t.name == "" else value(t) for t in node.inputs]
            except KeyError:
                continue
            if is_affine(node):
                amap = affine_of(node)
                if amap.out_size == 0:  # empty slices: apply() cannot reshape size-0 arrays
                    shape = amap.out_shape if amap.whole else (len(ins[0]), *amap.out_shape)
                    out = [np.zeros(shape)]
                else:
                    out = [amap.apply(ins)]
            elif is_op(node, "Relu"):
                out = [np.maximum(ins[0], 0.0)]
            elif fallback is not None:
                out = fallback(node, ins)
            else:
                raise AssertionError(f"the interpreter has no {node.op}")
            for t, v in zip(node.outputs, out):
                values[t.name] = v
            pending.remove(node)
            progress = True
        assert progress, "the lowered graph has a cycle or an unknown input"
    return [value(t) for t in graph.outputs]


def why_not(lm, allowed=("Affine",)) -> str:
    """The passes' reasons for every node left that is not in ``allowed``."""
    reasons = []
    for node in lm.graph.nodes:
        if ("Affine" if is_affine(node) else node.op) not in allowed:
            why = linear.explain(node, lm.graph, lm.opset) or onnx_lower.passes.activations.explain(
                node, lm.graph, lm.opset
            )
            reasons.append(f"{node.op}: {why}")
    return "not lowered: " + "; ".join(reasons)


def ops_of(graph) -> set[str]:
    return {"Affine" if is_affine(n) else n.op for n in graph.nodes}


def check(model, pass_names=("lower-linear",), *, feeds=None, allowed=("Affine",), seeds=(0,),
          symbolic=False, rtol=RTOL, atol=ATOL):
    """Lower ``model`` and compare the interpreter with onnxruntime on random inputs."""
    lm = lower(model, pass_names, symbolic=symbolic)
    assert ops_of(lm.graph) <= set(allowed), why_not(lm, allowed)
    for seed in seeds:
        f = feeds or random_feeds(model, seed=seed)
        expected = run_model(model, f)
        got = evaluate(lm.graph, f)
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            assert g.shape == e.shape, (g.shape, e.shape)
            np.testing.assert_allclose(g, e, rtol=rtol, atol=atol)
    return lm


def refused(model, reason: str, pass_names=("lower-linear",), *, opset=None):
    """The pass leaves the node alone, and ``explain`` gives a reason containing ``reason``."""
    inferred = onnx.shape_inference.infer_shapes(model)
    lm = LoweringModel(import_graph(inferred), template=model)
    node = lm.graph.nodes[-1]
    op = node.op
    for name in pass_names:
        get_pass(name)(lm)
    assert op in ops_of(lm.graph), f"{op} was lowered"
    why = linear.explain(node, lm.graph, lm.opset) or onnx_lower.passes.activations.explain(
        node, lm.graph, lm.opset
    )
    text = why if isinstance(why, str) else str(why)
    assert reason in text, text
    return text


def rand(*shape, seed=1):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# --- BatchNormalization ------------------------------------------------------------------------


def _bn_params(c, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(c), rng.standard_normal(c), rng.standard_normal(c),
            rng.uniform(0.5, 2.0, c)]


@pytest.mark.parametrize("opset", [7, 9, 14, 15])
@pytest.mark.parametrize("shape", [(4,), (3, 5), (2, 3, 4), (2, 2, 3, 2)])
def test_batchnorm(opset, shape):
    eps = 1e-3 if opset % 2 else 1e-5
    check(op_model("BatchNormalization", [("x", shape), *_bn_params(shape[0])],
                   {"epsilon": eps}, opset=opset))


def test_batchnorm_spatial0_opset7():
    # spatial=0: one statistic per element of the sample
    shape = (2, 3, 2)
    p = [rand(*shape, seed=i) for i in range(3)] + [np.abs(rand(*shape, seed=4)) + 0.5]
    model = op_model("BatchNormalization", [("x", shape), *p], {"spatial": 0}, opset=7)
    lm = lower(model)
    assert ops_of(lm.graph) == {"Affine"}
    x = random_feeds(model)["x"]
    scale, b, mean, var = (np.asarray(v, np.float64) for v in p)
    expected = scale * (x - mean) / np.sqrt(var + 1e-5) + b
    np.testing.assert_allclose(evaluate(lm.graph, {"x": x})[0], expected, rtol=1e-5, atol=1e-5)


def test_batchnorm_positions():
    """BatchNorm first in the graph, after a Relu, and before a Gemm."""
    c = 4
    nodes = [
        helper.make_node("BatchNormalization", ["x", "s0", "b0", "m0", "v0"], ["t0"]),
        helper.make_node("Relu", ["t0"], ["t1"]),
        helper.make_node("BatchNormalization", ["t1", "s1", "b1", "m1", "v1"], ["t2"]),
        helper.make_node("Gemm", ["t2", "w"], ["y"], transB=1),
    ]
    inits = {f"{k}{j}": v for j in range(2) for k, v in zip("sbmv", _bn_params(c, j))}
    inits["w"] = rand(5, c)
    lm = check(graph_model(nodes, {"x": (c,)}, inits), allowed=("Affine", "Relu"))
    assert sorted(n.op for n in lm.graph.nodes) == ["Affine", "Affine", "Affine", "Relu"]


def test_batchnorm_training_refused():
    p = _bn_params(3)
    refused(op_model("BatchNormalization", [("x", (3, 2)), *p], {"training_mode": 1},
                     n_outputs=3, opset=15), "training_mode=1")
    model = op_model("BatchNormalization", [("x", (3, 2)), *p], n_outputs=3, opset=9)
    refused(model, "training outputs")


def test_batchnorm_unused_training_outputs_lowered():
    p = _bn_params(3)
    plain = op_model("BatchNormalization", [("x", (3, 2)), *p], opset=9)
    model = onnx.ModelProto()
    model.CopyFrom(plain)
    model.graph.node[0].output.extend(["", "", "", ""])  # omitted training outputs
    lm = lower(model)
    assert ops_of(lm.graph) == {"Affine"}
    # (onnxruntime 1.32 crashes on the omitted outputs, so it runs the plain model)
    feeds = random_feeds(plain)
    np.testing.assert_allclose(evaluate(lm.graph, feeds)[0], run_model(plain, feeds)[0],
                               rtol=RTOL, atol=ATOL)


# --- Gemm --------------------------------------------------------------------------------------


@pytest.mark.parametrize("opset", [9, 11, 13])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("c_shape", [None, (5,), (1, 5), (), (1, 1), (1,)])
@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.5, -2.0)])
def test_gemm(opset, trans_b, c_shape, alpha, beta):
    if c_shape is None and opset < 11:
        return
    b = rand(5, 4) if trans_b else rand(4, 5)
    inputs = [("x", (4,)), b] + ([] if c_shape is None else [rand(*c_shape, seed=2)])
    check(op_model("Gemm", inputs, {"transB": trans_b, "alpha": alpha, "beta": beta},
                   opset=opset))


def test_gemm_refusals():
    """With a dynamic batch; a static one is the whole-tensor lowering below."""
    refused(op_model("Gemm", [("x", (4,)), rand(4, 5)], {"transA": 1}), "transA=1")
    refused(op_model("Gemm", [rand(5, 3), ("x", (2,))]), "contracts the batch axis")
    refused(op_model("Gemm", [("x", (4,)), rand(4, 5), rand(3, 5)]), "one row per")
    refused(op_model("Gemm", [("x", (4,)), ("w", (5,))], batch=4), "two activations")


def test_gemm_mixing_a_static_axis0_is_whole_tensor():
    for model in (
        op_model("Gemm", [("x", (4,)), rand(4, 5)], {"transA": 1, "alpha": 0.5}, batch=4),
        op_model("Gemm", [rand(5, 3), ("x", (2,)), rand(5, 2)], {"beta": 2.0}, batch=3),
        op_model("Gemm", [rand(3, 5), ("x", (3,))], {"transA": 1, "transB": 1}, batch=2),
        op_model("Gemm", [("x", (4,)), rand(4, 5), rand(3, 5)], batch=3),
    ):
        lm = check(model)
        assert all(affine_of(n).whole for n in lm.graph.nodes)


# --- MatMul ------------------------------------------------------------------------------------

MATMUL_RIGHT = [
    ((4,), (4, 5)),
    ((4,), (4,)),
    ((3, 4), (4, 5)),
    ((3, 4), (4,)),
    ((2, 3, 4), (4, 5)),
    ((2, 3, 4), (2, 4, 5)),
    ((2, 3, 4), (1, 2, 4, 5)),
    ((1, 3, 4), (2, 4, 5)),
    ((2, 1, 3, 4), (3, 4, 2)),
]
MATMUL_LEFT = [
    ((4, 3), (5, 4)),
    ((4, 3), (4,)),
    ((2, 4, 3), (5, 4)),
    ((2, 4, 3), (2, 5, 4)),
    ((1, 4, 3), (2, 5, 4)),
    ((2, 4, 3), (1, 2, 5, 4)),
]


@pytest.mark.parametrize("xs,ws", MATMUL_RIGHT)
def test_matmul_const_right(xs, ws):
    check(op_model("MatMul", [("x", xs), rand(*ws)]))


@pytest.mark.parametrize("xs,ws", MATMUL_LEFT)
def test_matmul_const_left(xs, ws):
    check(op_model("MatMul", [rand(*ws), ("x", xs)]))


def test_matmul_refusals():
    """With a dynamic batch; a static one is the whole-tensor lowering below."""
    refused(op_model("MatMul", [("x", (4,)), rand(2, 4, 5)]), "more batch axes")
    refused(op_model("MatMul", [("x", (3, 4)), rand(2, 4, 5)]), "differ between")
    refused(op_model("MatMul", [rand(5, 3), ("x", (4,))]), "contract axis 0")
    refused(op_model("MatMul", [("x", (4,)), ("w", (4,))], batch=4), "two activations")


@pytest.mark.parametrize(("x_shape", "w_shape", "const_left"), [
    ((4,), (4,), False), ((4,), (4, 5), False), ((4,), (2, 4, 5), False),
    ((2, 3, 4), (2, 4, 5), False), ((3,), (5, 3), True), ((3,), (2, 5, 3), True),
    ((2, 3, 4), (2, 5, 3), True), ((3, 4), (5, 3), True),
])
def test_matmul_mixing_a_static_axis0_is_whole_tensor(x_shape, w_shape, const_left):
    inputs = [rand(*w_shape), ("x", x_shape[1:])] if const_left else [
        ("x", x_shape[1:]), rand(*w_shape)]
    lm = check(op_model("MatMul", inputs, batch=x_shape[0]))
    assert all(affine_of(n).whole for n in lm.graph.nodes)


def test_matmul_map_is_sparse_kron():
    w = rand(4, 5).astype(np.float64)
    amap = matmul_map((6, 4), w)
    assert amap.terms[0].nnz == 6 * 4 * 5
    np.testing.assert_array_equal(amap.terms[0].toarray(), np.kron(np.eye(6), w.T))
    amap = matmul_map((4, 6), w.T, const_left=True)
    np.testing.assert_array_equal(amap.terms[0].toarray(), np.kron(w.T, np.eye(6)))


# --- elementwise with constants, sums ----------------------------------------------------------


@st.composite
def broadcast_pair(draw):
    """A per-sample activation shape and a full-rank-or-less constant shape that broadcast."""
    rank = draw(st.integers(1, 3))
    out = [draw(st.integers(1, 4)) for _ in range(rank)]
    xs = [d if draw(st.booleans()) else 1 for d in out]
    cs = [d if draw(st.booleans()) else 1 for d in out]
    crank = draw(st.integers(0, rank + 1))
    cs = ([1] + cs)[rank + 1 - crank :] if crank == rank + 1 else cs[rank - crank :]
    return tuple(xs), tuple(cs)


@HYP
@given(broadcast_pair(), st.sampled_from(["Add", "Sub", "Mul", "Div"]), st.booleans())
def test_elementwise_broadcast(pair, op, const_first):
    xs, cs = pair
    c = rand(*cs, seed=3)
    if op == "Div":
        if const_first:
            return
        c = np.where(np.abs(c) < 0.1, 0.5, c).astype(np.float32)
    inputs = [c, ("x", xs)] if const_first else [("x", xs), c]
    check(op_model(op, inputs))


def test_elementwise_refusals():
    refused(op_model("Div", [rand(3), ("x", (3,))]), "not linear")
    refused(op_model("Mul", [("x", (3,)), ("z", (3,))]), "two activations is not linear")
    refused(op_model("Div", [("x", (3,)), np.array([1.0, 0.0, 2.0])]), "containing 0")
    refused(op_model("Add", [("x", (3,)), rand(2, 3)]), "along axis 0, the batch")
    check(op_model("Add", [("x", (3,)), rand(2, 3)], batch=2))  # static: whole-tensor
    refused(op_model("Add", [("x", (3,)), rand(1, 2, 3)]), "more axes")


@pytest.mark.parametrize("op", ["Add", "Sub"])
@pytest.mark.parametrize("sa,sb", [((3, 4), (3, 4)), ((3, 1), (1, 4)), ((2, 1, 4), (3, 1))])
def test_residual_two_activations(op, sa, sb):
    if len(sa) != len(sb):
        refused(op_model(op, [("a", sa), ("b", sb)]), "batch axes")
        return
    check(op_model(op, [("a", sa), ("b", sb)]))


def test_add_same_tensor_twice():
    lm = check(op_model("Add", [("x", (3,)), ("x", (3,))]))
    assert len(lm.graph.nodes[0].inputs) == 1


@pytest.mark.parametrize("op", ["Sum", "Mean"])
def test_sum_mean(op):
    check(op_model(op, [("a", (2, 3)), ("b", (1, 3)), rand(3), ("c", (2, 1)), rand(1, 2, 1)],
                   opset=13))


def test_neg_identity_cast_dropout():
    check(op_model("Neg", [("x", (2, 3))]))
    check(op_model("Identity", [("x", (2, 3))]))
    check(op_model("Cast", [("x", (2, 3))], {"to": TensorProto.FLOAT}))
    check(op_model("Dropout", [("x", (2, 3))], opset=13))
    refused(op_model("Cast", [("x", (2, 3))], {"to": TensorProto.DOUBLE}), "changes the type")


# --- Transpose ---------------------------------------------------------------------------------


@HYP
@given(st.lists(st.integers(1, 4), min_size=1, max_size=4), st.data())
def test_transpose(sample, data):
    perm = [0] + [p + 1 for p in data.draw(st.permutations(range(len(sample))))]
    check(op_model("Transpose", [("x", tuple(sample))], {"perm": perm}))


def test_transpose_nhwc_to_nchw():
    check(op_model("Transpose", [("x", (4, 5, 3))], {"perm": [0, 3, 1, 2]}))


def test_transpose_batch_refused():
    refused(op_model("Transpose", [("x", (3, 4))]), "moves the batch")
    refused(op_model("Transpose", [("x", (3, 4))], {"perm": [1, 0, 2]}), "moves the batch")


# --- Pad ---------------------------------------------------------------------------------------


@st.composite
def pad_config(draw):
    sample = [draw(st.integers(1, 4)) for _ in range(draw(st.integers(1, 3)))]
    mode = draw(st.sampled_from(["constant", "reflect", "edge", "wrap"]))
    begins, ends = [0], [0]
    for d in sample:
        b = draw(st.integers(-(d - 1), 3))
        e = draw(st.integers(-(d - 1 - max(-b, 0)), 3))
        kept = d + min(b, 0) + min(e, 0)
        if mode == "reflect":  # onnxruntime needs pads < the (cropped) extent
            b, e = min(b, kept - 1), min(e, kept - 1)
        if mode == "wrap":
            b, e = min(b, kept), min(e, kept)
        begins.append(b)
        ends.append(e)
    return tuple(sample), mode, begins + ends, draw(st.sampled_from([0.0, 1.5, -2.0]))


@HYP
@given(pad_config(), st.booleans())
def test_pad(config, attr_form):
    sample, mode, pads, value = config
    if mode == "wrap":
        attr_form = False
    if attr_form:
        model = op_model("Pad", [("x", sample)], {"mode": mode, "pads": pads, "value": value},
                         opset=10)
    else:
        model = op_model("Pad", [("x", sample), np.array(pads, np.int64),
                                 np.array(value, np.float32)], {"mode": mode}, opset=19)
    check(model)


def test_pad_axes_input():
    model = op_model("Pad", [("x", (3, 4)), np.array([1, -1, 2, 0], np.int64), None,
                             np.array([-1, 1], np.int64)], {"mode": "edge"}, opset=18)
    check(model)


def test_pad_refusals():
    refused(op_model("Pad", [("x", (3,)), np.array([1, 0, 0, 0], np.int64)], opset=13),
            "batch axis")
    model = op_model("Pad", [("x", (3,)), ("p", (4,))], opset=13)
    model.graph.input[1].type.tensor_type.elem_type = TensorProto.INT64
    model.graph.input[1].type.tensor_type.shape.dim[0].dim_value = 4
    refused(model, "not a constant")


def test_pad_map_negative_and_fill():
    amap = pad_map((3,), [0, -1, 0, 2], "constant", 7.0)
    y = amap.apply([np.array([[1.0, 2.0, 3.0]])])
    np.testing.assert_array_equal(y, [[2.0, 3.0, 7.0, 7.0]])


# --- Concat / Split ----------------------------------------------------------------------------


@pytest.mark.parametrize("axis", [1, 2, -1, -2])
def test_concat(axis):
    shapes = [(2, 3), (2, 3)]
    other = [list(s) for s in shapes]
    a = axis % 3
    other[0][a - 1] = 1
    const = np.ones([1] + other[0], np.float32) * 3
    # a constant part has batch 1, so the original model runs only with batch 1
    model = op_model("Concat", [("a", shapes[0]), const, ("b", tuple(other[1]))],
                     {"axis": axis}, batch=1)
    check(model)


def test_concat_refusals():
    refused(op_model("Concat", [("a", (2,)), ("b", (2,))], {"axis": 0}), "batch axis")
    refused(op_model("Concat", [("a", (2,)), rand(2, 2)], {"axis": 1}), "size 1")
    check(op_model("Concat", [("a", (2,)), rand(2, 2)], {"axis": 1}, batch=2))
    check(op_model("Concat", [("a", (2,)), ("b", (2,))], {"axis": 0}, batch=3))


@pytest.mark.parametrize(
    "opset,attrs,split,n,sample",
    [
        (11, {"axis": 1, "split": [1, 3]}, None, 2, (4, 3)),
        (11, {"axis": -1}, None, 3, (4, 3)),
        (13, {"axis": 2}, np.array([2, 1], np.int64), 2, (4, 3)),
        (13, {"axis": 1}, None, 2, (4, 3)),
        (18, {"axis": 1, "num_outputs": 3}, None, 3, (5, 3)),
        (18, {"axis": 2, "num_outputs": 2}, None, 2, (4, 3)),
    ],
)
def test_split(opset, attrs, split, n, sample):
    inputs = [("x", sample)] + ([] if split is None else [split])
    check(op_model("Split", inputs, attrs, n_outputs=n, opset=opset))


def test_split_batch_refused():
    refused(op_model("Split", [("x", (4,))], {"axis": 0}, n_outputs=2), "batch axis")
    check(op_model("Split", [("x", (4,))], {"axis": 0}, n_outputs=2, batch=4))


# --- Slice / Gather ----------------------------------------------------------------------------


@st.composite
def slice_config(draw):
    sample = [draw(st.integers(1, 5)) for _ in range(draw(st.integers(1, 3)))]
    r = len(sample) + 1
    axes = draw(st.lists(st.integers(1, r - 1), min_size=1, max_size=r - 1, unique=True))
    ends_pool = st.one_of(st.integers(-7, 7), st.sampled_from([2**63 - 1, -(2**63), 2**31]))
    starts = [draw(st.integers(-7, 7)) for _ in axes]
    ends = [draw(ends_pool) for _ in axes]
    steps = [draw(st.sampled_from([-3, -2, -1, 1, 2, 3])) for _ in axes]
    for i, (a, k) in enumerate(zip(axes, steps)):
        n = sample[a - 1]
        if not range(n)[linear.onnx_slice(starts[i], ends[i], k, n)]:
            # an empty axis: start inside it and run to the far end in the step's direction
            starts[i] = draw(st.integers(-n, n - 1))
            ends[i] = 2**63 - 1 if k > 0 else -(2**63)
    axes = [a - r if draw(st.booleans()) else a for a in axes]
    return tuple(sample), starts, ends, axes, steps


@HYP
@given(slice_config())
def test_slice(config):
    sample, starts, ends, axes, steps = config
    expected_shape = np.zeros(sample)[
        tuple(
            dict(zip([a % (len(sample) + 1) - 1 for a in axes],
                     [linear.onnx_slice(s, e, k, sample[a % (len(sample) + 1) - 1])
                      for s, e, a, k in zip(starts, ends, axes, steps)])).get(i, slice(None))
            for i in range(len(sample))
        )
    ].shape
    assert 0 not in expected_shape  # slice_config only draws non-empty slices
    ints = lambda v: np.array(v, np.int64)  # noqa: E731
    check(op_model("Slice", [("x", sample), ints(starts), ints(ends), ints(axes), ints(steps)],
                   opset=13))


def test_slice_attr_form_and_batch_axis():
    check(op_model("Slice", [("x", (5, 4))], {"starts": [1, -3], "ends": [4, 100],
                                                "axes": [1, 2]}, opset=9))
    ints = lambda v: np.array(v, np.int64)  # noqa: E731
    # axis 0 taken whole: allowed even with a symbolic batch
    check(op_model("Slice", [("x", (5,)), ints([0, 1]), ints([2**63 - 1, 4]), ints([0, 1])]))
    refused(op_model("Slice", [("x", (5,)), ints([1]), ints([3]), ints([0])]), "cuts the batch")


def test_slice_map_clamping():
    x = np.arange(10.0).reshape(1, 10)
    for s, e, k in [(8, -20, -2), (-1, -11, -1), (20, 2, -3), (-30, 30, 4)]:
        got = slice_map((10,), [s], [e], [1], [k]).apply([x])
        expected = x[:, linear.onnx_slice(s, e, k, 10)]
        np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(
        slice_map((10,), [8], [-20], [1], [-2]).apply([x])[0], [8, 6, 4, 2, 0]
    )


@pytest.mark.parametrize(
    "axis,indices",
    [(1, np.array(2)), (1, np.array([0, -1, 1])), (2, np.array([[1, 0], [2, 2]])),
     (-1, np.array([3, 0]))],
)
def test_gather(axis, indices):
    check(op_model("Gather", [("x", (3, 4)), indices.astype(np.int64)], {"axis": axis}))


def test_gather_refusals():
    refused(op_model("Gather", [("x", (3,)), np.array([0], np.int64)], {"axis": 0}), "batch")
    model = op_model("Gather", [rand(5, 3), ("i", (2,))])
    model.graph.input[0].type.tensor_type.elem_type = TensorProto.INT64
    refused(model, "lookup")


# --- shape ops ---------------------------------------------------------------------------------


def test_squeeze_unsqueeze():
    check(op_model("Squeeze", [("x", (1, 3, 1))], {"axes": [1, -1]}, opset=11))
    check(op_model("Squeeze", [("x", (1, 3, 1)), np.array([1], np.int64)], opset=13))
    check(op_model("Squeeze", [("x", (1, 3, 1))], opset=13))
    check(op_model("Unsqueeze", [("x", (3,))], {"axes": [1, -1]}, opset=11))
    check(op_model("Unsqueeze", [("x", (3,)), np.array([2, 1], np.int64)], opset=13))
    refused(op_model("Squeeze", [("x", (3,))], {"axes": [0]}, opset=11), "batch")
    check(op_model("Squeeze", [("x", (3,))], {"axes": [0]}, opset=11, batch=1))
    check(op_model("Squeeze", [("x", (3,))], opset=11, batch=1))
    refused(op_model("Unsqueeze", [("x", (3,)), np.array([0], np.int64)], opset=13), "axis 0")


@pytest.mark.parametrize("axis,sample", [(1, (2, 3)), (2, (1, 3, 2)), (-2, (1, 3)), (3, (1, 1))])
def test_flatten(axis, sample):
    check(op_model("Flatten", [("x", sample)], {"axis": axis}))


def test_flatten_axis0():
    check(op_model("Flatten", [("x", (2, 3))], {"axis": 0}, batch=1),
          feeds={"x": rand(1, 2, 3)})
    refused(op_model("Flatten", [("x", (2, 3))], {"axis": 0}), "static batch of 1")
    refused(op_model("Flatten", [("x", (2, 3))], {"axis": 2}), "merges the batch")


@pytest.mark.parametrize(
    "sample,shape,allowzero",
    [((2, 3, 4), [0, -1], 0), ((2, 3, 4), [-1, 4, 6], 0), ((2, 3, 4), [0, 0, 12], 0),
     ((6,), [-1, 2, 3], 1), ((2, 3), [-1, 3, 2], 0)],
)
def test_reshape(sample, shape, allowzero):
    opset = 14 if allowzero else 13
    check(op_model("Reshape", [("x", sample), np.array(shape, np.int64)],
                   {"allowzero": allowzero} if allowzero else None, opset=opset))


def view_model(x_shape: tuple[int, ...]) -> onnx.ModelProto:
    """PyTorch's x.view(x.size(0), -1): Shape→Gather→Unsqueeze→Concat→Reshape."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "ax0"], ["n1"]),
        helper.make_node("Concat", ["n1", "minus1"], ["shape"], axis=0),
        helper.make_node("Reshape", ["x", "shape"], ["y"]),
    ]
    inits = {"zero": np.array(0, np.int64), "ax0": np.array([0], np.int64),
             "minus1": np.array([-1], np.int64)}
    return graph_model(nodes, {"x": x_shape}, inits, opset=13)


def test_reshape_from_shape_chain():
    model = view_model((2, 3, 2))
    lm = check(model, symbolic=True)
    assert [n.op for n in lm.graph.nodes] == ["Affine"]
    # Without symbolic inference the output's batch is unknown and the shape is not constant.
    refused(model, "symbolic shape inference")


def test_reshape_refusals():
    refused(op_model("Reshape", [("x", (3, 4)), np.array([-1, 4], np.int64)]), "batch")
    refused(op_model("Reshape", [("x", (3, 4)), np.array([3, -1], np.int64)]), "batch")


def test_reshape_target():
    assert reshape_target(["N", 2, 3], [0, -1]) == (6,)
    assert reshape_target(["N", 2, 3], [-1, 3, 2]) == (3, 2)
    assert reshape_target(["N", 2, 3], [-1, 2]) is None
    assert reshape_target([4, 2, 3], [4, 6]) == (6,)
    assert reshape_target(["N", 2, 3], [4, 6]) is None


@pytest.mark.parametrize(
    "op,opset,axes,keepdims",
    [("ReduceMean", 13, [2, 3], 1), ("ReduceMean", 13, [-1], 0), ("ReduceMean", 18, [1], 0),
     ("ReduceSum", 13, [2], 1), ("ReduceSum", 11, [1, 2], 0), ("ReduceSum", 13, [-2, -1], 0)],
)
def test_reduce(op, opset, axes, keepdims):
    attr_form = op == "ReduceMean" and opset < 18 or op == "ReduceSum" and opset < 13
    attrs = {"keepdims": keepdims}
    inputs = [("x", (2, 3, 4))]
    if attr_form:
        attrs["axes"] = axes
    else:
        inputs.append(np.array(axes, np.int64))
    check(op_model(op, inputs, attrs, opset=opset))


def test_reduce_noop_and_refusal():
    check(op_model("ReduceSum", [("x", (2, 3))], {"noop_with_empty_axes": 1}, opset=13))
    refused(op_model("ReduceSum", [("x", (2, 3))], opset=13), "batch axis")
    refused(op_model("ReduceMean", [("x", (2, 3))], {"axes": [0, 1]}, opset=13), "batch axis")


def test_expand_tile_depth_space():
    check(op_model("Expand", [("x", (3, 1)), np.array([1, 3, 4], np.int64)], opset=13))
    check(op_model("Expand", [("x", (3, 1)), np.array([1, 4], np.int64)], opset=13))
    check(op_model("Tile", [("x", (2, 3)), np.array([1, 2, 3], np.int64)], opset=13))
    for mode in ("DCR", "CRD"):
        check(op_model("DepthToSpace", [("x", (8, 2, 3))], {"blocksize": 2, "mode": mode},
                       opset=13))
    check(op_model("SpaceToDepth", [("x", (2, 4, 6))], {"blocksize": 2}, opset=13))
    refused(op_model("Tile", [("x", (2,)), np.array([2, 1], np.int64)]), "batch")
    refused(op_model("Expand", [("x", (2,)), np.array([2, 1, 2], np.int64)]), "in front")


# --- whole graphs, dynamic shapes, non-float tensors -------------------------------------------


def test_tf_style_network():
    """NHWC input → Transpose → Pad → BN → Relu → ReduceMean → Flatten → Gemm → Softmax-free."""
    c = 3
    nodes = [
        helper.make_node("Transpose", ["x"], ["t"], perm=[0, 3, 1, 2]),
        helper.make_node("Pad", ["t", "pads"], ["p"]),
        helper.make_node("BatchNormalization", ["p", "s", "b", "m", "v"], ["bn"]),
        helper.make_node("Relu", ["bn"], ["r"]),
        helper.make_node("ReduceMean", ["r"], ["g"], axes=[2, 3], keepdims=1),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "w", "c"], ["y"], transB=1),
    ]
    inits = dict(zip("sbmv", _bn_params(c)))
    inits.update(pads=np.array([0, 0, 1, 1, 0, 0, 1, 0], np.int64), w=rand(4, c), c=rand(4))
    lm = check(graph_model(nodes, {"x": (4, 5, c)}, inits, opset=13),
               allowed=("Affine", "Relu"))
    assert [n.op for n in lm.graph.nodes].count("Relu") == 1


def test_dynamic_dim_not_lowered():
    model = op_model("Neg", [("x", ("H", 3))])
    inferred = onnx.shape_inference.infer_shapes(model)
    lm = LoweringModel(import_graph(inferred), template=model)
    node = lm.graph.nodes[0]
    get_pass("lower-linear")(lm)
    assert lm.graph.nodes[0].op == "Neg"
    assert isinstance(linear.explain(node, lm.graph, lm.opset), DynamicShapeError)


def test_integer_shape_ops_left_alone():
    model = op_model("Concat", [("a", (2,)), np.array([[7, 8]], np.int64)], {"axis": 1})
    model.graph.input[0].type.tensor_type.elem_type = TensorProto.INT64
    model.graph.output[0].type.tensor_type.elem_type = TensorProto.INT64
    refused(model, "only float activations")


def test_pure_functions_raise_refused():
    with pytest.raises(Refused, match="perm"):
        transpose_map((2, 3), [2, 0, 1])
    assert math.prod(pad_map((2, 2), [0, 1, 1, 0, 1, 1], "reflect").out_shape) == 16


# --- ONNX backend node tests -------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _all_backend_cases():
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return collect_testcases()


def backend_cases(op: str) -> list:
    """The single-node backend tests of ``op`` (function-expanded variants excluded)."""
    return [
        c for c in _all_backend_cases()
        if c.model is not None and len(c.model.graph.node) == 1
        and c.model.graph.node[0].op_type == op
    ]


#: Ops whose further inputs are data, not parameters: those shaped like the first input (same
#: rank and axis 0) stay activations; every other input becomes an initializer.
DATA_INPUT_OPS = frozenset({"Add", "Sub", "Sum", "Mean", "Concat", "Max", "Min"})


def conformance_model(case, inputs: list) -> tuple[onnx.ModelProto, dict]:
    """The case's model with its parameter inputs turned into initializers, and the feeds."""
    model = onnx.ModelProto()
    model.CopyFrom(case.model)
    graph = model.graph
    op = graph.node[0].op_type
    first = np.asarray(inputs[0])
    feeds, keep = {}, []
    for i, (vi, value) in enumerate(zip(list(graph.input), inputs)):
        value = np.asarray(value)
        activation = i == 0 or (
            op in DATA_INPUT_OPS and value.ndim == first.ndim and value.ndim > 0
            and value.shape[0] == first.shape[0]
        )
        if activation:
            keep.append(vi)
            feeds[vi.name] = value
        else:
            graph.initializer.append(numpy_helper.from_array(value, vi.name))
    del graph.input[:]
    graph.input.extend(keep)
    return model, feeds


def run_backend_case(case, pass_names=("lower-linear", "lower-activations")) -> str | None:
    """Lower and compare one backend case; returns None, or what stayed unlowered."""
    for inputs, outputs in case.data_sets:
        model, feeds = conformance_model(case, inputs)
        inferred = onnx.shape_inference.infer_shapes(model)
        lm = LoweringModel(import_graph(inferred), template=model)
        for name in pass_names:
            get_pass(name)(lm)
        lm.graph.cleanup()
        left = ops_of(lm.graph) - {"Affine", "Relu"}
        if left:
            node = next(n for n in lm.graph.nodes if n.op in left)
            why = linear.explain(node, lm.graph, lm.opset) or onnx_lower.passes.activations.explain(
                node, lm.graph, lm.opset
            )
            return f"{sorted(left)}: {why}"
        got = evaluate(lm.graph, feeds)
        assert len(got) == len(outputs)
        for g, e in zip(got, outputs):
            assert g.shape == np.shape(e), (case.name, g.shape, np.shape(e))
            np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6, err_msg=case.name)
    return None


def run_conformance(op: str, skip: dict[str, str], counts: dict) -> None:
    """Every backend case of ``op`` passes, or is in ``skip`` and is refused by the passes."""
    cases = backend_cases(op)
    assert cases, f"no backend tests for {op}"
    passed, skipped, failures = 0, 0, []
    for case in cases:
        left = run_backend_case(case)
        if case.name in skip:
            skipped += 1
            if left is None:
                failures.append(f"{case.name} is in SKIP but lowers fine")
        elif left is None:
            passed += 1
        else:
            failures.append(f"{case.name}: {left}")
    counts[op] = (passed, skipped)
    print(f"\nconformance {op}: {passed} passed, {skipped} skipped")
    assert not failures, "\n".join(failures)
    assert set(skip) <= {c.name for c in _all_backend_cases()}, "SKIP names unknown cases"


_INT = "integer tensors (not float activations)"

#: Backend cases the passes do not lower. The first input's axis 0 is static in every case, so
#: an op that mixes it is lowered on whole-tensor samples (passes/sample_axis.py).
SKIP: dict[str, str] = {
    "test_batchnorm_example_training_mode": "training mode normalises with batch statistics",
    "test_batchnorm_epsilon_training_mode": "training mode normalises with batch statistics",
    "test_edge_pad": _INT,
    "test_reflect_pad": _INT,
    "test_wrap_pad": _INT,
    **{f"test_{op}_{t}": _INT for op in ("add", "sub", "mul", "div")
       for t in ("int8", "int16", "uint8", "uint16", "uint32", "uint64")},
    "test_div_int32_trunc": _INT,
}

CONFORMANCE_COUNTS: dict[str, tuple[int, int]] = {}

LINEAR_CONFORMANCE = [
    "BatchNormalization", "Gemm", "MatMul", "Flatten", "Reshape", "Transpose", "Pad", "Concat",
    "Split", "Squeeze", "Unsqueeze", "Slice", "Neg", "Add", "Sub", "Mul", "Div",
]  # fmt: skip


@pytest.mark.parametrize("op", LINEAR_CONFORMANCE)
def test_backend_conformance(op):
    run_conformance(op, SKIP, CONFORMANCE_COUNTS)


# --- real models -------------------------------------------------------------------------------


def _ort_node(opset: int):
    """Run one leftover node (Conv, pools, ...) in onnxruntime, for mixed evaluation."""

    def run(node, ins):
        inputs = [gs.Variable("") if v is None else gs.Constant(f"in{i}", np.asarray(v, dtype=(
            np.float32 if np.asarray(v).dtype == np.float64 else np.asarray(v).dtype)))
            for i, v in enumerate(ins)]
        outs = [gs.Variable(o.name, dtype=o.dtype) for o in node.outputs]
        graph = gs.Graph([gs.Node(node.op, attrs=node.attrs, inputs=inputs, outputs=outs)],
                         outputs=outs, opset=opset)
        model = gs.export_onnx(graph)
        model.ir_version = 8
        return run_model(model, {})

    return run


@pytest.mark.corpus
@pytest.mark.skipif(not CORPUS.is_dir(), reason="../shared/corpus is absent")
def test_corpus_models_agree():
    """Every corpus model after lower-linear + lower-activations (other ops run in onnxruntime
    node by node) gives onnxruntime's outputs."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    models = sorted(CORPUS.glob("*.onnx"))
    assert models
    for path in models:
        model = onnx.load(str(path))
        inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
        lm = LoweringModel.from_proto(inferred)
        for name in ("lower-linear", "lower-activations"):
            get_pass(name)(lm)
        lm.graph.cleanup().toposort()
        assert any(is_affine(n) for n in lm.graph.nodes), path.name
        inits = {i.name for i in model.graph.initializer}
        rng = np.random.default_rng(0)
        feeds = {}
        for vi in model.graph.input:
            if vi.name not in inits:
                dims = [d.dim_value if d.dim_value > 0 else 2
                        for d in vi.type.tensor_type.shape.dim]
                feeds[vi.name] = rng.standard_normal(dims).astype(np.float32)
        expected = run_model(model, feeds)
        got = evaluate(lm.graph, feeds, fallback=_ort_node(lm.opset))
        for g, e in zip(got, expected):
            np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4 * np.abs(e).max(),
                                       err_msg=path.name)
