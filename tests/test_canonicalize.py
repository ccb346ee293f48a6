"""The canonicalisation passes, one by one on tiny models and together on the real corpus.

Numerics are checked against onnxruntime: a model runs before and after the passes on the same
seeded inputs.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_lower import graph as g
from onnx_lower.pass_manager import LoweringModel, PassManager, get_pass
from onnx_lower.passes.canonicalize import CANONICALIZE, FOLD_LIMIT_BYTES
from tests.oracles import CORPUS

F = TensorProto.FLOAT
I64 = TensorProto.INT64


# ---------------------------------------------------------------------------------- helpers


def make_model(nodes, inputs, outputs, inits=(), opset=13, ir_version=8, functions=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset)],
        ir_version=ir_version,
        functions=list(functions),
    )


def vi(name, shape, elem=F):
    return helper.make_tensor_value_info(name, elem, shape)


def init(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def random_feeds(sess: ort.InferenceSession, batch: int = 2, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    types = {"tensor(float)": np.float32, "tensor(double)": np.float64}
    feeds = {}
    for i in sess.get_inputs():
        shape = [d if isinstance(d, int) else batch for d in i.shape]
        feeds[i.name] = rng.standard_normal(shape).astype(types[i.type])
    return feeds


def assert_same_outputs(before: onnx.ModelProto, after: onnx.ModelProto, batch=2, rtol=1e-5):
    s1, s2 = session(before), session(after)
    feeds = random_feeds(s1, batch)
    for a, b, meta in zip(s1.run(None, feeds), s2.run(None, feeds), s1.get_outputs()):
        np.testing.assert_allclose(b, a, rtol=rtol, atol=1e-6, err_msg=meta.name)


def run(model: onnx.ModelProto, *names: str, **kwargs) -> tuple[LoweringModel, PassManager]:
    lm = LoweringModel.from_proto(model)
    pm = PassManager(list(names), **kwargs)
    pm(lm)
    return lm, pm


def modified(pm: PassManager) -> dict[str, bool]:
    return {r.name: r.modified for r in pm.records}


def io_signature(model: onnx.ModelProto) -> list[tuple]:
    """Name, element type and dims of every graph input (initializers excluded) and output."""
    inits = {t.name for t in model.graph.initializer}

    def dims(v):
        if not v.type.tensor_type.HasField("shape"):
            return None
        return [d.dim_param if d.HasField("dim_param") else d.dim_value
                for d in v.type.tensor_type.shape.dim]

    ins = [(v.name, v.type.tensor_type.elem_type, dims(v)) for v in model.graph.input
           if v.name not in inits]
    outs = [(v.name, v.type.tensor_type.elem_type, dims(v)) for v in model.graph.output]
    return ins + outs


def nodes_of(lm: LoweringModel, op: str) -> list[gs.Node]:
    return [n for n in lm.graph.nodes if g.is_op(n, op)]


def torch_flatten_model(batch="N", gather_dims=(0,), opset=13):
    """``x.view(x.size(0), -1)`` as PyTorch exports it, after a Relu, with a dynamic batch.

    With ``gather_dims=(0, 1, 2, 3)`` the target is ``[x.size(0), x.size(1)*x.size(2)*x.size(3)]``.
    Indices are Constant nodes, as the exporter writes them; before opset 13 Unsqueeze takes
    its axes as an attribute.
    """
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Shape", ["r"], ["s"])]
    inits = []

    def unsqueeze(src, dst):
        if opset >= 13:
            if not any(t.name == "axes0" for t in inits):
                inits.append(init("axes0", np.array([0], np.int64)))
            return helper.make_node("Unsqueeze", [src, "axes0"], [dst])
        return helper.make_node("Unsqueeze", [src], [dst], axes=[0])

    for d in gather_dims:
        value = numpy_helper.from_array(np.array(d, np.int64), f"i{d}")
        nodes.append(helper.make_node("Constant", [], [f"i{d}"], value=value))
        nodes.append(helper.make_node("Gather", ["s", f"i{d}"], [f"g{d}"], axis=0))
    parts = ["u0"]
    nodes.append(unsqueeze("g0", "u0"))
    if len(gather_dims) > 1:
        nodes += [
            helper.make_node("Mul", ["g1", "g2"], ["m12"]),
            helper.make_node("Mul", ["m12", "g3"], ["m123"]),
            unsqueeze("m123", "u1"),
        ]
        parts.append("u1")
    else:
        inits.append(init("minus1", np.array([-1], np.int64)))
        parts.append("minus1")
    nodes += [
        helper.make_node("Concat", parts, ["target"], axis=0),
        helper.make_node("Reshape", ["r", "target"], ["flat"]),
        helper.make_node("Relu", ["flat"], ["y"]),
    ]
    return make_model(nodes, [vi("x", [batch, 3, 4, 4])], [vi("y", [batch, 48])], inits,
                      opset=opset)


# ---------------------------------------------------------------------------------- registry


def test_canonicalize_preset_is_registered_in_order():
    assert CANONICALIZE == (
        "resolve-shapes", "fold-constants", "remove-identity", "explicit-pads", "dce",
        "toposort", "name-nodes",
    )
    for name in CANONICALIZE:
        p = get_pass(name)
        assert p.name == name and p.description and "\n" not in p.description


def test_every_pipeline_starts_with_the_preset():
    from onnx_lower.pipelines import PIPELINES

    for name, passes in PIPELINES.items():
        assert passes[: len(CANONICALIZE)] == CANONICALIZE, name


# ---------------------------------------------------------------------------- resolve-shapes


@pytest.mark.parametrize("opset", [9, 11, 13])
@pytest.mark.parametrize("gather_dims", [(0,), (0, 1, 2, 3)], ids=["view-minus1", "view-prod"])
def test_torch_reshape_chain_becomes_constant_with_symbolic_batch(gather_dims, opset):
    model = torch_flatten_model(gather_dims=gather_dims, opset=opset)
    lm, pm = run(model, "resolve-shapes", "fold-constants", "dce", verify_each=True)
    assert modified(pm) == {"resolve-shapes": True, "fold-constants": True, "dce": True}
    (reshape,) = nodes_of(lm, "Reshape")
    target = reshape.inputs[1]
    assert isinstance(target, gs.Constant)
    np.testing.assert_array_equal(target.values, [-1, 48])
    assert g.op_counts(lm.graph) == {"Relu": 2, "Reshape": 1}  # the Shape chain is gone
    assert reshape.outputs[0].shape == ["N", 48]
    out = lm.to_proto()
    assert io_signature(out) == io_signature(model)
    for batch in (1, 3):
        assert_same_outputs(model, out, batch=batch)


def test_static_batch_chain_folds_to_its_actual_value():
    model = torch_flatten_model(batch=2, gather_dims=(0, 1, 2, 3), opset=11)
    lm, _ = run(model, "resolve-shapes", "fold-constants", "dce", verify_each=True)
    (reshape,) = nodes_of(lm, "Reshape")
    np.testing.assert_array_equal(reshape.inputs[1].values, [2, 48])
    assert_same_outputs(model, lm.to_proto())


def test_partially_static_gathers_fold_without_reshape_rewrite():
    """Gather of static dims folds; the batch Gather stays until the Reshape rule applies."""
    model = torch_flatten_model(gather_dims=(0, 1, 2, 3))
    lm, _ = run(model, "resolve-shapes")
    fold = get_pass("fold-constants")
    # phase one only: evaluate what is constant without touching the Reshape
    graph = lm.graph
    assert fold._sweep(graph, 13, fold._fold_node)
    while fold._sweep(graph, 13, fold._fold_node):
        pass
    ops = g.op_counts(graph)
    assert "Mul" not in ops and ops["Gather"] == 1  # dims 1..3 are static, dim 0 is 'N'
    assert isinstance(next(n for n in graph.nodes if g.is_op(n, "Concat")).inputs[1], gs.Constant)


def test_resolve_shapes_keeps_declared_interface_and_fills_internal_shapes():
    # the output declares a batch symbol of its own, as tf2onnx does ('unk__0')
    nodes = [
        helper.make_node("Flatten", ["x"], ["f"], axis=1),
        helper.make_node("MatMul", ["f", "w"], ["m"]),
        helper.make_node("Relu", ["m"], ["y"]),
    ]
    model = make_model(
        nodes,
        [vi("x", ["unk__22", 2, 3])],
        [vi("y", ["unk__0", 5])],
        [init("w", np.ones((6, 5), np.float32))],
    )
    lm, pm = run(model, "resolve-shapes")
    assert modified(pm) == {"resolve-shapes": True}
    tensors = lm.graph.tensors()
    assert tensors["f"].shape[1:] == [6] and tensors["m"].shape[1:] == [5]
    assert tensors["x"].shape == ["unk__22", 2, 3]
    assert tensors["y"].shape == ["unk__0", 5]
    assert io_signature(lm.to_proto()) == io_signature(model)


def test_resolve_shapes_gives_an_undeclared_output_its_inferred_shape():
    nodes = [helper.make_node("Relu", ["x"], ["y"])]
    model = make_model(nodes, [vi("x", ["N", 4])], [vi("y", None)])
    lm, _ = run(model, "resolve-shapes")
    assert lm.graph.outputs[0].shape == ["N", 4]


def test_resolve_shapes_is_idempotent():
    model = torch_flatten_model()
    lm, pm = run(model, "resolve-shapes", "resolve-shapes")
    assert [r.modified for r in pm.records] == [True, False]
    first = lm.to_proto().SerializeToString()
    PassManager(["resolve-shapes"])(lm)
    assert lm.to_proto().SerializeToString() == first


def test_resolve_shapes_survives_unknown_custom_op_and_writes_no_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    nodes = [
        helper.make_node("Relu", ["x"], ["a"]),
        helper.make_node("Transpose", ["a"], ["b"], perm=[0, 2, 1]),
        helper.make_node("Mystery", ["b"], ["c"], domain="com.example"),
        helper.make_node("Relu", ["c"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "g", [vi("x", ["N", 2, 3])], [vi("y", None)])
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("com.example", 1)],
    )
    lm, pm = run(model, "resolve-shapes")
    assert modified(pm) == {"resolve-shapes": True}
    assert lm.graph.tensors()["b"].shape == ["N", 3, 2]  # what could be inferred is kept
    assert os.listdir(tmp_path) == []  # no sym_shape_infer_temp.onnx left behind


def test_resolve_shapes_carries_on_after_a_custom_op_with_a_declared_shape():
    w = numpy_helper.from_array(np.ones((2, 2, 3, 3), np.float32), "w")
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("MyOp", ["r"], ["m"], domain="com.example"),
        helper.make_node("Conv", ["m", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "g", [vi("x", [1, 2, 4, 4])], [vi("y", [1, 2, 4, 4])],
                              initializer=[w], value_info=[vi("m", [1, 2, 4, 4])])
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("com.example", 1)],
    )
    lm, _ = run(model, "resolve-shapes")
    tensors = lm.graph.tensors()
    assert tensors["r"].shape == [1, 2, 4, 4]
    assert tensors["m"].shape == [1, 2, 4, 4]
    assert tensors["c"].shape == [1, 2, 4, 4]  # inferred past the custom op


def test_resolve_shapes_skips_models_with_internal_nodes():
    nodes = [helper.make_node("Affine", ["x"], ["y"], domain=g.INTERNAL_DOMAIN)]
    graph = helper.make_graph(nodes, "g", [vi("x", ["N", 4])], [vi("y", None)])
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid(g.INTERNAL_DOMAIN, 1)],
    )
    lm, pm = run(model, "resolve-shapes")
    assert modified(pm) == {"resolve-shapes": False}


def test_resolve_shapes_leaves_weights_untouched():
    """Large weights are hidden from inference as typed inputs and restored afterwards."""
    w = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
    model = make_model(nodes, [vi("x", ["N", 64])], [vi("y", ["N", 32])], [init("w", w)])
    lm, _ = run(model, "resolve-shapes")
    assert [t.name for t in lm.graph.inputs] == ["x"]
    weight = lm.graph.nodes[0].inputs[1]
    assert isinstance(weight, gs.Constant)
    np.testing.assert_array_equal(weight.values, w)
    assert_same_outputs(model, lm.to_proto())


# ---------------------------------------------------------------------------- fold-constants


def test_shape_with_start_end_and_slice_of_shape_fold_around_symbolic_batch():
    nodes = [
        helper.make_node("Shape", ["x"], ["s"], start=1),
        helper.make_node("Shape", ["x"], ["full"]),
        helper.make_node("Slice", ["full", "b", "e"], ["sl"]),
        helper.make_node("Concat", ["s", "sl"], ["c"], axis=0),
        helper.make_node("Cast", ["c"], ["cf"], to=F),
        helper.make_node("ReduceSum", ["x", "axes"], ["rs"], keepdims=0),
        helper.make_node("Unsqueeze", ["rs", "one"], ["rs1"]),
        helper.make_node("Mul", ["rs1", "cf"], ["y"]),
    ]
    inits = [init("b", np.array([2], np.int64)), init("e", np.array([100], np.int64)),
             init("one", np.array([1], np.int64)), init("axes", np.array([1, 2, 3], np.int64))]
    model = make_model(nodes, [vi("x", ["N", 3, 4, 5])], [vi("y", ["N", 5])], inits,
                       opset=15)
    lm, pm = run(model, "resolve-shapes", "fold-constants", "dce", verify_each=True)
    mul = nodes_of(lm, "Mul")[0]
    assert isinstance(mul.inputs[1], gs.Constant)
    np.testing.assert_array_equal(mul.inputs[1].values, [3, 4, 5, 4, 5])
    assert not nodes_of(lm, "Shape") and not nodes_of(lm, "Slice")
    assert_same_outputs(model, lm.to_proto())


def test_shape_of_symbolic_batch_does_not_fold():
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Cast", ["s"], ["y"], to=F)]
    model = make_model(nodes, [vi("x", ["N", 3])], [vi("y", [2])])
    lm, pm = run(model, "resolve-shapes", "fold-constants")
    assert modified(pm)["fold-constants"] is False
    assert g.op_counts(lm.graph) == {"Cast": 1, "Shape": 1}


def test_constant_nodes_become_initializers_and_chains_fold():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    nodes = [
        helper.make_node("Constant", [], ["ca"], value=numpy_helper.from_array(a, "ca")),
        helper.make_node("Constant", [], ["two"], value_float=2.0),
        helper.make_node("Mul", ["ca", "two"], ["m"]),
        helper.make_node("Transpose", ["m"], ["t"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "t"], ["y"]),
    ]
    model = make_model(nodes, [vi("x", ["N", 3])], [vi("y", ["N", 2])])
    lm, pm = run(model, "fold-constants", "dce", verify_each=True)
    assert modified(pm) == {"fold-constants": True, "dce": False}
    assert g.op_counts(lm.graph) == {"MatMul": 1}
    weight = lm.graph.nodes[0].inputs[1]
    assert isinstance(weight, gs.Constant) and weight.name == "t"
    np.testing.assert_array_equal(weight.values, (a * 2).T)
    out = lm.to_proto()
    assert {t.name for t in out.graph.initializer} == {"t"}
    assert_same_outputs(model, out)
    _, again = run(out, "fold-constants")
    assert modified(again) == {"fold-constants": False}


def test_scalar_constants_keep_rank_zero():
    nodes = [
        helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(
            np.array(3, np.int64), "k")),
        helper.make_node("Unsqueeze", ["k", "axes"], ["u"]),
        helper.make_node("Concat", ["u", "rest"], ["shape"], axis=0),
        helper.make_node("Reshape", ["x", "shape"], ["y"]),
    ]
    inits = [init("axes", np.array([0], np.int64)), init("rest", np.array([-1], np.int64))]
    model = make_model(nodes, [vi("x", [3, 4])], [vi("y", [3, 4])], inits)
    lm, _ = run(model, "fold-constants", verify_each=True)
    np.testing.assert_array_equal(lm.graph.nodes[0].inputs[1].values, [3, -1])


@pytest.mark.parametrize("case", ["huge", "random", "custom-domain", "graph-output"])
def test_nodes_that_must_not_fold(case):
    opsets = [helper.make_opsetid("", 13)]
    if case == "huge":  # 68 MB of zeros stays a ConstantOfShape
        n = FOLD_LIMIT_BYTES // 4 + 1024
        nodes = [helper.make_node("ConstantOfShape", ["shape"], ["z"]),
                 helper.make_node("Add", ["x", "z"], ["y"])]
        inits, outs = [init("shape", np.array([n], np.int64))], [vi("y", [n])]
        ins = [vi("x", [1])]
        kept = "ConstantOfShape"
    elif case == "random":
        nodes = [helper.make_node("RandomNormalLike", ["c"], ["z"], seed=1.0),
                 helper.make_node("Add", ["x", "z"], ["y"])]
        inits, ins, outs = [init("c", np.zeros(3, np.float32))], [vi("x", [3])], [vi("y", [3])]
        kept = "RandomNormalLike"
    elif case == "custom-domain":
        nodes = [helper.make_node("Neg", ["c"], ["z"], domain="com.example"),
                 helper.make_node("Add", ["x", "z"], ["y"])]
        inits, ins, outs = [init("c", np.zeros(3, np.float32))], [vi("x", [3])], [vi("y", [3])]
        opsets.append(helper.make_opsetid("com.example", 1))
        kept = "com.example::Neg"
    else:
        nodes = [helper.make_node("Neg", ["c"], ["y"]), helper.make_node("Relu", ["x"], ["r"])]
        inits, ins = [init("c", np.ones(3, np.float32))], [vi("x", [3])]
        outs = [vi("r", [3]), vi("y", [3])]
        kept = "Neg"
    graph = helper.make_graph(nodes, "g", ins, outs, initializer=inits)
    model = helper.make_model(graph, opset_imports=opsets)
    lm, pm = run(model, "fold-constants")
    assert modified(pm) == {"fold-constants": False}
    assert kept in g.op_counts(lm.graph)


def test_folding_reaches_into_subgraphs():
    then = helper.make_graph(
        [helper.make_node("Neg", ["c"], ["nc"]), helper.make_node("Add", ["x", "nc"], ["t"])],
        "then", [], [vi("t", [3])],
    )
    other = helper.make_graph([helper.make_node("Relu", ["x"], ["e"])], "else", [],
                              [vi("e", [3])])
    nodes = [helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other)]
    model = make_model(nodes, [vi("x", [3]), vi("cond", [], TensorProto.BOOL)], [vi("y", [3])],
                       [init("c", np.arange(3, dtype=np.float32))])
    lm, pm = run(model, "fold-constants", verify_each=True)
    assert modified(pm) == {"fold-constants": True}
    assert g.op_counts(lm.graph) == {"Add": 1, "If": 1, "Relu": 1}
    out = lm.to_proto()
    x = np.ones(3, np.float32)
    for cond in (True, False):
        feeds = {"x": x, "cond": np.array(cond)}
        np.testing.assert_allclose(session(out).run(None, feeds)[0],
                                   session(model).run(None, feeds)[0])


# --------------------------------------------------------------------------- remove-identity


def test_identity_dropout_and_same_type_cast_are_removed():
    nodes = [
        helper.make_node("Identity", ["x"], ["a"]),
        helper.make_node("Relu", ["a"], ["b"]),
        helper.make_node("Dropout", ["b"], ["c"]),
        helper.make_node("Cast", ["c"], ["d"], to=F),
        helper.make_node("Cast", ["d"], ["e"], to=TensorProto.DOUBLE),
        helper.make_node("Identity", ["e"], ["f"]),
        helper.make_node("Neg", ["f"], ["y"]),
    ]
    model = make_model(nodes, [vi("x", ["N", 3])], [vi("y", ["N", 3], TensorProto.DOUBLE)])
    lm, pm = run(model, "resolve-shapes", "remove-identity", verify_each=True)  # Cast needs types
    assert modified(pm) == {"resolve-shapes": True, "remove-identity": True}
    assert g.op_counts(lm.graph) == {"Cast": 1, "Neg": 1, "Relu": 1}
    assert lm.graph.nodes[0].inputs[0] is lm.graph.inputs[0]
    assert_same_outputs(model, lm.to_proto())
    _, again = run(lm.to_proto(), "remove-identity")
    assert modified(again) == {"remove-identity": False}


@pytest.mark.parametrize("op", ["Identity", "Dropout"])
def test_removed_node_feeding_a_graph_output_keeps_the_output_name(op):
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node(op, ["r"], ["out"]),
        helper.make_node("Identity", ["out"], ["out2"]),
    ]
    model = make_model(nodes, [vi("x", ["N", 3])], [vi("out", ["N", 3]), vi("out2", ["N", 3])])
    lm, pm = run(model, "remove-identity", verify_each=True)
    assert modified(pm) == {"remove-identity": True}
    # the first node goes ('r' takes the name 'out'); the second stays, since 'out' is itself
    # a graph output and cannot also be called 'out2'
    assert g.op_counts(lm.graph) == {"Identity": 1, "Relu": 1}
    out = lm.to_proto()
    assert [o.name for o in out.graph.output] == ["out", "out2"]
    assert io_signature(out) == io_signature(model)
    assert_same_outputs(model, out)


def test_identity_from_input_to_output_stays():
    nodes = [helper.make_node("Identity", ["x"], ["y"])]
    model = make_model(nodes, [vi("x", [3])], [vi("y", [3])])
    lm, pm = run(model, "remove-identity")
    assert modified(pm) == {"remove-identity": False}
    assert g.op_counts(lm.graph) == {"Identity": 1}


def test_dropout_in_training_mode_stays():
    nodes = [
        helper.make_node("Dropout", ["x", "ratio", "train"], ["z", "mask"]),
        helper.make_node("Dropout", ["x", "ratio", "flag"], ["w"]),  # not a constant
        helper.make_node("Add", ["z", "w"], ["y"]),
    ]
    inits = [init("ratio", np.array(0.5, np.float32)), init("train", np.array(True))]
    model = make_model(nodes, [vi("x", [3]), vi("flag", [], TensorProto.BOOL)], [vi("y", [3]),
                       vi("mask", [3], TensorProto.BOOL)], inits)
    lm, pm = run(model, "remove-identity")
    assert modified(pm) == {"remove-identity": False}
    assert g.op_counts(lm.graph)["Dropout"] == 2


@pytest.mark.parametrize("opset", [12, 13, 22])
def test_inference_dropout_with_a_used_mask_gives_a_constant_mask(opset):
    """The mask of an inference Dropout is all true: a bool initializer of ones, here read by a
    Cast and a graph output."""
    nodes = [
        helper.make_node("Dropout", ["x"], ["a", "mask"]),
        helper.make_node("Cast", ["mask"], ["mf"], to=F),
        helper.make_node("Add", ["a", "mf"], ["y"]),
    ]
    model = make_model(nodes, [vi("x", [2, 3])],
                       [vi("y", [2, 3]), vi("mask", [2, 3], TensorProto.BOOL)], opset=opset)
    lm, pm = run(model, "resolve-shapes", "remove-identity", verify_each=True)
    assert g.op_counts(lm.graph) == {"Add": 1, "Cast": 1}
    out = lm.to_proto()
    assert [t.name for t in out.graph.initializer] == ["mask"]
    assert io_signature(out) == io_signature(model)
    assert_same_outputs(model, out)


@pytest.mark.parametrize("opset", [7, 10])
def test_dropout_mask_before_opset_12_stays(opset):
    """onnxruntime's mask is all false there, the ONNX reference's all true: left alone."""
    mask_type = TensorProto.BOOL if opset >= 10 else F
    nodes = [helper.make_node("Dropout", ["x"], ["y", "mask"])]
    model = make_model(nodes, [vi("x", [2, 3])], [vi("y", [2, 3]), vi("mask", [2, 3], mask_type)],
                       opset=opset)
    lm, pm = run(model, "resolve-shapes", "remove-identity")
    assert g.op_counts(lm.graph) == {"Dropout": 1}


def test_dropout_with_unused_mask_and_constant_false_training_mode_goes():
    nodes = [
        helper.make_node("Dropout", ["x", "ratio", "train"], ["a", "mask"]),
        helper.make_node("Relu", ["a"], ["y"]),
    ]
    inits = [init("ratio", np.array(0.5, np.float32)), init("train", np.array(False))]
    model = make_model(nodes, [vi("x", [3])], [vi("y", [3])], inits)
    lm, pm = run(model, "remove-identity", "dce", verify_each=True)
    assert g.op_counts(lm.graph) == {"Relu": 1}
    assert_same_outputs(model, lm.to_proto())


def test_identity_inside_if_branches_is_removed():
    then = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["t0"]), helper.make_node("Identity", ["t0"], ["t"])],
        "then", [], [vi("t", [3])],
    )
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [],
                              [vi("e", [3])])
    nodes = [helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other)]
    model = make_model(nodes, [vi("x", [3]), vi("cond", [], TensorProto.BOOL)], [vi("y", [3])])
    lm, pm = run(model, "remove-identity", verify_each=True)
    assert modified(pm) == {"remove-identity": True}
    # the else branch returns an outer-scope value through its Identity: that one stays
    assert g.op_counts(lm.graph) == {"Identity": 1, "If": 1, "Relu": 1}
    out = lm.to_proto()
    x = np.array([-1, 0, 2], np.float32)
    for cond in (True, False):
        feeds = {"x": x, "cond": np.array(cond)}
        np.testing.assert_array_equal(session(out).run(None, feeds)[0],
                                      session(model).run(None, feeds)[0])


# ----------------------------------------------------------------------------- explicit-pads


def window_model(op, auto_pad, in_hw, kernel, strides, dilations=None, opset=19, **extra):
    attrs = {"auto_pad": auto_pad, "strides": strides, **extra}
    if dilations is not None:
        attrs["dilations"] = dilations
    inits = []
    inputs = ["x"]
    if op == "Conv":
        w = np.random.default_rng(1).standard_normal((4, 2, *kernel)).astype(np.float32)
        inits.append(init("w", w))
        inputs.append("w")
    else:
        attrs["kernel_shape"] = kernel
    nodes = [helper.make_node(op, inputs, ["y"], **attrs)]
    y = vi("y", ["N", 4 if op == "Conv" else 2, "h", "w"])
    return make_model(nodes, [vi("x", ["N", 2, *in_hw])], [y], inits, opset=opset)


WINDOW_CASES = [
    # op, in_hw, kernel, strides, dilations, extra attributes
    ("Conv", (7, 6), [3, 2], [2, 1], None, {}),
    ("Conv", (5, 9), [4, 3], [3, 2], None, {}),
    ("MaxPool", (7, 8), [3, 2], [2, 3], None, {}),
    ("MaxPool", (6, 5), [2, 2], [2, 2], None, {}),
    ("AveragePool", (7, 6), [3, 3], [2, 2], None, {"count_include_pad": 0}),
    ("AveragePool", (7, 6), [3, 2], [2, 1], None, {"count_include_pad": 1}),
    ("LpPool", (6, 7), [2, 3], [2, 2], None, {"p": 2}),
]


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER", "VALID"])
@pytest.mark.parametrize("op,in_hw,kernel,strides,dilations,extra", WINDOW_CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(WINDOW_CASES)])
def test_auto_pad_becomes_explicit_pads_with_ort_numerics(
    op, in_hw, kernel, strides, dilations, extra, auto_pad
):
    model = window_model(op, auto_pad, in_hw, kernel, strides, dilations, **extra)
    lm, pm = run(model, "explicit-pads", verify_each=True)
    assert modified(pm) == {"explicit-pads": True}
    node = lm.graph.nodes[0]
    assert g.attr(node, "auto_pad") == "NOTSET"
    assert len(node.attrs["pads"]) == 4 and node.attrs["strides"] == strides
    assert node.attrs["dilations"] == (dilations or [1, 1])
    if auto_pad == "VALID":
        assert node.attrs["pads"] == [0, 0, 0, 0]
    out = lm.to_proto()
    for batch in (1, 2):
        assert_same_outputs(model, out, batch=batch)
    _, again = run(out, "explicit-pads")
    assert modified(again) == {"explicit-pads": False}


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER", "VALID"])
def test_dilated_conv_follows_the_spec(auto_pad):
    """onnxruntime refuses dilated SAME convs; onnx.reference implements the spec."""
    from onnx.reference import ReferenceEvaluator

    model = window_model("Conv", auto_pad, (7, 8), [3, 2], [2, 3], [2, 1])
    lm, _ = run(model, "explicit-pads", verify_each=True)
    assert g.attr(lm.graph.nodes[0], "auto_pad") == "NOTSET"
    x = np.random.default_rng(2).standard_normal((1, 2, 7, 8)).astype(np.float32)
    expected = ReferenceEvaluator(model).run(None, {"x": x})[0]
    assert expected.shape[2:] == ((4, 3) if auto_pad != "VALID" else (2, 3))
    np.testing.assert_allclose(session(lm.to_proto()).run(None, {"x": x})[0], expected,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER", "VALID"])
def test_dilated_same_pools_are_left_alone(auto_pad):
    model = window_model("MaxPool", auto_pad, (7, 8), [3, 2], [2, 3], [2, 1])
    lm, _ = run(model, "explicit-pads", verify_each=True)
    kept = g.attr(lm.graph.nodes[0], "auto_pad")
    assert kept == ("NOTSET" if auto_pad == "VALID" else auto_pad)
    assert_same_outputs(model, lm.to_proto())


def test_same_upper_and_lower_put_the_odd_pad_at_opposite_ends():
    pads = {}
    for auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        lm, _ = run(window_model("MaxPool", auto_pad, (6, 6), [2, 2], [1, 1]), "explicit-pads")
        pads[auto_pad] = lm.graph.nodes[0].attrs["pads"]
    assert pads == {"SAME_UPPER": [0, 0, 1, 1], "SAME_LOWER": [1, 1, 0, 0]}


def test_defaults_are_spelled_out_only_where_the_opset_has_them():
    # AveragePool has no dilations before opset 19; MaxPool has them from opset 10
    nodes = [
        helper.make_node("AveragePool", ["x"], ["a"], kernel_shape=[2, 2]),
        helper.make_node("MaxPool", ["a"], ["b"], kernel_shape=[2, 2]),
        helper.make_node("Conv", ["b", "w"], ["y"]),
    ]
    w = np.ones((1, 2, 1, 1), np.float32)
    model = make_model(nodes, [vi("x", [1, 2, 8, 8])], [vi("y", [1, 1, 6, 6])], [init("w", w)],
                       opset=11)
    lm, pm = run(model, "explicit-pads", verify_each=True)
    assert modified(pm) == {"explicit-pads": True}
    avg, mx, conv = lm.graph.nodes
    assert avg.attrs == {"kernel_shape": [2, 2], "pads": [0, 0, 0, 0], "strides": [1, 1]}
    assert mx.attrs["dilations"] == [1, 1] and mx.attrs["pads"] == [0, 0, 0, 0]
    assert conv.attrs == {"pads": [0, 0, 0, 0], "strides": [1, 1], "dilations": [1, 1],
                          "kernel_shape": [1, 1]}
    assert_same_outputs(model, lm.to_proto())


def test_same_pads_need_a_static_spatial_shape_and_conv_transpose_is_left_alone():
    nodes = [
        helper.make_node("MaxPool", ["x"], ["a"], kernel_shape=[2, 2], auto_pad="SAME_UPPER"),
        helper.make_node("ConvTranspose", ["a", "w"], ["y"], auto_pad="SAME_UPPER",
                         strides=[2, 2]),
    ]
    w = np.ones((2, 1, 3, 3), np.float32)
    model = make_model(nodes, [vi("x", ["N", 2, "H", "W"])], [vi("y", ["N", 1, "H2", "W2"])],
                       [init("w", w)])
    lm, pm = run(model, "explicit-pads")
    assert modified(pm) == {"explicit-pads": False}
    assert g.attr(lm.graph.nodes[0], "auto_pad") == "SAME_UPPER"
    assert g.attr(lm.graph.nodes[1], "auto_pad") == "SAME_UPPER"
    assert "pads" not in lm.graph.nodes[1].attrs


def test_same_with_ceil_mode_is_left_to_the_runtime():
    model = window_model("MaxPool", "SAME_UPPER", (8, 8), [1, 1], [3, 3], ceil_mode=1)
    lm, pm = run(model, "explicit-pads")
    assert g.attr(lm.graph.nodes[0], "auto_pad") == "SAME_UPPER"


# ------------------------------------------------------------------------ dce and toposort


def test_dce_drops_dead_nodes_and_initializers_but_keeps_inputs_and_outputs():
    nodes = [
        helper.make_node("Relu", ["x"], ["y"]),
        helper.make_node("MatMul", ["x", "w"], ["dead"]),
        helper.make_node("Neg", ["dead"], ["dead2"]),
    ]
    model = make_model(
        nodes, [vi("x", [1, 3]), vi("unused", [2])], [vi("y", [1, 3])],
        [init("w", np.ones((3, 3), np.float32)), init("spare", np.ones(2, np.float32))],
    )
    lm, pm = run(model, "dce", "dce")
    assert [r.modified for r in pm.records] == [True, False]
    out = lm.to_proto()
    assert [n.op_type for n in out.graph.node] == ["Relu"]
    assert [i.name for i in out.graph.input] == ["x", "unused"]
    assert not out.graph.initializer
    assert [o.name for o in out.graph.output] == ["y"]


def test_toposort_orders_nodes_and_reports_change_only_once():
    nodes = [
        helper.make_node("Neg", ["b"], ["y"]),
        helper.make_node("Relu", ["a"], ["b"]),
        helper.make_node("Abs", ["x"], ["a"]),
    ]
    model = make_model(nodes, [vi("x", [3])], [vi("y", [3])])
    lm = LoweringModel.from_proto(model)
    pm = PassManager(["toposort", "toposort"])
    pm(lm)
    assert [r.modified for r in pm.records] == [True, False]
    assert [n.op for n in lm.graph.nodes] == ["Abs", "Relu", "Neg"]
    onnx.checker.check_model(lm.to_proto())


# ------------------------------------------------------------------------------- name-nodes


def unnamed_model():
    nodes = [
        helper.make_node("Relu", ["x"], ["a"]),
        helper.make_node("Relu", ["a"], ["b"], name="Relu_0"),
        helper.make_node("Neg", ["b"], ["c"], name="dup"),
        helper.make_node("Neg", ["c"], ["d"], name="dup"),
        helper.make_node("Relu", ["d"], ["y"]),
    ]
    return make_model(nodes, [vi("x", [3])], [vi("y", [3])])


def test_name_nodes_names_unnamed_and_duplicate_nodes():
    lm, pm = run(unnamed_model(), "name-nodes", "name-nodes")
    assert [r.modified for r in pm.records] == [True, False]
    assert [n.name for n in lm.graph.nodes] == ["Relu_1", "Relu_0", "dup", "Neg_0", "Relu_2"]


def test_canonical_output_is_byte_identical_across_runs():
    blobs = set()
    for _ in range(3):
        lm, _ = run(torch_flatten_model(gather_dims=(0, 1, 2, 3)), *CANONICALIZE)
        blobs.add(lm.to_proto().SerializeToString())
        lm, _ = run(unnamed_model(), *CANONICALIZE)
        blobs.add(lm.to_proto().SerializeToString())
    assert len(blobs) == 2


def test_name_nodes_names_unnamed_constants():
    graph = gs.Graph(opset=13)
    x = gs.Variable("x", np.float32, [3])
    c = gs.Constant("", np.ones(3, np.float32))
    y = gs.Variable("y", np.float32, [3])
    graph.nodes.append(gs.Node("Add", inputs=[x, c], outputs=[y]))
    graph.inputs, graph.outputs = [x], [y]
    lm = LoweringModel(graph, make_model([], [], []))
    PassManager(["name-nodes"], verify_each=True)(lm)
    assert lm.graph.nodes[0].name == "Add_0"
    assert c.name == "const"


# ----------------------------------------------------------------------------------- corpus


def corpus_models():
    if not CORPUS.is_dir():
        return [pytest.param(None, marks=pytest.mark.skip(
            reason=f"the real-model corpus is not at {CORPUS}"))]
    return [pytest.param(p, id=p.stem) for p in sorted(CORPUS.glob("*.onnx"))]


@pytest.mark.corpus
@pytest.mark.parametrize("path", corpus_models())
def test_canonicalize_keeps_corpus_models_equivalent(path):
    model = onnx.load(str(path))
    lm, pm = run(model, *CANONICALIZE, verify_each=True)
    out = lm.to_proto()
    onnx.checker.check_model(out)
    assert io_signature(out) == io_signature(model)
    s1, s2 = session(model), session(out)
    assert [(i.name, i.shape) for i in s2.get_inputs()] == [
        (i.name, i.shape) for i in s1.get_inputs()]
    assert [(o.name, o.shape) for o in s2.get_outputs()] == [
        (o.name, o.shape) for o in s1.get_outputs()]
    batches = (1, 3) if any(not isinstance(d, int) for d in s1.get_inputs()[0].shape) else (1,)
    for batch in batches:
        assert_same_outputs(model, out, batch=batch)
    # canonical form: no Identity/Dropout/Constant node, explicit pads, all names unique
    ops = g.op_counts(lm.graph)
    assert not {"Identity", "Dropout", "Constant"} & set(ops)
    for gr in g.all_graphs(lm.graph):
        for n in gr.nodes:
            if g.is_op(n, "Conv", "MaxPool", "AveragePool"):
                assert g.attr(n, "auto_pad", "NOTSET") == "NOTSET" and "pads" in n.attrs
    names = [n.name for gr in g.all_graphs(lm.graph) for n in gr.nodes]
    assert all(names) and len(set(names)) == len(names)
    # a second round changes nothing
    again = PassManager(list(CANONICALIZE))
    again(lm)
    assert not [r.name for r in again.records if r.modified]
