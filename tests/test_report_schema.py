"""Pin the ``--report FILE.json`` schema ("onnx_lower.report/1.3").

Every key set below is written out literally on purpose: renaming, adding or removing a key must
fail this test, and whoever does it must bump ``onnx_lower.report.SCHEMA`` (minor for additions,
major for renames and removals) and update the README's "Report JSON" section.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from onnx_lower.cli import main
from onnx_lower.report import SCHEMA

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE = REPO_ROOT / "models" / "avgpool_strided.onnx"

TOP_KEYS = {
    "schema",
    "tool_version",
    "input",
    "output",
    "form",
    "form_used",
    "form_reason",
    "regions",
    "target",
    "options",
    "before",
    "after",
    "passes",
    "fold",
    "kept_ops",
    "layered",
    "timings",
    "validation",
    "latency",
    "nnet",
    "conv_algos",
    "sample_axis",
}
OPTIONS_KEYS = {"max_weight_mb", "sparse_storage", "conv_algo", "passes", "ort_check"}
STATS_KEYS = {
    "ops", "nodes", "weight_bytes", "macs", "relu_neurons", "max_neurons", "piecewise_neurons",
}
LAYERED_KEYS = {"placement", "neurons", "layers", "relu_neurons", "carry_neurons", "exact",
                "input_box", "dropped_softmax"}
LAYER_KEYS = {"width", "relu", "carry_one", "carry_two", "carry_box"}
PASS_KEYS = {
    "name",
    "seconds",
    "nodes_before",
    "nodes_after",
    "node_delta",
    "weight_bytes",
    "modified",
    "iteration",
}
FOLD_KEYS = {"matmuls_before", "matmuls_after", "bytes_before", "bytes_after"}
TIMING_KEYS = {"load_s", "input_gate_s", "lower_s", "save_s", "output_gate_s", "validate_s"}
VALIDATION_KEYS = {
    "passed",
    "samples",
    "seed",
    "rtol",
    "atol",
    "input_range",
    "batch",
    "input_source",
    "rule",
    "outputs",
    "extra_outputs",
    "failures",
}
OUTPUT_KEYS = {
    "name",
    "dtype",
    "lowered_dtype",
    "shape",
    "lowered_shape",
    "elements",
    "max_abs_err",
    "max_rel_err",
    "scaled_err",
    "mean_abs_err",
    "p99_abs_err",
    "required_atol",
    "required_rtol",
    "nan_mismatch",
    "inf_mismatch",
    "out_of_tolerance",
    "passed",
    "message",
}
LATENCY_KEYS = {
    "a",
    "b",
    "ratio",
    "paired_ratio",
    "threads",
    "warmup",
    "repeat",
    "batch",
    "note",
}
LATENCY_STATS_KEYS = {"label", "runs", "median_ms", "p10_ms", "p90_ms", "mean_ms", "min_ms"}


def is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def is_float(x) -> bool:
    return isinstance(x, float) and math.isfinite(x)


def run_report(tmp_path: Path, *args: str) -> dict:
    rep = tmp_path / "report.json"
    code = main([str(SAMPLE), *args, "--report", str(rep)])
    assert code == 0
    return json.loads(rep.read_text())


def check_stats(stats: dict) -> None:
    assert set(stats) == STATS_KEYS
    assert is_int(stats["nodes"]) and is_int(stats["weight_bytes"]) and is_int(stats["macs"])
    assert all(is_int(stats[k]) for k in ("relu_neurons", "max_neurons", "piecewise_neurons"))
    assert isinstance(stats["ops"], dict)
    assert all(isinstance(k, str) and is_int(v) for k, v in stats["ops"].items())
    assert list(stats["ops"]) == sorted(stats["ops"])
    assert sum(stats["ops"].values()) == stats["nodes"]


def check_passes(passes: list) -> None:
    assert isinstance(passes, list) and passes
    for p in passes:
        assert set(p) == PASS_KEYS
        assert isinstance(p["name"], str)
        assert is_float(p["seconds"]) and p["seconds"] >= 0
        for k in ("nodes_before", "nodes_after", "node_delta", "weight_bytes", "iteration"):
            assert is_int(p[k]), (k, p[k])
        assert p["node_delta"] == p["nodes_after"] - p["nodes_before"]
        assert isinstance(p["modified"], bool)


@pytest.fixture(scope="module")
def full_report(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("schema")
    return run_report(tmp, str(tmp / "o.onnx"), "--form", "mlp", "--validate", "--benchmark",
                      "--repeat", "5", "-q")


def test_schema_constant():
    assert SCHEMA == "onnx_lower.report/1.3"


def test_top_level(full_report):
    r = full_report
    assert set(r) == TOP_KEYS
    assert r["schema"] == "onnx_lower.report/1.3"
    assert r["target"] is None  # no --target
    assert isinstance(r["tool_version"], str)
    assert r["input"] == str(SAMPLE)
    assert isinstance(r["output"], str) and r["output"].endswith("o.onnx")
    assert r["form"] == "mlp" and r["form_used"] == "mlp"
    assert isinstance(r["form_reason"], str) and r["form_reason"]
    assert set(r["options"]) == OPTIONS_KEYS
    assert r["options"] == {
        "max_weight_mb": 1024.0, "sparse_storage": False, "conv_algo": "auto", "passes": None,
        "ort_check": True,
    }
    assert r["conv_algos"] == []  # the mlp form has no conv algorithms
    assert r["sample_axis"] is None  # axis 0 is the batch: nothing mixes it
    assert is_float(r["options"]["max_weight_mb"])
    assert isinstance(r["kept_ops"], dict)
    assert all(isinstance(k, str) and is_int(v) for k, v in r["kept_ops"].items())


def test_before_after(full_report):
    check_stats(full_report["before"])
    check_stats(full_report["after"])
    assert full_report["after"]["ops"].get("MatMul", 0) >= 1
    assert "Conv" not in full_report["after"]["ops"]


def test_passes(full_report):
    check_passes(full_report["passes"])
    names = [p["name"] for p in full_report["passes"]]
    assert names[0] == "resolve-shapes" and "emit-affine" in names


def test_fold(full_report):
    fold = full_report["fold"]
    assert fold is None or set(fold) == FOLD_KEYS
    if fold is not None:
        assert all(is_int(v) for v in fold.values())


def test_timings(full_report):
    t = full_report["timings"]
    assert set(t) == TIMING_KEYS
    assert all(is_float(v) and v >= 0 for v in t.values())


def test_validation(full_report):
    v = full_report["validation"]
    assert set(v) == VALIDATION_KEYS
    assert v["passed"] is True
    assert is_int(v["samples"]) and is_int(v["seed"]) and is_int(v["batch"])
    assert is_float(v["rtol"]) and is_float(v["atol"])
    assert v["input_range"] == [0.0, 1.0]
    assert v["input_source"] == "random"
    assert isinstance(v["rule"], str)
    assert v["extra_outputs"] == [] and v["failures"] == []
    assert [o["name"] for o in v["outputs"]] == ["logits"]
    for o in v["outputs"]:
        assert set(o) == OUTPUT_KEYS
        assert o["dtype"] == o["lowered_dtype"] == "float32"
        assert o["shape"] == o["lowered_shape"] == [1, 10]
        for k in ("elements", "nan_mismatch", "inf_mismatch", "out_of_tolerance"):
            assert is_int(o[k]), k
        for k in ("max_abs_err", "max_rel_err", "scaled_err", "mean_abs_err", "p99_abs_err",
                  "required_atol",
                  "required_rtol"):
            assert is_float(o[k]), k
        assert o["passed"] is True and o["message"] is None


def test_latency(full_report):
    lat = full_report["latency"]
    assert set(lat) == LATENCY_KEYS
    assert is_float(lat["ratio"]) and is_float(lat["paired_ratio"])
    assert lat["repeat"] == 5 and lat["threads"] == 1 and lat["batch"] == 1
    assert is_int(lat["warmup"])
    assert isinstance(lat["note"], str)
    for side, label in (("a", "original"), ("b", "lowered")):
        s = lat[side]
        assert set(s) == LATENCY_STATS_KEYS
        assert s["label"] == label and s["runs"] == 5
        for k in LATENCY_STATS_KEYS - {"label", "runs"}:
            assert is_float(s[k]) and s[k] > 0, k
    assert lat["ratio"] == pytest.approx(lat["b"]["median_ms"] / lat["a"]["median_ms"])


def test_optional_parts_are_null(tmp_path):
    """With --no-validate, without --benchmark (and with a custom pass list, so no fold), the
    optional parts are present as null, never missing; only the validation's timing is."""
    r = run_report(tmp_path, str(tmp_path / "o.onnx"), "--passes", "resolve-shapes,dce,toposort",
                   "--no-validate", "-q")
    assert set(r) == TOP_KEYS
    assert r["validation"] is None and r["latency"] is None and r["nnet"] is None
    assert r["fold"] is None and r["kept_ops"] == {} and r["layered"] is None
    assert r["form_used"] == "custom"
    assert r["options"]["passes"] == ["resolve-shapes", "dce", "toposort"]
    assert set(r["timings"]) == TIMING_KEYS - {"validate_s"}
    check_stats(r["before"])
    check_stats(r["after"])
    check_passes(r["passes"])
    assert [p["name"] for p in r["passes"]] == ["resolve-shapes", "dce", "toposort"]


PLAN_KEYS = {
    "form", "reason", "region", "macs", "mlp_bytes", "budget_bytes", "layers", "regions",
    "im2col_bytes", "im2col_index_bytes", "neurons", "mlp_relu_neurons", "conv_algos",
}
CONV_ALGO_KEYS = {"name", "algo", "reason", "estimated_ms", "probe_error"}


def test_conv_algos_of_the_im2col_form(tmp_path):
    """One entry per Conv with the algorithm it got and why (1.3)."""
    r = run_report(tmp_path, str(tmp_path / "o.onnx"), "--form", "im2col", "--conv-algo",
                   "winograd", "-q")
    assert r["options"]["conv_algo"] == "winograd"
    assert r["conv_algos"] and all(set(c) == CONV_ALGO_KEYS for c in r["conv_algos"])
    assert {c["algo"] for c in r["conv_algos"]} <= {"matmul", "im2col", "winograd-f2",
                                                     "winograd-f4"}
    assert all(isinstance(c["reason"], str) and c["reason"] for c in r["conv_algos"])


PLAN_LAYER_KEYS = {"name", "sources", "inputs", "outputs", "bytes", "macs"}


def test_dry_run_report_is_a_plan(tmp_path):
    """--dry-run --report writes the plan document, with its own schema tag."""
    r = run_report(tmp_path, "--dry-run", "--form", "auto", "-q")
    assert set(r) == {"schema", "plan"}
    assert r["schema"] == "onnx_lower.plan/1.3"
    assert set(r["plan"]) == PLAN_KEYS
    assert r["plan"]["form"] == "mlp" and r["plan"]["regions"] == []
    assert r["plan"]["im2col_bytes"] is None  # only a plan that picks im2col runs it
    assert r["plan"]["layers"] and all(set(la) == PLAN_LAYER_KEYS for la in r["plan"]["layers"])
    assert r["plan"]["mlp_bytes"] == sum(la["bytes"] for la in r["plan"]["layers"])
    assert set(r["plan"]["neurons"]) == {"relu", "max", "piecewise"}
    assert isinstance(r["plan"]["mlp_relu_neurons"], int)


REGION_KEYS = {"name", "form", "reason", "nodes", "inputs", "outputs", "macs", "weight_bytes"}


def test_regions_only_under_auto(full_report, tmp_path):
    """--form auto lists the regions it decided (one here); a requested form lists none."""
    assert full_report["regions"] == []
    r = run_report(tmp_path, str(tmp_path / "o.onnx"), "--form", "auto", "-q")
    assert len(r["regions"]) == 1
    region = r["regions"][0]
    assert set(region) == REGION_KEYS
    assert region["form"] == r["form_used"] == "mlp" and region["reason"] == r["form_reason"]
    assert region["inputs"] and region["outputs"] and is_int(region["nodes"])
    assert is_int(region["macs"]) and is_int(region["weight_bytes"])


def test_layered_part(tmp_path):
    """``layered`` (1.2): the chain's layers and neuron counts, and where the output is exact."""
    r = run_report(tmp_path, str(tmp_path / "o.onnx"), "--form", "layered", "--input-range",
                   "0,1", "-q")
    assert set(r) == TOP_KEYS and r["form_used"] == "layered"
    lay = r["layered"]
    assert set(lay) == LAYERED_KEYS
    assert lay["placement"] in lay["neurons"] and lay["input_box"] is True
    assert lay["exact"] in ("everywhere", "inside the input box")
    assert lay["dropped_softmax"] is None
    for layer in lay["layers"]:
        assert set(layer) == LAYER_KEYS and all(is_int(v) for v in layer.values())
        assert layer["width"] == sum(layer[k] for k in LAYER_KEYS - {"width"}) or (
            layer is lay["layers"][-1])
    assert lay["relu_neurons"] == sum(la["relu"] for la in lay["layers"])
    assert lay["carry_neurons"] == sum(
        la["carry_one"] + la["carry_two"] + la["carry_box"] for la in lay["layers"])
    assert r["after"]["ops"]["MatMul"] == len(lay["layers"])


NNET_KEYS = {"path", "bytes", "layer_sizes", "input_box", "long_rows", "warnings"}
FC_SAMPLE = REPO_ROOT.parent / "shared" / "corpus" / "stanleybak__mnist-net_256x2.onnx"


@pytest.mark.skipif(not FC_SAMPLE.exists(), reason="corpus model not available")
def test_nnet_part(tmp_path):
    """A .nnet output (1.2) fills ``nnet``: what was written, and rows too long for ReluVal."""
    out = tmp_path / "o.nnet"
    report = tmp_path / "r.json"
    assert main([str(FC_SAMPLE), str(out), "--form", "mlp", "--report", str(report), "-q"]) == 0
    r = json.loads(report.read_text())
    assert set(r) == TOP_KEYS and set(r["nnet"]) == NNET_KEYS
    assert r["nnet"]["bytes"] == out.stat().st_size
    assert r["nnet"]["layer_sizes"] == [784, 256, 256, 10]
    assert r["nnet"]["input_box"] is False
    assert set(r["nnet"]["long_rows"]) <= {"ReluVal"}
    assert all("ReluVal" in w for w in r["nnet"]["warnings"])


TARGET_KEYS = {"name", "rewritten"}
REWRITE_KEYS = {"node", "op", "rule", "became"}


def test_target_section(tmp_path):
    """1.3: --target NAME writes the profile and one entry per rewritten node."""
    r = run_report(tmp_path, str(tmp_path / "t.onnx"), "--target", "marabou", "-q")
    assert set(r["target"]) == TARGET_KEYS
    assert r["target"]["name"] == "marabou"
    assert r["target"]["rewritten"]
    for entry in r["target"]["rewritten"]:
        assert set(entry) == REWRITE_KEYS
        assert all(isinstance(entry[k], str) and entry[k] for k in REWRITE_KEYS)


def test_sample_axis_part(tmp_path):
    """1.3: ``sample_axis`` names the op that made the mlp form take the whole tensor."""
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("Transpose", ["x"], ["y"], perm=[1, 0], name="swap")
    graph = helper.make_graph([node], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 2])])
    path = tmp_path / "t.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    rep = tmp_path / "r.json"
    assert main([str(path), str(tmp_path / "o.onnx"), "--form", "mlp", "--report", str(rep),
                 "-q"]) == 0
    r = json.loads(rep.read_text())
    assert set(r) == TOP_KEYS
    assert set(r["sample_axis"]) == {"mode", "node", "op", "reason"}
    assert r["sample_axis"]["mode"] == "whole-tensor"
    assert r["sample_axis"]["node"] == "swap" and r["sample_axis"]["op"] == "Transpose"
