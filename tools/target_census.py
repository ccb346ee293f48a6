"""Census of Marabou on a corpus: the original, ``--target marabou`` and ``--form mlp`` (issue 15).

For each model, each variant is read by ``Marabou.read_onnx`` in a child process of its own
(read time, ``ru_maxrss`` peak memory of the child), then evaluated with
``evaluateWithMarabou`` (Marabou's own solver on the parsed query with the input fixed, interval
tightening only; or, with ``--evaluator propagate``, :func:`onnx_lower.marabou.evaluate_equations`
of the parsed query, no solver) on
a seeded standard-normal input (the model's static batch, else 1; nonzero borders, so padding
matters), compared with onnxruntime on the *original*. (``evaluateWithoutMarabou`` runs
onnxruntime on the file, not the parsed query: it cannot see a misread.) The scaled error is
``max |marabou − ort| / max |ort|``. ReLU, max and sigmoid (Tanh is written as a sigmoid)
constraints are counted from the parsed query; the memory shown is the peak after the read.
The mlp variant is written with ``--max-weight-mb 300``; a model over that is skipped (said so).

    python tools/target_census.py [--corpus ../shared/corpus] [--out census.json] [--timeout 900]
        [--variants original,target,mlp] [--only NAME] [--evaluator solver|propagate]

Prints a Markdown table (the BENCHMARKS.md "Targets (issue 15)" one) and writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

OK_ERROR = 1e-5


def child(model: str, original: str, evaluator: str = "solver") -> dict:
    """Read ``model`` with Marabou and compare its evaluation with onnxruntime on ``original``.

    ``evaluator``: ``solver`` (``evaluate_with_solver``) or ``propagate``
    (``evaluate_equations``).
    """
    import warnings

    warnings.filterwarnings("ignore")
    import onnxruntime as ort
    from maraboupy import Marabou

    from onnx_lower import marabou as mb
    from onnx_lower.errors import LoweringError

    start = time.perf_counter()
    try:
        net = Marabou.read_onnx(model)
    except Exception as exc:  # the verifier's own failure is the measurement
        return {"status": "error", "error": f"{type(exc).__name__}: {str(exc)[:120]}"}
    read_s = time.perf_counter() - start
    read_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    sess = ort.InferenceSession(original, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    shape = [d if isinstance(d, int) and d > 0 else 1 for d in inp.shape]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    ref = sess.run(None, {inp.name: x})[0]
    start = time.perf_counter()
    evaluate = mb.evaluate_equations if evaluator == "propagate" else mb.evaluate_with_solver
    try:
        got = [evaluate(net, x)]
    except mb.MarabouEquationError as exc:  # an output no equation reaches: a misread
        return {"status": "wrong", "error": str(exc)[:120]}
    except LoweringError as exc:  # the solver's TIMEOUT or unsat, named
        return {"status": "error", "error": str(exc)[:120]}
    eval_s = time.perf_counter() - start
    if got is None or np.asarray(got[0]).size != ref.size:
        err = float("inf")
    else:
        got = np.asarray(got[0]).reshape(ref.shape)
        err = float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30))
    return {
        "status": "ok" if err <= OK_ERROR else "wrong",
        "read_s": round(read_s, 2),
        "eval_s": round(eval_s, 2),
        "read_peak_mb": read_mb,
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
        "evaluator": evaluator,
        "error": err,
        "relus": len(net.reluList),
        "maxes": len(net.maxList),
        "sigmoids": len(getattr(net, "sigmoidList", [])),
        "equations": len(net.equList),
    }


def _in_child(model: str, original: str, timeout: int, evaluator: str = "solver") -> dict:
    cmd = [sys.executable, __file__, "--child", model, original, "--evaluator", evaluator]
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "error", "error": f"read timed out after {timeout} s"}
    lines = [ln for ln in run.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        tail = (run.stderr.strip().splitlines() or ["no output"])[-1]
        return {"status": "error", "error": f"child died ({run.returncode}): {tail[:120]}"}
    return json.loads(lines[-1])


def _lower(original: Path, out: Path, args: list[str], timeout: int) -> str | None:
    cmd = [sys.executable, "-m", "onnx_lower", str(original), str(out), "-q", *args]
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"lowering timed out after {timeout} s"
    if run.returncode:
        return (run.stderr.strip().splitlines() or ["failed"])[-1][:160]
    return None


def _cell(r: dict) -> str:
    if r.get("status") == "skipped":
        return r["error"]
    if r["status"] == "error":
        return f"error: {r['error']}"
    verdict = "right" if r["status"] == "ok" else "**wrong**"
    if "read_s" not in r:
        return f"**wrong**: {r['error']}"
    how = ", propagated" if r.get("evaluator") == "propagate" else ""
    mb = r.get("read_peak_mb", r["peak_mb"])
    return (f"read {r['read_s']} s, {mb} MB; err {r['error']:.1e} ({verdict}{how}); "
            f"{r['relus']} ReLU / {r['maxes']} max"
            + (f" / {r['sigmoids']} sigmoid" if r.get("sigmoids") else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "ORIGINAL"), help=argparse.SUPPRESS)
    ap.add_argument("--corpus", default="../shared/corpus")
    ap.add_argument("--out", default="target_census.json")
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--only", help="comma-separated substrings of the model names to run")
    ap.add_argument("--variants", default="original,target,mlp")
    ap.add_argument("--evaluator", choices=("solver", "propagate"), default="solver",
                    help="Marabou's solver with the input fixed, or the parsed query's "
                         "equations evaluated without it (onnx_lower.marabou.evaluate_equations; "
                         "where the solver runs out of memory: lenet5's batch of 10)")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, evaluator=args.evaluator)))
        return
    rows = {}
    work = Path(tempfile.mkdtemp(prefix="target_census_"))
    for original in sorted(Path(args.corpus).glob("*.onnx")):
        if args.only and not any(s in original.name for s in args.only.split(",")):
            continue
        variants = args.variants.split(",")
        row = {}
        if "original" in variants:
            row["original"] = _in_child(str(original), str(original), args.timeout,
                                        args.evaluator)
        for variant, flags in (("target", ["--target", "marabou"]),
                               ("mlp", ["--form", "mlp", "--max-weight-mb", "300"])):
            if variant not in variants:
                continue
            out = work / f"{original.stem}.{variant}.onnx"
            failed = _lower(original, out, flags, args.timeout)
            if failed:
                over = "budget" in failed or "MB" in failed
                row[variant] = {"status": "skipped" if over else "error",
                                "error": "skipped: mlp weights > 300 MB" if over else failed}
            else:
                row[variant] = _in_child(str(out), str(original), args.timeout, args.evaluator)
                row[variant]["file_mb"] = round(os.path.getsize(out) / 2**20, 1)
                out.unlink()
        rows[original.stem] = row
        print(original.stem, json.dumps(row), file=sys.stderr, flush=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))
    print_table(rows)


def print_table(rows: dict) -> None:
    heads = {"original": "Marabou on the original", "target": "`--target marabou`",
             "mlp": "`--form mlp`"}
    used = [v for v in heads if any(v in row for row in rows.values())]
    print("| model | " + " | ".join(heads[v] for v in used) + " |")
    print("|---" * (len(used) + 1) + "|")
    for name, row in rows.items():
        cells = [_cell(row[v]) if v in row else "" for v in used]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
