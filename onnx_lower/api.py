"""The library entry point: ``lower(model, form=...) -> (ModelProto, Report)``.

``lower`` loads and checks the model, runs the pipeline of the requested form (see
:mod:`onnx_lower.pipelines`), checks that no internal node is left and that the result passes the
ONNX checker, and returns the lowered model with a :class:`~onnx_lower.report.Report`.

``form="auto"`` decides per region (:mod:`onnx_lower.regions`), in graph order: the mlp form
when the region is tractable and its emitted weights fit the budget the earlier regions left,
else im2col (also when mlp meets an op it cannot keep). Regions lowered apart are stitched back
by name; when all of them need im2col the graph is lowered at once. The report's ``regions``
and ``form_reason`` say which form each region got and why; ``form_used`` is ``mixed`` when
they differ.
"""

from __future__ import annotations

import dataclasses
import gc
import time
from collections.abc import Callable, Sequence

import onnx

from . import cost
from . import graph as g
from .errors import BudgetExceededError, LoweringError, UnsupportedOpError
from .model_io import ModelSource, load_model, skeleton, to_sparse_storage
from .pass_manager import LoweringModel, Options, PassRecord
from .pipelines import CANONICALIZE, FORMS, build_pipeline
from .plan import Plan, make_plan
from .regions import Region, extract_region, find_regions, stitch
from .report import ModelStats, RegionReport, Report

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
    source = _Source(model)
    before = model_stats(source.proto())  # also feeds the auto plan its MAC count
    loaded = time.perf_counter()
    options = Options(
        form=form,
        max_weight_bytes=int(max_weight_mb * MB),
        sparse_storage=sparse_storage,
        verify_each=verify_each,
        dump_dir=dump_dir,
        progress=progress,
    )
    regions: list[RegionReport] = []
    if passes:
        used, reason = "custom", "passes given with --passes"
        lowered, records, notes = _run(source, options, passes=list(passes))
    elif form == "auto":
        used, reason, lowered, records, notes, regions = _lower_auto(source, options, before)
    else:
        used = form
        reason = "requested"
        lowered, records, notes = _run(source, options, form=form)
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
        regions=regions,
    )
    return lowered, report


def _lower_auto(
    source: _Source, options: Options, before: ModelStats
) -> tuple[str, str, onnx.ModelProto, list[PassRecord], dict, list[RegionReport]]:
    """``form="auto"``: mlp where it fits, im2col elsewhere, decided per region."""
    pieces = find_regions(source.proto())
    if len(pieces) > 1:  # regions are cut on the canonical graph, whose tensors are all typed
        canonical, canon_records, _ = _run(source, options, passes=list(CANONICALIZE))
        pieces = find_regions(canonical)
        if len(pieces) > 1:
            return _lower_regions(canonical, pieces, options, canon_records)
    first = make_plan(source.proto(), options.max_weight_bytes, exact=False, macs=before.macs)
    used, reason = first.form, first.reason
    if used == "mlp":
        try:
            lowered, records, notes = _run(source, options, form="mlp")
            reason = (
                f"the mlp weights ({notes.get('emitted_weight_bytes', 0) / MB:,.1f} MB) fit "
                f"the budget of {options.max_weight_bytes / MB:,.0f} MB"
            )
        except (BudgetExceededError, UnsupportedOpError) as exc:
            used, reason = "im2col", f"mlp not possible: {exc}"
    if used == "im2col":
        lowered, records, notes = _run(source, options, form="im2col")
    whole = pieces[0] if pieces else None
    region = RegionReport(
        name=whole.name if whole else "main",
        form=used,
        reason=reason,
        nodes=before.nodes,
        inputs=list(whole.inputs) if whole else [],
        outputs=list(whole.outputs) if whole else [],
        macs=before.macs,
        weight_bytes=cost.weight_bytes(lowered),
    )
    return used, reason, lowered, records, notes, [region]


def _lower_regions(
    canonical: onnx.ModelProto,
    pieces: list[Region],
    options: Options,
    canon_records: list[PassRecord],
) -> tuple[str, str, onnx.ModelProto, list[PassRecord], dict, list[RegionReport]]:
    """Plan each region in graph order against the budget left; lower; stitch if forms differ.

    Each region's plan is exact (its mlp pipeline up to folding, nothing densified). When every
    region gets the same form the graph is lowered at once in that form: cutting would add a
    Reshape and Flatten (mlp) or two Transposes (im2col) around every kept op for nothing, and
    the mlp form of a verifier-bound model should apply its kept ops to flat vectors.
    """
    remaining = options.max_weight_bytes
    decided: list[tuple[Region, onnx.ModelProto, str, str, int]] = []
    for piece in pieces:
        sub = extract_region(canonical, piece)
        part = make_plan(sub, remaining, exact=True)
        reason = part.reason
        if part.form == "mlp":
            reason = (
                f"its mlp weights ({(part.mlp_bytes or 0) / MB:,.1f} MB) fit the budget left "
                f"({remaining / MB:,.1f} of {options.max_weight_bytes / MB:,.0f} MB)"
            )
            remaining -= part.mlp_bytes or 0
        elif not reason.startswith("mlp not possible"):
            reason = f"mlp not possible: {reason}"
        decided.append((piece, sub, part.form, reason, part.macs))
    forms = {form for _, _, form, _, _ in decided}
    results: list[tuple | None] = [None] * len(decided)
    lowered, prefix = None, ""
    if len(forms) == 1:
        used = forms.pop()
        reason = f"all {len(pieces)} regions take the {used} form; lowered as one graph"
        try:
            lowered, records, notes = _run(canonical, options, form=used)
        except (BudgetExceededError, UnsupportedOpError) as exc:
            if used != "mlp":
                raise
            # lower region by region instead, each with its own fallback to im2col
            prefix = f"the graph failed in mlp as a whole ({exc}); "
    if lowered is None:
        for i, (piece, sub, form, _, macs) in enumerate(decided):
            if form == "mlp":
                try:
                    results[i] = _run(sub, options, form="mlp")
                    continue
                except (BudgetExceededError, UnsupportedOpError) as exc:
                    decided[i] = (piece, sub, "im2col", f"mlp not possible: {exc}", macs)
            results[i] = _run(sub, options, form="im2col")
        lowered = stitch(canonical, pieces, [r[0] for r in results])
        records = list(canon_records)
        notes = {}
        for (piece, *_), (_, recs, sub_notes) in zip(decided, results, strict=True):
            records.extend(dataclasses.replace(r, name=f"{piece.name}/{r.name}") for r in recs)
            _merge_notes(notes, sub_notes)
        got = [form for _, _, form, _, _ in decided]
        used = got[0] if len(set(got)) == 1 else "mixed"
        counts = ", ".join(f"{got.count(form)} {form}" for form in ("mlp", "im2col"))
        reason = f"{prefix}{len(pieces)} regions, each in its own form ({counts})"
    regions = [
        RegionReport(
            name=piece.name,
            form=form,
            reason=why,
            nodes=len(piece.nodes),
            inputs=list(piece.inputs),
            outputs=list(piece.outputs),
            macs=macs,
            weight_bytes=cost.weight_bytes(result[0]) if result is not None else None,
        )
        for (piece, _, form, why, macs), result in zip(decided, results, strict=True)
    ]
    return used, reason, lowered, records, notes, regions


def _merge_notes(into: dict, notes: dict) -> None:
    """Lists are concatenated, counts and fold summaries added, anything else kept first."""
    for key, value in notes.items():
        if key not in into:
            into[key] = dict(value) if isinstance(value, dict) else value
        elif isinstance(value, list):
            into[key] = list(into[key]) + value
        elif isinstance(value, int | float):
            into[key] += value
        elif key == "fold_summary":
            into[key] = {k: into[key][k] + value[k] for k in value}


def plan(model: ModelSource, *, max_weight_mb: float = 1024, per_region: bool = True) -> Plan:
    """What ``form="auto"`` would do, with the exact mlp bytes per layer; writes nothing.

    With ``per_region`` a graph of several regions gets one plan per region (``Plan.regions``),
    as ``form="auto"`` lowers it; without, one plan of the whole graph (``form="mlp"``).
    """
    budget = int(max_weight_mb * MB)
    original = load_model(model)
    pieces = find_regions(original) if per_region else []
    if len(pieces) > 1:
        canonical, _, _ = _run(original, Options(form="auto"), passes=list(CANONICALIZE))
        pieces = find_regions(canonical)
    if len(pieces) <= 1:
        return make_plan(original, budget, exact=True)
    remaining, plans = budget, []
    for piece in pieces:
        part = make_plan(extract_region(canonical, piece), remaining, exact=True)
        part.region = piece.name
        if part.form == "mlp":
            remaining -= part.mlp_bytes or 0
        plans.append(part)
    forms = {p.form for p in plans}
    form = forms.pop() if len(forms) == 1 else "mixed"
    spent = [p.mlp_bytes or 0 for p in plans if p.form == "mlp"]
    return Plan(
        form,
        f"{len(plans)} regions, each planned against the budget the ones before it left",
        original.graph.name or "main",
        sum(p.macs for p in plans),
        sum(spent) if spent else None,
        budget,
        [],
        plans,
    )


class _Source:
    """The input model of one ``lower()`` call.

    Loaded from a path, the proto is ``lower()``'s own: a pipeline run takes it, moves the
    weights into arrays of the pass graph and drops it, so the input's bytes are not resident
    beside the lowered weights (VGG-11: 507 MB). A later step that needs it again (auto falling
    back from mlp to im2col) loads it again. A ModelProto given by the caller is only read.
    """

    def __init__(self, model: ModelSource):
        self.path = None if isinstance(model, onnx.ModelProto) else model
        self._proto: onnx.ModelProto | None = load_model(model)

    def proto(self) -> onnx.ModelProto:
        if self._proto is None:
            self._proto = load_model(self.path)
        return self._proto

    def take(self) -> tuple[onnx.ModelProto, bool]:
        """The proto, and whether the caller may free it (this source forgets it)."""
        proto = self.proto()
        if self.path is None:
            return proto, False
        self._proto = None
        return proto, True


def _run(
    original: onnx.ModelProto | _Source,
    options: Options,
    *,
    form: str | None = None,
    passes: list[str] | None = None,
) -> tuple[onnx.ModelProto, list[PassRecord], dict]:
    options.form = form or options.form
    manager = build_pipeline(form, passes)
    if isinstance(original, _Source):
        original, owned = original.take()
    else:
        owned = False
    work = LoweringModel.from_proto(original, options)
    if owned:
        work.own_weights()
        del original  # with the graph's weights in arrays, nothing refers to the proto now
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
