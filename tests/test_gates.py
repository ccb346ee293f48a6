"""The input and output gates (onnx_lower/gates.py) and the CLI's validation by default.

Input gate: the full ONNX checker (strict shape inference) and an onnxruntime load, before any
pass; a failure is exit 2 with the checker's or onnxruntime's own message on one line, naming
the node. Output gate: the same two checks on the temporary file before the rename; a failure
is exit 3 (a bug) and nothing is written. Validation runs unless ``--no-validate``; a mismatch is
exit 1 with the output written.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_lower
import onnx_lower.api
from onnx_lower.errors import InvalidModelError, OutputGateError
from onnx_lower.model_io import save_model
from tests.test_cli import MODELS, SAMPLE, assert_user_error, listing, run


def unary_model(op: str, dtype: int, name: str = "n1", opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node(op, ["x"], ["y"], name=name)],
        "g",
        [helper.make_tensor_value_info("x", dtype, [1, 4])],
        [helper.make_tensor_value_info("y", dtype, [1, 4])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def bad_shapes_model() -> onnx.ModelProto:
    """Passes the plain checker; strict shape inference refuses Add of (1,4) and (3,) (node
    'bad_add')."""
    c = numpy_helper.from_array(np.ones(3, np.float32), "c")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "c"], ["y"], name="bad_add")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [c],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture()
def folders(tmp_path: Path) -> tuple[Path, Path]:
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    return tmp_path / "in", tmp_path / "out"


# --------------------------------------------------------------------------- input gate


def test_input_gate_checker_names_the_node(capsys, folders):
    indir, outdir = folders
    onnx.checker.check_model(bad_shapes_model())  # the plain checker lets it through
    src = indir / "bad.onnx"
    onnx.save(bad_shapes_model(), str(src))
    code, _, err = run(capsys, src, outdir / "o.onnx")
    assert_user_error(code, err, "fails the ONNX checker", "bad_add", folder=outdir)


def test_input_gate_onnxruntime_names_the_node(capsys, folders):
    """Abs on bfloat16 passes the full checker; onnxruntime's CPU provider has no kernel."""
    indir, outdir = folders
    src = indir / "abs.onnx"
    onnx.save(unary_model("Abs", TensorProto.BFLOAT16, name="abs_node"), str(src))
    code, _, err = run(capsys, src, outdir / "o.onnx", "--form", "fold-only")
    assert_user_error(code, err, "onnxruntime cannot load", "abs_node", folder=outdir)


def test_library_gate_and_ort_check_off(tmp_path):
    """lower() runs the gate too; ort_check=False skips only onnxruntime's load, and the report
    says so."""
    with pytest.raises(InvalidModelError, match="bad_add"):
        onnx_lower.lower(bad_shapes_model(), form="fold-only")
    model = unary_model("Abs", TensorProto.BFLOAT16)
    with pytest.raises(InvalidModelError, match="onnxruntime cannot load"):
        onnx_lower.lower(model, form="fold-only")
    _, report = onnx_lower.lower(SAMPLE, form="mlp", ort_check=False)
    assert report.options["ort_check"] is False
    assert report.timings["input_gate_s"] >= 0


def test_external_data_input(capsys, folders):
    """A model with external data passes the gate (the checker sees its skeleton, onnxruntime
    loads the file); a missing or truncated .data file is exit 2 and leaves nothing."""
    indir, outdir = folders
    src = indir / "ext.onnx"
    onnx.save_model(onnx.load(str(MODELS / "lenet_maxpool.onnx")), str(src),
                    save_as_external_data=True, location="ext.onnx.data", size_threshold=256)
    code, _, err = run(capsys, src, outdir / "o.onnx", "--form", "im2col", "-q")
    assert code == 0, err
    assert (outdir / "o.onnx").exists()
    data = indir / "ext.onnx.data"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    code, _, err = run(capsys, src, outdir / "t.onnx", "--form", "im2col")
    assert_user_error(code, err, "ext.onnx", folder=outdir, before=["o.onnx"])
    data.unlink()
    code, _, err = run(capsys, src, outdir / "m.onnx", "--form", "im2col")
    assert_user_error(code, err, "ext.onnx.data", folder=outdir, before=["o.onnx"])


# --------------------------------------------------------------------------- output gate


@pytest.mark.parametrize(
    "model, needle",
    [
        (bad_shapes_model(), "ONNX checker"),
        (unary_model("Abs", TensorProto.BFLOAT16), "onnxruntime load"),
    ],
    ids=["checker", "onnxruntime"],
)
def test_output_gate_writes_nothing(tmp_path, model, needle):
    target = tmp_path / "o.onnx"
    with pytest.raises(OutputGateError, match=needle) as info:
        save_model(model, target)
    assert info.value.exit_code == 3 and "bug in onnx_lower" in str(info.value)
    assert listing(tmp_path) == []


def test_cli_output_gate_is_exit_3(capsys, folders, monkeypatch):
    """A pipeline that returned a broken model (simulated) is an internal error: exit 3, the
    message says it is a bug, and no output file appears."""
    _, outdir = folders
    real = onnx_lower.api.lower

    def broken(*args, **kwargs):
        lowered, report = real(*args, **kwargs)
        lowered.graph.node[0].op_type = "NotAnOp"
        return lowered, report

    monkeypatch.setattr(onnx_lower.api, "lower", broken)
    code, _, err = run(capsys, SAMPLE, outdir / "o.onnx", "--form", "mlp")
    assert code == 3, err
    assert "bug in onnx_lower" in err and "NotAnOp" in err and "Traceback" not in err
    assert listing(outdir) == []


def test_sparse_storage_passes_the_output_gate(capsys, folders):
    """onnx's strict shape inference types sparse initializers as sparse tensors, which
    MatMul's inference refuses: the gate checks the skeleton, where they are typed inputs."""
    _, outdir = folders
    code, _, err = run(capsys, SAMPLE, outdir / "o.onnx", "--form", "mlp", "--sparse-storage",
                       "-q")
    assert code == 0, err
    assert len(onnx.load(str(outdir / "o.onnx")).graph.sparse_initializer) > 0


# --------------------------------------------------------------------------- validation


def test_validation_is_on_by_default(capsys, folders):
    _, outdir = folders
    report = outdir / "r.json"
    code, out, err = run(capsys, SAMPLE, outdir / "o.onnx", "--form", "mlp", "--report", report)
    assert code == 0, err
    assert "validation PASS" in out
    r = json.loads(report.read_text())
    assert r["validation"]["passed"] is True and r["validation"]["samples"] >= 1
    assert r["timings"]["validate_s"] > 0


def test_no_validate_and_alias(capsys, folders):
    _, outdir = folders
    report = outdir / "r.json"
    code, out, err = run(capsys, SAMPLE, outdir / "a.onnx", "--no-validate", "--report", report)
    assert code == 0, err
    r = json.loads(report.read_text())
    assert r["validation"] is None and "validate_s" not in r["timings"]
    code, out, err = run(capsys, SAMPLE, outdir / "b.onnx", "--validate", "-q")
    assert code == 0 and (outdir / "b.onnx").exists(), err


def test_mismatch_is_exit_1_and_written(capsys, folders):
    """Zero tolerance fails on float rounding: exit 1, the output is kept for inspection, the
    report says validation failed."""
    _, outdir = folders
    report = outdir / "r.json"
    code, out, err = run(capsys, SAMPLE, outdir / "o.onnx", "--form", "mlp", "--rtol", "0",
                         "--atol", "0", "--report", report, "-q")
    assert code == 1, err
    assert (outdir / "o.onnx").exists()
    assert "validation failed" in err
    assert json.loads(report.read_text())["validation"]["passed"] is False


# --------------------------------------------------------------------------- attributes


def _conv(**attrs) -> onnx.ModelProto:
    w = numpy_helper.from_array(np.ones((4, 2, 3, 3), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="c1", **attrs)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [w],
    )
    return _with_shapes(graph)


def _pool(**attrs) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("MaxPool", ["x"], ["y"], name="p1", **attrs)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    return _with_shapes(graph)


def _gemm(**attrs) -> onnx.ModelProto:
    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w"], ["y"], name="g1", **attrs)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [w],
    )
    return _with_shapes(graph)


def _with_shapes(graph: onnx.GraphProto) -> onnx.ModelProto:
    """The model with its output of the input's rank, every dimension symbolic (shape
    inference cannot size an out-of-spec node; the full checker wants a shape)."""
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    rank = len(model.graph.input[0].type.tensor_type.shape.dim)
    out = model.graph.output[0]
    out.CopyFrom(helper.make_tensor_value_info(out.name, TensorProto.FLOAT,
                                               ["d0", "d1", "d2", "d3"][:rank]))
    return model


# Each passes the input gate (full checker and onnxruntime's load) and breaks the spec.
ATTRIBUTE_CASES = {
    "conv-group-zero": (_conv(group=0), "group"),
    "conv-group-negative": (_conv(group=-2), "group"),
    "conv-group-not-dividing": (_conv(group=3), "group"),
    "conv-kernel-over-padded-input": (_conv(group=2, dilations=[5, 5]), "kernel_shape"),
    "conv-absurd-pads": (_conv(group=2, pads=[10**6] * 4), "pads"),
    "pool-kernel-over-input": (_pool(kernel_shape=[9, 9]), "kernel_shape"),
    "pool-ceil-mode-2": (_pool(kernel_shape=[2, 2], ceil_mode=2), "ceil_mode"),
    "gemm-transA-2": (_gemm(transA=2), "transA"),
    "gemm-transB-minus-1": (_gemm(transB=-1), "transB"),
}


@pytest.mark.parametrize(
    "name, form",
    # the forms alternate: each reads the attributes through the same validated reader
    [(n, ("mlp", "im2col")[k % 2]) for k, n in enumerate(sorted(ATTRIBUTE_CASES))],
)
def test_out_of_spec_attribute_is_refused(name, form):
    from onnx_lower.errors import InvalidAttributeError

    model, attribute = ATTRIBUTE_CASES[name]
    assert gates_pass(model), name
    if form == "im2col" and name.startswith("gemm"):
        form = "fold-only"  # im2col keeps Gemm as it is
    with pytest.raises(InvalidAttributeError) as info:
        onnx_lower.lower(model, form=form)
    message = str(info.value)
    node = model.graph.node[0].name
    assert f"node '{node}'" in message and f"attribute '{attribute}'" in message, message


#: the lowering pass of each form alone, with no ``explicit-pads`` before it
_BARE_PASSES = {"mlp": {"Conv": ["lower-conv"], "MaxPool": ["lower-pool"],
                        "Gemm": ["lower-linear"]},
                "im2col": {"Conv": ["lower-im2col"], "MaxPool": ["lower-im2col"],
                           "Gemm": ["lower-linear"]}}


@pytest.mark.parametrize("form", ["mlp", "im2col"])
@pytest.mark.parametrize("name", sorted(ATTRIBUTE_CASES))
def test_out_of_spec_attribute_is_refused_by_a_bare_pass_list(name, form):
    """The check is in the lowering that reads the attributes, not only in ``explicit-pads``."""
    from onnx_lower.errors import InvalidAttributeError

    model, attribute = ATTRIBUTE_CASES[name]
    node = model.graph.node[0]
    with pytest.raises(InvalidAttributeError) as info:
        onnx_lower.lower(model, passes=_BARE_PASSES[form][node.op_type])
    message = str(info.value)
    assert f"node '{node.name}'" in message and f"attribute '{attribute}'" in message, message


def test_absurd_stride_is_exact():
    """A stride of 10⁶ is legal ONNX (one window per axis): lowered, not refused."""
    model = _conv(group=2, strides=[10**6, 10**6])
    lowered, _ = onnx_lower.lower(model, form="mlp")
    check = onnx_lower.validate(model, lowered, samples=1)
    assert check.passed, check.failures()


def gates_pass(model: onnx.ModelProto) -> bool:
    from onnx_lower.gates import checker_problem, ort_problem

    return checker_problem(model) is None and ort_problem(model) is None
