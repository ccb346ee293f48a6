#!/usr/bin/env python3
"""One 3×3 stride-1 conv as Winograd MatMul graphs against the native Conv (issue 13).

Usage::

    python tools/bench_winograd.py                       # every layer, every variant
    python tools/bench_winograd.py --layers 64x56,128x28 --variants f2-sep-split,f4-sep-split

Each layer ``C_in→C_out @ H×W`` (same padding, batch 1) is built as standalone ONNX graphs that
take the channels-last rows ``(1, S, C_in)`` the im2col form carries and give ``(1, S, C_out)``:

* ``im2col``: Pad (zero row), Gather ``(S, 9, C)``, Reshape, one 2-D MatMul (today's form);
* ``f{m}-{transform}-{gemm}[-tile]``: F(m×m, 3×3) with the math of :mod:`onnx_lower.winograd`:
  Pad, Gather of the tiles (tap-major ``(a², T, C)``, or ``-tile``: tile-major ``(T, a², C)`` then
  Transpose), input transform, the a² GEMMs, output transform, Gather of the output rows.
  ``transform``: ``kron`` = one MatMul with ``Bᵀ⊗Bᵀ`` (a², a²) / ``Aᵀ⊗Aᵀ``; ``sep`` = two MatMuls
  with ``Bᵀ`` (a, a) / ``Aᵀ`` (the second one broadcast over the first tile axis).
  ``gemm``: ``batched`` = one 3-D MatMul against ``U`` (a², C_in, C_out); ``split`` = Split into
  a² rows blocks and a² 2-D MatMuls with ``U[p]`` as input 1 (onnxruntime prepacks those), Concat.

``--models a.onnx …``: whole networks instead, each lowered twice to the im2col form,
``conv_algo="im2col"`` (A) and ``"auto"`` (B), both validated against the original, then timed
A/B interleaved with :func:`onnx_lower.benchmark.benchmark`: the ratio B/A is Winograd's gain
alone, free of the native baseline's noise.

The native model is the ONNX Conv on ``(1, C, H, W)``. Every variant is checked against it first,
then all are timed round-robin (interleaved) in one process, 1 thread; medians and ratios to
native are printed as a Markdown table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper

REPO_ROOT = Path(__file__).resolve().parents[1]
for p in (REPO_ROOT, REPO_ROOT / "tools"):
    if str(p) not in sys.path:  # run as a script from anywhere
        sys.path.insert(0, str(p))

from bench_layers import _model  # noqa: E402

from onnx_lower import winograd as wg  # noqa: E402
from onnx_lower.benchmark import machine_info  # noqa: E402
from onnx_lower.validate import make_session  # noqa: E402
from onnx_lower.windows import sliding_windows  # noqa: E402

F = TensorProto.FLOAT

#: (C_in, C_out, H=W): fast-conv.md's prototype layers, then ResNet-18's and VGG-11's 3×3 ones.
LAYERS = {
    "64x56": (64, 64, 56), "128x28": (128, 128, 28), "256x16": (256, 256, 16),
    "512x8": (512, 512, 8), "32x112": (32, 32, 112), "3-64x224": (3, 64, 224),
    "256x14": (256, 256, 14), "512x7": (512, 512, 7),
    "64-128x112": (64, 128, 112), "128-256x56": (128, 256, 56), "256x56": (256, 256, 56),
    "256-512x28": (256, 512, 28), "512x28": (512, 512, 28), "512x14": (512, 512, 14),
}
VARIANTS = ("im2col",
            "f2-kron-batched", "f2-sep-batched", "f2-kron-split", "f2-sep-split",
            "f2-kron-batched-tile",
            "f4-kron-batched", "f4-sep-batched", "f4-kron-split", "f4-sep-split",
            "f4-kron-batched-tile")


class _G:
    """A tiny graph builder: nodes and initializers with fresh names."""

    def __init__(self):
        self.nodes, self.inits, self.n = [], {}, 0

    def c(self, value) -> str:
        self.n += 1
        name = f"c{self.n}"
        self.inits[name] = np.asarray(value)
        return name

    def op(self, op: str, inputs, out: str | None = None, n_out: int = 1, **attrs):
        self.n += 1
        outs = [out] if out else [f"t{self.n}_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, list(inputs), outs, **attrs))
        return outs[0] if n_out == 1 else outs

    def reshape(self, x: str, shape) -> str:
        return self.op("Reshape", [x, self.c(np.array(shape, np.int64))])

    def zero_row(self, x: str) -> str:
        return self.op("Pad", [x, self.c(np.array([0, 0, 0, 0, 1, 0], np.int64))])


def im2col_graph(w: np.ndarray, hw: int) -> _G:
    c_out, c_in = w.shape[:2]
    g = _G()
    win = sliding_windows((hw, hw), (3, 3), pads=(1, 1, 1, 1))
    idx = np.where(win.taps >= 0, win.taps, hw * hw)
    gat = g.op("Gather", [g.zero_row("x"), g.c(idx)], axis=1)
    flat = g.reshape(gat, [-1, 9 * c_in])
    wk = w.transpose(2, 3, 1, 0).reshape(9 * c_in, c_out).astype(np.float32)
    y = g.op("MatMul", [flat, g.c(wk)])
    g.op("Reshape", [y, g.c(np.array([1, -1, c_out], np.int64))], out="y")
    return g


def _transform(g: _G, x: str, mat: np.ndarray, rank: int, sep: bool, cols: int) -> str:
    """``kron_power(mat, rank) @ x`` for ``x`` ``(a^d, cols)`` → ``(n^d, cols)``."""
    n, a = mat.shape
    if not sep or rank == 1:
        return g.op("MatMul", [g.c(wg.kron_power(mat, rank).astype(np.float32)), x])
    m32 = g.c(mat.astype(np.float32))
    first = g.op("MatMul", [m32, g.reshape(x, [a, a * cols])])          # (n, a·cols)
    second = g.op("MatMul", [m32, g.reshape(first, [n, a, cols])])      # (n, n, cols)
    return g.reshape(second, [n * n, cols])


def winograd_graph(w: np.ndarray, hw: int, variant: str) -> _G:
    parts = variant.split("-")
    m, sep, split, tile = int(parts[0][1:]), parts[1] == "sep", parts[2] == "split", \
        parts[-1] == "tile"
    c_out, c_in = w.shape[:2]
    t = wg.transform(m)
    grid = wg.tile_grid((hw, hw), (1, 1, 1, 1), m)
    a2, m2, n_t = t.a ** 2, m * m, grid.n_tiles
    taps = np.where(grid.taps >= 0, grid.taps, hw * hw)
    u = wg.weight_transform(w, t).astype(np.float32)                    # (a², C_in, C_out)
    g = _G()
    src = g.zero_row("x")
    if tile:
        gat = g.reshape(g.op("Gather", [src, g.c(taps)], axis=1), [n_t, a2, c_in])
        x = g.reshape(g.op("Transpose", [gat], perm=[1, 0, 2]), [a2, n_t * c_in])
    else:
        x = g.reshape(g.op("Gather", [src, g.c(np.ascontiguousarray(taps.T))], axis=1),
                      [a2, n_t * c_in])
    v = g.reshape(_transform(g, x, t.bt, 2, sep, n_t * c_in), [a2, n_t, c_in])
    if split:
        rows = g.op("Split", [v], n_out=a2, axis=0, num_outputs=a2)
        prods = [g.op("MatMul", [r, g.c(u[p])]) for p, r in enumerate(rows)]
        mm = g.op("Concat", prods, axis=0)
    else:
        mm = g.op("MatMul", [v, g.c(u)])                                # (a², T, C_out)
    y = _transform(g, g.reshape(mm, [a2, n_t * c_out]), t.at, 2, sep, n_t * c_out)
    rows = g.reshape(y, [m2 * n_t, c_out])
    out = g.op("Gather", [rows, g.c(wg.output_rows(grid, "tap"))], axis=0)
    g.op("Reshape", [out, g.c(np.array([1, -1, c_out], np.int64))], out="y")
    return g


def _model18(g: _G, c: int, s: int):
    """The graph as a model at opset 18 (Split's ``num_outputs``)."""
    model = _model(g.nodes, [helper.make_tensor_value_info("x", F, [1, s, c])], g.inits)
    model.opset_import[0].version = 18
    return model


def _paired(runs, repeat: int, warmup: int = 3) -> tuple[float, list[str]]:
    """Round-robin timing: native median ms, and per variant ``"min / paired"`` ratios to native.

    ``min``: ratio of the fastest runs (least disturbed by the other processes on a shared
    machine); ``paired``: median of per-round ratios to the native run of the same round.
    """
    for sess, feed in runs:
        for _ in range(warmup):
            sess.run(None, feed)
    times = np.zeros((repeat, len(runs)))
    for i in range(repeat):
        order = range(len(runs)) if i % 2 == 0 else reversed(range(len(runs)))
        for j in order:
            sess, feed = runs[j]
            start = time.perf_counter()
            sess.run(None, feed)
            times[i, j] = time.perf_counter() - start
    paired = np.median(times[:, 1:] / times[:, :1], axis=0)
    best = times.min(axis=0)
    return float(np.median(times[:, 0])) * 1e3, [
        f"{b / best[0]:.2f} / {p:.2f}" for b, p in zip(best[1:], paired)]


def bench_layer(name: str, variants, repeat: int, seed: int = 0) -> list[float]:
    c_in, c_out, hw = LAYERS[name]
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((c_out, c_in, 3, 3)) / np.sqrt(9 * c_in)).astype(np.float32)
    x = rng.standard_normal((1, c_in, hw, hw)).astype(np.float32)
    x_cl = np.ascontiguousarray(x.reshape(c_in, -1).T)[None]
    native = make_session(_model([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1] * 4)],
                                 [helper.make_tensor_value_info("x", F, [1, c_in, hw, hw])],
                                 {"w": w}))
    want = native.run(None, {"x": x})[0].reshape(c_out, -1).T
    runs = [(native, {"x": x})]
    for v in variants:
        g = im2col_graph(w, hw) if v == "im2col" else winograd_graph(w, hw, v)
        sess = make_session(_model18(g, c_in, hw * hw))
        got = sess.run(None, {"x": x_cl})[0][0]
        err = float(np.abs(got - want).max() / np.abs(want).max())
        if err > 1e-4:
            raise AssertionError(f"{name} {v}: scaled error {err:.2e}")
        runs.append((sess, {"x": x_cl}))
    return _paired(runs, repeat)


def bench_models(paths, repeat: int, threads: int) -> None:
    import onnx

    from onnx_lower.api import lower
    from onnx_lower.benchmark import benchmark
    from onnx_lower.validate import validate

    print(f"\n| model ({threads}T) | im2col ms | auto ms | auto / im2col | paired | "
          "winograd convs | scaled err auto |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for path in paths:
        original = onnx.load(path)
        a, _ = lower(original, form="im2col", conv_algo="im2col")
        b, rep = lower(original, form="im2col", conv_algo="auto")
        check = validate(original, b, rtol=1e-4, atol=1e-4, samples=2)
        err = max(o.scaled_err for o in check.outputs)
        wino = sum(c["algo"].startswith("winograd") for c in rep.notes.get("conv_algos", []))
        r = benchmark(a, b, threads=threads, repeat=repeat, warmup=3,
                      labels=("im2col", "auto"))
        print(f"| {Path(path).stem} | {r.a.median * 1e3:.2f} | {r.b.median * 1e3:.2f} | "
              f"{r.ratio:.3f} | {r.paired_ratio:.3f} | {wino} | {err:.1e} |", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", default=",".join(LAYERS), help="comma list of " + ", ".join(LAYERS))
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma list of variants")
    ap.add_argument("--repeat", type=int, default=20, help="timed rounds (default 20)")
    ap.add_argument("--models", nargs="*", help="whole ONNX networks: auto vs im2col (see above)")
    ap.add_argument("--threads", type=int, default=1, help="threads for --models (default 1)")
    args = ap.parse_args(argv)
    if args.models:
        info = machine_info()
        print(f"machine: {info['cpu']}, {info['cores']} cores; onnxruntime "
              f"{info['onnxruntime']}; {info['date']}; batch 1, {args.repeat} interleaved runs")
        bench_models(args.models, args.repeat, args.threads)
        return 0
    layers, variants = args.layers.split(","), args.variants.split(",")
    info = machine_info()
    print(f"machine: {info['cpu']}, {info['cores']} cores; onnxruntime {info['onnxruntime']}; "
          f"{info['date']}; 1 thread, batch 1, {args.repeat} interleaved rounds, "
          "cells: min-time ratio / median per-round ratio, to native")
    print("\n| layer | native ms | " + " | ".join(variants) + " |")
    print("|---|---:|" + "---:|" * len(variants))
    for name in layers:
        native_ms, ratios = bench_layer(name, variants, args.repeat)
        c_in, c_out, hw = LAYERS[name]
        print(f"| {c_in}→{c_out} @ {hw}² | {native_ms:.2f} | "
              + " | ".join(ratios) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
