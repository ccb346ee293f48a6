"""Tests of onnx_lower.benchmark: interleaved paired latency measurement."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_lower.benchmark import LatencyReport, benchmark
from onnx_lower.errors import LoweringError

N = 256


def chain_model(k: int, x_name: str = "x") -> onnx.ModelProto:
    """x[B, 256] -> k chained MatMuls by 256x256 weights -> y."""
    rng = np.random.default_rng(k)
    nodes, inits, prev = [], [], x_name
    for i in range(k):
        w = (rng.standard_normal((N, N)) / np.sqrt(N)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"W{i}"))
        out = "y" if i == k - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [prev, f"W{i}"], [out]))
        prev = out
    graph = helper.make_graph(
        nodes, f"chain{k}",
        [helper.make_tensor_value_info(x_name, TensorProto.FLOAT, ["B", N])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", N])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


@pytest.fixture(scope="module")
def report() -> LatencyReport:
    return benchmark(chain_model(1), chain_model(10), warmup=3, repeat=20, batch=64)


def test_ten_matmuls_are_slower_than_one(report: LatencyReport):
    assert report.ratio > 1.5, report.summary_lines()
    assert report.ratio == pytest.approx(report.b.median / report.a.median)
    assert report.paired_ratio > 1.5


def test_runs_and_interleaving(report: LatencyReport):
    assert report.a.runs == report.b.runs == 20 == report.repeat
    assert len(report.a.times) == len(report.b.times) == 20
    assert report.order == "ABBA" * 10
    for s in (report.a, report.b):
        assert 0 < s.min <= s.p10 <= s.median <= s.p90
        assert s.min <= s.mean


def test_to_dict_and_summary(report: LatencyReport):
    d = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert {"a", "b", "ratio", "paired_ratio", "threads", "warmup", "repeat", "batch"} <= d.keys()
    for side in ("a", "b"):
        assert {"label", "runs", "median_ms", "p10_ms", "p90_ms", "mean_ms", "min_ms"} <= (
            d[side].keys())
        assert d[side]["runs"] == 20
    assert d["a"]["label"] == "original" and d["b"]["label"] == "lowered"
    assert d["repeat"] == 20 and d["batch"] == 64 and d["threads"] == 1
    assert len(report.to_dict(include_times=True)["a"]["times_ms"]) == 20
    lines = report.summary_lines()
    assert any(line.startswith("original") for line in lines)
    assert any(line.startswith("lowered") for line in lines)
    assert "ratio" in lines[-1]


def test_given_inputs_and_odd_repeat():
    x = np.ones((2, N), np.float32)
    rep = benchmark(chain_model(1), chain_model(2), warmup=0, repeat=3, inputs={"x": x},
                    labels=("one", "two"))
    assert rep.order == "ABBAAB"
    assert rep.a.label == "one" and rep.b.runs == 3


def test_mismatched_inputs_raise():
    with pytest.raises(LoweringError, match="different inputs"):
        benchmark(chain_model(1), chain_model(1, x_name="z"), warmup=0, repeat=1)
    with pytest.raises(LoweringError, match="repeat"):
        benchmark(chain_model(1), chain_model(1), repeat=0)
