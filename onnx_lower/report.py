"""The report of one lowering: what changed, what it cost, and whether it is right.

``Report.to_dict()`` is the ``--report FILE.json`` document. Its schema is stable and pinned by
``tests/test_report_schema.py``; README.md documents every key. Additions bump the minor
version of ``schema``; renames or removals bump the major.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from .pass_manager import PassRecord

__all__ = ["Report", "ModelStats", "RegionReport", "SCHEMA"]

SCHEMA = "onnx_lower.report/1.3"


@dataclasses.dataclass
class ModelStats:
    """Op counts, node count, weight bytes, MACs and neuron counts of one model.

    ``relu_neurons``, ``max_neurons`` and ``piecewise_neurons`` (schema 1.2) are per sample, as
    :func:`onnx_lower.cost.count_neurons` counts them.
    """

    ops: dict[str, int]
    nodes: int
    weight_bytes: int
    macs: int
    relu_neurons: int = 0
    max_neurons: int = 0
    piecewise_neurons: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class RegionReport:
    """The form one region of the graph got under ``--form auto``, and why.

    ``weight_bytes`` is what the region's lowered model holds when it was lowered on its own;
    None when it was lowered together with other regions (the whole graph, or the regions of
    its form it joins through kept ops).
    """

    name: str
    form: str
    reason: str
    nodes: int
    inputs: list[str]
    outputs: list[str]
    macs: int
    weight_bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Report:
    form: str
    form_used: str
    form_reason: str
    before: ModelStats
    after: ModelStats
    passes: list[PassRecord]
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    notes: dict[str, Any] = dataclasses.field(default_factory=dict)
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    input: str | None = None
    output: str | None = None
    validation: Any = None  # onnx_lower.validate.ValidationReport
    latency: Any = None  # onnx_lower.benchmark.LatencyReport
    regions: list[RegionReport] = dataclasses.field(default_factory=list)
    nnet: dict[str, Any] | None = None  # onnx_lower.nnet.NnetInfo.to_dict() of a .nnet output
    # --target: {"name", "rewritten": [{"node", "op", "rule", "became"}]}
    target: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        from . import __version__

        return {
            "schema": SCHEMA,
            "tool_version": __version__,
            "input": self.input,
            "output": self.output,
            "form": self.form,
            "form_used": self.form_used,
            "form_reason": self.form_reason,
            "regions": [r.to_dict() for r in self.regions],
            "target": self.target,
            "options": dict(self.options),
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
            "passes": [
                {
                    "name": r.name,
                    "seconds": round(r.seconds, 6),
                    "nodes_before": r.nodes_before,
                    "nodes_after": r.nodes_after,
                    "node_delta": r.node_delta,
                    "weight_bytes": r.weight_bytes,
                    "modified": r.modified,
                    "iteration": r.iteration,
                }
                for r in self.passes
            ],
            "fold": self.notes.get("fold_summary"),
            "kept_ops": self.kept_ops(),
            "layered": self.notes.get("layered"),
            "timings": {k: round(v, 6) for k, v in self.timings.items()},
            "validation": self.validation.to_dict() if self.validation else None,
            "latency": self.latency.to_dict() if self.latency else None,
            "nnet": self.nnet,
            "conv_algos": list(self.notes.get("conv_algos") or []),
            "sample_axis": self.notes.get("sample_axis"),
        }

    def kept_ops(self) -> dict[str, int]:
        """Ops kept as they are (not MatMul/Add/Relu), counted over every graph.

        ``check-mlp`` notes one dict per graph it visits (``LoweringModel.note`` appends to a
        list); a single dict is accepted too.
        """
        kept = self.notes.get("kept_ops") or {}
        merged: dict[str, int] = {}
        for part in [kept] if isinstance(kept, dict) else kept:
            for op, count in part.items():
                merged[op] = merged.get(op, 0) + int(count)
        return dict(sorted(merged.items()))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    def summary_lines(self, verbose: bool = False) -> list[str]:
        b, a = self.before, self.after
        lines = [f"form: {self.form_used} ({self.form_reason})"]
        if len(self.regions) > 1:
            for r in self.regions:
                lines.append(f"  {r.name}: {r.nodes} nodes -> {r.form} ({r.reason})")
        ops = sorted(set(b.ops) | set(a.ops))
        width = max([len(o) for o in ops] + [12])
        lines.append(f"  {'op':<{width}} {'before':>8} {'after':>8}")
        for op in ops:
            lines.append(f"  {op:<{width}} {b.ops.get(op, 0):>8} {a.ops.get(op, 0):>8}")
        lines.append(f"  {'nodes':<{width}} {b.nodes:>8} {a.nodes:>8}")
        lines.append(f"  {'weights':<{width}} {_mb(b.weight_bytes):>8} {_mb(a.weight_bytes):>8}")
        lines.append(f"  {'MACs':<{width}} {_si(b.macs):>8} {_si(a.macs):>8}")
        lines.append(
            f"  {'ReLU neurons':<{width}} {b.relu_neurons:>8,} {a.relu_neurons:>8,}"
        )
        for label, key in (("max neurons", "max_neurons"), ("piecewise", "piecewise_neurons")):
            if getattr(b, key) or getattr(a, key):
                lines.append(
                    f"  {label:<{width}} {getattr(b, key):>8,} {getattr(a, key):>8,}"
                )
        fold = self.notes.get("fold_summary")
        if fold:
            lines.append(
                f"fold: {fold['matmuls_before']} -> {fold['matmuls_after']} MatMuls, "
                f"{_mb(fold['bytes_before'])} -> {_mb(fold['bytes_after'])} of weights"
            )
        sample = self.notes.get("sample_axis")
        if sample:
            lines.append(
                f"sample: the whole tensor, batch included ({sample['op']} '{sample['node']}' "
                f"mixes the static axis 0: {sample['reason']})"
            )
        if self.target is not None:
            done = self.target["rewritten"]
            lines.append(f"target {self.target['name']}: {len(done)} node(s) rewritten")
            for r in done if verbose else done[:10]:
                lines.append(f"  {r['node']} ({r['op']}) -> {r['became']}")
            if not verbose and len(done) > 10:
                lines.append(f"  ... {len(done) - 10} more (-v, or --report)")
        kept = self.kept_ops()
        if kept:
            listed = ", ".join(f"{k}×{v}" for k, v in kept.items())
            lines.append(f"kept (not MatMul/Add/Relu): {listed}")
        lines.extend(_layered_lines(self.notes.get("layered")))
        if self.nnet:
            sizes = ",".join(map(str, self.nnet["layer_sizes"]))
            lines.append(f".nnet: {self.nnet['bytes']:,} bytes, layer sizes {sizes}")
            lines.extend(f"warning: {w}" for w in self.nnet["warnings"])
        total = sum(r.seconds for r in self.passes)
        lines.append(f"passes: {len(self.passes)} runs, {total:.3f} s")
        records = self.passes if verbose else sorted(self.passes, key=lambda r: -r.seconds)[:5]
        for r in records:
            lines.append(f"  {r.name:<20} {r.seconds * 1000:>9.1f} ms  nodes {r.node_delta:+d}")
        return lines


def _layered_lines(layered: dict | None) -> list[str]:
    """The layered form's chain: widths, ReLU and carry neurons, and where it is exact."""
    if not layered:
        return []
    widths = " -> ".join(str(la["width"]) for la in layered["layers"])
    lines = [
        f"layered: {len(layered['layers'])} layers ({widths}), "
        f"{layered['relu_neurons']} ReLU + {layered['carry_neurons']} carry neurons "
        f"({layered['placement']} placement); exact {layered['exact']}"
    ]
    if layered.get("dropped_softmax"):
        lines.append(f"  dropped the final Softmax '{layered['dropped_softmax']}' (argmax kept)")
    return lines


def _mb(n: int) -> str:
    if n < 1024 * 1024:
        return f"{n / 1024:.1f}KB"
    return f"{n / 1024 / 1024:.1f}MB"


def _si(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)
