"""Benchmark onnx_lower.passes.conv: build time, throughput and peak memory of Conv matrices.

Usage (from the repository root)::

    PYTHONPATH=. python tools/bench_conv_matrix.py [--runs 5] [--small] [--no-memory]

For a few realistic layers it reports the matrix nnz, the median build time over ``--runs`` runs,
and millions of nonzeros per second, as a markdown table, with the machine it ran on. The peak
memory of building the largest layer is measured with tracemalloc (numpy reports its buffers to
it) and compared with ``nnz · 12`` bytes, the size of the result's data (float64) and column
indices (int32). ``--small`` replaces the 64x56x56 layer (~113 M nonzeros, ~1.4 GB) by 64x28x28.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import scipy

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from onnx_lower.benchmark import machine_info  # noqa: E402
from onnx_lower.passes.conv import (  # noqa: E402
    conv_matrix,
    conv_nnz,
    conv_transpose_matrix,
    conv_transpose_nnz,
)


def layers(small: bool) -> list[tuple[str, str, tuple[int, ...], tuple[int, ...], dict]]:
    """``(name, op, in_shape, weight_shape, attrs)`` of the benchmarked layers."""
    big = 28 if small else 56
    p1 = {"pads": [1, 1, 1, 1]}
    return [
        ("3x32x32 -> 16, 3x3 pad 1", "Conv", (3, 32, 32), (16, 3, 3, 3), p1),
        ("16x32x32 -> 32, 3x3 s2", "Conv", (16, 32, 32), (32, 16, 3, 3), {**p1, "strides": [2, 2]}),
        ("32x16x16 -> 64, 3x3", "Conv", (32, 16, 16), (64, 32, 3, 3), p1),
        (f"64x{big}x{big} -> 64, 3x3", "Conv", (64, big, big), (64, 64, 3, 3), p1),
        ("depthwise 32x56x56, 3x3", "Conv", (32, 56, 56), (32, 1, 3, 3), {**p1, "group": 32}),
        ("3D 4x8x16x16 -> 8, 3x3x3", "Conv", (4, 8, 16, 16), (8, 4, 3, 3, 3), {"pads": [1] * 6}),
        (
            "ConvT 64x28x28 -> 32, 4x4 s2",
            "ConvTranspose",
            (64, 28, 28),
            (64, 32, 4, 4),
            {**p1, "strides": [2, 2]},
        ),
    ]


def build(op: str, in_shape, weight, attrs):
    fn = conv_matrix if op == "Conv" else conv_transpose_matrix
    return fn(in_shape, weight, **attrs)[0]


def predicted_nnz(op: str, in_shape, w_shape, attrs) -> int:
    fn = conv_nnz if op == "Conv" else conv_transpose_nnz
    return fn(in_shape, w_shape, **attrs)


def peak_memory(op: str, in_shape, weight, attrs) -> tuple[int, int]:
    """``(peak traced bytes while building, nnz)``; the weight is allocated before tracing."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    a = build(op, in_shape, weight, attrs)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak, a.nnz


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs per layer (median)")
    parser.add_argument("--small", action="store_true", help="64x28x28 instead of 64x56x56")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory run")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    rows, largest = [], None
    for name, op, in_shape, w_shape, attrs in layers(args.small):
        weight = rng.standard_normal(w_shape).astype(np.float32)
        a = build(op, in_shape, weight, attrs)  # warm-up, and the result to check
        nnz = a.nnz
        assert nnz == predicted_nnz(op, in_shape, w_shape, attrs), name
        del a
        times = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            a = build(op, in_shape, weight, attrs)
            times.append(time.perf_counter() - t0)
            del a
        med = statistics.median(times)
        rows.append((name, nnz, med, nnz / med / 1e6))
        if largest is None or nnz > largest[0]:
            largest = (nnz, name, op, in_shape, weight, attrs)

    print(f"machine: {platform.platform()}; CPU: {machine_info()['cpu']}")
    print(
        f"Python {platform.python_version()}; numpy {np.__version__}; scipy {scipy.__version__}; "
        f"median of {args.runs} runs\n"
    )
    print("| layer | nnz | build s (median) | M nnz/s |")
    print("|---|---:|---:|---:|")
    for name, nnz, med, rate in rows:
        print(f"| {name} | {nnz:,} | {med:.4f} | {rate:.0f} |")

    if not args.no_memory and largest is not None:
        nnz, name, op, in_shape, weight, attrs = largest
        peak, nnz = peak_memory(op, in_shape, weight, attrs)
        ref = nnz * 12
        print(
            f"\npeak memory building '{name}': {peak / 2**20:.1f} MiB traced = "
            f"{peak / ref:.3f} x nnz*12 bytes ({ref / 2**20:.1f} MiB: float64 data + int32 indices)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
