#!/usr/bin/env python3
"""Latency of the im2col form against the original network, in onnxruntime on the CPU.

Usage::

    python tools/bench_im2col.py                          # ImageNet set + models/ + corpus
    python tools/bench_im2col.py --only resnet18,squeezenet --repeat 50
    python tools/bench_im2col.py --models a.onnx b.onnx --threads 1 --json im2col.json

For every model: lower it with ``onnx_lower.lower(model, form="im2col", conv_algo=...)``
(``--conv-algo``, default auto; timed), check the
numerics with :func:`onnx_lower.validate.validate` (rtol = atol = 1e-4, batch 1, random inputs
in [0, 1); the table gives the elementwise max relative error and the scaled error, max abs error
over the output's largest magnitude), and time original and lowered with
:func:`onnx_lower.benchmark.benchmark` (batch 1, interleaved A/B runs after warm-up) for each
thread count. The table gives the medians and the ratio lowered/original per thread count; the
last lines give the geometric mean of the ratios over the ImageNet set and over every model.
On a shared machine absolute times are noise: quote the ratios.

The default model list is ``models/imagenet/{resnet18,resnet50,vgg11,mobilenetv2,squeezenet}``
(make them with ``python tools/make_models.py --imagenet``; missing ones are skipped with a
note), the samples in ``models/`` and ``../shared/corpus/*.onnx``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO_ROOT))

import onnx  # noqa: E402

import onnx_lower  # noqa: E402
from onnx_lower.benchmark import benchmark, machine_info  # noqa: E402
from onnx_lower.errors import LoweringError  # noqa: E402
from onnx_lower.validate import validate  # noqa: E402
from tools.make_models import IMAGENET, IMAGENET_DIR  # noqa: E402

SAMPLES_DIR = REPO_ROOT / "models"
CORPUS_DIR = REPO_ROOT.parent / "shared" / "corpus"


def default_models() -> tuple[list[Path], list[str]]:
    paths, notes = [], []
    for name in IMAGENET:
        p = IMAGENET_DIR / f"{name}.onnx"
        if p.is_file():
            paths.append(p)
        else:
            notes.append(f"{p} is missing (python tools/make_models.py --imagenet)")
    paths += sorted(SAMPLES_DIR.glob("*.onnx"))
    if CORPUS_DIR.is_dir():
        paths += sorted(CORPUS_DIR.glob("*.onnx"))
    else:
        notes.append(f"the corpus is not at {CORPUS_DIR}")
    return paths, notes


def bench_one(path: Path, threads: list[int], repeat: int, warmup: int,
              conv_algo: str = "auto") -> dict:
    row: dict = {"model": path.stem, "path": str(path), "imagenet": path.parent == IMAGENET_DIR}
    original = onnx.load(str(path))
    start = time.perf_counter()
    try:
        lowered, _ = onnx_lower.lower(original, form="im2col", conv_algo=conv_algo)
    except LoweringError as exc:
        row["error"] = str(exc).splitlines()[0]
        return row
    row["lower_s"] = time.perf_counter() - start
    ops = {}
    for n in lowered.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    row["ops"] = dict(sorted(ops.items()))
    report = validate(original, lowered, rtol=1e-4, atol=1e-4, samples=2)
    row["valid"] = report.passed
    row["max_rel_err"] = max((o.max_rel_err for o in report.outputs), default=0.0)
    row["max_abs_err"] = max((o.max_abs_err for o in report.outputs), default=0.0)
    row["scaled_err"] = max((o.scaled_err for o in report.outputs), default=0.0)
    for t in threads:
        r = benchmark(original, lowered, threads=t, warmup=warmup, repeat=repeat)
        row[f"orig_ms_{t}"] = r.a.median * 1e3
        row[f"lowered_ms_{t}"] = r.b.median * 1e3
        row[f"ratio_{t}"] = r.ratio
        row[f"paired_ratio_{t}"] = r.paired_ratio
    return row


def geomean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x and x > 0]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def markdown(rows: list[dict], threads: list[int], machine: dict) -> str:
    t0 = threads[0]
    head = ["model", "lowering s", "max rel err", "scaled err", "valid", f"orig ms ({t0}T)",
            f"lowered ms ({t0}T)", *(f"ratio {t}T" for t in threads)]
    lines = [
        f"machine: {machine['cpu']}, {machine['cores']} cores ({machine['usable_cores']} usable), "
        f"onnxruntime {machine['onnxruntime']}, onnx {machine['onnx']}, numpy {machine['numpy']}, "
        f"{machine['date']}",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | error: {r['error']} |" + " |" * (len(head) - 2))
            continue
        cells = [r["model"], f"{r['lower_s']:.2f}", f"{r['max_rel_err']:.1e}",
                 f"{r['scaled_err']:.1e}",
                 "yes" if r["valid"] else "**NO**", f"{r[f'orig_ms_{t0}']:.2f}",
                 f"{r[f'lowered_ms_{t0}']:.2f}", *(f"{r[f'ratio_{t}']:.3f}" for t in threads)]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for label, subset in (("ImageNet set", [r for r in rows if r.get("imagenet")]),
                          ("all models", rows)):
        ok = [r for r in subset if "error" not in r]
        if not ok:
            continue
        parts = []
        for t in threads:
            gm = geomean([r[f"ratio_{t}"] for r in ok])
            worst = max(ok, key=lambda r: r[f"ratio_{t}"])
            parts.append(f"{t}T geomean {gm:.3f} (worst {worst['model']} "
                         f"{worst[f'ratio_{t}']:.3f})")
        lines.append(f"- {label} ({len(ok)} models): " + "; ".join(parts))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", help="ONNX files (default: ImageNet set, samples, "
                    "corpus)")
    ap.add_argument("--only", help="comma-separated model names (file stems) to keep")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts (1,2)")
    ap.add_argument("--repeat", type=int, default=20, help="timed runs per model (20)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed runs first (5)")
    ap.add_argument("--json", help="also write every number to this JSON file")
    ap.add_argument("--conv-algo", default="auto", help="lower(conv_algo=...): auto (default), "
                    "im2col or winograd")
    args = ap.parse_args(argv)
    if args.models:
        paths, notes = [Path(p) for p in args.models], []
    else:
        paths, notes = default_models()
    if args.only:
        keep = set(args.only.split(","))
        paths = [p for p in paths if p.stem in keep]
    threads = [int(t) for t in args.threads.split(",")]
    machine = machine_info()
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    rows = []
    for p in paths:
        print(f"[{len(rows) + 1}/{len(paths)}] {p.stem}", file=sys.stderr, flush=True)
        rows.append(bench_one(p, threads, args.repeat, args.warmup, args.conv_algo))
    print(f"conv_algo: {args.conv_algo}")
    print(markdown(rows, threads, machine))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    return 0 if all(r.get("valid", False) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
