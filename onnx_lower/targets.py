"""Target profiles: what each verifier's ONNX reader handles correctly, as one table per tool.

A :class:`Profile` is a table of :class:`Rule` lines. A rule names one op, the attribute
constraints under which the tool reads that op *correctly* (a small predicate vocabulary,
:data:`PREDICATES`), and the source the rule was read from (repository path and function). An
op without a rule is not read at all. A node *violates* the profile when its op has no rule or
one of its rule's predicates fails on it (:func:`violations`); the reason names the rule.

The ``--target NAME`` pipeline (:mod:`onnx_lower.passes.targets`) keeps every node the profile
accepts and rewrites the others; the same tables drive the checker the tests use on its output.

Predicates read a node of the gs graph (shapes resolved by canonicalisation):

==========================  ===================================================================
``2-D only``                the data input has rank 4 (N, C, H, W)
``group == 1``              Conv ``group`` attribute is 1
``dilations all 1``         no dilation (or the attribute is absent)
``pads all zero``           ``pads`` absent or all 0
``pads symmetric``          ``pads`` begin == end on every axis
``stride == kernel``        ``strides`` equal ``kernel_shape``
``no ceil_mode``            ``ceil_mode`` is 0
``explicit pads``           ``auto_pad`` is NOTSET (the reader ignores auto_pad)
``weights constant``        input 1 (and 2 if present) are constants
``second input constant``   input 1 is a constant and input 0 is not
``second input scalar``     input 1 is a constant with one element, input 0 is not
``same input shapes``       both inputs have the same static shape
``axes as input``           Squeeze/Unsqueeze carry ``axes`` as input 1 (opset >= 13)
``shape without 0``         Reshape's constant target has no 0 ("copy") entry
``batch 1``                 the data input's dim 0 is 1 or symbolic (read as 1)
``epsilon explicit``        the ``epsilon`` attribute is present (the reader has no default)
``pads counted``            ``pads`` all 0 or ``count_include_pad`` = 1 (a reader that always
                            divides by the whole kernel)
``split per sample``        Split along axis 0 with the ``split`` attribute (opset < 13), or into
                            one sample per output, each read only by a Reshape (the reader
                            passes ``split=None`` and takes output ``n`` as ``x[n]``)
``one Relu stage``          every non-constant input was made after the same number of Relus
                            (a skip connection over a Relu cannot be cut into one chain)
==========================  ===================================================================
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import numpy as np
import onnx_graphsurgeon as gs

from . import graph as g

__all__ = [
    "Rule",
    "Profile",
    "Violation",
    "PREDICATES",
    "PROFILES",
    "get_profile",
    "violations",
    "format_targets",
]


def _ints(node: gs.Node, name: str) -> list[int]:
    value = node.attrs.get(name)
    return [int(v) for v in value] if value is not None else []


def _rank4(node: gs.Node) -> bool:
    shape = node.inputs[0].shape
    return shape is not None and len(shape) == 4


def _pads_zero(node: gs.Node) -> bool:
    return not any(_ints(node, "pads"))


def _pads_symmetric(node: gs.Node) -> bool:
    pads = _ints(node, "pads")
    half = len(pads) // 2
    return pads[:half] == pads[half:]


def _stride_is_kernel(node: gs.Node) -> bool:
    kernel = _ints(node, "kernel_shape")
    return (_ints(node, "strides") or [1] * len(kernel)) == kernel


def _is_const(t: gs.Tensor) -> bool:
    return g.const_value(t) is not None


def _second_constant(node: gs.Node) -> bool:
    return len(node.inputs) >= 2 and not _is_const(node.inputs[0]) and _is_const(node.inputs[1])


def _second_scalar(node: gs.Node) -> bool:
    if not _second_constant(node):
        return False
    return g.const_value(node.inputs[1]).size == 1


def _same_shapes(node: gs.Node) -> bool:
    a, b = (t.shape for t in node.inputs[:2])
    return a is not None and b is not None and list(a) == list(b)


def _weights_constant(node: gs.Node) -> bool:
    return all(_is_const(t) for t in node.inputs[1:] if t.name)


def _axes_input(node: gs.Node) -> bool:
    return len(node.inputs) >= 2 and _is_const(node.inputs[1])


def _shape_without_zero(node: gs.Node) -> bool:
    shape = g.const_value(node.inputs[1]) if len(node.inputs) > 1 else None
    return shape is not None and not np.any(shape == 0)


def _relu_stage(t: gs.Tensor, memo: dict[str, int]) -> int:
    """The largest number of Relus on a path from a graph input to ``t``."""
    if t.name in memo:
        return memo[t.name]
    node = g.producer(t)
    stage = 0
    if node is not None:
        ins = [x for x in node.inputs if not _is_const(x)]
        stage = max((_relu_stage(x, memo) for x in ins), default=0)
        stage += int(g.is_op(node, "Relu"))
    memo[t.name] = stage
    return stage


def _one_relu_stage(node: gs.Node) -> bool:
    memo: dict[str, int] = {}
    stages = {_relu_stage(t, memo) for t in node.inputs if not _is_const(t)}
    return len(stages) <= 1


def _batch_one(node: gs.Node) -> bool:
    shape = node.inputs[0].shape
    return shape is None or not shape or not isinstance(shape[0], int) or shape[0] in (1, -1)


def _split_per_sample(node: gs.Node) -> bool:
    if int(node.attrs.get("axis", 0)) != 0:
        return False
    if "split" in node.attrs:
        return True
    shape = node.inputs[0].shape
    return (shape is not None and len(shape) > 0 and shape[0] == len(node.outputs)
            and all(t.outputs and all(c.op == "Reshape" for c in t.outputs)
                    for t in node.outputs))


PREDICATES: dict[str, Callable[[gs.Node], bool]] = {
    "batch 1": _batch_one,
    "2-D only": _rank4,
    "group == 1": lambda n: int(n.attrs.get("group", 1)) == 1,
    "dilations all 1": lambda n: all(d == 1 for d in _ints(n, "dilations")),
    "pads all zero": _pads_zero,
    "pads symmetric": _pads_symmetric,
    "stride == kernel": _stride_is_kernel,
    "no ceil_mode": lambda n: int(n.attrs.get("ceil_mode", 0)) == 0,
    "explicit pads": lambda n: g.attr(n, "auto_pad", "NOTSET") == "NOTSET",
    "weights constant": _weights_constant,
    "second input constant": _second_constant,
    "second input scalar": _second_scalar,
    "same input shapes": _same_shapes,
    "axes as input": _axes_input,
    "shape without 0": _shape_without_zero,
    "one Relu stage": _one_relu_stage,
    "split per sample": _split_per_sample,
    "epsilon explicit": lambda n: "epsilon" in n.attrs,
    "pads counted": lambda n: _pads_zero(n) or int(n.attrs.get("count_include_pad", 0)) == 1,
}


@dataclasses.dataclass(frozen=True)
class Rule:
    """``op`` is read correctly when every predicate in ``requires`` holds."""

    op: str
    requires: tuple[str, ...]
    source: str

    def __post_init__(self) -> None:
        unknown = [p for p in self.requires if p not in PREDICATES]
        if unknown:
            raise ValueError(f"rule for {self.op}: unknown predicates {unknown}")

    def text(self) -> str:
        return f"{self.op}: {', '.join(self.requires) or 'any attributes'}"


@dataclasses.dataclass(frozen=True)
class Profile:
    """One verifier's reader. ``form`` set: the profile *is* that lowering form (no table)."""

    name: str
    reader: str
    rules: tuple[Rule, ...] = ()
    form: str | None = None
    has_groups: bool = False

    def rule(self, op: str) -> Rule | None:
        return next((r for r in self.rules if r.op == op), None)

    def accepts(self, node: gs.Node) -> bool:
        return self.check(node) is None

    def check(self, node: gs.Node) -> str | None:
        """Why ``node`` is outside the profile (the rule it breaks), or None."""
        rule = self.rule(node.op)
        if rule is None:
            return f"{node.op} is not read (no {node.op} rule in the {self.name} profile)"
        failed = [p for p in rule.requires if not PREDICATES[p](node)]
        if failed:
            return f"{rule.text()} [{rule.source}]; fails: {', '.join(failed)}"
        return None

    def ops(self) -> list[str]:
        return [r.op for r in self.rules]


@dataclasses.dataclass(frozen=True)
class Violation:
    node: str
    op: str
    reason: str


_MARABOU = "maraboupy 2.0.0 maraboupy/parsers/ONNXParser.py"
_NNENUM = (
    "stanleybak/nnenum src/nnenum/settings.py ONNX_WHITELIST, onnx_network.py load_onnx_network"
)
_ERAN = "eth-sri/eran tf_verify/onnx_translator.py"
_CROWN = "Verified-Intelligence/auto_LiRPA auto_LiRPA/operators"


def _rules(source: str, table: Iterable[tuple[str, str]]) -> tuple[Rule, ...]:
    """Rules from ``(op, "pred; pred @ where")`` lines; ``where`` is appended to ``source``."""
    out = []
    for op, spec in table:
        preds, _, where = spec.partition("@")
        names = tuple(p.strip() for p in preds.split(";") if p.strip())
        out.append(Rule(op, names, f"{source} {where.strip()}".strip()))
    return tuple(out)


MARABOU = Profile(
    "marabou",
    "maraboupy's Python ONNX reader (Marabou.read_onnx)",
    _rules(_MARABOU, [
        ("Constant", "@ constant"),
        ("Identity", "@ identity"),
        ("Dropout", "@ dropout"),
        ("Reshape", "shape without 0 @ reshape (numpy reshape of the variable array)"),
        ("Flatten", "@ flatten"),
        ("Transpose", "@ transpose"),
        ("Unsqueeze", "axes as input @ unsqueeze (reads constantMap[node.input[1]])"),
        ("Squeeze", "axes as input @ squeeze (inputName, axisName = node.input)"),
        ("BatchNormalization", "batch 1; epsilon explicit @ batchNorm (reshape(numChannels, -1) "
                               "of the whole tensor: a batch > 1 mixes samples; epsilon = None "
                               "unless given)"),
        ("Concat", "@ concatEquations"),
        ("Split", "split per sample @ splitEquations (Split_18.eval(x, split=<attribute>, "
                  "axis): a split input or num_outputs is not read)"),
        ("MaxPool", "2-D only; batch 1; explicit pads; pads all zero; dilations all 1; "
                    "no ceil_mode "
                    "@ maxpoolEquations (reads kernel_shape/strides only: pads, dilations, "
                    "ceil_mode silently ignored)"),
        ("Conv", "2-D only; batch 1; explicit pads; group == 1; dilations all 1; "
                 "weights constant @ convEquations (asserts input_channels == filter_channels; "
                 "dilations ignored; unpacks 4-D shapes; equations for inVars[0], sample 0, only)"),
        ("Gemm", "second input constant @ gemmEquations"),
        ("MatMul", "@ matMulEquations"),
        ("Mul", "second input scalar @ mulEquations (addAddend(multiple, x) per element)"),
        ("Add", "@ addEquations"),
        ("Relu", "@ reluEquations"),
        ("Sigmoid", "@ sigmoidEquations"),
        ("Tanh", "@ tanhEquations"),
        ("LeakyRelu", "@ leakyReluEquations"),
        ("Softmax", "@ softmaxEquations"),
        ("Sub", "second input constant; same input shapes @ subEquations (asserts equal shapes)"),
    ]),
)  # fmt: skip

NNENUM = Profile(
    "nnenum",
    "nnenum's ONNX loader: linear parts run in onnxruntime, cut into a chain at each Relu",
    _rules(_NNENUM, [
        ("Add", "one Relu stage @ (a skip over a Relu cannot be one chain)"),
        ("AveragePool", "@"), ("Constant", "@"), ("Concat", "one Relu stage @"), ("Conv", "@"),
        ("Flatten", "@"), ("Gather", "@"), ("Gemm", "@"), ("MatMul", "@"), ("Mul", "@"),
        ("Reshape", "@"), ("Relu", "@"), ("Shape", "@"), ("Sub", "one Relu stage @"),
        ("Unsqueeze", "@"), ("Slice", "@"), ("Dropout", "@"),
    ]),
    has_groups=True,
)  # fmt: skip

ERAN = Profile(
    "eran",
    "ERAN's ONNX translator",
    _rules(_ERAN, [
        ("Conv", "2-D only; weights constant; explicit pads; group == 1; dilations all 1 "
                 "@ conv_resources (reads strides, pads, kernel_shape only)"),
        ("Gemm", "second input constant @ gemm_resources"), ("MatMul", "@ matmul_resources"),
        ("Add", "@ translate"), ("Sub", "@ sub_resources"), ("Mul", "@ add_resources"),
        ("Relu", "@ nonlinearity_resources"), ("Sigmoid", "@ nonlinearity_resources"),
        ("Tanh", "@ nonlinearity_resources"),
        ("MaxPool", "2-D only; explicit pads; pads symmetric; dilations all 1; no ceil_mode "
                    "@ pool_resources (asserts symmetric pads; dilations, auto_pad, ceil_mode "
                    "unused)"),
        ("AveragePool", "2-D only; explicit pads; pads all zero; dilations all 1; no ceil_mode "
                        "@ pool_resources (as MaxPool; count_include_pad not read)"),
        ("Flatten", "@ translate (ignored; reshape_adjust reorders the next Gemm/MatMul)"),
        ("Reshape", "@ translate"), ("Constant", "@ translate"),
    ]),  # BatchNormalization and Concat are in operations_to_be_ignored: dropped, not rules;
    # Transpose is not handled ("Operations of type Transpose are not yet supported")
)  # fmt: skip

CROWN = Profile(
    "crown",
    "auto_LiRPA / alpha-beta-CROWN (onnx2pytorch conversion)",
    _rules(_CROWN, [
        ("Conv", "weights constant @ BoundConv"), ("Gemm", "@ BoundLinear"),
        ("MatMul", "@ BoundMatMul"), ("Add", "@ BoundAdd"), ("Sub", "@ BoundSub"),
        ("Mul", "@ BoundMul"), ("Div", "second input constant @ BoundDiv"),
        ("Relu", "@ BoundRelu"), ("Sigmoid", "@ BoundSigmoid"), ("Tanh", "@ BoundTanh"),
        ("BatchNormalization", "@ BoundBatchNormalization"),
        ("MaxPool", "2-D only; pads symmetric; stride == kernel; no ceil_mode; dilations all 1 "
                    "@ pooling.py BoundMaxPool (asserts symmetric pads; ceil_mode set False; "
                    "dilations not read; bound_backward raises unless stride == kernel)"),
        ("AveragePool", "2-D only; pads symmetric; pads counted; no ceil_mode; dilations all 1 "
                        "@ pooling.py BoundAveragePool (asserts symmetric pads; ceil_mode "
                        "False and count_include_pad True are set, dilations not read)"),
        ("GlobalAveragePool", "@ BoundGlobalAveragePool"),
        ("Pad", "@ BoundPad"), ("Concat", "@ BoundConcat"), ("Flatten", "@ BoundFlatten"),
        ("Reshape", "@ BoundReshape"), ("Transpose", "@ BoundTranspose"),
        ("Constant", "@ BoundConstant"), ("Unsqueeze", "@ BoundUnsqueeze"),
        ("Squeeze", "@ BoundSqueeze"), ("Slice", "@ BoundSlice"),
    ]),
    has_groups=True,
)  # fmt: skip

NNET = Profile(
    "nnet",
    "the .nnet format and its readers (ReluVal, Neurify, Reluplex, Marabou's NNet reader): "
    "the layered form (sisl/NNet README.md)",
    form="layered",
)

PROFILES: dict[str, Profile] = {p.name: p for p in (MARABOU, NNENUM, ERAN, CROWN, NNET)}


def get_profile(name: str) -> Profile:
    from .errors import LoweringError

    try:
        return PROFILES[name]
    except KeyError:
        raise LoweringError(
            f"unknown target '{name}'; choose one of {', '.join(PROFILES)} (see --list-targets)"
        ) from None


def violations(graph: gs.Graph, profile: Profile) -> list[Violation]:
    """The nodes of ``graph`` that ``profile``'s reader does not read correctly."""
    found = []
    for node in graph.nodes:
        reason = profile.check(node)
        if reason is not None:
            found.append(Violation(node.name, node.op, reason))
    return found


def format_targets() -> str:
    """``--list-targets``: each profile, one line per rule with its source."""
    lines = []
    for p in PROFILES.values():
        lines.append(f"{p.name}: {p.reader}")
        if p.form:
            lines.append(f"  = the {p.form} form (--form {p.form})")
        for r in p.rules:
            lines.append(f"  {r.text():<70} {r.source}")
    return "\n".join(lines)
