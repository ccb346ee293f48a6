"""Command line: ``python -m onnx_lower IN.onnx OUT.onnx [options]`` (also ``onnx-lower``).

Exit codes: 0 ok; 1 validation failed; 2 bad input or unsupported model; 3 internal error (a
pass broke the model: please report it). A user's mistake never shows a traceback; ``-v`` does.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .errors import LoweringError
from .pass_manager import CONV_ALGOS
from .pipelines import FORMS

__all__ = ["main", "build_parser"]

EXIT_OK, EXIT_VALIDATION, EXIT_USER, EXIT_INTERNAL = 0, 1, 2, 3
#: Schema of the ``--dry-run --report`` document.
PLAN_SCHEMA = "onnx_lower.plan/1.3"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="onnx-lower",
        description="Lower an ONNX CNN to MatMul/Add/Relu (mlp form) or Gather+MatMul (im2col).",
        epilog="Exit codes: 0 ok, 1 validation failed, 2 bad input or unsupported, 3 internal.",
    )
    p.add_argument("input", nargs="?", help="the model to lower (.onnx)")
    p.add_argument("output", nargs="?", help="where to write the lowered model")
    p.add_argument(
        "--form",
        choices=FORMS,
        default=None,
        help="target form (default: auto; layered for a .nnet output)",
    )
    p.add_argument(
        "--format",
        choices=("onnx", "nnet"),
        default=None,
        help="output file format (default: from OUTPUT's suffix, .nnet or else onnx)",
    )
    p.add_argument(
        "--vnnlib",
        metavar="PROP.vnnlib",
        help="input box from a VNN-LIB property (X_i = input element i, C order): the .nnet "
        "input bounds, and validation samples inside it",
    )
    p.add_argument("--passes", help="comma-separated pass names to run instead of a form")
    p.add_argument(
        "--drop-final-softmax",
        action="store_true",
        help="layered form: drop a Softmax that computes the output (the argmax is kept)",
    )
    p.add_argument("--list-passes", action="store_true", help="list the registered passes")
    p.add_argument(
        "--target",
        metavar="VERIFIER",
        help="rewrite only what VERIFIER's reader cannot read (see --list-targets)",
    )
    p.add_argument(
        "--list-targets", action="store_true", help="list the verifier profiles and their rules"
    )
    p.add_argument(
        "--max-weight-mb",
        type=float,
        default=1024,
        help="budget for the dense weights the mlp form emits (default: 1024)",
    )
    p.add_argument(
        "--sparse-storage",
        action="store_true",
        help="store sparse weights as sparse_initializer (smaller file, same numerics)",
    )
    p.add_argument(
        "--conv-algo",
        choices=CONV_ALGOS,
        default="auto",
        help="im2col form: conv algorithm, im2col, Winograd or per layer by a cost model "
        "(default: auto)",
    )
    p.add_argument("--external-data", action="store_true", help="save weights in OUT.onnx.data")
    p.add_argument("--report", metavar="FILE.json", help="write the full report as JSON")
    p.add_argument("--verify-each", action="store_true", help="check the model after each pass")
    p.add_argument("--dump-after", metavar="DIR", help="write the model after each pass to DIR")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan (form, emitted bytes and MACs per layer); write no model",
    )
    g = p.add_argument_group("validation and benchmarking")
    g.add_argument(
        "--validate",
        action="store_true",
        help="compare outputs with onnxruntime (the default; kept as a no-op alias)",
    )
    g.add_argument(
        "--no-validate", action="store_true", help="skip the numerical comparison (on by default)"
    )
    g.add_argument(
        "--no-ort-check",
        action="store_true",
        help="skip the input gate's onnxruntime load (for models too large to load twice)",
    )
    g.add_argument("--benchmark", action="store_true", help="time original vs lowered (CPU)")
    g.add_argument("--threads", type=int, default=1, help="onnxruntime threads (default: 1)")
    g.add_argument("--batch", type=int, default=1, help="value for a dynamic batch dimension")
    g.add_argument("--samples", type=int, default=4, help="random input sets to validate on")
    g.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    g.add_argument(
        "--input-range",
        metavar="LO,HI",
        help="random input range (default 0,1); given explicitly, also the input box of the "
        "layered form (its output is then exact inside the box)",
    )
    g.add_argument("--inputs", nargs="+", metavar="FILE", help=".npy/.npz/.pb input files")
    g.add_argument("--rtol", type=float, default=1e-4, help="relative tolerance (default 1e-4)")
    g.add_argument("--atol", type=float, default=1e-5, help="absolute tolerance (default 1e-5)")
    g.add_argument("--repeat", type=int, default=100, help="timed runs per model (default 100)")
    p.add_argument("-q", "--quiet", action="store_true", help="print errors only")
    p.add_argument("-v", "--verbose", action="store_true", help="more detail; tracebacks")
    p.add_argument("--version", action="version", version=f"onnx_lower {__version__}")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _main(args, parser)
    except LoweringError as exc:
        if args.verbose:
            traceback.print_exc()
        # one line: a message quoting onnxruntime or the checker may hold line breaks
        one_line = " ".join(part.strip() for part in str(exc).splitlines() if part.strip())
        print(f"error: {one_line}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # stdout's reader went away (`| head`): the work is done, keep its status, say no more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return getattr(args, "status", EXIT_OK)
    except Exception as exc:  # a bug: say so, and how to report it
        if args.verbose:
            traceback.print_exc()
        print(
            f"internal error: {type(exc).__name__}: {exc}\n"
            f"This is a bug in onnx_lower; rerun with -v and report the traceback.",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


def _main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .api import lower
    from .model_io import stage_model
    from .pass_manager import registered_passes
    from .pipelines import load_passes

    if args.list_passes:
        load_passes()
        for name, cls in registered_passes().items():
            print(f"{name:<20} {cls.description}")
        return EXIT_OK
    if args.list_targets:
        from .targets import format_targets

        print(format_targets())
        return EXIT_OK
    if args.target and (args.passes or args.dry_run or args.form is not None):
        raise LoweringError("--target picks its own pipeline: drop --form, --passes or --dry-run")
    if not args.input or (not args.output and not args.dry_run):
        parser.error("give INPUT and OUTPUT (or --dry-run, or --list-passes)")
    _check_output(args)
    _resolve_format(args)
    if args.target and args.format == "nnet" and args.target != "nnet":
        raise LoweringError(f"a .nnet output is the layered form: use --target nnet, not "
                            f"--target {args.target}, or write .onnx")
    if args.dry_run:
        return _dry_run(args)
    # before any work: a typo must not leave an output
    explicit_range = _range(args.input_range) if args.input_range is not None else None
    input_range = explicit_range or (0.0, 1.0)
    vnnlib_box = None
    if args.vnnlib:
        from .vnnlib import read_input_box

        vnnlib_box = read_input_box(args.vnnlib)
    # the layered form's input box: a VNN-LIB property's, else an explicit --input-range
    box = vnnlib_box.as_tuple() if vnnlib_box is not None else explicit_range
    given_inputs = None
    validating = not args.no_validate
    if validating and args.inputs:
        from .validate import load_inputs

        given_inputs = load_inputs(args.inputs, args.input)
    passes = [p.strip() for p in args.passes.split(",") if p.strip()] if args.passes else None
    progress = _Progress(enabled=sys.stderr.isatty() and not args.quiet)
    lowered, report = lower(
        args.input,
        args.form,
        target=args.target,
        passes=passes,
        max_weight_mb=args.max_weight_mb,
        sparse_storage=args.sparse_storage,
        conv_algo=args.conv_algo,
        verify_each=args.verify_each,
        dump_dir=args.dump_after,
        progress=progress,
        ort_check=not args.no_ort_check,
        input_box=box,
        drop_final_softmax=args.drop_final_softmax,
    )
    progress.done()
    if vnnlib_box is not None:
        _check_box_size(vnnlib_box, lowered, args.vnnlib)
        if vnnlib_box.note:
            report.notes["input_box_note"] = vnnlib_box.note
    start = time.perf_counter()
    timed = args.output  # what --benchmark runs: the written model, or the chain a .nnet holds
    if args.format == "nnet":
        timed = lowered
        _write_nnet(args, report, lowered, box, vnnlib_box, given_inputs, input_range,
                    validating, progress)
        report.timings["save_s"] = time.perf_counter() - start
    else:
        staged = stage_model(
            lowered, args.output, input_path=args.input, external_data=args.external_data
        )
        del lowered  # the output gate and validation load the file: free the proto first
        gc.collect()
        try:
            report.timings["save_s"] = time.perf_counter() - start
            start = time.perf_counter()
            _output_gate(args, staged)
            report.timings["output_gate_s"] = time.perf_counter() - start
            if validating:
                _validate(args, report, staged.file, given_inputs, input_range, box, progress)
            staged.commit(check=False)  # a mismatch is still written, for inspection
        finally:
            staged.discard()
    report.output = str(args.output)
    status = EXIT_OK
    if report.validation is not None and not report.validation.passed:
        status = EXIT_VALIDATION
    args.status = status  # kept if printing the summary fails on a closed pipe
    if args.benchmark:
        from .benchmark import benchmark

        progress.step("benchmark")
        report.latency = benchmark(
            args.input,
            timed,
            threads=args.threads,
            repeat=args.repeat,
            batch=args.batch,
            seed=args.seed,
        )
        progress.done()
    if args.report:
        _write_text(Path(args.report), report.to_json() + "\n")
    if not args.quiet:
        _print_summary(args, report)
    if status == EXIT_VALIDATION:
        for line in report.validation.failures():
            print(f"validation failed: {line}", file=sys.stderr)
    return status


def _output_gate(args: argparse.Namespace, staged) -> None:
    """The output gate; a failure is a bug unless the input itself does not run as declared."""
    from .errors import InvalidModelError, OutputGateError
    from .gates import check_output, runtime_problem

    try:
        check_output(staged.file, ort_load=staged.ort_load)
    except OutputGateError:
        problem = None if args.no_ort_check else runtime_problem(args.input, args.batch)
        if problem:
            raise InvalidModelError(
                f"'{args.input}' is inconsistent: {problem}. Fix the model at its source"
            ) from None
        raise


def _write_nnet(args, report, lowered, box, vnnlib_box, given_inputs, input_range, validating,
                progress) -> None:
    """Validate the lowered chain in memory, then write it as ``.nnet`` (atomically).

    A ``.nnet`` is not ONNX: there is no output gate to run on it, so the chain is checked
    against the original before it is serialised; a mismatch is still written (exit 1).
    """
    import numpy as np

    from .nnet import chain_layers, write_nnet

    layers = chain_layers(lowered)
    if box is not None:  # an --input-range box is two scalars: one bound for every input
        n_in = layers[0][0].shape[1]
        box = tuple(np.broadcast_to(np.asarray(v, np.float64).reshape(-1), (n_in,)) for v in box)
    if validating:
        _validate(args, report, lowered, given_inputs, input_range, box, progress)
    info = write_nnet(
        layers,
        args.output,
        box,
        source=args.input,
        exact_only_in_box=box is not None and args.form == "layered",
        box_source=args.vnnlib,
    )
    report.nnet = info.to_dict()
    for line in info.warnings():
        print(f"warning: {line}", file=sys.stderr)


def _validate(args, report, lowered, given_inputs, input_range, box, progress) -> None:
    """Compare the staged output with the input in onnxruntime; ``timings.validate_s``.

    The layered form's output is exact inside its input box only: it is sampled there.
    """
    from .validate import validate

    progress.step("validate")
    start = time.perf_counter()
    report.validation = validate(
        args.input,
        lowered,
        inputs=given_inputs,
        samples=args.samples,
        seed=args.seed,
        input_range=input_range,
        rtol=args.rtol,
        atol=args.atol,
        batch=args.batch,
        input_box=box if args.form == "layered" else None,
    )
    report.timings["validate_s"] = time.perf_counter() - start
    progress.done()


def _dry_run(args: argparse.Namespace) -> int:
    """Print the plan; fail with exit 2 when the requested form cannot be had."""
    import json

    from .api import plan
    from .errors import BudgetExceededError

    if args.form in ("im2col", "fold-only", "layered") or args.passes:
        raise LoweringError("--dry-run plans the auto and mlp forms; use --form auto or mlp")
    result = plan(args.input, max_weight_mb=args.max_weight_mb, per_region=args.form == "auto")
    if args.report:
        document = {"schema": PLAN_SCHEMA, "plan": result.to_dict()}
        _write_text(Path(args.report), json.dumps(document, indent=2) + "\n")
    if not args.quiet:
        print("\n".join(result.summary_lines()))
    if args.form == "mlp" and result.form != "mlp":
        if result.mlp_bytes is not None and result.layers:
            worst = max(result.layers, key=lambda la: la.bytes)
            budget, total = result.budget_bytes, result.mlp_bytes
            raise BudgetExceededError(worst.name, worst.bytes, budget, total)
        raise LoweringError(f"the mlp form is not possible: {result.reason}")
    return EXIT_OK


#: Forms whose output can be a strict ReLU chain: layered always, mlp for fully-connected models
_CHAIN_FORMS = ("layered", "mlp")


def _resolve_format(args: argparse.Namespace) -> None:
    """``--format`` from the suffix; a .nnet output needs a strict-chain form (layered)."""
    if args.format is None:
        suffix = Path(args.output).suffix.lower() if args.output else ""
        args.format = "nnet" if suffix == ".nnet" else "onnx"
    if args.format != "nnet":
        args.form = args.form or "auto"
        return
    if args.passes:
        raise LoweringError("--format nnet writes a form's output; drop --passes")
    if args.form is None:
        args.form = "layered"
    elif args.form not in _CHAIN_FORMS:
        raise LoweringError(
            f"--format nnet needs a strict ReLU chain, which --form {args.form} does not make; "
            f"use --form layered (or leave --form out)"
        )
    if args.sparse_storage or args.external_data:
        raise LoweringError("--sparse-storage and --external-data apply to ONNX output, not .nnet")


def _check_box_size(box, lowered, where: str) -> None:
    """The box must bound every element of the (single) input, before anything is written."""
    from .validate import graph_inputs

    specs = graph_inputs(lowered)
    shape = specs[0].dims[1:] if len(specs) == 1 and specs[0].dims else None
    if shape is None or any(not isinstance(d, int) for d in shape):
        return  # validate / write_nnet name the problem
    size = math.prod(shape)
    if box.lo.size != size:
        raise LoweringError(
            f"'{where}' bounds {box.lo.size} inputs X_0…, but the model's input "
            f"'{specs[0].name}' has {size} elements per sample; is it this model's property?"
        )


def _check_output(args: argparse.Namespace) -> None:
    """Fail before any work when the output cannot be written."""
    from .model_io import check_output_path

    for path, what in ((args.output, "output path"), (args.report, "--report file")):
        if path:
            check_output_path(path, args.input, what)


def _range(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise LoweringError(f"--input-range wants LO,HI (two numbers), not '{text}'") from None
    if not lo < hi:
        raise LoweringError(f"--input-range needs LO < HI, got {lo}, {hi}")
    return lo, hi


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _print_summary(args: argparse.Namespace, report) -> None:
    print(f"{args.input} -> {report.output}")
    for line in report.summary_lines(verbose=args.verbose):
        print(line)
    if report.validation is not None:
        for line in report.validation.summary_lines():
            print(line)
    if report.latency is not None:
        for line in report.latency.summary_lines():
            print(line)


class _Progress:
    """One updating status line on stderr, shown only when a step takes over half a second."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.start = time.perf_counter()
        self.shown = False

    def __call__(self, name: str) -> None:
        self.step(name)

    def step(self, name: str) -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        if elapsed > 0.5:
            sys.stderr.write(f"\r\033[K[{elapsed:6.1f}s] {name}")
            sys.stderr.flush()
            self.shown = True

    def done(self) -> None:
        if self.enabled and self.shown:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
            self.shown = False
