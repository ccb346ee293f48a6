"""The library entry point: ``lower(model, form=...) -> (ModelProto, Report)``.

``lower`` loads and checks the model, runs the pipeline of the requested form (see
:mod:`onnx_lower.pipelines`), checks that no internal node is left and that the result passes the
ONNX checker, and returns the lowered model with a :class:`~onnx_lower.report.Report`.

``form="auto"`` tries the mlp form first. When its emitted weights would exceed the budget, or
it meets an op it cannot keep, the im2col form lowers the model instead; the report's
``form_reason`` says which and why.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence

import onnx

from . import cost
from . import graph as g
from .errors import BudgetExceededError, LoweringError, UnsupportedOpError
from .model_io import ModelSource, load_model, skeleton, to_sparse_storage
from .pass_manager import LoweringModel, Options, PassRecord
from .pipelines import FORMS, build_pipeline
from .plan import Plan, make_plan
from .report import ModelStats, Report

__all__ = ["lower", "plan", "model_stats"]

MB = 1024 * 1024


def lower(
    model: ModelSource,
    form: str = "auto",
    *,
    passes: Sequence[str] | None = None,
    max_weight_mb: float = 1024,
    sparse_storage: bool = False,
    verify_each: bool = False,
    dump_dir: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[onnx.ModelProto, Report]:
    """Lower ``model`` (a path or ModelProto) and return ``(lowered, report)``.

    Raises a :class:`~onnx_lower.errors.LoweringError` subclass for anything a user can cause.
    """
    if form not in FORMS:
        raise LoweringError(f"unknown form '{form}'; choose one of {', '.join(FORMS)}")
    start = time.perf_counter()
    original = load_model(model)
    before = model_stats(original)  # also feeds the auto plan its MAC count
    loaded = time.perf_counter()
    options = Options(
        form=form,
        max_weight_bytes=int(max_weight_mb * MB),
        sparse_storage=sparse_storage,
        verify_each=verify_each,
        dump_dir=dump_dir,
        progress=progress,
    )
    if passes:
        used, reason = "custom", "passes given with --passes"
        lowered, records, notes = _run(original, options, passes=list(passes))
    elif form == "auto":
        first = make_plan(original, options.max_weight_bytes, exact=False, macs=before.macs)
        used, reason = first.form, first.reason
        if used == "mlp":
            try:
                lowered, records, notes = _run(original, options, form="mlp")
                reason = (
                    f"the mlp weights ({notes.get('emitted_weight_bytes', 0) / MB:,.1f} MB) fit "
                    f"the budget of {max_weight_mb:,.0f} MB"
                )
            except (BudgetExceededError, UnsupportedOpError) as exc:
                used, reason = "im2col", f"mlp not possible: {exc}"
        if used == "im2col":
            lowered, records, notes = _run(original, options, form="im2col")
    else:
        used = form
        reason = "requested"
        lowered, records, notes = _run(original, options, form=form)
    _check_result(lowered)
    if sparse_storage:
        notes["sparse_initializers"] = to_sparse_storage(lowered)
    done = time.perf_counter()
    report = Report(
        form=form,
        form_used=used,
        form_reason=reason,
        before=before,
        after=model_stats(lowered),
        passes=records,
        options={
            "max_weight_mb": float(max_weight_mb),
            "sparse_storage": sparse_storage,
            "passes": list(passes) if passes else None,
        },
        notes=notes,
        timings={"load_s": loaded - start, "lower_s": done - loaded},
        input=str(model) if not isinstance(model, onnx.ModelProto) else None,
    )
    return lowered, report


def plan(model: ModelSource, *, max_weight_mb: float = 1024) -> Plan:
    """What ``form="auto"`` would do, with the exact mlp bytes per layer; writes nothing."""
    return make_plan(load_model(model), int(max_weight_mb * MB), exact=True)


def _run(
    original: onnx.ModelProto,
    options: Options,
    *,
    form: str | None = None,
    passes: list[str] | None = None,
) -> tuple[onnx.ModelProto, list[PassRecord], dict]:
    options.form = form or options.form
    manager = build_pipeline(form, passes)
    work = LoweringModel.from_proto(original, options)
    manager(work)
    notes = dict(work.notes)
    lowered = work.to_proto(release=True)
    del work
    gc.collect()  # the gs graph is cyclic; free its weights before the caller copies the proto
    fold = notes.pop("fold", None)
    if fold:
        notes["fold_summary"] = {
            "matmuls_before": sum(f["before"]["matmuls"] for f in fold),
            "matmuls_after": sum(f["after"]["matmuls"] for f in fold),
            "bytes_before": sum(f["before"]["bytes"] for f in fold),
            "bytes_after": sum(f["after"]["bytes"] for f in fold),
        }
    return lowered, manager.records, notes


def _check_result(model: onnx.ModelProto) -> None:
    internal = [n.name for n in model.graph.node if n.domain == g.INTERNAL_DOMAIN]
    if internal:
        raise LoweringError(
            f"internal nodes are left after the pipeline ({', '.join(internal[:3])}); the "
            f"pipeline must end with emit-affine"
        )
    try:
        onnx.checker.check_model(skeleton(model))
    except Exception as exc:  # a bug in a pass, not the user's input
        raise LoweringError(f"the lowered model fails the ONNX checker: {exc}") from exc


def model_stats(model: onnx.ModelProto) -> ModelStats:
    counts: dict[str, int] = {}
    for n in model.graph.node:
        key = n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}"
        counts[key] = counts.get(key, 0) + 1
    return ModelStats(
        ops=dict(sorted(counts.items())),
        nodes=len(model.graph.node),
        weight_bytes=cost.weight_bytes(model),
        macs=cost.count_macs(model),
    )
