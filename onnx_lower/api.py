"""The library entry point: ``lower(model, form=...) -> (ModelProto, Report)``.

``lower`` loads and checks the model, runs the pipeline of the requested form (see
:mod:`onnx_lower.pipelines`), checks that no internal node is left and that the result passes the
ONNX checker, and returns the lowered model with a :class:`~onnx_lower.report.Report`.

``form="auto"`` decides per region (:mod:`onnx_lower.regions`), in graph order: the mlp form
when the region is tractable and its emitted weights fit the budget the earlier regions left,
else im2col (also when mlp meets an op it cannot keep). When all regions take one form the
graph is lowered at once; otherwise the regions of each form are lowered together with the
kept ops between them and the parts are stitched back by name. The report's ``regions`` and
``form_reason`` say which form each region got and why; ``form_used`` is ``mixed`` when they
differ.
"""

from __future__ import annotations

import dataclasses
import gc
import time
from collections.abc import Callable, Sequence

import numpy as np
import onnx

from . import cost, gates
from . import graph as g
from .errors import BudgetExceededError, LoweringError, TargetUnsupportedError, UnsupportedOpError
from .model_io import ModelSource, load_model, skeleton, to_sparse_storage
from .pass_manager import CONV_ALGOS, LoweringModel, Options, PassRecord
from .pipelines import CANONICALIZE, FORMS, build_pipeline, target_pipeline
from .plan import Plan, make_plan, plan_regions
from .regions import Region, extract_region, find_regions, merge_same_form, stitch
from .report import ModelStats, RegionReport, Report

__all__ = ["lower", "plan", "model_stats"]

MB = 1024 * 1024


def lower(
    model: ModelSource,
    form: str = "auto",
    *,
    target: str | None = None,
    passes: Sequence[str] | None = None,
    max_weight_mb: float = 1024,
    sparse_storage: bool = False,
    conv_algo: str = "auto",
    verify_each: bool = False,
    dump_dir: str | None = None,
    progress: Callable[[str], None] | None = None,
    ort_check: bool = True,
    input_box: tuple[np.ndarray, np.ndarray] | None = None,
    drop_final_softmax: bool = False,
) -> tuple[onnx.ModelProto, Report]:
    """Lower ``model`` (a path or ModelProto) and return ``(lowered, report)``.

    ``conv_algo`` (im2col form): ``auto`` picks im2col, F(2,3) or F(4,3) Winograd per conv by
    a cost model, ``im2col`` never uses Winograd, ``winograd`` uses it wherever it applies
    (see :mod:`onnx_lower.passes.im2col.winograd`).

    The input gate (:mod:`onnx_lower.gates`) runs first: the full ONNX checker and, unless
    ``ort_check`` is False, an onnxruntime load.

    ``input_box`` (``(lo, hi)`` per input element, C order, one sample; or scalars) lets the
    layered form carry signed values in one neuron; its output is then exact inside the box.
    ``drop_final_softmax`` lets the layered form drop a Softmax computing the output.

    ``target`` (a profile of :mod:`onnx_lower.targets`) replaces ``form``: only the nodes that
    verifier cannot read are rewritten.

    Raises a :class:`~onnx_lower.errors.LoweringError` subclass for anything a user can cause.
    """
    if target is not None:
        if passes:
            raise LoweringError("give either a target or passes, not both")
        target_form, passes = target_pipeline(target)
        form = target_form or form
    if form not in FORMS:
        raise LoweringError(f"unknown form '{form}'; choose one of {', '.join(FORMS)}")
    if drop_final_softmax and (form != "layered" or passes):
        raise LoweringError(
            "--drop-final-softmax applies to --form layered only (the other forms keep a Softmax)"
        )
    if conv_algo not in CONV_ALGOS:
        raise LoweringError(f"unknown conv algorithm '{conv_algo}'; choose one of "
                            f"{', '.join(CONV_ALGOS)}")
    start = time.perf_counter()
    source = _Source(model)
    gate_s = _input_gate(source, ort_check)
    before = model_stats(source.proto())  # also feeds the auto plan its MAC count
    loaded = time.perf_counter()
    options = Options(
        form=form,
        max_weight_bytes=int(max_weight_mb * MB),
        sparse_storage=sparse_storage,
        conv_algo=conv_algo,
        verify_each=verify_each,
        dump_dir=dump_dir,
        progress=progress,
        input_box=input_box,
        drop_final_softmax=drop_final_softmax,
    )
    regions: list[RegionReport] = []
    if target is not None and passes:
        used, reason = f"target:{target}", f"only what the {target} profile does not read rewritten"
        try:
            lowered, records, notes = _run(source, options, passes=list(passes))
        except TargetUnsupportedError as exc:
            lowered, records, notes = _target_fallback(exc, options, list(passes))
    elif passes:
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
            "conv_algo": conv_algo,
            "passes": list(passes) if passes and target is None else None,
            "ort_check": ort_check,
        },
        notes=notes,
        timings={"load_s": loaded - start - gate_s, "input_gate_s": gate_s,
                 "lower_s": done - loaded},
        input=str(model) if not isinstance(model, onnx.ModelProto) else None,
        regions=regions,
        target=_target_section(target, notes),
    )
    return lowered, report


def _input_gate(source: _Source, ort_check: bool) -> float:
    """Run the input gate on ``source``; return its seconds.

    From a path, the proto is dropped while onnxruntime loads the file and read again after,
    so the two copies of the weights are never resident together.
    """
    start = time.perf_counter()
    where = f"'{source.path}'" if source.path is not None else "the model"
    gates.check_input(source.proto(), where=where)
    if ort_check:
        if source.path is not None:
            source.forget()
            gates.check_input_loads(source.path, where=where)
        else:
            gates.check_input_loads(source.proto(), where=where)
    return time.perf_counter() - start


def _target_fallback(
    exc: TargetUnsupportedError, options: Options, passes: list[str]
) -> tuple[onnx.ModelProto, list[PassRecord], dict]:
    """The nodes no target rewrite reaches, each lowered alone to the mlp form, stitched back.

    ``exc.partial`` is the model after the target rewrites. Each refused node becomes a region
    of its own (its non-constant inputs in, its outputs out; an average pool with the
    Flatten/Reshape → Gemm/MatMul after it, which the mlp form folds it into), is lowered with the
    mlp pipeline
    and stitched back by name; then the target pipeline runs again on the result, so what the
    mlp form emitted (Flatten/MatMul/Add/Relu/Reshape) is checked against the profile too. A
    node the mlp form cannot express is refused with the profile rule it breaks.
    """
    model = exc.partial
    by_name = {n.name: i for i, n in enumerate(model.graph.node)}
    constants = {t.name for t in model.graph.initializer}
    regions, lowered, reasons = [], [], {}
    batch = [(n, op, why) for n, op, why in exc.nodes if "fails: batch 1" in why]
    if batch:  # the dense mlp form would read a batch > 1, at many times the cost: refuse
        raise TargetUnsupportedError(exc.target, [
            (n, op, f"{why}; fix the batch to 1 (python -m onnxruntime.tools."
                    f"make_dynamic_shape_fixed) and lower again") for n, op, why in batch])
    taken: set[int] = set()
    for name, op, reason in exc.nodes:
        i = by_name[name]
        if i in taken:
            continue
        nodes = [i, *_linear_tail(model, i)]
        taken.update(nodes)
        made = {t for k in nodes for t in model.graph.node[k].output}
        region = Region(
            f"target_mlp_{len(regions)}", nodes,
            [t for k in nodes for t in model.graph.node[k].input
             if t and t not in constants and t not in made],
            [t for t in model.graph.node[nodes[-1]].output if t],
        )
        try:
            low, _, _ = _run(extract_region(model, region), options, form="mlp")
            kept = _outside(low, exc.target)
            if kept:
                raise LoweringError(f"the mlp form keeps {', '.join(sorted(set(kept)))}")
        except LoweringError as err:
            raise TargetUnsupportedError(
                exc.target, [(name, op, f"{reason}; the mlp form cannot express it either: "
                                        f"{err.fact}")]
            ) from None
        regions.append(region)
        lowered.append(low)
        folded = [model.graph.node[k] for k in nodes[1:]]
        with_ = f" folded with {', '.join(f'{n.op_type} {n.name!r}' for n in folded)}" \
            if folded else " alone"
        reasons[name] = (op, reason, with_)
    stitched = stitch(model, regions, lowered)
    low, records, notes = _run(stitched, options, passes=passes)
    done = list(exc.notes) + list(notes.get("target", []))
    done += [{"node": n, "op": op, "rule": why, "became": f"mlp form of the node{with_} "
              "(Flatten/MatMul/Add/Relu/Reshape)"} for n, (op, why, with_) in reasons.items()]
    notes["target"] = done
    return low, records, notes


def _linear_tail(model: onnx.ModelProto, i: int) -> list[int]:
    """Indices of the Flatten/Reshape… → Gemm/MatMul chain after node ``i`` that the mlp form
    folds node ``i`` into (each the only reader of the one before); empty if there is none."""
    from onnx_lower.passes.targets.pools import linear_tail

    graph = g.import_graph(model)
    node = graph.nodes[i]
    tail = linear_tail(node, graph) if node.op in ("AveragePool", "GlobalAveragePool") else []
    names = {n.name: k for k, n in enumerate(model.graph.node)}
    return [names[n.name] for n in tail]


def _outside(model: onnx.ModelProto, target: str) -> list[str]:
    """The ops of ``model`` outside the ``target`` profile."""
    from .targets import get_profile, violations

    return [v.op for v in violations(g.import_graph(model), get_profile(target))]


def _target_section(target: str | None, notes: dict) -> dict | None:
    """The report's ``target`` key: the profile and each rewritten node (rule, what it became)."""
    if target is None:
        return None
    return {"name": target, "rewritten": list(notes.pop("target", []))}


def _lower_auto(
    source: _Source, options: Options, before: ModelStats
) -> tuple[str, str, onnx.ModelProto, list[PassRecord], dict, list[RegionReport]]:
    """``form="auto"``: mlp where it fits, im2col elsewhere, decided per region."""
    canonical, pieces, canon_records = _cut_regions(source, options)
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
            used, reason = "im2col", f"mlp not possible: {exc.fact}"
    if used == "im2col":
        lowered, records, notes = _run(source, options, form="im2col")
    whole = pieces[0]
    region = RegionReport(
        name=whole.name,
        form=used,
        reason=reason,
        nodes=before.nodes,
        inputs=list(whole.inputs),
        outputs=list(whole.outputs),
        macs=before.macs,
        weight_bytes=cost.weight_bytes(lowered),
    )
    return used, reason, lowered, records, notes, [region]


def _cut_regions(
    source: _Source | onnx.ModelProto, options: Options
) -> tuple[onnx.ModelProto | None, list[Region], list[PassRecord]]:
    """``(canonical, regions, its pass records)``; the graph is canonicalised only to be cut.

    Regions are cut on the canonical graph, whose tensors are all typed. A model with one
    region before canonicalisation gets ``(None, [region], [])``: it is lowered whole anyway.
    """
    proto = source.proto() if isinstance(source, _Source) else source
    pieces = find_regions(proto)
    if len(pieces) == 1:
        return None, pieces, []
    canonical, records, _ = _run(source, options, passes=list(CANONICALIZE))
    return canonical, find_regions(canonical), records


def _lower_regions(
    canonical: onnx.ModelProto,
    pieces: list[Region],
    options: Options,
    canon_records: list[PassRecord],
) -> tuple[str, str, onnx.ModelProto, list[PassRecord], dict, list[RegionReport]]:
    """Plan each region in graph order against the budget left, lower, stitch where forms differ.

    Each region's plan is exact (its mlp pipeline up to folding, nothing densified). Regions of
    one form are lowered together with the kept ops between them
    (:func:`~onnx_lower.regions.merge_same_form`): cutting there would add a Reshape and Flatten
    (mlp) or two Transposes (im2col) around the kept op for nothing, and the mlp form of a
    verifier-bound model should apply its kept ops to flat vectors. When every region takes one
    form, the graph is lowered at once. A part that fails in mlp after all falls back to im2col.
    """
    plans = plan_regions(canonical, pieces, options.max_weight_bytes)
    forms = [p.form for p in plans]
    reasons = [p.reason for p in plans]
    while True:
        parts = merge_same_form(canonical, pieces, forms)
        results = []
        for part, held in parts:
            form = forms[held[0]]
            model = canonical if len(parts) == 1 else extract_region(canonical, part)
            try:
                results.append(_run(model, options, form=form))
            except (BudgetExceededError, UnsupportedOpError) as exc:
                if form != "mlp":
                    raise
                for k in held:
                    forms[k], reasons[k] = "im2col", f"mlp not possible: {exc.fact}"
                break
        if len(results) == len(parts):
            break
    if len(parts) == 1:
        lowered, records, notes = results[0]
        used = forms[0]
        reason = f"all {len(pieces)} regions take the {used} form; lowered as one graph"
    else:
        lowered = stitch(canonical, [part for part, _ in parts], [r[0] for r in results])
        records, notes = list(canon_records), {}
        for (part, _), (_, recs, sub_notes) in zip(parts, results, strict=True):
            records.extend(dataclasses.replace(r, name=f"{part.name}/{r.name}") for r in recs)
            _merge_notes(notes, sub_notes)
        used = "mixed" if len(set(forms)) > 1 else forms[0]
        listed = ", ".join(f"{part.name} {forms[held[0]]}" for part, held in parts)
        reason = f"{len(pieces)} regions lowered in {len(parts)} parts: {listed}"
    sizes = {}  # a region lowered on its own has weights of its own
    for (_, held), result in zip(parts, results, strict=True):
        if len(parts) > 1 and len(held) == 1:
            sizes[held[0]] = cost.weight_bytes(result[0])
    regions = [
        RegionReport(
            name=piece.name,
            form=forms[k],
            reason=reasons[k],
            nodes=len(piece.nodes),
            inputs=list(piece.inputs),
            outputs=list(piece.outputs),
            macs=plans[k].macs,
            weight_bytes=sizes.get(k),
        )
        for k, piece in enumerate(pieces)
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
    canonical, pieces = None, []
    if per_region:
        canonical, pieces, _ = _cut_regions(original, Options(form="auto"))
    if len(pieces) <= 1:
        return make_plan(original, budget, exact=True, im2col_cost=True)
    plans = plan_regions(canonical, pieces, budget, im2col_cost=True)
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
        # the input gate runs the full checker
        self._proto: onnx.ModelProto | None = load_model(model, check=False)

    def proto(self) -> onnx.ModelProto:
        if self._proto is None:
            self._proto = load_model(self.path, check=False)
        return self._proto

    def forget(self) -> None:
        """Drop a proto loaded from a path (:meth:`proto` loads it again)."""
        if self.path is not None:
            self._proto = None
            gc.collect()

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
    neurons = cost.count_neurons(model)
    return ModelStats(
        ops=dict(sorted(counts.items())),
        nodes=len(model.graph.node),
        weight_bytes=cost.weight_bytes(model),
        macs=cost.count_macs(model),
        relu_neurons=neurons["relu"],
        max_neurons=neurons["max"],
        piecewise_neurons=neurons["piecewise"],
    )
