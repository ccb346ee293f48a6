#!/usr/bin/env python3
"""ReLU neurons per sample of the corpus and models/*.onnx: original, mlp before and after the
MaxPool plans of issue 12, and what DNNV's ReluifyMaxPool would spend on the pools.

Usage::

    python tools/relu_counts.py                 # ../shared/corpus and models/*.onnx
    python tools/relu_counts.py a.onnx b.onnx   # given models

Columns (all per sample, batch 1):

- ``orig ReLU / max / pw``: :func:`onnx_lower.cost.count_neurons` of the original (Relu
  elements, MaxPool/GlobalMaxPool/ReduceMax output elements, other piecewise-linear elements);
- ``mlp after``: the Relu elements of the mlp form as lowered now (the pipeline up to
  ``fold-linear``, in memory, as ``--dry-run`` plans it; emission adds no Relu);
- ``mlp before``: the same minus the pools' ReLUs now plus what the per-window tournament before
  issue 12 emitted for them: ``C·S_out·Σ_l ceil(K_l / 2)`` with ``K_0 = K``,
  ``K_{l+1} = ceil(K_l / 2)`` (an odd candidate got a zero ``diff`` row, a Relu of 0);
- ``pools K−1 / now / DNNV``: the MaxPool ReLUs of a per-window tournament without zero rows
  (``C·S_out·(K − 1)``), of the plans chosen now, and of DNNV's ReluifyMaxPool (3 ReLUs per
  pairwise max: ``3·C·S_out·(K − 1)``);
- ``plans``: the plan chosen for each MaxPool, in graph order.

``n/a`` marks an mlp form that cannot be built (the reason is printed below the table).

A second table (``--pools``, on by default without model arguments) gives, for common pool
shapes, the ReLUs per output and channel of every plan of :mod:`onnx_lower.passes.pool_max`.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import onnx
from onnx import helper

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO_ROOT))

from onnx_lower import api, cost  # noqa: E402
from onnx_lower.errors import LoweringError  # noqa: E402
from onnx_lower.passes.pool import (  # noqa: E402
    MAX_POOL_PLANS,
    global_pool_kernel,
    max_pool_tournament,
    pool_windows,
)
from onnx_lower.passes.pool_max import max_pool_relu_counts  # noqa: E402

CORPUS = REPO_ROOT.parent / "shared" / "corpus"
POOL_ATTRS = ("strides", "pads", "dilations", "ceil_mode", "auto_pad")
#: (label, spatial input, kernel, strides, pads) of common MaxPools (one channel)
COMMON_POOLS = [
    ("2×2/2 over 24×24 (LeNet)", (24, 24), (2, 2), (2, 2), (0, 0, 0, 0)),
    ("2×2/1 over 24×24", (24, 24), (2, 2), (1, 1), (0, 0, 0, 0)),
    ("3×3/2 over 55×55 (AlexNet)", (55, 55), (3, 3), (2, 2), (0, 0, 0, 0)),
    ("3×3/2 pad 1 over 112×112 (ResNet stem)", (112, 112), (3, 3), (2, 2), (1, 1, 1, 1)),
    ("3×3/1 pad 1 over 28×28 (Inception)", (28, 28), (3, 3), (1, 1), (1, 1, 1, 1)),
    ("3×3/1 over 9×9", (9, 9), (3, 3), (1, 1), (0, 0, 0, 0)),
    ("5×5/1 pad 2 over 16×16", (16, 16), (5, 5), (1, 1), (2, 2, 2, 2)),
    ("3×3×3/2 over 16³ (3-D)", (16, 16, 16), (3, 3, 3), (2, 2, 2), (0,) * 6),
    ("3/1 over 100 (1-D)", (100,), (3,), (1,), (0, 0)),
]


def _old_rows(k: int) -> int:
    """Relus per window of the tournament before issue 12 (zero rows included)."""
    rows = 0
    while k > 1:
        k = -(-k // 2)
        rows += k
    return rows


def pool_counts(model: onnx.ModelProto) -> tuple[int, int, int, list[str]]:
    """(old tournament Relus, per-window K−1 ReLUs, ReLUs now, plan names) of the MaxPools."""
    shapes = cost.value_shapes(model)
    old = k_minus_1 = now = 0
    plans = []
    for n in model.graph.node:
        if n.op_type not in ("MaxPool", "GlobalMaxPool") or n.domain not in ("", "ai.onnx"):
            continue
        in_shape = tuple(shapes[n.input[0]][1:])
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        if n.op_type == "GlobalMaxPool":
            kernel, kw = global_pool_kernel(in_shape), {}
        else:
            kernel = attrs["kernel_shape"]
            kw = {k: attrs[k] for k in POOL_ATTRS if k in attrs}
        t = max_pool_tournament(in_shape, kernel, plan="auto", **kw)
        k, outputs = math.prod(kernel), math.prod(t.out_shape)
        old += outputs * _old_rows(k)
        k_minus_1 += outputs * (k - 1)
        now += t.relu_count
        plans.append(t.plan)
    return old, k_minus_1, now, plans


def row(path: Path) -> tuple[list[str], str | None]:
    model = onnx.load(str(path))
    orig = cost.count_neurons(model)
    old, k_minus_1, now, plans = pool_counts(model)
    note = None
    try:
        after = api.plan(model, per_region=False).mlp_relu_neurons
    except LoweringError as exc:
        after, note = None, f"{path.stem}: {exc}"
    if after is None and note is None:
        note = f"{path.stem}: the mlp form was not planned (too many MACs, or not possible)"
    before = None if after is None else after - now + old
    fmt = "{:,}".format
    cells = [
        path.stem,
        fmt(orig["relu"]),
        fmt(orig["max"]),
        fmt(orig["piecewise"]),
        "n/a" if before is None else fmt(before),
        "n/a" if after is None else fmt(after),
        fmt(k_minus_1),
        fmt(now),
        fmt(3 * k_minus_1),
        "; ".join(plans) or "-",
    ]
    return cells, note


def pool_table() -> list[str]:
    """ReLUs per output and channel of each plan, for :data:`COMMON_POOLS`."""
    plans = [p for p in MAX_POOL_PLANS if p != "auto"]
    head = ["pool", "outputs", "before", *plans, "auto", "DNNV", "auto plan"]
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join("---" if i in (0, len(head) - 1) else "---:"
                            for i in range(len(head))) + "|"]
    for label, spatial, kernel, strides, pads in COMMON_POOLS:
        win, _ = pool_windows((1, *spatial), kernel, strides=strides, pads=pads)
        counts = max_pool_relu_counts(win)
        t = max_pool_tournament((1, *spatial), kernel, strides=strides, pads=pads, plan="auto")
        assert t.relu_count == counts["auto"]
        m, k = win.out_size, math.prod(kernel)
        per = [f"{counts[p] / m:.2f}" for p in [*plans, "auto"]]
        lines.append("| " + " | ".join([label, f"{m:,}", f"{_old_rows(k):.2f}", *per,
                                         f"{3 * (k - 1):.2f}", t.plan]) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", type=Path)
    parser.add_argument("--pools", action="store_true", help="print the common-pool table too")
    args = parser.parse_args(argv)
    paths = args.models or [
        *sorted(CORPUS.glob("*.onnx")),
        *sorted((REPO_ROOT / "models").glob("*.onnx")),
    ]
    head = ["model", "orig ReLU", "orig max", "orig pw", "mlp before", "mlp after",
            "pools K−1", "pools now", "pools DNNV", "plans"]
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" if i in (0, 9) else "---:" for i in range(len(head))) + "|")
    notes = []
    for path in paths:
        cells, note = row(path)
        print("| " + " | ".join(cells) + " |", flush=True)
        if note:
            notes.append(note)
    for note in notes:
        print(f"\nn/a: {note}")
    if args.pools or not args.models:
        print("\nReLUs per output and channel:\n")
        print("\n".join(pool_table()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
