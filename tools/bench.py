#!/usr/bin/env python3
"""Benchmark onnx_lower over a corpus of models: size, arithmetic, accuracy, latency, memory.

Usage::

    python tools/bench.py                                  # ../shared/corpus + models/, --form auto
    python tools/bench.py --models models/lenet_maxpool.onnx some/folder --form mlp --repeat 20
    python tools/bench.py --json bench.json --plot bench.png

Every model is lowered by the real CLI in a child process::

    python -m onnx_lower IN OUT --form F --max-weight-mb M --validate --benchmark
        --threads T --repeat R --report R.json -q

run inside a temporary folder, so that the child's wall time and peak resident memory are its
own. Peak RSS comes from the child itself: a tiny wrapper runs the CLI module with ``runpy`` and
records ``getrusage(RUSAGE_SELF).ru_maxrss`` at exit (``RUSAGE_CHILDREN`` in the parent is a
running maximum over all children so far, so it cannot give one child's peak). The numbers in
the table come from the child's JSON report (see README, "Report JSON"). A second child lowers
the model again with ``--sparse-storage`` (no validation or benchmark) and the size of the file it
writes is recorded.

A model that cannot be lowered (exit code 2: over the budget, unsupported op, ...) becomes a row
that gives the first line of the error; a model whose validation fails (exit code 1) keeps its
numbers and is flagged. The benchmark itself never stops at a bad model.

Output: a Markdown table on stdout, preceded by the machine (CPU, cores, onnxruntime and numpy
versions, date) and the exact command; ``--json`` writes every number; ``--plot`` draws the
latency ratios and weight sizes if matplotlib is installed (and is skipped with a note if not).
Latencies are medians over interleaved runs on the CPU; on a shared machine their absolute
values are noise and the ratio is the figure to quote.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
CORPUS = REPO_ROOT.parent / "shared" / "corpus"
SAMPLES = REPO_ROOT / "models"
FORMS = ("auto", "mlp", "im2col", "fold-only")
MB = 1024 * 1024
SCHEMA = "onnx_lower.bench/1.0"

if str(REPO_ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO_ROOT))
from onnx_lower.benchmark import machine_info  # noqa: E402

# Runs ``python -m onnx_lower ARGS`` in this process and writes its own peak RSS (bytes) to the
# file named by argv[1]. Exit code and output are the CLI's.
_CHILD = r"""
import resource, runpy, sys
rss_file = sys.argv[1]
sys.argv = ["onnx_lower", *sys.argv[2:]]
code = 0
try:
    runpy.run_module("onnx_lower", run_name="__main__", alter_sys=True)
except SystemExit as exc:
    if exc.code is None or isinstance(exc.code, int):
        code = exc.code or 0
    else:
        print(exc.code, file=sys.stderr)
        code = 1
finally:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    with open(rss_file, "w") as f:
        f.write(str(peak * scale))
sys.exit(code)
"""

#: Every key of a row in the JSON output (pinned by tests/test_bench_tool.py).
ROW_KEYS = (
    "model",
    "path",
    "form",
    "form_used",
    "status",
    "exit_code",
    "error",
    "wall_s",
    "load_s",
    "lower_s",
    "peak_rss_mb",
    "sparse_wall_s",
    "sparse_peak_rss_mb",
    "weight_bytes_orig",
    "weight_bytes_lowered",
    "file_bytes_orig",
    "file_bytes_lowered",
    "file_bytes_sparse",
    "nodes_orig",
    "nodes_lowered",
    "matmuls",
    "macs_orig",
    "macs_lowered",
    "kept_ops",
    "validation_passed",
    "max_abs_err",
    "max_rel_err",
    "latency_orig_ms",
    "latency_lowered_ms",
    "ratio",
    "paired_ratio",
)


# --------------------------------------------------------------------------- arguments


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tools/bench.py",
        description="Lower, validate and time every model of a corpus; print a Markdown table.",
    )
    p.add_argument(
        "--models",
        nargs="+",
        metavar="PATH",
        help=f"model files or folders of .onnx files (default: {CORPUS} and {SAMPLES})",
    )
    p.add_argument("--form", choices=FORMS, default="auto", help="target form (default: auto)")
    p.add_argument("--max-weight-mb", type=float, default=1024, help="mlp budget (default 1024)")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime threads (default 1)")
    p.add_argument("--repeat", type=int, default=100, help="timed runs per model (default 100)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per child (default 1800)")
    p.add_argument("--no-sparse", action="store_true", help="skip the --sparse-storage run")
    p.add_argument("--json", metavar="OUT.json", help="write every number as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="draw ratios and sizes (needs matplotlib)")
    return p


def find_models(paths: list[str] | None) -> list[Path]:
    """Files as given; folders give their ``*.onnx`` files (not recursive), sorted by name."""
    if paths is None:
        roots = []
        if CORPUS.is_dir():
            roots.append(CORPUS)
        else:
            print(f"note: corpus folder {CORPUS} is absent; benchmarking {SAMPLES} only",
                  file=sys.stderr)
        roots.append(SAMPLES)
    else:
        roots = [Path(p) for p in paths]
    models: list[Path] = []
    for root in roots:
        if root.is_dir():
            models.extend(sorted(root.glob("*.onnx")))
        else:
            models.append(root)  # a missing file becomes an error row, reported by the CLI
    return models


# --------------------------------------------------------------------------- running children


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("PYTHONHASHSEED", "0")
    return env


def run_cli(cli_args: list[str], workdir: Path, timeout: float) -> dict[str, Any]:
    """Run the CLI in a child process; its exit code, stderr, wall time and peak RSS."""
    rss_file = workdir / f".rss-{time.monotonic_ns()}"
    cmd = [sys.executable, "-c", _CHILD, str(rss_file), *cli_args]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=workdir,
                              env=_child_env(), timeout=timeout)
        code, stderr = proc.returncode, proc.stderr
    except subprocess.TimeoutExpired:
        code, stderr = None, f"timed out after {timeout:g} s"
    wall = time.perf_counter() - start
    peak = None
    try:
        peak = int(rss_file.read_text()) / MB
    except (OSError, ValueError):
        pass
    return {"exit_code": code, "stderr": stderr, "wall_s": wall, "peak_rss_mb": peak}


def first_error_line(stderr: str) -> str:
    """The line that says what went wrong: the first ``error:``-like line, else the first one."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    for prefix in ("error:", "internal error:", "validation failed:"):
        for ln in lines:
            if ln.startswith(prefix):
                return ln
    return lines[-1] if lines else "(no message)"


def file_bytes(path: Path) -> int | None:
    """Size of a model file plus its external data file, if any."""
    if not path.exists():
        return None
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def _num(x: Any) -> float | None:
    """A float from a report value (the report writes non-finite floats as strings)."""
    if x is None:
        return None
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def bench_model(path: Path, index: int, args: argparse.Namespace, workdir: Path) -> dict:
    row: dict[str, Any] = dict.fromkeys(ROW_KEYS)
    row.update(model=path.stem, path=str(path), form=args.form)
    src = path.resolve() if path.exists() else path.absolute()
    out = workdir / f"{index:03d}-{path.stem}.onnx"
    rep = workdir / f"{index:03d}-{path.stem}.json"
    common = ["--form", args.form, "--max-weight-mb", f"{args.max_weight_mb:g}"]
    res = run_cli(
        [str(src), str(out), *common, "--validate", "--benchmark", "--threads",
         str(args.threads), "--repeat", str(args.repeat), "--report", str(rep), "-q"],
        workdir,
        args.timeout,
    )
    row.update(exit_code=res["exit_code"], wall_s=res["wall_s"], peak_rss_mb=res["peak_rss_mb"])
    row["file_bytes_orig"] = file_bytes(src)
    report = None
    if res["exit_code"] in (0, 1) and rep.exists():
        try:
            report = json.loads(rep.read_text())
        except (OSError, ValueError) as exc:
            res["stderr"] += f"\nerror: unreadable report {rep}: {exc}"
    if report is None:
        row["status"] = "timeout" if res["exit_code"] is None else "error"
        row["error"] = first_error_line(res["stderr"])
        return row
    row["status"] = "ok" if res["exit_code"] == 0 else "validation_failed"
    if res["exit_code"] != 0:
        row["error"] = first_error_line(res["stderr"])
    fill_from_report(row, report)
    row["file_bytes_lowered"] = file_bytes(out)
    if not args.no_sparse:
        sparse = workdir / f"{index:03d}-{path.stem}.sparse.onnx"
        sres = run_cli([str(src), str(sparse), *common, "--sparse-storage", "-q"], workdir,
                       args.timeout)
        row["sparse_wall_s"] = sres["wall_s"]
        row["sparse_peak_rss_mb"] = sres["peak_rss_mb"]
        row["file_bytes_sparse"] = file_bytes(sparse) if sres["exit_code"] == 0 else None
        for f in (sparse, sparse.with_name(sparse.name + ".data")):
            f.unlink(missing_ok=True)
    for f in (out, out.with_name(out.name + ".data")):
        f.unlink(missing_ok=True)
    return row


def fill_from_report(row: dict, r: dict) -> None:
    before, after = r.get("before") or {}, r.get("after") or {}
    timings = r.get("timings") or {}
    row.update(
        form_used=r.get("form_used"),
        load_s=timings.get("load_s"),
        lower_s=timings.get("lower_s"),
        weight_bytes_orig=before.get("weight_bytes"),
        weight_bytes_lowered=after.get("weight_bytes"),
        nodes_orig=before.get("nodes"),
        nodes_lowered=after.get("nodes"),
        matmuls=(after.get("ops") or {}).get("MatMul", 0),
        macs_orig=before.get("macs"),
        macs_lowered=after.get("macs"),
        kept_ops=r.get("kept_ops") or {},
    )
    v = r.get("validation")
    if v:
        outs = v.get("outputs") or []
        row["validation_passed"] = bool(v.get("passed"))
        abs_errs = [_num(o.get("max_abs_err")) for o in outs]
        rel_errs = [_num(o.get("max_rel_err")) for o in outs]
        row["max_abs_err"] = max((e for e in abs_errs if e is not None), default=None)
        row["max_rel_err"] = max((e for e in rel_errs if e is not None), default=None)
    lat = r.get("latency")
    if lat:
        row["latency_orig_ms"] = _num(lat["a"]["median_ms"])
        row["latency_lowered_ms"] = _num(lat["b"]["median_ms"])
        row["ratio"] = _num(lat.get("ratio"))
        row["paired_ratio"] = _num(lat.get("paired_ratio"))


# --------------------------------------------------------------------------- output


def _mb(n: Any) -> str:
    return "—" if n is None else f"{n / MB:.2f}"


def _si(n: Any) -> str:
    if n is None:
        return "—"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _f(x: Any, fmt: str) -> str:
    if x is None:
        return "—"
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return format(x, fmt)


COLUMNS = (
    "model", "form used", "lower s", "peak RSS MB", "W orig MB", "W lowered MB",
    "sparse file MB", "MatMuls", "MACs orig", "MACs lowered", "max abs err", "max rel err",
    "lat orig ms", "lat lowered ms", "ratio", "status",
)


def table_row(row: dict) -> list[str]:
    if row["status"] == "ok":
        status = "ok"
    elif row["status"] == "validation_failed":
        status = f"VALIDATION FAILED ({row['error']})"
    elif row["status"] == "timeout":
        status = f"timeout: {row['error']}"
    else:
        status = row["error"] or "error"
    status = status.replace("|", "\\|")
    return [
        row["model"],
        row["form_used"] or row["form"],
        _f(row["lower_s"], ".2f"),
        _f(row["peak_rss_mb"], ".0f"),
        _mb(row["weight_bytes_orig"]),
        _mb(row["weight_bytes_lowered"]),
        _mb(row["file_bytes_sparse"]),
        _f(row["matmuls"], "d"),
        _si(row["macs_orig"]),
        _si(row["macs_lowered"]),
        _f(row["max_abs_err"], ".1e"),
        _f(row["max_rel_err"], ".1e"),
        _f(row["latency_orig_ms"], ".3f"),
        _f(row["latency_lowered_ms"], ".3f"),
        "—" if row["ratio"] is None else f"{row['ratio']:.2f}x",
        status,
    ]


def markdown(rows: list[dict], machine: dict, command: str, args: argparse.Namespace) -> str:
    lines = [
        f"machine: {machine['cpu']}, {machine['cores']} cores ({machine['usable_cores']} usable); "
        f"onnxruntime {machine['onnxruntime']}, numpy {machine['numpy']}, onnx "
        f"{machine['onnx']}, Python {machine['python']}; {machine['date']}",
        f"command: {command}",
        f"settings: --form {args.form} --max-weight-mb {args.max_weight_mb:g} --threads "
        f"{args.threads} --repeat {args.repeat}; latencies are medians of interleaved runs, "
        f"ratio = lowered/original",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" if i < 2 or c == "status" else "---:"
                       for i, c in enumerate(COLUMNS)) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(table_row(row)) + " |")
    ok = sum(r["status"] == "ok" for r in rows)
    lines += ["", f"{len(rows)} model(s): {ok} ok, {len(rows) - ok} not ok"]
    return "\n".join(lines)


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_jsonable(v) for v in x]
    return x


def plot(rows: list[dict], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"note: matplotlib is not installed; --plot {path} skipped", file=sys.stderr)
        return
    done = [r for r in rows if r["ratio"] is not None]
    if not done:
        print("note: no model has latencies; nothing to plot", file=sys.stderr)
        return
    names = [r["model"] for r in done]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(6, 0.5 * len(names) + 2), 8))
    ax1.bar(names, [r["ratio"] for r in done])
    ax1.axhline(1.0, color="k", lw=0.8)
    ax1.set_yscale("log")
    ax1.set_ylabel("latency lowered / original")
    x = range(len(names))
    for off, key, label in ((-0.3, "weight_bytes_orig", "original"),
                            (0.0, "weight_bytes_lowered", "lowered"),
                            (0.3, "file_bytes_sparse", "sparse file")):
        ax2.bar([i + off for i in x], [(r[key] or 0) / MB for r in done], width=0.3, label=label)
    ax2.set_yscale("log")
    ax2.set_ylabel("MB")
    ax2.set_xticks(list(x))
    ax2.set_xticklabels(names)
    ax2.legend()
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", labelrotation=60)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}", file=sys.stderr)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.repeat < 1 or args.threads < 1:
        print("error: --repeat and --threads must be at least 1", file=sys.stderr)
        return 2
    models = find_models(args.models)
    if not models:
        print("error: no .onnx models found; give files or folders with --models",
              file=sys.stderr)
        return 2
    command = shlex.join(["python", *sys.argv]) if argv is None else shlex.join(
        ["python", "tools/bench.py", *argv])
    machine = machine_info()
    rows = []
    with tempfile.TemporaryDirectory(prefix="onnx_lower_bench_") as tmp:
        for i, path in enumerate(models):
            print(f"[{i + 1}/{len(models)}] {path}", file=sys.stderr, flush=True)
            try:
                row = bench_model(path, i, args, Path(tmp))
            except Exception as exc:  # a bug here must not lose the other rows
                row = dict.fromkeys(ROW_KEYS)
                row.update(model=path.stem, path=str(path), form=args.form, status="error",
                           error=f"bench.py: {type(exc).__name__}: {exc}")
            rows.append(row)
    print(markdown(rows, machine, command, args))
    if args.json:
        doc = {
            "schema": SCHEMA,
            "command": command,
            "machine": machine,
            "settings": {
                "form": args.form,
                "max_weight_mb": float(args.max_weight_mb),
                "threads": args.threads,
                "repeat": args.repeat,
            },
            "rows": rows,
        }
        Path(args.json).write_text(json.dumps(_jsonable(doc), indent=2) + "\n")
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
