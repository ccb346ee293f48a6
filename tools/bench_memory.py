#!/usr/bin/env python3
"""Peak memory and wall time of ``onnx_lower.lower()`` alone, one child process per model.

Usage::

    python tools/bench_memory.py                                   # ImageNet set, --form im2col
    python tools/bench_memory.py --models models/imagenet/vgg11.onnx --form auto

Each child imports onnx_lower, lowers the model from its path (as the CLI does) and reports its
own ``getrusage(RUSAGE_SELF).ru_maxrss`` and the seconds ``lower()`` took; nothing is saved,
validated or benchmarked, so the peak is the lowering's. The baseline row is a child that only
imports onnx_lower and onnxruntime. The target column is issue 8's bound, 2 × the model file +
300 MB.

``--cli`` runs the whole command instead, ``onnx_lower.cli.main([model, tmp.onnx, --form F,
*EXTRA])`` with ``--cli-args`` as EXTRA (default ``--no-validate``): the input gate (checker
and an onnxruntime load), the lowering, the save and the output gate (checker and an
onnxruntime load of the temporary file after the lowered proto is freed). "lower s" is then the
whole command's wall time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO_ROOT))

from onnx_lower.benchmark import machine_info  # noqa: E402
from tools.make_models import IMAGENET, IMAGENET_DIR  # noqa: E402

MB = 1024 * 1024

_CHILD = """
import json, resource, sys, time
import onnxruntime  # noqa: F401  (the CLI loads it too: count its libraries in the baseline)
import onnx_lower
path, form = sys.argv[1], sys.argv[2]
seconds = None
if path != "-" and sys.argv[3:]:  # the whole CLI
    import os, tempfile
    from onnx_lower.cli import main
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        code = main([path, os.path.join(tmp, "out.onnx"), "--form", form, "-q", *sys.argv[4:]])
        seconds = time.perf_counter() - start
    if code:
        sys.exit(f"the CLI exited {code}")
    form = "cli " + form
elif path != "-":
    start = time.perf_counter()
    lowered, report = onnx_lower.lower(path, form=form)
    seconds = time.perf_counter() - start
    form = report.form_used
print(json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "seconds": seconds, "form": form}))
"""


def measure(path: str, form: str, cli_args: list[str] | None = None) -> dict:
    extra = [] if cli_args is None else ["--cli", *cli_args]
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, path, form, *extra],
        capture_output=True, text=True, cwd=REPO_ROOT, check=False,
    )
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="*", help="ONNX files (default: models/imagenet/*)")
    ap.add_argument("--form", default="im2col", help="form to lower to (default im2col)")
    ap.add_argument("--json", help="also write the rows to this JSON file")
    ap.add_argument("--cli", action="store_true", help="measure the whole CLI command, gates "
                    "and save included")
    ap.add_argument("--cli-args", default="--no-validate",
                    help="extra CLI flags with --cli (default: --no-validate)")
    args = ap.parse_args(argv)
    cli_args = args.cli_args.split() if args.cli else None
    paths = [Path(p) for p in args.models] if args.models else [
        IMAGENET_DIR / f"{n}.onnx" for n in IMAGENET
    ]
    missing = [p for p in paths if not p.is_file()]
    for p in missing:
        print(f"skipped {p}: missing (python tools/make_models.py --imagenet)", file=sys.stderr)
    paths = [p for p in paths if p.is_file()]
    info = machine_info()
    print(f"machine: {info['cpu']}, {info['cores']} cores; onnxruntime {info['onnxruntime']}; "
          f"{info['date']}")
    print(f"command: python tools/bench_memory.py {' '.join(argv or sys.argv[1:])}".rstrip())
    base = measure("-", args.form)
    print(f"baseline (imports only): {base['peak_mb']:.0f} MB\n")
    print("| model | file MB | form | lower s | peak MB | target MB | within |")
    print("|---|---:|---|---:|---:|---:|---|")
    rows = []
    for p in paths:
        size = p.stat().st_size / MB
        r = measure(str(p), args.form, cli_args)
        target = 2 * size + 300
        row = {"model": p.stem, "file_mb": size, "target_mb": target, **r}
        rows.append(row)
        if "error" in r:
            print(f"| {p.stem} | {size:.1f} | — | — | — | {target:.0f} | error: {r['error']} |")
            continue
        ok = "yes" if r["peak_mb"] <= target else f"no ({r['peak_mb'] / target:.2f}×)"
        print(f"| {p.stem} | {size:.1f} | {r['form']} | {r['seconds']:.2f} | "
              f"{r['peak_mb']:.0f} | {target:.0f} | {ok} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "baseline": base, "rows": rows},
                                              indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
