#!/usr/bin/env python3
"""ONNX backend node tests through onnx_lower: every supported op, every form that handles it.

Usage::

    python tools/conformance.py                    # the Markdown table on stdout
    python tools/conformance.py --op Conv --op MaxPool --form mlp -v   # a subset, with details

The cases are ONNX's own node tests (``onnx.backend.test.case.node.collect_testcases()``): one
model of a single node, the inputs and the expected outputs (computed by ONNX's numpy reference).
For every case whose node is one of :data:`OPS`:

1. The first graph input stays the activation. Its axis 0 is the batch by the mlp form's
   convention; it is static in every case, so an op that mixes it (a Transpose moving axis 0,
   Gemm with ``transA``, Flatten with ``axis != 1``, ...) is lowered with the whole tensor as
   the sample (``onnx_lower/passes/sample_axis.py``). Every other input becomes an initializer
   holding the case's value (weights, bias, scale, shapes, pads, axes, ...), except the *data*
   inputs of :data:`DATA_OPS` (Add, Sub, Mul, Div, Max, Min, Sum, Concat) that have the
   activation's shape: those stay graph inputs (two activations, e.g. a residual Add).
2. ``onnx_lower.lower(model, form=F)`` for each form of :data:`FORMS`. The im2col form rewrites
   only conv/pool/BatchNorm and keeps the other ops as they are, so it must pass everything.
3. onnxruntime runs the lowered model on the case's inputs; every output is compared with the
   case's expected output by ``np.allclose`` semantics (``|a - b| <= atol + rtol·|b|``, NaN
   equal to NaN), with rtol = atol = 1e-5 (:data:`CASE_TOL` names the one case that needs
   more, and why).

A case lowering refuses (a :class:`~onnx_lower.errors.LoweringError`) is a failure unless it is
in :data:`SKIP`, which gives the reason for every expected refusal or known disagreement. A
SKIP entry whose case passes is *stale* and counts as a failure too, so the list cannot rot.

The test module ``tests/test_conformance.py`` imports this file (one place for the logic) and
parametrizes over ``(case, form)``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import sys
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO_ROOT))

import onnx_lower  # noqa: E402
from onnx_lower.errors import LoweringError  # noqa: E402
from onnx_lower.validate import make_session  # noqa: E402

__all__ = [
    "OPS",
    "FORMS",
    "DATA_OPS",
    "SKIP",
    "Outcome",
    "all_cases",
    "cases",
    "case_op",
    "skip_reason",
    "prepare",
    "run_case",
    "tolerance",
    "markdown_table",
    "main",
]

#: The ops onnx_lower lowers or keeps, in the order of the table.
OPS = (
    "Conv", "ConvTranspose", "MaxPool", "AveragePool", "GlobalMaxPool", "GlobalAveragePool",
    "BatchNormalization", "Gemm", "MatMul", "Flatten", "Reshape", "Transpose", "Pad", "Concat",
    "Split", "Squeeze", "Unsqueeze", "Slice", "LeakyRelu", "PRelu", "Clip", "Relu", "Abs", "Neg",
    "Add", "Sub", "Mul", "Div", "Max", "Min", "HardSigmoid", "ReduceMean", "ReduceSum", "Sum",
    "Sigmoid", "Tanh", "Softmax", "Elu", "Selu", "Exp", "Identity", "Dropout", "Gather",
)
#: Every form is expected to handle every op of :data:`OPS`: mlp lowers or keeps it, im2col
#: rewrites conv/pool/BN and keeps the rest unchanged. layered must pass every case mlp passes
#: that has one activation input, one output and no kept op (:func:`skip_reason`).
FORMS = ("mlp", "layered", "im2col")
#: The strict chain of the layered form, hidden layers repeated.
LAYERED_HEAD, LAYERED_HIDDEN, LAYERED_TAIL = ("Flatten",), ("MatMul", "Add", "Relu"), (
    "MatMul", "Add", "Reshape")
#: Ops whose further inputs are data like the first one when they have its shape.
DATA_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Concat"})

RTOL = ATOL = 1e-5
#: Cases that need a looser tolerance, with the reason. Every op, the accumulating ones (Conv,
#: ConvTranspose, Gemm, MatMul, pools, reductions) included, passes at 1e-5 otherwise.
CASE_TOL: dict[str, tuple[float, float, str]] = {
    "test_averagepool_2d_ceil_last_window_starts_on_pad": (
        1e-4, 1e-4, "the expected values are written with 4 decimals in the ONNX test "
                    "(0.2841 for 0.284044...); onnxruntime on the original is off by 5.6e-5 too"),
}

# Reasons shared by several entries.
_INT = "integer tensors: the mlp form lowers float activations only (refused on purpose)"
_BUDGET = ("dense mlp matrices exceed the default 1024 MB --max-weight-mb: BudgetExceededError "
           "on purpose (im2col lowers it)")
_NONLINEAR = "product/quotient of two activations: not piecewise-linear, no MatMul/Add/Relu form"
_RANDOM = ("training-mode Dropout draws a random mask: onnxruntime's generator is not the "
           "reference's (the original model mismatches too)")
_SOFTMAX = ("Softmax over part of a sample normalises several slices separately: no flat-vector "
            "form (the mlp form keeps only a Softmax over the whole sample)")
_ORT_INT16 = ("onnxruntime has no int16/uint16 Max/Min kernel: the original model does not load "
              "either")
_TRAIN_BN = "training-mode BatchNormalization normalises with batch statistics"
_TRAIN_ZERO = "training-mode Dropout is refused, even at ratio 0"
_ZERO = ("zero-size output: refused (a Reshape cannot infer the batch of an empty tensor, and "
         "the mlp form does not special-case empty tensors)")
_SOFTMAX_0 = ("Softmax over axis 0 of a (3, 4, 5) tensor normalises 20 slices separately: "
              "not elementwise on the flat vector, even with the whole tensor as the sample")

#: (case name, form) or case name (every form) → why the case is not expected to pass.
SKIP: dict[str | tuple[str, str], str] = {
    # pools
    ("test_maxpool_3d_default", "mlp"): _BUDGET,
    ("test_maxpool_3d_dilations_use_ref_impl_large", "mlp"): _BUDGET,
    ("test_averagepool_3d_default", "mlp"): _BUDGET,
    # the mlp form fits (1 ReLU per pairwise max, shared); its strict chain carries the
    # tournament's values through 5 layers: 1.1 GB
    ("test_maxpool_2d_pads", "layered"): _BUDGET,
    "test_maxpool_2d_uint8": "uint8 pooling: only float activations are lowered, in both forms",
    "test_maxpool_with_argmax_2d_precomputed_pads": "the Indices output of MaxPool is out of scope",
    "test_maxpool_with_argmax_2d_precomputed_strides": "the Indices output of MaxPool is out of "
                                                       "scope",
    # BatchNormalization, Dropout
    "test_batchnorm_epsilon_training_mode": _TRAIN_BN,
    "test_batchnorm_example_training_mode": _TRAIN_BN,
    "test_training_dropout": _RANDOM,
    "test_training_dropout_default": _RANDOM,
    "test_training_dropout_default_mask": _RANDOM,
    "test_training_dropout_mask": _RANDOM,
    ("test_training_dropout_zero_ratio", "mlp"): _TRAIN_ZERO,
    ("test_training_dropout_zero_ratio_mask", "mlp"): _TRAIN_ZERO,
    # zero-size outputs, Softmax
    ("test_reshape_allowzero_reordered", "mlp"): _ZERO,
    ("test_split_zero_size_splits_opset13", "mlp"): _ZERO,
    ("test_split_zero_size_splits_opset18", "mlp"): _ZERO,
    ("test_slice_start_out_of_bounds", "mlp"): _ZERO,
    ("test_reduce_sum_empty_set_non_reduced_axis_zero", "mlp"): _ZERO,
    ("test_softmax_axis_0", "mlp"): _SOFTMAX_0,
    ("test_softmax_axis_1", "mlp"): _SOFTMAX,
    ("test_softmax_axis_2", "mlp"): _SOFTMAX,
    ("test_softmax_default_axis", "mlp"): _SOFTMAX,
    ("test_softmax_negative_axis", "mlp"): _SOFTMAX,
    # integer tensors
    **{(f"test_{case}", "mlp"): _INT for case in (
        "edge_pad", "reflect_pad", "wrap_pad", "clip_default_int8_inbounds",
        "clip_default_int8_max", "clip_default_int8_min", "clip_default_int8_inbounds_expanded",
        *(f"{op}_{t}" for op in ("add", "sub", "max", "min")
          for t in ("int8", "int16", "uint8", "uint16", "uint32", "uint64")),
        "max_int32", "max_int64", "min_int32", "min_int64")},
    **{(f"test_{op}_{t}", "im2col"): _ORT_INT16 for op in ("max", "min")
       for t in ("int16", "uint16")},
    # products and quotients of two activations
    **{(f"test_{op}{t}", "mlp"): _NONLINEAR for op in ("mul", "div")
       for t in ("", "_example", "_int8", "_int16", "_uint8", "_uint16", "_uint32", "_uint64")},
    ("test_div_int32_trunc", "mlp"): _NONLINEAR,
    # not tensors
    "test_identity_opt": "optional-typed input: only tensor inputs and outputs are in scope",
    "test_identity_sequence": "sequence-typed input: only tensor inputs and outputs are in scope",
}


def skip_reason(name: str, form: str) -> str | None:
    """The SKIP reason of ``name`` in ``form``, or None.

    The layered form inherits the mlp form's reasons, and by rule skips the cases a strict
    chain cannot hold: a kept op (no MatMul/Add/Relu form), or several activation inputs or
    outputs (a .nnet holds one of each).
    """
    if form == "layered":
        return SKIP.get((name, form)) or skip_reason(name, "mlp") or _layered_rule(name)
    return SKIP.get((name, form)) or SKIP.get(name)


def _layered_rule(name: str) -> str | None:
    from onnx_lower.passes.activations import KEPT_ELEMENTWISE

    case = next((c for c in all_cases() if c.name == name), None)
    if case is None:
        return None
    op = case_op(case)
    if op in KEPT_ELEMENTWISE:
        return f"{op} is kept by the mlp form: a strict ReLU chain has no form for it (refused)"
    try:
        model, _, _ = prepare(case)
    except ValueError:
        return None
    if len(model.graph.input) != 1 or len(model.graph.output) != 1:
        return (f"{len(model.graph.input)} activation inputs and {len(model.graph.output)} "
                "outputs: the layered form takes one of each (refused)")
    return None


# --------------------------------------------------------------------------- the cases


@functools.cache
def all_cases() -> tuple:
    """Every single-node ONNX backend case whose op is in :data:`OPS`, sorted by op and name.

    ``collect_testcases`` is slow (~6 s) and filters by op only on its first call in a
    process, so everything is collected once, here, and filtered in Python.
    """
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        everything = collect_testcases()
    order = {op: i for i, op in enumerate(OPS)}
    picked = [c for c in everything
              if len(c.model.graph.node) == 1 and c.model.graph.node[0].op_type in order]
    picked.sort(key=lambda c: (order[case_op(c)], c.name))
    return tuple(picked)


def case_op(case) -> str:
    return case.model.graph.node[0].op_type


def cases(ops: Iterable[str] | None = None) -> list:
    """The cases of ``ops`` (all of :data:`OPS` by default)."""
    wanted = set(OPS if ops is None else ops)
    return [c for c in all_cases() if case_op(c) in wanted]


def case_size(case) -> int:
    """Elements of the case's largest input or output (a proxy for its lowering time)."""
    ins, outs = case.data_sets[0]
    arrays = [a for a in (*ins, *outs) if isinstance(a, np.ndarray)]
    return max((a.size for a in arrays), default=0)


def tolerance(name: str) -> tuple[float, float]:
    """``(rtol, atol)`` for the case ``name``."""
    if name in CASE_TOL:
        return CASE_TOL[name][:2]
    return RTOL, ATOL


def _is_data(op: str, first: np.ndarray, value) -> bool:
    return (op in DATA_OPS and isinstance(value, np.ndarray)
            and value.shape == first.shape and value.dtype == first.dtype)


def prepare(case, data_set: int = 0) -> tuple[onnx.ModelProto, list[dict[str, np.ndarray]],
                                               list[list]]:
    """The case as a model to lower: ``(model, feeds, expected)``, one entry per data set.

    Parameters (every input but the first, except data inputs of :data:`DATA_OPS`) become
    initializers with the values of the first data set; later data sets are used only where
    their parameters are the same.
    """
    model = onnx.ModelProto()
    model.CopyFrom(case.model)
    graph = model.graph
    op = case_op(case)
    ins0, _ = case.data_sets[data_set]
    names = [vi.name for vi in graph.input]
    if len(names) != len(ins0):
        raise ValueError(f"{case.name}: {len(names)} graph inputs but {len(ins0)} input values")
    ins0 = [_tensor(v) for v in ins0]
    first = ins0[0]
    keep = [0] + [j for j in range(1, len(names)) if _is_data(op, first, ins0[j])]
    params = [j for j in range(1, len(names)) if j not in keep]
    for j in params:
        graph.initializer.append(numpy_helper.from_array(np.asarray(ins0[j]), names[j]))
    kept_inputs = [graph.input[j] for j in keep]
    del graph.input[:]
    graph.input.extend(kept_inputs)

    feeds, expected = [], []
    for ins, outs in case.data_sets:
        if not all(_same(ins[j], ins0[j]) for j in params):
            continue
        feeds.append({names[j]: _tensor(ins[j]) for j in keep})
        expected.append([_tensor(v) for v in outs])
    if not feeds:
        raise ValueError(f"{case.name}: no data set has the parameters of the first one")
    return model, feeds, expected


def _tensor(value):
    """numpy scalars (rank-0 values) as arrays; sequences stay lists."""
    return value if isinstance(value, (list, tuple)) else np.asarray(value)


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return False
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and bool(
        np.array_equal(a, b, equal_nan=a.dtype.kind == "f"))


# --------------------------------------------------------------------------- running


@dataclass(frozen=True)
class Outcome:
    """``status``: "pass", "refused" (a LoweringError), "mismatch" (wrong numbers, shapes or
    ops), "crash" (lower() raised something other than a LoweringError: a bug, never
    acceptable, SKIP or not) or "error" (the case cannot be prepared, or onnxruntime cannot run
    the lowered model)."""

    status: str
    detail: str = ""
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.status == "pass"


def _compare(got, want, rtol: float, atol: float) -> str | None:
    if isinstance(want, (list, tuple)):  # a sequence output
        if not isinstance(got, (list, tuple)) or len(got) != len(want):
            return f"expected a sequence of {len(want)} tensors, got {type(got).__name__}"
        for k, (g_, w) in enumerate(zip(got, want)):
            problem = _compare(g_, w, rtol, atol)
            if problem:
                return f"sequence element {k}: {problem}"
        return None
    want = np.asarray(want)  # numpy scalars (rank-0 outputs) included
    got = np.asarray(got)
    if got.dtype != want.dtype:
        return f"dtype {got.dtype}, expected {want.dtype}"
    if got.shape != want.shape:
        return f"shape {got.shape}, expected {want.shape}"
    if want.dtype.kind not in "fc":
        bad = int(np.count_nonzero(got != want))
        return f"{bad} of {want.size} elements differ" if bad else None
    ok = np.isclose(got, want, rtol=rtol, atol=atol, equal_nan=True)
    if ok.all():
        return None
    err = np.abs(got.astype(np.float64) - want.astype(np.float64))
    i = int(np.argmax(np.where(ok, -np.inf, err)))
    return (f"{int(np.count_nonzero(~ok))} of {want.size} elements off; worst at flat index "
            f"{i}: got {got.ravel()[i]!r}, expected {want.ravel()[i]!r} (max abs err "
            f"{np.nanmax(err):.3g}, rtol={rtol:g}, atol={atol:g})")


def _reference_agrees(model: onnx.ModelProto, feeds, expected, rtol, atol) -> str:
    """Whether onnxruntime on the *original* (prepared) model matches the expected outputs."""
    try:
        sess = make_session(model, 1, label="original model")
        for feed, want in zip(feeds, expected):
            got = sess.run(None, feed)
            for g_, w in zip(got, want):
                if _compare(g_, w, rtol, atol):
                    return "onnxruntime disagrees with the expected output on the original too"
    except Exception as exc:  # noqa: BLE001 - diagnostic only
        return f"onnxruntime cannot run the original either ({type(exc).__name__})"
    return "onnxruntime agrees with the expected output on the original model"


def run_case(case, form: str) -> Outcome:
    """Lower ``case`` to ``form``, run it in onnxruntime and compare with the expected outputs."""
    start = time.perf_counter()
    rtol, atol = tolerance(case.name)

    def done(status: str, detail: str = "") -> Outcome:
        return Outcome(status, detail, time.perf_counter() - start)

    try:
        model, feeds, expected = prepare(case)
    except Exception as exc:  # noqa: BLE001
        return done("error", f"cannot prepare the case: {type(exc).__name__}: {exc}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lowered, _ = onnx_lower.lower(model, form=form)
    except LoweringError as exc:
        return done("refused", f"{type(exc).__name__}: {exc}")
    except Exception as exc:  # noqa: BLE001 - a crash of a pass is a bug, reported as such
        return done("crash", f"lower() crashed: {type(exc).__name__}: {exc}")
    bad_ops = op_violations(lowered, form)
    if bad_ops:
        return done("mismatch", f"the lowered model has ops the {form} form must not have: "
                                f"{', '.join(bad_ops)}")
    try:
        sess = make_session(lowered, 1, label="lowered model")
        out_names = [o.name for o in case.model.graph.output]
        if [o.name for o in sess.get_outputs()] != out_names:
            return done("mismatch", f"outputs {[o.name for o in sess.get_outputs()]}, expected "
                                    f"{out_names}")
        for k, (feed, want) in enumerate(zip(feeds, expected)):
            got = sess.run(None, feed)
            for name, g_, w in zip(out_names, got, want):
                problem = _compare(g_, w, rtol, atol)
                if problem:
                    ref = _reference_agrees(model, feeds, expected, rtol, atol)
                    return done("mismatch", f"output '{name}' (data set {k}): {problem}; {ref}")
    except Exception as exc:  # noqa: BLE001
        return done("error", f"onnxruntime cannot run the lowered model: "
                             f"{type(exc).__name__}: {_first_line(exc)}")
    return done("pass")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def op_violations(lowered: onnx.ModelProto, form: str) -> list[str]:
    """Ops of ``lowered`` that ``form`` must not leave (sorted)."""
    from onnx_lower.passes.activations import KEPT_ELEMENTWISE
    from onnx_lower.passes.im2col import LOWERED_OPS

    ops = {n.op_type for n in lowered.graph.node}
    if form == "mlp":
        allowed = {"MatMul", "Add", "Relu", "Flatten", "Reshape", *KEPT_ELEMENTWISE}
        return sorted(ops - allowed)
    if form == "im2col":
        return sorted(ops & LOWERED_OPS)
    if form == "layered":
        seq = tuple(n.op_type for n in lowered.graph.node)
        hidden = (len(seq) - len(LAYERED_HEAD) - len(LAYERED_TAIL)) // len(LAYERED_HIDDEN)
        if seq != LAYERED_HEAD + LAYERED_HIDDEN * max(hidden, 0) + LAYERED_TAIL:
            return [f"not a strict chain: {' '.join(seq)}"]
    return []


# --------------------------------------------------------------------------- the table


@dataclass
class Tally:
    passed: int = 0
    skipped: int = 0
    failed: int = 0


def verdict(case, form: str, outcome: Outcome) -> tuple[str, str]:
    """``("pass" | "skip" | "fail", detail)`` of one outcome, SKIP applied (stale → fail)."""
    reason = skip_reason(case.name, form)
    if outcome.status == "crash":
        return "fail", f"crash: {outcome.detail}"
    if reason is not None:
        if outcome.passed:
            return "fail", f"stale SKIP entry (the case passes now): {reason}"
        return "skip", reason
    if outcome.passed:
        return "pass", ""
    return "fail", f"{outcome.status}: {outcome.detail}"


def markdown_table(results: Sequence[tuple[str, str, str]], forms: Sequence[str] = FORMS) -> str:
    """Markdown table from ``(op, form, verdict)`` rows: pass/skip/fail per op and form."""
    tallies: dict[tuple[str, str], Tally] = {}
    for op, form, v in results:
        t = tallies.setdefault((op, form), Tally())
        setattr(t, {"pass": "passed", "skip": "skipped", "fail": "failed"}[v],
                getattr(t, {"pass": "passed", "skip": "skipped", "fail": "failed"}[v]) + 1)
    ops = [op for op in OPS if any((op, f) in tallies for f in forms)]
    head = "| op | cases | " + " | ".join(f"{f} pass / skip / fail" for f in forms) + " |"
    lines = [head, "|---|---:|" + "---:|" * len(forms)]
    totals = {f: Tally() for f in forms}
    n_cases = 0
    for op in ops:
        n = max(sum(vars(tallies.get((op, f), Tally())).values()) for f in forms)
        n_cases += n
        cells = []
        for f in forms:
            t = tallies.get((op, f), Tally())
            for k in ("passed", "skipped", "failed"):
                setattr(totals[f], k, getattr(totals[f], k) + getattr(t, k))
            cells.append(f"{t.passed} / {t.skipped} / {t.failed}")
        lines.append(f"| {op} | {n} | " + " | ".join(cells) + " |")
    cells = [f"**{t.passed} / {t.skipped} / {t.failed}**" for t in totals.values()]
    lines.append(f"| **total** | **{n_cases}** | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--op", action="append", choices=OPS, help="only these ops (repeatable)")
    p.add_argument("--form", action="append", choices=FORMS, help="only these forms")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="list every skip and failure with its reason")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    forms = tuple(args.form or FORMS)
    rows, notes = [], []
    start = time.perf_counter()
    selected = cases(args.op)
    for i, case in enumerate(selected):
        print(f"[{i + 1}/{len(selected)}] {case.name}", file=sys.stderr, flush=True)
        for form in forms:
            v, detail = verdict(case, form, run_case(case, form))
            rows.append((case_op(case), form, v))
            if v != "pass":
                notes.append(f"- {v}: `{case.name}` [{form}]: {detail}")
    print(markdown_table(rows, forms))
    import onnxruntime

    print(f"\nonnx {onnx.__version__}, onnxruntime {onnxruntime.__version__}; "
          f"{len(selected)} cases × {len(forms)} forms in {time.perf_counter() - start:.0f} s")
    failed = [n for n in notes if n.startswith("- fail")]
    if args.verbose:
        print("\n" + "\n".join(notes))
    elif failed:
        print("\n" + "\n".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
