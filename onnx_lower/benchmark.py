"""Paired CPU latency benchmark of two models (typically original vs lowered) with onnxruntime.

Both models get one onnxruntime CPU session each (``threads`` intra-op threads, one inter-op
thread, sequential execution) and the very same input feed. After ``warmup`` untimed runs of
each, the timed runs are interleaved A B, B A, A B, ... (the order alternates every round, so
neither model systematically runs first, hot or cold), each ``sess.run`` timed with
``time.perf_counter_ns``.

Absolute times on a shared machine are noise: other processes, frequency scaling and cache
state move them from one invocation to the next. Because both models are measured in the same
interleaved window, that noise hits both alike, and the **ratio** (``median_b / median_a``) is
the figure to read and to quote. ``paired_ratio`` (the median of per-round ``b / a``) is a
second, drift-robust estimate of the same thing.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from onnx_lower.errors import LoweringError
from onnx_lower.validate import (
    InputsLike,
    ModelLike,
    graph_inputs,
    load_proto,
    make_session,
    random_inputs,
    resolve_inputs,
)

__all__ = ["LatencyReport", "LatencyStats", "benchmark", "machine_info"]


@dataclass
class LatencyStats:
    """Latency of one model over the timed runs; times in seconds."""

    label: str
    runs: int
    median: float
    p10: float
    p90: float
    mean: float
    min: float
    times: list[float] = field(default_factory=list, repr=False)

    @classmethod
    def from_ns(cls, label: str, times_ns: list[int]) -> LatencyStats:
        t = np.asarray(times_ns, dtype=np.float64) / 1e9
        return cls(
            label=label,
            runs=int(t.size),
            median=float(np.median(t)),
            p10=float(np.percentile(t, 10)),
            p90=float(np.percentile(t, 90)),
            mean=float(t.mean()),
            min=float(t.min()),
            times=[float(x) for x in t],
        )

    def to_dict(self, include_times: bool = False) -> dict[str, Any]:
        """Stats in milliseconds (keys end in ``_ms``)."""
        d: dict[str, Any] = {
            "label": self.label,
            "runs": self.runs,
            "median_ms": self.median * 1e3,
            "p10_ms": self.p10 * 1e3,
            "p90_ms": self.p90 * 1e3,
            "mean_ms": self.mean * 1e3,
            "min_ms": self.min * 1e3,
        }
        if include_times:
            d["times_ms"] = [x * 1e3 for x in self.times]
        return d


@dataclass
class LatencyReport:
    """The outcome of :func:`benchmark`. ``ratio`` = median latency of B / median of A.

    ``order`` is the sequence in which timed runs happened, e.g. ``"ABBAAB..."``.
    """

    a: LatencyStats
    b: LatencyStats
    ratio: float
    paired_ratio: float
    threads: int
    warmup: int
    repeat: int
    batch: int
    order: str = field(default="", repr=False)

    def to_dict(self, include_times: bool = False) -> dict[str, Any]:
        """JSON-able dict; times in milliseconds, ``ratio`` = b.median / a.median."""
        return {
            "a": self.a.to_dict(include_times),
            "b": self.b.to_dict(include_times),
            "ratio": self.ratio,
            "paired_ratio": self.paired_ratio,
            "threads": self.threads,
            "warmup": self.warmup,
            "repeat": self.repeat,
            "batch": self.batch,
            "note": "absolute times on a shared machine are noise; the ratio is the figure",
        }

    def summary_lines(self) -> list[str]:
        """A short aligned table of both models plus the ratio line."""
        head = ("model", "median ms", "p10 ms", "p90 ms", "mean ms", "min ms", "runs")
        rows = [head]
        for s in (self.a, self.b):
            rows.append((s.label, *(f"{v * 1e3:.3f}" for v in (s.median, s.p10, s.p90, s.mean,
                                                               s.min)), str(s.runs)))
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        title = (f"latency (onnxruntime CPU, {self.threads} thread(s), batch {self.batch}, "
                 f"{self.repeat} interleaved runs each after {self.warmup} warm-up)")
        lines = [title]
        for r in rows:
            nums = [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)]
            lines.append("  ".join([r[0].ljust(widths[0]), *nums]))
        lines.append(f"ratio {self.b.label}/{self.a.label} (median): {self.ratio:.3f}x "
                     f"(paired: {self.paired_ratio:.3f}x)")
        return lines


def _feed(model_a: ModelLike, model_b: ModelLike, inputs: InputsLike | None, seed: int,
          batch: int) -> dict[str, np.ndarray]:
    proto_a, proto_b = load_proto(model_a), load_proto(model_b)
    names_a = sorted(s.name for s in graph_inputs(proto_a))
    names_b = sorted(s.name for s in graph_inputs(proto_b))
    if names_a != names_b:
        raise LoweringError(
            f"the two models have different inputs ({', '.join(names_a) or 'none'} vs "
            f"{', '.join(names_b) or 'none'}); they must take the same feed to be compared")
    if inputs is None:
        return random_inputs(proto_a, seed=seed, batch=batch)
    feeds = resolve_inputs(inputs, proto_a)
    return feeds[0]


def benchmark(model_a: ModelLike, model_b: ModelLike, *, threads: int = 1, warmup: int = 10,
              repeat: int = 100, batch: int = 1, seed: int = 0,
              inputs: InputsLike | None = None,
              labels: tuple[str, str] = ("original", "lowered")) -> LatencyReport:
    """Time ``model_a`` and ``model_b`` interleaved on the same inputs; see the module docstring.

    ``inputs``: None for one random feed (``seed``, ``batch`` for dynamic axis 0), else anything
    :func:`onnx_lower.validate.validate` accepts (only the first sample is used).
    """
    if repeat < 1:
        raise LoweringError(f"repeat must be >= 1 (got {repeat})")
    if warmup < 0:
        raise LoweringError(f"warmup must be >= 0 (got {warmup})")
    if threads < 1:
        raise LoweringError(f"threads must be >= 1 (got {threads})")
    feed = _feed(model_a, model_b, inputs, seed, batch)
    sess = {
        "A": make_session(model_a, threads, label=f"{labels[0]} model"),
        "B": make_session(model_b, threads, label=f"{labels[1]} model"),
    }
    run = {k: (s.run, [o.name for o in s.get_outputs()]) for k, s in sess.items()}

    def once(key: str) -> int:
        fn, names = run[key]
        t0 = time.perf_counter_ns()
        fn(names, feed)
        return time.perf_counter_ns() - t0

    try:
        for key in ("A", "B"):
            for _ in range(warmup):
                once(key)
        times: dict[str, list[int]] = {"A": [], "B": []}
        order = []
        for i in range(repeat):
            for key in (("A", "B") if i % 2 == 0 else ("B", "A")):
                times[key].append(once(key))
                order.append(key)
    except Exception as exc:
        raise LoweringError(f"onnxruntime failed while benchmarking: {exc}") from exc

    a = LatencyStats.from_ns(labels[0], times["A"])
    b = LatencyStats.from_ns(labels[1], times["B"])
    ta = np.asarray(times["A"], dtype=np.float64)
    tb = np.asarray(times["B"], dtype=np.float64)
    paired = float(np.median(tb / np.maximum(ta, 1.0)))
    return LatencyReport(
        a=a,
        b=b,
        ratio=b.median / a.median if a.median > 0 else float("inf"),
        paired_ratio=paired,
        threads=int(threads),
        warmup=int(warmup),
        repeat=int(repeat),
        batch=int(batch),
        order="".join(order),
    )


def machine_info() -> dict[str, Any]:
    """The CPU, cores and library versions a latency was measured with (for BENCHMARKS.md)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "python": platform.python_version(),
        "onnxruntime": version("onnxruntime"),
        "onnx": version("onnx"),
        "numpy": version("numpy"),
        "platform": platform.platform(),
        "date": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
    }
