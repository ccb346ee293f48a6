#!/usr/bin/env python3
"""Whole networks under variants of the im2col cost knobs, timed interleaved in one run.

Usage::

    python tools/bench_knobs.py --only mobilenetv2,shufflenet \\
        --variant gather:DW_SLICE_MAX_BYTES=0 --variant slices: --repeat 30

Each ``--variant NAME:KNOB=VALUE,...`` lowers the model with those
:mod:`onnx_lower.passes.im2col.cost` constants set (``NAME:`` alone: the defaults); every
lowered model is validated against the original (rtol = atol = 1e-4) and all of them and the
original run round-robin on one thread (onnxruntime CPU, batch 1) after warm-up. The table gives
medians and each variant's ratio to the original; compare variants by their ratios of one run.
"""

from __future__ import annotations

import argparse
import ast
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO_ROOT))

import onnx  # noqa: E402

import onnx_lower  # noqa: E402
from onnx_lower.benchmark import machine_info  # noqa: E402
from onnx_lower.validate import make_session, validate  # noqa: E402
from tools.make_models import IMAGENET_DIR  # noqa: E402


def parse_variant(text: str) -> tuple[str, dict[str, object]]:
    name, _, rest = text.partition(":")
    knobs = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        try:
            knobs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            knobs[key] = value
    return name, knobs


def lowered(model: onnx.ModelProto, knobs: dict[str, object]) -> onnx.ModelProto:
    """``model`` lowered to im2col with the :mod:`~onnx_lower.passes.im2col.cost` constants in
    ``knobs`` set for the call (restored after)."""
    from onnx_lower.passes.im2col import cost

    saved = {k: getattr(cost, k) for k in knobs}
    try:
        for k, v in knobs.items():
            setattr(cost, k, v)
        return onnx_lower.lower(model, form="im2col")[0]
    finally:
        for k, v in saved.items():
            setattr(cost, k, v)


def run(path: Path, variants, repeat: int, warmup: int = 5) -> list[str]:
    model = onnx.load(str(path))
    models = [("original", model)] + [(n, lowered(model, k)) for n, k in variants]
    for name, low in models[1:]:
        rep = validate(model, low, rtol=1e-4, atol=1e-4)
        if not rep.passed:
            raise SystemExit(f"{path.stem} {name}: validation failed")
    inp = model.graph.input[0]
    shape = [d.dim_value or 1 for d in inp.type.tensor_type.shape.dim]
    feed = {inp.name: np.random.default_rng(0).random(shape, dtype=np.float32)}
    sessions = [make_session(m) for _, m in models]
    for s in sessions:
        for _ in range(warmup):
            s.run(None, feed)
    times = [[] for _ in sessions]
    for _ in range(repeat):
        for i, s in enumerate(sessions):
            t0 = time.perf_counter()
            s.run(None, feed)
            times[i].append(time.perf_counter() - t0)
    med = [float(np.median(t)) * 1e3 for t in times]
    return [f"| {path.stem} | " + " | ".join(f"{m:.2f}" for m in med) + " | "
            + " | ".join(f"{m / med[0]:.3f}" for m in med[1:]) + " |"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", required=True, help="comma-separated models/imagenet names")
    ap.add_argument("--variant", action="append", required=True, help="NAME:KNOB=VALUE,...")
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=1, help="repeat the whole table")
    args = ap.parse_args(argv)
    variants = [parse_variant(v) for v in args.variant]
    info = machine_info()
    print(f"machine: {info['cpu']}, {info['cores']} cores; onnxruntime {info['onnxruntime']}; "
          f"{info['date']}; 1 thread, {args.repeat} interleaved rounds, medians")
    names = [n for n, _ in variants]
    print("| model | original ms | " + " | ".join(f"{n} ms" for n in names) + " | "
          + " | ".join(f"{n} / orig" for n in names) + " |")
    print("|---|" + "---:|" * (1 + 2 * len(names)))
    for _ in range(args.rounds):
        for name in args.only.split(","):
            print("\n".join(run(IMAGENET_DIR / f"{name}.onnx", variants, args.repeat)),
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
