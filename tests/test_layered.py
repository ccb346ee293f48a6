"""``--form layered`` (issue 12): the output is a strict ReLU chain and computes the original.

The property tests draw random networks of two kinds:

- :func:`dags`: small MLP-like DAGs over a flat input, built from Relu(Gemm) layers, linear
  (signed) layers, residual Adds of an earlier value, elementwise Max of two values, and a final
  Gemm that reads several earlier values and often the input itself: skips over several ReLUs
  and inputs needed late, the cases that need carries;
- the random CNNs of ``tests/test_random_cnns.py`` (Conv, BatchNorm, Relu, LeakyRelu, MaxPool
  with overlapping windows, AveragePool, residual blocks).

Each is lowered with each placement (ASAP and ALAP), with and without a random input box. The
lowered graph must be exactly ``Flatten, (MatMul, Add, Relu)*, MatMul, Add, Reshape`` with dense
``(in, out)`` weights, and match onnxruntime on the original to a scaled error of 1e-5
(:attr:`onnx_lower.validate.OutputComparison.scaled_err`): inside the box when there is one,
on a wide range when there is none (the output must then be exact everywhere).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import onnx_lower
from onnx_lower.cli import main
from onnx_lower.errors import BudgetExceededError, LoweringError, UnsupportedOpError
from onnx_lower.passes import layered
from tests.oracles import CORPUS, run_model
from tests.test_random_cnns import build_model, nets

SCALED = 1e-5
CHAIN_HEAD, CHAIN_TAIL = ["Flatten"], ["MatMul", "Add", "Reshape"]


# --------------------------------------------------------------------------- checks


def check_chain(model: onnx.ModelProto) -> int:
    """The op sequence is the strict chain; returns its number of layers."""
    nodes = list(model.graph.node)
    ops = [n.op_type for n in nodes]
    hidden = (len(ops) - 4) // 3
    assert ops == CHAIN_HEAD + ["MatMul", "Add", "Relu"] * hidden + CHAIN_TAIL, ops
    inits = {t.name: t for t in model.graph.initializer}
    width = None
    for n in nodes:
        if n.op_type == "MatMul":
            w = inits[n.input[1]]
            assert len(w.dims) == 2 and w.data_type == TensorProto.FLOAT
            assert width is None or w.dims[0] == width, "layers do not chain"
            width = w.dims[1]
    chained = [nodes[0].output[0]]
    for n in nodes[1:]:
        assert n.input[0] == chained[-1], f"{n.name} does not read the previous node"
        chained.append(n.output[0])
    inits_listed = {t.name for t in model.graph.initializer}  # IR < 4 lists them as inputs
    assert len([i for i in model.graph.input if i.name not in inits_listed]) == 1
    assert len(model.graph.output) == 1
    return hidden + 1


def check_layered(model: onnx.ModelProto, box=None, placement: str | None = None,
                  batch: int = 1) -> dict:
    places = (placement,) if placement else layered.PLACEMENTS
    with mock.patch.object(layered, "PLACEMENTS", places):
        lowered, report = onnx_lower.lower(model, form="layered", input_box=box)
    depth = check_chain(lowered)
    notes = report.notes["layered"]
    assert len(notes["layers"]) == depth
    if box is None:
        assert notes["exact"] == "everywhere"
        result = onnx_lower.validate(model, lowered, samples=3, seed=1, input_range=(-4.0, 4.0),
                                     batch=batch)
    else:
        result = onnx_lower.validate(model, lowered, samples=3, seed=1, input_box=box,
                                     batch=batch)
    errs = [o.scaled_err for o in result.outputs]
    assert max(errs) <= SCALED, (errs, notes)
    return notes


def random_box(n: int, seed: int):
    rng = np.random.default_rng(seed)
    lo = rng.uniform(-1.5, 0.5, n)
    return lo, lo + rng.uniform(0.0, 2.0, n)


# --------------------------------------------------------------------------- random DAGs


@dataclass(frozen=True)
class Dag:
    """Values ``v_0 = x`` (``n_in`` wide) and one per step; ``reads`` go into the output Gemm."""

    n_in: int
    steps: tuple[tuple, ...]  # ("relu"|"linear", src, width) | ("add"|"max", a, b)
    reads: tuple[int, ...]
    outputs: int
    seed: int


@st.composite
def dags(draw) -> Dag:
    n_in = draw(st.integers(1, 6))
    widths = [n_in]
    steps = []
    for _ in range(draw(st.integers(1, 7))):
        i = len(widths)
        kind = draw(st.sampled_from(("relu", "relu", "linear", "add", "max")))
        src = draw(st.integers(0, i - 1))
        if kind in ("relu", "linear"):
            w = draw(st.integers(1, 6))
            steps.append((kind, src, w))
            widths.append(w)
        else:
            other = draw(st.integers(0, i - 1))
            steps.append((kind, src, other))
            widths.append(widths[src])
    reads = draw(st.lists(st.integers(0, len(widths) - 1), min_size=1, max_size=4, unique=True))
    if len(widths) - 1 not in reads:
        reads.append(len(widths) - 1)
    return Dag(n_in, tuple(steps), tuple(sorted(reads)), draw(st.integers(1, 4)),
               draw(st.integers(0, 2**16)))


def build_dag(dag: Dag) -> onnx.ModelProto:
    rng = np.random.default_rng(dag.seed)
    nodes, inits, names, widths = [], [], ["x"], [dag.n_in]

    def const(value) -> str:
        name = f"c{len(inits)}"
        inits.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    def gemm(src: int, width: int) -> str:
        w = rng.standard_normal((widths[src], width)) / math.sqrt(widths[src])
        out = f"g{len(nodes)}"
        nodes.append(helper.make_node("Gemm", [names[src], const(w), const(
            rng.uniform(-0.3, 0.3, width))], [out]))
        return out

    for kind, a, b in dag.steps:
        if kind in ("relu", "linear"):
            out, width = gemm(a, b), b
            if kind == "relu":
                nodes.append(helper.make_node("Relu", [out], [out + "r"]))
                out += "r"
        else:  # residual Add / elementwise Max of v_a and a projection of v_b
            width = widths[a]
            proj = gemm(b, width)
            out = f"{kind}{len(nodes)}"
            nodes.append(helper.make_node(kind.capitalize(), [names[a], proj], [out]))
        names.append(out)
        widths.append(width)
    parts = [gemm(i, dag.outputs) for i in dag.reads]
    acc = parts[0]
    for k, p in enumerate(parts[1:]):
        nodes.append(helper.make_node("Add", [acc, p], [f"sum{k}"]))
        acc = f"sum{k}"
    nodes.append(helper.make_node("Identity", [acc], ["y"]))
    graph = helper.make_graph(
        nodes, "dag", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, dag.n_in])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, dag.outputs])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model, full_check=True)
    return model


placements = st.sampled_from(layered.PLACEMENTS)


@settings(max_examples=15)
@given(dag=dags(), placement=placements, boxed=st.booleans())
def test_random_dag_is_a_strict_chain(dag, placement, boxed):
    _check_dag(dag, placement, boxed)


@settings(max_examples=6)
@given(net=nets(), placement=placements, boxed=st.booleans())
def test_random_cnn_is_a_strict_chain(net, placement, boxed):
    _check_cnn(net, placement, boxed)


@pytest.mark.slow
@settings(max_examples=300)
@given(dag=dags(), placement=placements, boxed=st.booleans())
def test_random_dag_is_a_strict_chain_many(dag, placement, boxed):
    _check_dag(dag, placement, boxed)


@pytest.mark.slow
@settings(max_examples=150)
@given(net=nets(), placement=placements, boxed=st.booleans())
def test_random_cnn_is_a_strict_chain_many(net, placement, boxed):
    _check_cnn(net, placement, boxed)


def _check_dag(dag, placement, boxed: bool) -> None:
    box = random_box(dag.n_in, dag.seed) if boxed else None
    check_layered(build_dag(dag), box, placement)


def _check_cnn(net, placement, boxed: bool) -> None:
    box = random_box(math.prod(net.input[1:]), net.seed) if boxed else None
    check_layered(build_model(net), box, placement, batch=2 if net.dynamic_batch else 1)


# --------------------------------------------------------------------------- carries


def test_input_needed_late_takes_two_neurons_or_one_with_a_box():
    """``y = W₂ relu(W₁ x) + V x``: x rides through layer 1 as relu(x) − relu(−x), or, with a
    box, as relu(x − lo) + lo, and then the output is exact inside the box only."""
    dag = Dag(2, (("relu", 0, 4),), (0, 1), 4, 5)  # x (2) is narrower than V x (4)
    model = build_dag(dag)
    plain = check_layered(model)
    assert plain["layers"][0] == {"width": 8, "relu": 4, "carry_one": 0, "carry_two": 4,
                                  "carry_box": 0}
    boxed = check_layered(model, box=(np.full(2, -1.0), np.full(2, 2.0)))
    assert boxed["layers"][0]["carry_box"] == 2 and boxed["layers"][0]["width"] == 6
    assert boxed["exact"] == "inside the input box"


def test_narrow_partial_sum_is_carried_instead_of_a_wide_input():
    """``y = W₂ relu(W₁ x) + V x`` with 1 output and 5 inputs: ``V x`` rides, not ``x``."""
    notes = check_layered(build_dag(Dag(5, (("relu", 0, 3),), (0, 1), 1, 2)))
    assert notes["layers"][0]["carry_two"] == 2


def test_relu_output_needed_late_takes_one_neuron():
    """A residual of a Relu output over two ReLU layers: one carry neuron per layer."""
    dag = Dag(2, (("relu", 0, 3), ("relu", 1, 3), ("relu", 2, 3), ("add", 3, 1)), (4,), 2, 3)
    notes = check_layered(build_dag(dag))
    assert [la["carry_one"] for la in notes["layers"]] == [0, 3, 3, 0]
    assert notes["carry_neurons"] == 6 and notes["exact"] == "everywhere"


# --------------------------------------------------------------------------- refusals


def _single(op: str, extra_out: bool = False) -> onnx.ModelProto:
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["h"], name="fc"),
             helper.make_node(op, ["h"], ["y"], name=f"the_{op.lower()}")]
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])]
    if extra_out:
        outs.append(helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, 3]))
    inits = [numpy_helper.from_array(np.ones((2, 3), np.float32), "w"),
             numpy_helper.from_array(np.zeros(3, np.float32), "b")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])], outs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_kept_op_is_refused_by_name():
    with pytest.raises(UnsupportedOpError, match="'the_tanh' \\(Tanh\\).*layered"):
        onnx_lower.lower(_single("Tanh"), form="layered")


def test_final_softmax_only_with_the_flag():
    with pytest.raises(UnsupportedOpError, match="--drop-final-softmax"):
        onnx_lower.lower(_single("Softmax"), form="layered")
    model = _single("Softmax")
    lowered, report = onnx_lower.lower(model, form="layered", drop_final_softmax=True)
    check_chain(lowered)
    assert report.notes["layered"]["dropped_softmax"] == "the_softmax"
    assert any("dropped the final Softmax" in line for line in report.summary_lines())
    xs = np.random.default_rng(0).uniform(-1, 1, (20, 1, 2)).astype(np.float32)
    for x in xs:
        (a,), (b,) = run_model(model, {"x": x}), run_model(lowered, {"x": x})
        assert a.argmax() == b.argmax()
    with pytest.raises(LoweringError, match="not by a Softmax"):
        onnx_lower.lower(_single("Relu"), form="layered", drop_final_softmax=True)
    with pytest.raises(LoweringError, match="layered only"):
        onnx_lower.lower(model, form="mlp", drop_final_softmax=True)


def test_two_outputs_are_refused():
    with pytest.raises(LoweringError, match="exactly one input and one output"):
        onnx_lower.lower(_single("Relu", extra_out=True), form="layered")


def test_budget_names_the_layer():
    dag = Dag(6, (("relu", 0, 6), ("relu", 1, 6)), (0, 2), 2, 1)
    with pytest.raises(BudgetExceededError, match="layer [123] of 3 \\(\\d+ -> \\d+ neurons"):
        onnx_lower.lower(build_dag(dag), form="layered", max_weight_mb=1e-5)


def test_box_of_the_wrong_size_is_refused():
    with pytest.raises(LoweringError, match="one \\(lo, hi\\) per element"):
        onnx_lower.lower(_single("Relu"), form="layered", input_box=(np.zeros(5), np.ones(5)))


def test_cli_input_range_is_the_box(tmp_path, capsys):
    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(build_dag(Dag(3, (("relu", 0, 4),), (0, 1), 2, 5)), src)
    assert main([str(src), str(out), "--form", "layered", "--input-range=-1,2",
                 "--validate"]) == 0
    printed = capsys.readouterr().out
    assert "exact inside the input box" in printed
    assert main([str(src), str(out), "--form", "layered", "--validate"]) == 0
    assert "exact everywhere" in capsys.readouterr().out
    assert main([str(src), str(out), "--form", "mlp", "--drop-final-softmax"]) == 2


# --------------------------------------------------------------------------- the corpus

#: Corpus models and what the layered form does with them at the default budget. Fast ones run
#: by default, the rest are slow-marked.
CORPUS_CASES = {
    "stanleybak__mnist-net_256x2": "lowers",
    "stanleybak__cifar10_small": "lowers",
    "stanleybak__cifar_base_kw": "lowers",
    "stanleybak__resnet_2b": "lowers",
    "neuralnetworkverification__cnn_max_mninst2": "slow",  # with a box by default, below
    "debjyoti0891__lenet5": "Tanh",
    "fastmachinelearning__conv1d_small_keras": "Softmax",
    "stanleybak__Convnet_avgpool": "slow",
    "christopherbrix__NN_rul_full_window_20": "slow",
    "emclab-sinica__HAR-CNN": "slow",
    "emclab-sinica__mnist-8": "slow",
    "ref-rain7__cifar_net": "slow",
    "hwang2409__mnist_cnn": "slow",
    "stanleybak__Convnet_maxpool": "slow",
    "amandashi95__resnet20": "slow",
}


CORPUS_PARAMS = [
    pytest.param(name, marks=[pytest.mark.slow] if kind == "slow" else [], id=name)
    for name, kind in CORPUS_CASES.items()
]


@pytest.mark.parametrize("name", CORPUS_PARAMS)
def test_corpus_model(name):
    """Every corpus model lowers and matches, is refused by its kept op, or is over budget."""
    path = CORPUS / f"{name}.onnx"
    if not path.exists():
        pytest.skip(f"corpus model {path} is missing")
    model = onnx.load(path)
    kinds = {n.op_type for n in model.graph.node}
    kept = sorted(kinds & {"Tanh", "Sigmoid", "Softmax", "LogSoftmax"})
    try:
        lowered, report = onnx_lower.lower(model, form="layered")
    except UnsupportedOpError as exc:
        assert kept and exc.op_type in kept, exc
        return
    except BudgetExceededError as exc:
        assert "layer " in exc.layer and exc.total_bytes > exc.budget_bytes
        return
    assert not kept
    check_chain(lowered)
    result = onnx_lower.validate(model, lowered, samples=2, seed=0)
    assert max(o.scaled_err for o in result.outputs) <= SCALED


def test_bench_tool_measures_a_model(tmp_path):
    """``tools/bench_layered.py``: the numbers of its table agree with ``lower()``'s report."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "bench_layered", Path(__file__).resolve().parents[1] / "tools" / "bench_layered.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    path = tmp_path / "dag.onnx"
    model = build_dag(Dag(2, (("relu", 0, 4), ("relu", 1, 3)), (0, 2), 4, 7))
    onnx.save(model, path)
    row = tool.measure(path, (0.0, 1.0), 1024)
    _, report = onnx_lower.lower(model, form="layered")
    notes = report.notes["layered"]
    assert row["status"] == "lowers" and row["layers"] == len(notes["layers"])
    assert row["carry"] == notes["carry_neurons"] <= row["carry_atoms"]
    assert row["relu_layered"] == 7
    assert row["relu_original"] == 7 and row["carry_box"] <= row["carry"]
    assert row["layered_bytes"] == report.notes["emitted_weight_bytes"]
    assert "| dag | lowers |" in tool.markdown([row])


@pytest.mark.parametrize("name", [
    "neuralnetworkverification__cnn_max_mninst2",
    *(pytest.param(n, marks=pytest.mark.slow) for n in (
        "emclab-sinica__mnist-8", "ref-rain7__cifar_net", "stanleybak__resnet_2b")),
])
def test_corpus_model_with_a_box(name):
    """With the box [0, 1] the chain is exact inside the box, to 1e-5 scaled error: interval
    bounds of these networks are loose, and box carries are used only where they keep float32
    precision (before that rule, mnist-8 reached 3e-5)."""
    path = CORPUS / f"{name}.onnx"
    if not path.exists():
        pytest.skip(f"corpus model {path} is missing")
    model = onnx.load(path)
    box = (0.0, 1.0)
    lowered, report = onnx_lower.lower(model, form="layered", input_box=box)
    check_chain(lowered)
    notes = report.notes["layered"]
    assert notes["exact"] == "inside the input box"
    assert sum(la["carry_box"] for la in notes["layers"]) > 0
    result = onnx_lower.validate(model, lowered, samples=3, seed=2, input_box=box)
    assert max(o.scaled_err for o in result.outputs) <= SCALED


@pytest.mark.parametrize("head", ["MatMul", "Gemm"])
def test_whole_tensor_sample_is_a_strict_chain(head):
    """Marabou's conv_mp1 shape (Reshape [1,8,4,4] → [128], static batch 1): the mlp form takes
    the whole tensor as the sample, and so does the chain (Flatten axis 0, full-shape Reshape)."""
    from tests.test_sample_axis import conv_mp1_style

    model = conv_mp1_style(head)
    lowered, report = onnx_lower.lower(model, form="layered")
    check_chain(lowered)
    assert report.notes["sample_axis"]["mode"] == "whole-tensor"
    flat = lowered.graph.node[0]
    assert flat.op_type == "Flatten" and flat.attribute[0].i == 0
    result = onnx_lower.validate(model, lowered, samples=3, seed=1, input_range=(-4.0, 4.0))
    assert max(o.scaled_err for o in result.outputs) <= SCALED
