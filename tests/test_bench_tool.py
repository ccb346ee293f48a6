"""tools/bench.py: one model end to end, and a failing model becomes a row, not a crash."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from onnx_lower import cost

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCH = REPO_ROOT / "tools" / "bench.py"
SAMPLE = REPO_ROOT / "models" / "avgpool_strided.onnx"

TOP_KEYS = {"schema", "command", "machine", "settings", "rows"}
MACHINE_KEYS = {"cpu", "cores", "usable_cores", "python", "onnxruntime", "onnx", "numpy",
                "platform", "date"}
ROW_KEYS = {
    "model", "path", "form", "form_used", "status", "exit_code", "error", "wall_s", "load_s",
    "lower_s", "peak_rss_mb", "sparse_wall_s", "sparse_peak_rss_mb", "weight_bytes_orig",
    "weight_bytes_lowered", "file_bytes_orig", "file_bytes_lowered", "file_bytes_sparse",
    "nodes_orig", "nodes_lowered", "matmuls", "macs_orig", "macs_lowered", "kept_ops",
    "validation_passed", "max_abs_err", "max_rel_err", "latency_orig_ms", "latency_lowered_ms",
    "ratio", "paired_ratio",
}


def run_bench(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "bench.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, str(BENCH), *args, "--json", str(out)],
                          capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc, json.loads(out.read_text())


def test_row_keys_match_the_tool():
    spec = importlib.util.spec_from_file_location("bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert set(bench.ROW_KEYS) == ROW_KEYS


def test_one_model(tmp_path):
    proc, doc = run_bench(tmp_path, "--models", "models/avgpool_strided.onnx", "--form", "mlp",
                          "--repeat", "3")
    assert set(doc) == TOP_KEYS
    assert set(doc["machine"]) == MACHINE_KEYS
    assert doc["settings"] == {"form": "mlp", "max_weight_mb": 1024, "threads": 1, "repeat": 3}
    assert "--models models/avgpool_strided.onnx" in doc["command"]
    (row,) = doc["rows"]
    assert set(row) == ROW_KEYS
    assert row["status"] == "ok", row["error"]
    assert row["exit_code"] == 0 and row["error"] is None
    assert row["model"] == "avgpool_strided" and row["form_used"] == "mlp"

    model = onnx.load(str(SAMPLE))
    assert row["weight_bytes_orig"] == cost.weight_bytes(model)
    assert row["macs_orig"] == cost.count_macs(model)
    assert row["nodes_orig"] == len(model.graph.node)
    assert row["file_bytes_orig"] == SAMPLE.stat().st_size
    assert row["matmuls"] >= 1
    assert row["weight_bytes_lowered"] > 0 and row["macs_lowered"] > 0
    assert 0 < row["file_bytes_sparse"] <= row["file_bytes_lowered"]
    assert row["validation_passed"] is True
    assert 0 <= row["max_abs_err"] < 1e-4
    assert 0 <= row["max_rel_err"] < 1
    assert row["latency_orig_ms"] > 0 and row["latency_lowered_ms"] > 0
    assert row["ratio"] == pytest.approx(row["latency_lowered_ms"] / row["latency_orig_ms"])
    assert 10 < row["peak_rss_mb"] < 4096
    assert row["wall_s"] > 0 and 0 <= row["lower_s"] < row["wall_s"]

    out = proc.stdout
    assert out.startswith("machine: ") and "\ncommand: python " in out
    table = [ln for ln in out.splitlines() if ln.startswith("| ")]
    assert table[0].startswith("| model | form used | lower s | peak RSS MB |")
    assert table[1].startswith("| avgpool_strided | mlp |") and table[1].endswith("| ok |")


def test_failures_become_rows(tmp_path):
    """Over budget (exit 2) and a missing file: rows with the reason, and the tool carries on."""
    proc, doc = run_bench(tmp_path, "--models", "models/lenet_maxpool.onnx", "missing.onnx",
                          "--form", "mlp", "--max-weight-mb", "0.01", "--repeat", "1",
                          "--no-sparse")
    over, missing = doc["rows"]
    for row in (over, missing):
        assert set(row) == ROW_KEYS
        assert row["status"] == "error" and row["exit_code"] == 2
        assert row["error"].startswith("error: ")
        assert "\n" not in row["error"]
    assert "budget" in over["error"]
    assert "does not exist" in missing["error"]
    assert "2 model(s): 0 ok, 2 not ok" in proc.stdout
    assert "| lenet_maxpool | mlp |" in proc.stdout
