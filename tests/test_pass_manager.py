"""The pass framework: order, fixed points, records, verification, dumps, walking, registry."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_lower import graph as g
from onnx_lower import pass_manager as pm_module
from onnx_lower.errors import LoweringError, PassVerificationError
from onnx_lower.pass_manager import (
    GraphPass,
    LoweringModel,
    Options,
    Pass,
    PassManager,
    PassResult,
    get_pass,
    register_pass,
    registered_passes,
)

F = TensorProto.FLOAT


@pytest.fixture
def clean_registry():
    """Passes registered by a test disappear after it."""
    saved = dict(pm_module._REGISTRY)
    yield
    pm_module._REGISTRY.clear()
    pm_module._REGISTRY.update(saved)


def vi(name, shape, elem=F):
    return helper.make_tensor_value_info(name, elem, shape)


def chain_model(n_relu: int = 3) -> onnx.ModelProto:
    names = ["x"] + [f"r{i}" for i in range(n_relu - 1)] + ["y"]
    nodes = [helper.make_node("Relu", [a], [b], name=f"relu{i}")
             for i, (a, b) in enumerate(zip(names, names[1:]))]
    graph = helper.make_graph(nodes, "chain", [vi("x", ["N", 4])], [vi("y", ["N", 4])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def lowering(model: onnx.ModelProto | None = None, **options) -> LoweringModel:
    return LoweringModel.from_proto(model or chain_model(), Options(**options))


class Recorder(Pass):
    """Appends its label to ``model.notes['order']``; never modifies."""

    def __init__(self, label: str):
        self.name = label

    def run(self, model):
        model.note("order", self.name)
        return PassResult(False)


class Countdown(Pass):
    """Reports a change on its first ``n`` runs, then none."""

    name = "countdown"

    def __init__(self, n: int):
        self.left = n
        self.calls = 0

    def run(self, model):
        self.calls += 1
        if self.left > 0:
            self.left -= 1
            return PassResult(True)
        return PassResult(False)


class DropFirstRelu(Pass):
    """Bypasses the first Relu (a real change of one node)."""

    name = "drop-first-relu"

    def run(self, model):
        graph = model.graph
        relus = [n for n in graph.nodes if g.is_op(n, "Relu")]
        if len(relus) < 2:
            return PassResult(False)
        first = relus[0]
        x, y = first.inputs[0], first.outputs[0]
        for consumer in list(y.outputs):
            consumer.inputs[consumer.inputs.index(y)] = x
        g.detach(first)
        graph.nodes.remove(first)
        return PassResult(True)


class ConnectToGhost(Pass):
    """Broken on purpose: feeds the last Relu from a tensor nothing defines."""

    name = "connect-to-ghost"

    def run(self, model):
        model.graph.nodes[-1].inputs[0] = gs.Variable("ghost", np.float32, ["N", 4])
        return PassResult(True)


class TwoInputRelu(Pass):
    """Broken on purpose: gives a Relu a second input."""

    name = "two-input-relu"

    def run(self, model):
        node = model.graph.nodes[0]
        node.inputs.append(node.inputs[0])
        return PassResult(True)


# ------------------------------------------------------------------------------ ordering


def test_passes_run_in_the_given_order_and_records_follow():
    model = lowering()
    manager = PassManager([Recorder("a"), Recorder("b"), Recorder("c")])
    result = manager(model)
    assert result.modified is False
    assert model.notes["order"] == ["a", "b", "c"]
    assert [r.name for r in manager.records] == ["a", "b", "c"]


def test_passes_can_be_given_by_name(clean_registry):
    @register_pass("test-recorder-x")
    class RecorderX(Pass):
        """Records x."""

        def run(self, model):
            model.note("order", "x")
            return False  # a bare bool is accepted too

    model = lowering()
    manager = PassManager(["test-recorder-x", Recorder("y"), "test-recorder-x"])
    assert manager(model).modified is False
    assert model.notes["order"] == ["x", "y", "x"]
    assert RecorderX.description == "Records x."


def test_progress_callback_sees_every_pass():
    seen = []
    model = lowering(progress=seen.append)
    PassManager([Recorder("a"), Recorder("b")])(model)
    assert seen == ["a", "b"]


# ------------------------------------------------------------------------------ fixed point


def test_fixed_point_iterates_until_nothing_changes():
    countdown = Countdown(3)
    manager = PassManager([Recorder("r"), countdown], fixed_point=True)
    model = lowering()
    assert manager(model).modified is True
    # three changing rounds and one quiet round that proves the fixed point
    assert countdown.calls == 4
    assert [r.iteration for r in manager.records if r.name == "countdown"] == [0, 1, 2, 3]
    assert [r.modified for r in manager.records if r.name == "countdown"] == [
        True, True, True, False]
    assert model.notes["order"] == ["r"] * 4


def test_without_fixed_point_the_list_runs_once():
    countdown = Countdown(3)
    PassManager([countdown])(lowering())
    assert countdown.calls == 1


def test_fixed_point_stops_at_max_iterations():
    forever = Countdown(10**9)
    manager = PassManager([forever], fixed_point=True, max_iterations=5)
    assert manager(lowering()).modified is True
    assert forever.calls == 5 and len(manager.records) == 5


def test_nested_fixed_point_group_inside_a_pipeline():
    inner_countdown = Countdown(2)
    inner = PassManager([inner_countdown], fixed_point=True, name="group")
    outer = PassManager([Recorder("before"), inner, Recorder("after")])
    model = lowering()
    assert outer(model).modified is True
    assert inner_countdown.calls == 3
    assert [r.name for r in outer.records] == [
        "before", "countdown", "countdown", "countdown", "after"]
    assert model.notes["order"] == ["before", "after"]


# ------------------------------------------------------------------------------ records


def test_records_hold_time_and_node_delta():
    manager = PassManager([DropFirstRelu(), Recorder("r"), DropFirstRelu(), DropFirstRelu()])
    model = lowering(chain_model(3))
    manager(model)
    drop, rec, drop2, drop3 = manager.records
    assert (drop.nodes_before, drop.nodes_after, drop.node_delta, drop.modified) == (3, 2, -1, True)
    assert (rec.node_delta, rec.modified) == (0, False)
    assert (drop2.nodes_before, drop2.node_delta) == (2, -1)
    assert (drop3.nodes_before, drop3.node_delta, drop3.modified) == (1, 0, False)
    assert all(r.seconds >= 0 for r in manager.records)
    assert g.count_nodes(model.graph) == 1


# ------------------------------------------------------------------------------ verify_each


@pytest.mark.parametrize("broken", [ConnectToGhost, TwoInputRelu])
def test_verify_each_names_the_guilty_pass(broken):
    manager = PassManager([Recorder("fine"), DropFirstRelu(), broken(), Recorder("later")],
                          verify_each=True)
    model = lowering()
    with pytest.raises(PassVerificationError) as info:
        manager(model)
    assert info.value.pass_name == broken.name
    assert f"'{broken.name}'" in str(info.value)
    assert "\n" not in str(info.value)
    assert model.notes["order"] == ["fine"]  # nothing after the broken pass ran


def test_verify_each_from_the_options_and_inside_nested_groups():
    inner = PassManager([TwoInputRelu()], name="group")
    with pytest.raises(PassVerificationError, match="two-input-relu"):
        PassManager([Recorder("a"), inner])(lowering(verify_each=True))


def test_without_verify_each_a_broken_pass_goes_unnoticed():
    PassManager([TwoInputRelu()])(lowering())


# ------------------------------------------------------------------------------ dump_dir


def test_dump_dir_writes_one_model_per_pass_in_order(tmp_path):
    dump = tmp_path / "dumps"
    inner = PassManager([DropFirstRelu()], name="group")
    manager = PassManager([Recorder("first"), inner, Recorder("last/odd name")], dump_dir=dump)
    manager(lowering(chain_model(3)))
    files = sorted(p.name for p in dump.iterdir())
    assert files == ["001-first.onnx", "002-drop-first-relu.onnx", "003-last_odd_name.onnx"]
    counts = [len(onnx.load(str(dump / f)).graph.node) for f in files]
    assert counts == [3, 2, 2]
    for f in files:
        onnx.checker.check_model(onnx.load(str(dump / f)))


def test_dump_dir_from_the_options(tmp_path):
    PassManager([Recorder("only")])(lowering(dump_dir=str(tmp_path / "d")))
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["001-only.onnx"]


# ------------------------------------------------------------------------------ graph walking


class ConvCounter(GraphPass):
    """Counts and renames the Conv nodes of every graph it is given."""

    name = "conv-counter"

    def __init__(self):
        self.seen: list[str] = []

    def run_on_graph(self, graph, model):
        changed = False
        for node in graph.nodes:
            if g.is_op(node, "Conv"):
                self.seen.append(node.name)
                node.name = f"seen_{node.name}"
                changed = True
        return changed


def conv_node(x, y, name):
    return helper.make_node("Conv", [x, "w"], [y], name=name)


def test_graph_pass_visits_if_and_loop_bodies_at_any_depth():
    w = numpy_helper.from_array(np.ones((1, 1, 1, 1), np.float32), "w")
    then = helper.make_graph([conv_node("x", "t", "conv_then")], "then", [],
                             [vi("t", [1, 1, 2, 2])])
    other = helper.make_graph([conv_node("x", "e", "conv_else")], "else", [],
                              [vi("e", [1, 1, 2, 2])])
    # the loop body holds a Conv and, one level deeper, an If with another Conv
    inner_then = helper.make_graph([conv_node("s_in", "it", "conv_deep")], "inner_then", [],
                                   [vi("it", [1, 1, 2, 2])])
    inner_else = helper.make_graph([helper.make_node("Identity", ["s_in"], ["ie"])],
                                   "inner_else", [], [vi("ie", [1, 1, 2, 2])])
    body = helper.make_graph(
        [
            helper.make_node("If", ["c_in"], ["deep"], then_branch=inner_then,
                             else_branch=inner_else),
            conv_node("deep", "s_out", "conv_loop"),
            helper.make_node("Identity", ["c_in"], ["c_out"]),
        ],
        "body",
        [vi("i", [], TensorProto.INT64), vi("c_in", [], TensorProto.BOOL),
         vi("s_in", [1, 1, 2, 2])],
        [vi("c_out", [], TensorProto.BOOL), vi("s_out", [1, 1, 2, 2])],
    )
    nodes = [
        conv_node("x", "main", "conv_main"),
        helper.make_node("If", ["cond"], ["branch"], then_branch=then, else_branch=other),
        helper.make_node("Loop", ["trips", "cond", "branch"], ["looped"], body=body),
        helper.make_node("Add", ["main", "looped"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "main",
        [vi("x", [1, 1, 2, 2]), vi("cond", [], TensorProto.BOOL),
         vi("trips", [], TensorProto.INT64)],
        [vi("y", [1, 1, 2, 2])],
        initializer=[w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    counter = ConvCounter()
    lm = LoweringModel.from_proto(model)
    PassManager([counter], verify_each=True)(lm)
    assert sorted(counter.seen) == sorted(
        ["conv_main", "conv_then", "conv_else", "conv_loop", "conv_deep"])
    assert g.count_nodes(lm.graph) == 4 + 1 + 1 + 3 + 1 + 1
    out = lm.to_proto()
    names = []

    def walk(graph_proto):
        for n in graph_proto.node:
            names.append(n.name)
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g)

    walk(out.graph)
    assert {n for n in names if "conv" in n} == {
        "seen_conv_main", "seen_conv_then", "seen_conv_else", "seen_conv_loop", "seen_conv_deep"}


def test_graph_pass_visits_model_local_functions():
    fn = helper.make_function(
        "local", "ConvRelu", ["fx", "fw"], ["fy"],
        [helper.make_node("Conv", ["fx", "fw"], ["fc"], name="conv_in_function"),
         helper.make_node("Relu", ["fc"], ["fy"])],
        opset_imports=[helper.make_opsetid("", 17)],
    )
    nodes = [helper.make_node("ConvRelu", ["x", "w"], ["y"], domain="local", name="call")]
    graph = helper.make_graph(
        nodes, "main", [vi("x", [1, 1, 2, 2])], [vi("y", [1, 1, 2, 2])],
        initializer=[numpy_helper.from_array(np.ones((1, 1, 1, 1), np.float32), "w")],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
        functions=[fn],
    )
    onnx.checker.check_model(model)
    counter = ConvCounter()
    lm = LoweringModel.from_proto(model)
    assert PassManager([counter], verify_each=True)(lm).modified is True
    assert counter.seen == ["conv_in_function"]
    out = lm.to_proto()
    assert [n.name for n in out.functions[0].node] == ["seen_conv_in_function", ""]


# ------------------------------------------------------------------------------ hooks


def test_requires_and_ensures_hooks_can_refuse():
    class Picky(Pass):
        name = "picky"

        def requires(self, model):
            if g.count_nodes(model.graph) > 2:
                raise LoweringError("picky wants at most two nodes")

        def run(self, model):
            return PassResult(False)

    with pytest.raises(LoweringError, match="at most two"):
        PassManager([Picky()])(lowering(chain_model(3)))
    PassManager([Picky()])(lowering(chain_model(2)))


# ------------------------------------------------------------------------------ registry


def test_registering_a_name_twice_is_an_error(clean_registry):
    @register_pass("test-dup")
    class First(Pass):
        """First."""

    register_pass("test-dup")(First)  # the same class again is harmless
    with pytest.raises(ValueError, match="test-dup"):

        @register_pass("test-dup")
        class Second(Pass):
            """Second."""


def test_unknown_pass_lists_the_registered_names(clean_registry):
    @register_pass("test-known")
    class Known(Pass):
        """Known."""

    with pytest.raises(LoweringError) as info:
        get_pass("nope")
    message = str(info.value)
    assert "'nope'" in message and "test-known" in message
    for name in registered_passes():
        assert name in message
    with pytest.raises(LoweringError):
        PassManager(["test-known", "nope"])


def test_get_pass_returns_a_fresh_instance(clean_registry):
    @register_pass("test-fresh")
    class Fresh(Pass):
        """Fresh."""

    a, b = get_pass("test-fresh"), get_pass("test-fresh")
    assert isinstance(a, Fresh) and a is not b and a.name == "test-fresh"
    assert list(registered_passes()) == sorted(registered_passes())
