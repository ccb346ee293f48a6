#!/usr/bin/env python3
"""Per-conv times inside a whole network: the original's native Conv against its lowered form.

Usage::

    python tools/profile_layers.py models/imagenet/resnet18.onnx
    python tools/profile_layers.py models/imagenet/resnet18.onnx --runs 50 --threads 1

Both models run in onnxruntime (CPU, all graph optimisations, ``--threads``) with its profiler
on, ``--runs`` times after warm-up, alternating original and lowered run by run. Every profiled
kernel is charged to one conv of the original graph:

* a kernel's node name is mapped back to an original node: the lowered form names its nodes
  ``<original node>/<part>``, onnxruntime's fusions write ``fused <name>/...`` or
  ``<name>_nchwc``; the longest original node name that prefixes it (at a ``/`` boundary) wins;
* an original node belongs to the conv it follows: BatchNormalization, Relu, Clip, Add, ...
  are charged to the conv that produces their first input, as onnxruntime fuses them into it
  (and the lowered form folds them into the conv's GEMM epilogue);
* what maps to no conv (layout edges, pools, the classifier) is listed by original node.

The table gives per conv: its shape, the algorithm ``--conv-algo`` chose (the report's
``conv_algos``), the median over runs of the native and the lowered milliseconds, and their
ratio. The total line is the whole network's median. On a shared machine quote the ratios.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

import onnx_lower  # noqa: E402
from onnx_lower.benchmark import machine_info  # noqa: E402

#: ops that onnxruntime fuses into the conv before them (and the lowered form folds into it)
EPILOGUE = {"BatchNormalization", "Relu", "Clip", "Add", "Sum", "LeakyRelu", "Sigmoid"}


def owners(model: onnx.ModelProto) -> tuple[dict[str, str], dict[str, str]]:
    """(node name → the conv it is charged to, or itself), (conv name → shape text)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    owner: dict[str, str] = {}
    for n in model.graph.node:  # graph order: a producer is resolved before its consumers
        if n.op_type in ("Conv", "ConvTranspose"):
            owner[n.name] = n.name
            continue
        first = producer.get(n.input[0]) if n.input else None
        inherited = owner.get(first.name) if first is not None else None
        owner[n.name] = inherited if n.op_type in EPILOGUE and inherited else n.name
    shapes = {}
    init = {t.name: list(t.dims) for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Conv" and len(n.input) > 1 and n.input[1] in init:
            m, c, *k = init[n.input[1]]
            group = next((a.i for a in n.attribute if a.name == "group"), 1)
            strides = next((list(a.ints) for a in n.attribute if a.name == "strides"), [1])
            shapes[n.name] = (f"{c * group}→{m} {'×'.join(map(str, k))}/{max(strides)}"
                              + (f" g{group}" if group > 1 else ""))
    return owner, shapes


def original_node(kernel: str, names: list[str]) -> str | None:
    """The original node a profiled kernel belongs to (``names`` longest first)."""
    name = kernel.removeprefix("fused ").removesuffix("_nchwc")
    for cand in names:
        if name == cand or name.startswith(cand + "/"):
            return cand
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--runs", type=int, default=30, help="profiled runs of each model (30)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--conv-algo", default="auto")
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args(argv)

    original = onnx.load(args.model)
    lowered, report = onnx_lower.lower(original, form="im2col", conv_algo=args.conv_algo)
    algos = {c["name"]: c["algo"] for c in report.to_dict().get("conv_algos") or []}
    owner, shapes = owners(original)
    names = sorted(owner, key=len, reverse=True)
    inp = original.graph.input[0]
    shape = [d.dim_value or 1 for d in inp.type.tensor_type.shape.dim]
    feeds = {inp.name: np.random.default_rng(0).random(shape, dtype=np.float32)}

    per_model: dict[str, list[collections.Counter]] = {}
    walls: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {}
        for tag, model in (("native", original), ("lowered", lowered)):
            so = ort.SessionOptions()
            so.intra_op_num_threads = args.threads
            so.enable_profiling = True
            so.profile_file_prefix = str(Path(tmp) / tag)
            sessions[tag] = ort.InferenceSession(model.SerializeToString(), so,
                                                 providers=["CPUExecutionProvider"])
        for _ in range(args.warmup):
            for s in sessions.values():
                s.run(None, feeds)
        for _ in range(args.runs):  # interleaved, run by run
            for s in sessions.values():
                s.run(None, feeds)
        for tag, s in sessions.items():
            events = json.loads(Path(s.end_profiling()).read_text())
            runs, current, wall = [], None, []
            for e in events:
                if e.get("cat") == "Session" and e["name"] == "model_run":
                    wall.append(e["dur"] / 1e3)
                if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
                    continue
                if current is None or e["name"] in current["seen"]:
                    current = {"seen": set(), "t": collections.Counter()}
                    runs.append(current)
                current["seen"].add(e["name"])
                node = original_node(e["name"][: -len("_kernel_time")], names)
                key = owner.get(node, "(unmapped)") if node else "(unmapped)"
                current["t"][key] += e["dur"] / 1e3
            keep = len(runs) - args.runs  # drop the warm-up runs
            per_model[tag] = [r["t"] for r in runs[keep:]]
            walls[tag] = wall[-args.runs:]

    keys = list(dict.fromkeys(k for rs in per_model.values() for r in rs for k in r))
    order = {n.name: i for i, n in enumerate(original.graph.node)}
    keys.sort(key=lambda k: order.get(k, len(order)))

    def med(tag: str, key: str) -> float:
        return statistics.median(r.get(key, 0.0) for r in per_model[tag])

    info = machine_info()
    print(f"`python tools/profile_layers.py {' '.join(argv or sys.argv[1:])}` "
          f"({info['cpu']}, {info['cores']} cores, onnxruntime {info['onnxruntime']}, "
          f"{info['date']}; {args.threads} thread(s), {args.runs} interleaved runs)\n")
    print("| layer | conv | algorithm | native ms | lowered ms | ratio |")
    print("|---|---|---|---:|---:|---:|")
    rows = []
    for k in keys:
        a, b = med("native", k), med("lowered", k)
        row = {"layer": k, "shape": shapes.get(k, ""), "algorithm": algos.get(k, ""),
               "native_ms": a, "lowered_ms": b}
        rows.append(row)
        ratio = f"{b / a:.2f}" if a > 0.005 else "—"
        print(f"| {k} | {row['shape']} | {row['algorithm']} | {a:.3f} | {b:.3f} | {ratio} |")
    ta, tb = statistics.median(walls["native"]), statistics.median(walls["lowered"])
    print(f"| **whole run** | | | {ta:.2f} | {tb:.2f} | {tb / ta:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "rows": rows,
                                               "wall_ms": {"native": ta, "lowered": tb}},
                                              indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
