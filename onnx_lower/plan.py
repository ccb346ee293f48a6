"""The plan of a lowering: which form each region gets, and what it will cost, before any work.

Two estimates, both from resolved shapes:

- **Tractability of the mlp form.** Building a layer's sparse matrix takes ~12 bytes per
  nonzero, and a conv's or Gemm's nonzeros are its MACs, so a network with more than
  :data:`MLP_MAX_MACS` MACs per sample (2·10⁸, ≈2.4 GB of sparse matrices) is not tried in the
  mlp form at all: its dense matrices would be orders of magnitude over any budget anyway.
- **Exact mlp bytes** (``--dry-run``): for tractable networks the mlp pipeline runs up to and
  including ``fold-linear``, and each remaining Affine node reports the dense bytes and MACs
  emission would give it. Nothing is densified.
- **Neurons** (plan schema 1.2): ``neurons`` holds the original's ``relu``/``max``/``piecewise``
  neuron counts per sample (:func:`onnx_lower.cost.count_neurons`); ``mlp_relu_neurons`` the
  ReLU neurons of the mlp form (the Relu elements of that same in-memory pipeline: the MaxPool
  plans, the rewritten activations and the original Relus), ``None`` when it was not planned.

``--form auto`` takes the mlp form when it is tractable and fits ``--max-weight-mb``, else im2col,
for each region of the graph (:mod:`onnx_lower.regions`) in graph order, against the budget the
regions before it left. A graph of one region has one plan; a graph of several has one plan per
region under a top plan whose form is ``mlp``, ``im2col`` or ``mixed``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import onnx

from . import cost
from .affine import layer_label
from .errors import BudgetExceededError, LoweringError

__all__ = ["Plan", "LayerPlan", "make_plan", "plan_regions", "MLP_MAX_MACS"]

#: Above this many MACs per sample (convs and matmuls), the mlp form is not attempted.
MLP_MAX_MACS = 200_000_000


@dataclasses.dataclass
class LayerPlan:
    name: str
    sources: list[str]
    inputs: int
    outputs: int
    bytes: int
    macs: int


@dataclasses.dataclass
class Plan:
    form: str
    reason: str
    region: str
    macs: int
    mlp_bytes: int | None
    budget_bytes: int
    layers: list[LayerPlan]
    regions: list[Plan] = dataclasses.field(default_factory=list)
    #: what the im2col form emits (weights + Gather tables), when the plan picked im2col
    im2col_bytes: int | None = None
    im2col_index_bytes: int | None = None
    #: the original's neurons per sample: {"relu", "max", "piecewise"} (cost.count_neurons)
    neurons: dict[str, int] | None = None
    #: ReLU neurons per sample of the mlp form, when its pipeline ran
    mlp_relu_neurons: int | None = None
    #: the im2col form's algorithm per conv (``{name, algo, reason, estimated_ms, probe_error}``,
    #: :mod:`onnx_lower.passes.im2col.winograd`), when the plan picked im2col
    conv_algos: list[dict[str, Any]] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def summary_lines(self) -> list[str]:
        mb = 1024 * 1024
        lines = [
            f"plan: region '{self.region}' -> {self.form} ({self.reason})",
            f"  MACs of the original: {self.macs:,} per sample",
        ]
        for region in self.regions:
            lines.extend("  " + line for line in region.summary_lines())
        if self.neurons is not None:
            n = self.neurons
            mlp = "" if self.mlp_relu_neurons is None else (
                f"; mlp form: {self.mlp_relu_neurons:,} ReLU"
            )
            lines.append(
                f"  neurons of the original: {n['relu']:,} ReLU, {n['max']:,} max, "
                f"{n['piecewise']:,} piecewise{mlp}"
            )
        if self.regions:
            return lines
        if self.im2col_bytes is not None:
            lines.append(
                f"  im2col form: {self.im2col_bytes / mb:,.1f} MB of constants, of which "
                f"{(self.im2col_index_bytes or 0) / mb:,.1f} MB are Gather tap tables"
            )
        for conv in self.conv_algos or []:
            lines.append(f"  conv {conv['name']}: {conv['algo']} ({conv['reason']})")
        if self.mlp_bytes is not None:
            lines.append(
                f"  mlp form: {len(self.layers)} MatMul layers, {self.mlp_bytes / mb:,.1f} MB of "
                f"dense weights (budget {self.budget_bytes / mb:,.0f} MB)"
            )
            width = max([len(layer.name) for layer in self.layers] + [5])
            lines.append(
                f"  {'layer':<{width}} {'in':>8} {'out':>8} {'MB':>10} {'MACs':>12}  from"
            )
            for layer in sorted(self.layers, key=lambda la: -la.bytes):
                lines.append(
                    f"  {layer.name:<{width}} {layer.inputs:>8} {layer.outputs:>8} "
                    f"{layer.bytes / mb:>10.2f} {layer.macs:>12,}  {' + '.join(layer.sources)}"
                )
        return lines


def make_plan(
    model: onnx.ModelProto,
    budget_bytes: int,
    *,
    exact: bool = True,
    macs: int | None = None,
    im2col_cost: bool = False,
) -> Plan:
    """Decide the form of ``model`` under ``budget_bytes`` (the ``auto`` rule).

    ``macs`` is the model's MAC count if the caller has it already. With ``im2col_cost`` a plan
    that picks im2col also runs that pipeline (nothing is written) to give its emitted bytes.
    """
    plan = _decide(model, budget_bytes, exact, cost.count_macs(model) if macs is None else macs)
    plan.neurons = cost.count_neurons(model)
    if im2col_cost and plan.form == "im2col":
        try:
            plan.im2col_bytes, plan.im2col_index_bytes, plan.conv_algos = _im2col_bytes(model)
        except LoweringError as exc:
            plan.reason += f"; the im2col form is not possible either: {exc.fact}"
    return plan


def plan_regions(
    model: onnx.ModelProto,
    regions: list,
    budget_bytes: int,
    *,
    im2col_cost: bool = False,
) -> list[Plan]:
    """One exact plan per region of ``model`` (canonical, typed), in graph order.

    Each region is planned against the budget the mlp regions before it left; a plan's
    ``region`` is the region's name.
    """
    from .regions import extract_region

    remaining, plans = budget_bytes, []
    for region in regions:
        part = make_plan(extract_region(model, region), remaining, exact=True,
                         im2col_cost=im2col_cost)
        part.region = region.name
        if part.form == "mlp":
            spent = part.mlp_bytes or 0
            part.reason = (
                f"its mlp weights ({spent / 2**20:,.1f} MB) fit the budget left "
                f"({remaining / 2**20:,.1f} of {budget_bytes / 2**20:,.0f} MB)"
            )
            remaining -= spent
        elif not part.reason.startswith("mlp not possible"):
            part.reason = f"mlp not possible: {part.reason}"
        plans.append(part)
    return plans


def _decide(model: onnx.ModelProto, budget_bytes: int, exact: bool, macs: int) -> Plan:
    region = model.graph.name or "main"
    if macs > MLP_MAX_MACS:
        return Plan(
            "im2col",
            f"{macs:,} MACs per sample: the mlp matrices would be far over any budget",
            region,
            macs,
            None,
            budget_bytes,
            [],
        )
    if not exact:
        return Plan("mlp", "small enough to try the mlp form", region, macs, None, budget_bytes, [])
    try:
        layers, relus = _folded_layers(model)
    except LoweringError as exc:
        return Plan("im2col", f"mlp not possible: {exc.fact}", region, macs, None, budget_bytes,
                    [])
    total = sum(layer.bytes for layer in layers)
    if total > budget_bytes:
        worst = max(layers, key=lambda la: la.bytes)
        label = layer_label(worst.name, worst.sources)
        reason = BudgetExceededError(label, worst.bytes, budget_bytes, total).fact
        return Plan("im2col", reason, region, macs, total, budget_bytes, layers,
                    mlp_relu_neurons=relus)
    reason = f"the mlp weights ({total / 2**20:,.1f} MB) fit the budget"
    return Plan("mlp", reason, region, macs, total, budget_bytes, layers, mlp_relu_neurons=relus)


def _in_memory(model: onnx.ModelProto, form: str, upto: str | None = None):
    """``model`` as a LoweringModel after ``form``'s pipeline (up to pass ``upto``); no export."""
    from .pass_manager import LoweringModel, Options
    from .pipelines import PIPELINES, build_pipeline

    names = list(PIPELINES[form])
    if upto is not None:
        names = names[: names.index(upto) + 1]
    work = LoweringModel.from_proto(model, Options(form=form))
    build_pipeline(passes=names)(work)
    return work


def _im2col_bytes(model: onnx.ModelProto) -> tuple[int, int, list[dict[str, Any]]]:
    """(constant bytes, Gather index bytes, conv algorithms) of ``model`` lowered to im2col, in
    memory only."""
    from . import graph as g

    work = _in_memory(model, "im2col")
    return (g.constant_bytes(work.graph), g.gather_index_bytes(work.graph),
            list(work.notes.get("conv_algos", [])))


def _folded_layers(model: onnx.ModelProto) -> tuple[list[LayerPlan], int]:
    """The mlp form's Affine layers after ``fold-linear`` and its ReLU neurons per sample."""
    import math

    from . import graph as g
    from .affine import affine_of, emitted_bytes

    work = _in_memory(model, "mlp", upto="fold-linear")
    layers, relus = [], 0
    for sub in g.all_graphs(work.graph):
        for node in sub.nodes:
            if g.is_op(node, "Relu"):
                relus += math.prod(g.sample_shape(node.outputs[0]))
            amap = affine_of(node)
            if amap is None:
                continue
            layers.append(
                LayerPlan(
                    node.name,
                    list(amap.sources),
                    sum(amap.in_sizes),
                    amap.out_size,
                    emitted_bytes(node),
                    amap.dense_elements,
                )
            )
    return layers, relus
