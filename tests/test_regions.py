"""``--form auto`` per region: cutting at kept ops, extraction, stitching, budget, report.

Every lowered model is compared with onnxruntime on the original at two batch sizes.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto
from onnx import helper as h
from onnx import numpy_helper as nh

from onnx_lower import lower, plan
from onnx_lower.errors import LoweringError
from onnx_lower.regions import Region, extract_region, find_regions, splittable, stitch
from tests.oracles import CORPUS

from .oracles import run_model

RNG = np.random.default_rng(7)


def _w(name: str, *shape: int, rng: np.random.Generator = RNG) -> onnx.TensorProto:
    return nh.from_array((rng.standard_normal(shape) * 0.2).astype(np.float32), name)


def _model(nodes, inits, x_shape, y_shape, *, extra_outputs=None) -> onnx.ModelProto:
    graph = h.make_graph(
        nodes,
        "regions",
        [h.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [h.make_tensor_value_info("y", TensorProto.FLOAT, y_shape),
         *(h.make_tensor_value_info(n, TensorProto.FLOAT, shape)
           for n, shape in (extra_outputs or {}).items())],
        inits,
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def gated_cnn(size: int = 48) -> onnx.ModelProto:
    """Conv → Relu → Conv → MaxPool (too large for mlp) | Sigmoid | Gemm → Relu → Gemm (small)."""
    pooled = size // 4
    nodes = [
        h.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        h.make_node("Relu", ["c1"], ["r1"]),
        h.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
        h.make_node("MaxPool", ["c2"], ["p2"], kernel_shape=[4, 4], strides=[4, 4]),
        h.make_node("Sigmoid", ["p2"], ["s2"]),
        h.make_node("Flatten", ["s2"], ["f"]),
        h.make_node("Gemm", ["f", "wf", "bf"], ["g1"], transB=1),
        h.make_node("Relu", ["g1"], ["r3"]),
        h.make_node("Gemm", ["r3", "wg", "bg"], ["y"], transB=1),
    ]
    inits = [_w("w1", 16, 3, 3, 3), _w("b1", 16), _w("w2", 16, 16, 3, 3), _w("b2", 16),
             _w("wf", 32, 16 * pooled * pooled), _w("bf", 32), _w("wg", 10, 32), _w("bg", 10)]
    return _model(nodes, inits, ["N", 3, size, size], ["N", 10])


def two_small_stacks() -> onnx.ModelProto:
    """Gemm → Relu → Gemm | Tanh | Gemm → Relu → Gemm, a Constant read by both stacks."""
    nodes = [
        h.make_node("Constant", [], ["shift"], value=nh.from_array(np.full(16, 0.5, np.float32))),
        h.make_node("Gemm", ["x", "w1", "b1"], ["a1"], transB=1),
        h.make_node("Add", ["a1", "shift"], ["a2"]),
        h.make_node("Relu", ["a2"], ["a3"]),
        h.make_node("Gemm", ["a3", "w2", "b2"], ["a4"], transB=1),
        h.make_node("Tanh", ["a4"], ["t"]),
        h.make_node("Gemm", ["t", "w3", "b3"], ["a5"], transB=1),
        h.make_node("Add", ["a5", "shift"], ["a6"]),
        h.make_node("Relu", ["a6"], ["a7"]),
        h.make_node("Gemm", ["a7", "w4", "b4"], ["y"], transB=1),
    ]
    inits = [_w("w1", 16, 8), _w("b1", 16), _w("w2", 12, 16), _w("b2", 12),
             _w("w3", 16, 12), _w("b3", 16), _w("w4", 4, 16), _w("b4", 4)]
    return _model(nodes, inits, ["N", 8], ["N", 4], extra_outputs={"t": ["N", 12]})


def check_against_ort(original: onnx.ModelProto, lowered: onnx.ModelProto) -> None:
    dims = [d.dim_value for d in original.graph.input[0].type.tensor_type.shape.dim[1:]]
    for batch in (1, 3):
        x = RNG.standard_normal((batch, *dims)).astype(np.float32)
        want = run_model(original, {"x": x})
        got = run_model(lowered, {"x": x})
        assert len(got) == len(want)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def ops(model: onnx.ModelProto) -> set[str]:
    return {n.op_type for n in model.graph.node}


def tanh_cnn_then_gate() -> onnx.ModelProto:
    """Conv | Tanh | Conv → MaxPool | Sigmoid | Gemm: two big regions, then a small one."""
    nodes = [
        h.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        h.make_node("Tanh", ["c1"], ["t1"]),
        h.make_node("Conv", ["t1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
        h.make_node("MaxPool", ["c2"], ["p2"], kernel_shape=[2, 2], strides=[2, 2]),
        h.make_node("Sigmoid", ["p2"], ["s2"]),
        h.make_node("Flatten", ["s2"], ["f"]),
        h.make_node("Gemm", ["f", "wf", "bf"], ["y"], transB=1),
    ]
    inits = [_w("w1", 8, 3, 3, 3), _w("b1", 8), _w("w2", 8, 8, 3, 3), _w("b2", 8),
             _w("wf", 10, 8 * 16 * 16), _w("bf", 10)]
    return _model(nodes, inits, ["N", 3, 32, 32], ["N", 10])


def test_a_cnn_is_one_region():
    model = onnx.load("models/lenet_maxpool.onnx")
    regions = find_regions(model)
    assert len(regions) == 1
    assert len(regions[0].nodes) == len(model.graph.node)


def test_kept_ops_cut_regions_with_their_boundaries():
    regions = find_regions(gated_cnn())
    assert [(r.inputs, r.outputs) for r in regions] == [(["x"], ["p2"]), (["s2"], ["y"])]
    assert [len(r.nodes) for r in regions] == [4, 4]


def test_constant_nodes_join_no_region_and_are_copied_into_each():
    model = two_small_stacks()
    regions = find_regions(model)
    assert [(r.inputs, r.outputs) for r in regions] == [(["x"], ["a4"]), (["t"], ["y"])]
    sub = extract_region(model, regions[1])
    assert [n.op_type for n in sub.graph.node][0] == "Constant"
    onnx.checker.check_model(sub)


def test_mixed_forms_stitch_and_match(tmp_path):
    model = gated_cnn()
    lowered, report = lower(model, form="auto")
    assert report.form_used == "mixed"
    assert [(r.name, r.form) for r in report.regions] == [("region0", "im2col"),
                                                          ("region1", "mlp")]
    assert "mlp not possible" in report.regions[0].reason
    assert "fit the budget left" in report.regions[1].reason
    assert not ops(lowered) & {"Conv", "MaxPool", "Gemm"}
    assert "Sigmoid" in ops(lowered)
    # every name a region made for itself carries its prefix; boundary names are the originals
    made = {o for n in lowered.graph.node if n.op_type != "Sigmoid" for o in n.output}
    assert all(o.startswith(("region0/", "region1/")) or o in {"p2", "y"} for o in made)
    check_against_ort(model, lowered)
    as_dict = report.to_dict()["regions"]
    assert [r["form"] for r in as_dict] == ["im2col", "mlp"]
    assert all(r["weight_bytes"] > 0 for r in as_dict)


def test_all_mlp_regions_lower_as_one_graph_with_kept_ops_on_flat_vectors():
    model = two_small_stacks()
    lowered, report = lower(model, form="auto")
    assert report.form_used == "mlp" and "lowered as one graph" in report.form_reason
    assert [r.form for r in report.regions] == ["mlp", "mlp"]
    assert all(r.weight_bytes is None for r in report.regions)
    assert not any(n.name.startswith("region") for n in lowered.graph.node)
    whole, _ = lower(model, form="mlp")
    assert [n.op_type for n in lowered.graph.node] == [n.op_type for n in whole.graph.node]
    check_against_ort(model, lowered)


def test_budget_is_shared_in_graph_order():
    model = two_small_stacks()
    first = plan(model).regions[0].mlp_bytes
    # a budget the first region fills leaves the second one to im2col
    lowered, report = lower(model, form="auto", max_weight_mb=(first + 64) / 2**20)
    assert [r.form for r in report.regions] == ["mlp", "im2col"]
    assert report.form_used == "mixed"
    assert "over the budget" in report.regions[1].reason
    assert report.regions[0].weight_bytes >= first
    check_against_ort(model, lowered)


def test_all_im2col_regions_lower_as_one_graph():
    model = gated_cnn()
    lowered, report = lower(model, form="auto", max_weight_mb=0.001)
    assert report.form_used == "im2col"
    assert [r.form for r in report.regions] == ["im2col", "im2col"]
    assert "lowered as one graph" in report.form_reason
    assert all(r.weight_bytes is None for r in report.regions)
    assert not any(n.name.startswith("region") for n in lowered.graph.node)
    check_against_ort(model, lowered)


def test_plan_per_region_matches_the_lowering():
    p = plan(gated_cnn())
    assert p.form == "mixed"
    assert [(r.region, r.form) for r in p.regions] == [("region0", "im2col"), ("region1", "mlp")]
    assert p.mlp_bytes == p.regions[1].mlp_bytes
    whole = plan(gated_cnn(), per_region=False)
    assert whole.regions == [] and whole.form == "im2col"
    assert any("region1" in line for line in p.summary_lines())


def test_control_flow_is_one_region():
    then = h.make_graph([h.make_node("Relu", ["x"], ["r"])], "then", [],
                        [h.make_tensor_value_info("r", TensorProto.FLOAT, None)])
    nodes = [
        h.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
        h.make_node("Greater", ["s", "zero"], ["c"]),
        h.make_node("If", ["c"], ["y"], then_branch=then, else_branch=then),
    ]
    model = _model(nodes, [nh.from_array(np.float32(0), "zero")], [2], [2])
    assert "has a subgraph" in splittable(model)
    assert len(find_regions(model)) == 1


def test_untyped_boundary_is_refused():
    model = gated_cnn()
    regions = find_regions(model)  # the original has no value_info for p2 / s2
    with pytest.raises(LoweringError, match="without a known type"):
        extract_region(model, regions[1])


def test_stitch_reports_a_dangling_read():
    model = two_small_stacks()
    regions = find_regions(model)
    broken = Region(regions[0].name, regions[0].nodes, regions[0].inputs, [])
    sub = onnx.ModelProto()
    sub.CopyFrom(model)
    del sub.graph.node[:]
    with pytest.raises(LoweringError, match="unknown tensors"):
        stitch(model, [broken], [sub])


def test_corpus_lenet5_five_tanh_separated_regions_all_mlp():
    path = CORPUS / "debjyoti0891__lenet5.onnx"
    if not path.is_file():
        pytest.skip(f"{path} is absent (the shared corpus is read, not copied)")
    lowered, report = lower(str(path), form="auto")
    assert len(report.regions) == 5 and report.form_used == "mlp"
    whole, _ = lower(str(path), form="mlp")
    assert [n.op_type for n in lowered.graph.node] == [n.op_type for n in whole.graph.node]


def test_regions_of_one_form_join_through_kept_ops():
    """The two conv regions both need im2col: they are lowered as one part with the Tanh
    inside (one region entry, one exit), and only the change to mlp at the Sigmoid cuts."""
    model = tanh_cnn_then_gate()
    lowered, report = lower(model, form="auto", max_weight_mb=1)
    assert [r.form for r in report.regions] == ["im2col", "im2col", "mlp"]
    assert report.form_used == "mixed"
    assert "region0+region1 im2col, region2 mlp" in report.form_reason
    assert [r.weight_bytes is None for r in report.regions] == [True, True, False]
    counts = ops_count(lowered)
    assert counts["Transpose"] == 2 and counts["Tanh"] == 1 and counts["Sigmoid"] == 1
    tanh = next(n for n in lowered.graph.node if n.op_type == "Tanh")
    assert tanh.input[0].startswith("region0+region1/")  # inside the part, channels-last
    check_against_ort(model, lowered)


def ops_count(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in model.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


def test_an_im2col_plan_gives_the_bytes_the_lowering_emits():
    from onnx_lower.cost import weight_bytes

    model = onnx.load("models/resblock_bn.onnx")
    p = plan(model, max_weight_mb=0.01)
    assert p.form == "im2col" and p.regions == []
    lowered, _ = lower(model, form="im2col")
    assert p.im2col_bytes == weight_bytes(lowered)
    gathers = {n.input[1] for n in lowered.graph.node if n.op_type == "Gather"}
    tables = sum(nh.to_array(t).nbytes for t in lowered.graph.initializer if t.name in gathers)
    assert p.im2col_index_bytes == tables > 0
    assert any("Gather tap tables" in line for line in p.summary_lines())


# --------------------------------------------------------------------------- property test

KEPT = ("Tanh", "Sigmoid", "Softsign")


@st.composite
def region_chains(draw):
    """A conv stack then a dense stack, cut by kept ops at random places, with residual Adds
    that sometimes cross a cut, and a budget under which some regions fit the mlp form and
    others do not. Returns ``(model, budget in MB)``."""
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    channels = draw(st.integers(1, 3))
    size = in_size = draw(st.sampled_from([6, 8]))
    nodes, inits, count = [], [], [0]

    def name(base: str) -> str:
        count[0] += 1
        return f"{base}{count[0]}"

    def cut(t: str) -> str:
        if not draw(st.booleans()):
            return t
        out = name("kept")
        nodes.append(h.make_node(draw(st.sampled_from(KEPT)), [t], [out]))
        return out

    t, c = "x", channels
    for _ in range(draw(st.integers(1, 3))):
        m = draw(st.integers(1, 3))
        w, b, y = name("w"), name("b"), name("conv")
        inits += [_w(w, m, c, 3, 3, rng=rng), _w(b, m, rng=rng)]
        nodes.append(h.make_node("Conv", [t, w, b], [y], pads=[1, 1, 1, 1]))
        skip = t if m == c and draw(st.booleans()) else None
        t, c = y, m
        if draw(st.booleans()):
            r = name("relu")
            nodes.append(h.make_node("Relu", [t], [r]))
            t = r
        t = cut(t)
        if skip is not None:  # a residual, across the cut if there is one
            r = name("res")
            nodes.append(h.make_node("Add", [t, skip], [r]))
            t = r
    if draw(st.booleans()):
        p = name("pool")
        nodes.append(h.make_node("MaxPool", [t], [p], kernel_shape=[2, 2], strides=[2, 2]))
        t, size = p, size // 2
    f = name("flat")
    nodes.append(h.make_node("Flatten", [t], [f]))
    t, width = cut(f), c * size * size
    for _ in range(draw(st.integers(1, 2))):
        out = draw(st.integers(2, 6))
        w, b, y = name("w"), name("b"), name("fc")
        inits += [_w(w, out, width, rng=rng), _w(b, out, rng=rng)]
        nodes.append(h.make_node("Gemm", [t, w, b], [y], transB=1))
        t, width = cut(y), out
    nodes.append(h.make_node("Identity", [t], ["y"]))
    model = _model(nodes, inits, ["N", channels, in_size, in_size], ["N", width])
    return model, draw(st.sampled_from([0.0005, 0.005, 0.05, 1024.0]))


@settings(max_examples=max(25, settings().max_examples // 2))
@given(case=region_chains())
def test_random_region_chains_lower_exactly(case):
    """Whatever the cuts and the budget: no Conv/MaxPool/Gemm left, kept ops kept, the region
    report consistent, and the numbers of onnxruntime's original at batch 1 and 3."""
    model, budget = case
    lowered, report = lower(model, form="auto", max_weight_mb=budget)
    counts = ops_count(lowered)
    assert not set(counts) & {"Conv", "MaxPool", "Gemm"}
    for op in KEPT:
        assert counts.get(op, 0) == sum(n.op_type == op for n in model.graph.node)
    forms = {r.form for r in report.regions}
    assert report.form_used == (forms.pop() if len(forms) == 1 else "mixed")
    assert sum(r.nodes for r in report.regions) <= len(model.graph.node)
    check_against_ort(model, lowered)


def test_region_reasons_state_facts_without_cli_advice():
    """A region's reason says why mlp did not fit; the advice to try --form auto, which the
    user is already running, stays in the error messages only."""
    _, report = lower(gated_cnn(), form="auto")
    reason = report.regions[0].reason
    assert "over the budget" in reason and "--form" not in reason and "Raise" not in reason
    p = plan(gated_cnn())
    assert "--form" not in p.regions[0].reason
