#!/usr/bin/env python3
"""The layered form (issue 12) on a corpus: layers, widths, ReLU and carry neurons, weight bytes.

Usage::

    python tools/bench_layered.py                      # ../shared/corpus, Markdown on stdout
    python tools/bench_layered.py --models a.onnx dir/ --box 0,1 --json layered.json

For every model, in this process: the layered pipeline runs up to ``fold-linear`` (the mlp
lowering), then :func:`onnx_lower.passes.layered.layer_chain` plans and builds the strict chain
twice, without and with the input box ``--box`` (default ``0,1``, the range of the corpus'
image inputs), without densifying anything, so a model over the budget still gets its numbers.
The columns:

- ReLU neurons of the original (Relu outputs, per sample, from ONNX shape inference) and of the
  lowered forms (the mlp and layered forms have the same ReLUs; MaxPools add theirs);
- layers ``L`` and the widest hidden layer;
- carry neurons without a box, without a box when every late value rides as itself (no
  partial sums: the baseline of the carry search), and with the box; the neurons of the ASAP
  and ALAP placements (without a box; the form keeps the smaller);
- the dense weight bytes of the mlp form (the folded Affine nodes) and of the layered form
  (``Σ w_{ℓ-1}·w_ℓ`` plus biases), and whether the layered weights fit ``--max-weight-mb``.

A model the layered form refuses (a kept op) gets a row with the reason.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import onnx

REPO_ROOT = Path(__file__).resolve().parents[1]
CORPUS = REPO_ROOT.parent / "shared" / "corpus"
MB = 1024 * 1024

if str(REPO_ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO_ROOT))

from onnx_lower.affine import pending_weight_bytes  # noqa: E402
from onnx_lower.errors import LoweringError  # noqa: E402
from onnx_lower.pass_manager import LoweringModel, Options  # noqa: E402
from onnx_lower.pipelines import PIPELINES, build_pipeline  # noqa: E402


def original_relus(model: onnx.ModelProto) -> int:
    """Relu output elements per sample of ``model`` (shape inference)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {
        vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim]
        for vi in (*inferred.graph.value_info, *inferred.graph.output)
    }
    total = 0
    for node in model.graph.node:
        if node.op_type == "Relu" and node.output[0] in shapes:
            total += math.prod(shapes[node.output[0]][1:])
    return total


def measure(path: Path, box: tuple[float, float], budget_mb: float) -> dict:
    from onnx_lower.passes.layered import chain_bytes, layer_chain

    proto = onnx.load(path)
    row: dict = {"model": path.stem, "relu_original": original_relus(proto)}
    steps = PIPELINES["layered"]
    upto = list(steps[: steps.index("layer-chain")])
    model = LoweringModel.from_proto(proto, Options(form="layered"))
    start = time.perf_counter()
    try:
        build_pipeline(passes=upto)(model)
        row["mlp_bytes"] = pending_weight_bytes(model.graph)
        layers, widths, notes = layer_chain(model)
        _, _, plain = layer_chain(model, search=False)
        model.options.input_box = box
        _, boxed_widths, boxed = layer_chain(model)
    except LoweringError as exc:
        row["status"] = f"refused: {exc.fact.split(':')[0]}"
        return row
    y = model.graph.outputs[0]
    row.update(
        layers=len(layers),
        max_width=max(widths[1:-1], default=0),
        relu_layered=notes["relu_neurons"],
        carry=notes["carry_neurons"],
        carry_atoms=plain["carry_neurons"],
        carry_box=boxed["carry_neurons"],
        neurons=notes["neurons"],
        layered_bytes=chain_bytes(widths, y),
        layered_box_bytes=chain_bytes(boxed_widths, y),
        seconds=time.perf_counter() - start,
    )
    fits = row["layered_bytes"] <= budget_mb * MB
    row["status"] = "lowers" if fits else f"over {budget_mb:g} MB"
    return row


def markdown(rows: list[dict]) -> str:
    head = ("| model | status | ReLU orig | ReLU layered | layers | max width | carry | carry "
            "(atoms only) | carry (box) | neurons ASAP / ALAP | mlp MB | layered MB | layered MB "
            "(box) |")
    lines = [head, "|---|---|" + "---:|" * 11]
    for r in rows:
        if "layers" not in r:
            lines.append(f"| {r['model']} | {r['status']} | {r['relu_original']} |" + " |" * 10)
            continue
        n = r["neurons"]
        lines.append(
            f"| {r['model']} | {r['status']} | {r['relu_original']} | {r['relu_layered']} | "
            f"{r['layers']} | {r['max_width']} | {r['carry']} | {r['carry_atoms']} | "
            f"{r['carry_box']} | "
            f"{n['asap']} / {n['alap']} | {r['mlp_bytes'] / MB:,.1f} | "
            f"{r['layered_bytes'] / MB:,.1f} | {r['layered_box_bytes'] / MB:,.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=[str(CORPUS)], help="files or folders")
    p.add_argument("--box", default="0,1", metavar="LO,HI", help="input box (default 0,1)")
    p.add_argument("--max-weight-mb", type=float, default=1024, help="budget (default 1024)")
    p.add_argument("--json", metavar="FILE", help="write every number as JSON")
    args = p.parse_args(argv)
    lo, hi = (float(v) for v in args.box.split(","))
    paths = []
    for m in args.models:
        m = Path(m)
        paths.extend(sorted(m.glob("*.onnx")) if m.is_dir() else [m])
    rows = []
    for path in paths:
        print(f"{path.name}", file=sys.stderr, flush=True)
        rows.append(measure(path, (lo, hi), args.max_weight_mb))
    print(markdown(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
