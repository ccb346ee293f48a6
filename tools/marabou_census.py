#!/usr/bin/env python3
"""The corpus as Marabou sees it: ``.nnet`` sizes, Marabou read cost, and time to a verdict.

Usage::

    python tools/marabou_census.py                      # ../shared/corpus, markdown on stdout
    python tools/marabou_census.py --models a.onnx --json census.json --timeout 300

For every model: lowered in ``--form layered`` when that form exists (else ``--form mlp``,
whose output is a strict chain only for fully-connected models), the chain written as
``.nnet``; then Marabou reads the original ONNX, the lowered ONNX and the ``.nnet``, each in
its own child process, which reports its wall time and its own peak RSS. The peak is the
child's ``VmHWM`` (``/proc/self/status``), not ``getrusage(RUSAGE_SELF).ru_maxrss``: Linux
keeps ``ru_maxrss`` across fork and exec, so a child of this process (which holds the lowered
weights) would report the parent's peak; ``RUSAGE_CHILDREN`` is a running maximum over all
children. ``ru_maxrss`` is the fallback where ``/proc`` is absent. A read over ``--timeout``
seconds is killed and shown as such; each child runs under an address-space cap
(``--max-as-gb``, 12 GB), and a read that hits it is shown as out of memory at the cap. After
the read the child evaluates the parsed equations at a seeded input
(:func:`onnx_lower.marabou.evaluate_equations`, no solver): its time is the ``eval`` and the
peak includes it.

For the property models (``PROPERTIES``: model, ε), a local-robustness query (L∞ box of
radius ε around a seeded input in [0, 1], "the argmax does not change",
:func:`onnx_lower.marabou.robustness`) is solved on the original, on the lowered ONNX and on
the ``.nnet`` (whose input bounds are the box), each in a child, and the time to the verdict
is recorded with the verdict.
"""

from __future__ import annotations

import argparse
import json
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import onnx  # noqa: E402

import onnx_lower  # noqa: E402
from onnx_lower import cost  # noqa: E402
from onnx_lower.errors import LoweringError  # noqa: E402
from onnx_lower.nnet import chain_layers, write_nnet  # noqa: E402

CORPUS = REPO_ROOT.parent / "shared" / "corpus"
#: model -> ε of the robustness query (chosen so that Marabou answers in about a minute).
PROPERTIES = {"stanleybak__mnist-net_256x2.onnx": 0.01, "stanleybak__cifar10_small.onnx": 2e-4}

# Child: read (and optionally solve) with Marabou, print one JSON line with time and peak RSS.
_CHILD = r"""
import json, resource, sys, time, warnings
warnings.simplefilter("ignore")
sys.path.insert(0, sys.argv[1])
import numpy as np
from onnx_lower import marabou as mb
path, query = sys.argv[2], json.loads(sys.argv[3])
start = time.perf_counter()
net = mb.read(path)
out = {"read_s": time.perf_counter() - start}
if not query:  # the parsed equations, evaluated without the solver at a seeded input
    x = np.random.default_rng(0).uniform(0, 1, np.asarray(net.inputVars[0]).size)
    start = time.perf_counter()
    try:
        mb.evaluate_equations(net, x)
        out["eval_s"] = time.perf_counter() - start
    except mb.LoweringError as exc:
        out["eval_error"] = str(exc)[:80]
if query:
    lo, hi = np.load(query["box"])
    r = mb.robustness(net, lo, hi, query["label"], timeout=query["timeout"],
                      set_box=not path.endswith(".nnet"))
    out.update(verdict=r.verdict, solve_s=r.seconds)
try:  # VmHWM: this process image's own peak (ru_maxrss keeps the parent's across fork + exec)
    with open("/proc/self/status") as f:
        hwm = next(int(x.split()[1]) for x in f if x.startswith("VmHWM:"))
except (OSError, StopIteration):
    hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out["peak_rss"] = hwm * 1024
print(json.dumps(out))
"""


#: Address-space cap of each Marabou child (``--max-as-gb``), so that a read too big for the
#: machine fails in its child instead of taking the machine down.
MAX_AS_BYTES = 12 * 10**9


def _cap() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MAX_AS_BYTES, MAX_AS_BYTES))


def _child(path: Path, query: dict | None, timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, "-c", _CHILD, str(REPO_ROOT), str(path), json.dumps(query or {})]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              preexec_fn=_cap)
    except subprocess.TimeoutExpired:
        return {"error": f"over {timeout:g} s"}
    lines = [x for x in done.stdout.splitlines() if x.startswith("{")]
    if done.returncode or not lines:
        tail = (done.stderr.strip().splitlines() or ["?"])[-1]
        if "MemoryError" in done.stderr or "bad_alloc" in done.stderr or done.returncode < 0:
            tail = f"out of memory at the {MAX_AS_BYTES / 1e9:g} GB cap ({tail[:40]})"
        return {"error": tail[:80]}
    return json.loads(lines[-1])


def census(model: Path, tmp: Path, timeout: float, solve_timeout: float) -> dict[str, Any]:
    form = "layered"
    row: dict[str, Any] = {"model": model.name, "form": form}
    try:
        lowered, _ = onnx_lower.lower(model, form=form)
    except LoweringError as exc:
        row["error"] = str(exc).split(". ")[0]
        return row
    low_path = tmp / f"{model.stem}.{form}.onnx"
    onnx_lower.save_model(lowered, low_path)
    row["weight_bytes"] = cost.weight_bytes(lowered)
    row["original"] = _child(model, None, timeout)
    row["lowered_onnx"] = _child(low_path, None, timeout)
    try:
        layers = chain_layers(lowered)
    except LoweringError as exc:
        row["nnet_error"] = exc.fact
        layers = None
    if layers is not None:
        nnet_path = tmp / f"{model.stem}.nnet"
        info = write_nnet(layers, nnet_path, source=model.name)
        row.update(layers=len(layers), max_width=max(info.layer_sizes), nnet_bytes=info.bytes,
                   reluval_long_rows=info.long_rows.get("ReluVal", {}).get("rows", 0))
        row["nnet"] = _child(nnet_path, None, timeout)
    if model.name in PROPERTIES:
        row["property"] = _property(model, layers, low_path, tmp, solve_timeout)
    return row


def _property(model, layers, low_path, tmp, timeout) -> dict[str, Any]:
    from onnx_lower.validate import graph_inputs, make_session

    eps = PROPERTIES[model.name]
    spec = graph_inputs(onnx.load(str(model)))[0]
    shape = [d if isinstance(d, int) else 1 for d in spec.dims]
    x = np.random.default_rng(0).uniform(0, 1, shape).astype(spec.dtype)
    y = make_session(model, 1, label="original").run(None, {spec.name: x})[0]
    lo, hi = x.reshape(-1).astype(np.float64) - eps, x.reshape(-1).astype(np.float64) + eps
    np.save(tmp / "box.npy", np.stack([lo, hi]))
    query = {"box": str(tmp / "box.npy"), "label": int(y.argmax()), "timeout": int(timeout)}
    out = {"eps": eps, "original": _child(model, query, timeout + 60),
           "lowered_onnx": _child(low_path, query, timeout + 60)}
    if layers is not None:
        boxed = tmp / f"{model.stem}.box.nnet"
        write_nnet(layers, boxed, (lo, hi), source=model.name)
        out["nnet"] = _child(boxed, query, timeout + 60)
    return out


def _read(cell: dict | None) -> str:
    if not cell:
        return "-"
    if "error" in cell:
        return cell["error"]
    ev = f" + eval {cell['eval_s']:.1f} s" if "eval_s" in cell else ""
    return f"{cell['read_s']:.2f} s{ev}, {cell['peak_rss'] / 2**20:.0f} MB"


def _verdict(cell: dict | None) -> str:
    if not cell:
        return "-"
    if "error" in cell:
        return cell["error"]
    return f"{cell['verdict']} in {cell['solve_s']:.1f} s"


def table(rows: list[dict]) -> list[str]:
    head = ("model", "form", "layers", "max width", "weights MB", ".nnet MB", "ReluVal long rows",
            "Marabou read: original", "lowered ONNX", ".nnet")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['form']} | {r['error']} |" + " |" * 7)
            continue
        nnet = (str(r["layers"]), str(r["max_width"]), f"{r['nnet_bytes'] / 2**20:.2f}",
                str(r["reluval_long_rows"])) if "layers" in r else ("not a chain", "", "", "")
        cells = (r["model"].removesuffix(".onnx"), r["form"], nnet[0], nnet[1],
                 f"{r['weight_bytes'] / 2**20:.2f}", nnet[2], nnet[3], _read(r["original"]),
                 _read(r["lowered_onnx"]), _read(r.get("nnet")))
        lines.append("| " + " | ".join(cells) + " |")
    props = [r for r in rows if "property" in r]
    if props:
        lines += ["", "| property model | ε | original | lowered ONNX | .nnet (box in file) |",
                  "|---|---|---|---|---|"]
        for r in props:
            p = r["property"]
            lines.append(f"| {r['model'].removesuffix('.onnx')} | {p['eps']:g} | "
                         f"{_verdict(p['original'])} | {_verdict(p['lowered_onnx'])} | "
                         f"{_verdict(p.get('nnet'))} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    global MAX_AS_BYTES
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", type=Path, help="models (default: the corpus)")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per Marabou child")
    ap.add_argument("--solve-timeout", type=float, default=300, help="seconds per property")
    ap.add_argument("--json", type=Path, help="write every number here")
    ap.add_argument("--max-as-gb", type=float, default=MAX_AS_BYTES / 1e9,
                    help="address-space cap of each Marabou child, GB (default 12)")
    args = ap.parse_args(argv)
    MAX_AS_BYTES = int(args.max_as_gb * 1e9)
    models = args.models or sorted(CORPUS.glob("*.onnx"))
    rows = []
    with tempfile.TemporaryDirectory(prefix="marabou_census_") as tmp:
        for m in models:
            start = time.perf_counter()
            rows.append(census(Path(m), Path(tmp), args.timeout, args.solve_timeout))
            print(f"{m.name}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    print("command: " + shlex.join(["python", "tools/marabou_census.py", *(argv or sys.argv[1:])]))
    print("\n".join(table(rows)))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
