"""Canonicalisation: the passes every pipeline starts with (:data:`CANONICALIZE`).

They bring any exported CNN into one shape that the lowering passes can rely on:

``resolve-shapes``
    Symbolic shape inference (onnxruntime's ``SymbolicShapeInference``, which evaluates the
    ``Shape→Gather→Unsqueeze→Concat→Reshape`` chains PyTorch exports, even with a symbolic
    batch), falling back to ``onnx.shape_inference`` with data propagation. The graph inputs and
    outputs keep exactly the types and shapes the model declared: inference may rename symbolic
    dims (``unk__22``), never the model's interface.
``fold-constants``
    A node whose inputs are all constants is evaluated with ``onnx.reference`` and replaced by
    its value. Shapes count as constants where they are static::

        Shape(x)                       -> const   if every dim of x is static
        Gather(Shape(x), i)            -> const   if the dims x[i] are static
        Slice(Shape(x), b, e, a, s)    -> const   if the selected dims are static
        Size(x)                        -> const   if every dim of x is static
        Reshape(x, <computed shape>)   -> Reshape(x, const)  when the output shape is inferred:
                                          static dims as is, the one dynamic dim as -1 (or, with
                                          several, a dim equal to x's dim at the same axis as 0 =
                                          "copy", https://onnx.ai/onnx/operators/onnx__Reshape.html)

    Constant nodes become initializers. Outputs over 64 MB, random ops, nodes outside the
    default domain and nodes with subgraphs are left alone.
``remove-identity``
    ``y = Identity(x)``, ``y = Dropout(x)`` in inference mode and ``y = Cast(x, to=dtype(x))``
    are removed. Dropout is in inference mode when its ``training_mode`` input is absent or a
    constant false (opset 12+) and, before opset 7, when ``is_test=1``
    (https://onnx.ai/onnx/operators/onnx__Dropout.html). From opset 12 its ``mask`` output is then
    all true, so a used mask of static shape becomes a bool initializer of ones. (Before opset 12
    onnxruntime gives an all-false mask where ONNX's reference gives all true: such a Dropout
    stays, and the mlp form refuses it.) A training-mode Dropout stays (the mlp form refuses it).
    Removal follows onnx-ir's IdentityEliminationPass: uses of ``y`` read ``x``; if ``y`` is a
    graph output, ``x`` takes its name (so output names never change) unless ``x`` is a graph
    input, an initializer, another output or an outer-scope value, in which case the node stays.
``explicit-pads``
    Conv, MaxPool, AveragePool and LpPool get explicit ``pads`` for ``auto_pad`` SAME_UPPER /
    SAME_LOWER (``out = ceil(n / s)``, the odd pad at the end for SAME_UPPER, at the start for
    SAME_LOWER) and VALID (zeros), and explicit defaults: strides and dilations 1, pads 0
    (https://onnx.ai/onnx/operators/onnx__Conv.html#attributes,
    https://onnx.ai/onnx/operators/onnx__MaxPool.html#attributes). Left alone: ConvTranspose
    (its auto_pad derives pads from the output shape; the conv lowering resolves it), SAME
    without a static spatial shape, SAME with ``ceil_mode``, and SAME pools with dilations
    (onnxruntime pads them as if undilated, against the spec and ``onnx.reference``).
``dce``
    Dead-code elimination; graph inputs and outputs never change.
``toposort``
    Nodes in topological order.
``name-nodes``
    Deterministic names: a node without a name, or whose name an earlier node already has, gets
    ``{op}_{i}`` (``i`` counts that op in graph order, skipping names in use); unnamed tensors get
    ``{node}_out{k}``. The same input always gives the same bytes.

Every pass reports honestly whether it changed the model, so fixed-point groups terminate.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
from collections.abc import Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnx_lower import graph as g
from onnx_lower.pass_manager import GraphPass, LoweringModel, Pass, PassResult, register_pass
from onnx_lower.pipelines import CANONICALIZE  # the preset prefix of every pipeline
from onnx_lower.windows import resolve_pads, window_attributes

__all__ = [
    "CANONICALIZE",
    "ResolveShapes",
    "FoldConstants",
    "RemoveIdentity",
    "ExplicitPads",
    "WINDOW_OPS",
    "check_window_node",
    "DeadCodeElimination",
    "TopologicalSort",
    "NameNodes",
]


logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# resolve-shapes


def _shape_signature(graph: gs.Graph) -> list[tuple]:
    """Types and shapes of every variable, with symbolic dims renamed by first appearance.

    Two graphs with equal signatures carry the same shape facts; inference that only renames
    symbols (``unk__3`` → ``unk__7``) changes nothing.
    """
    symbols: dict[str, str] = {}
    sig = []
    for gr in g.all_graphs(graph):
        tensors = gr.tensors()
        for name in sorted(tensors, key=str):
            t = tensors[name]
            if not isinstance(t, gs.Variable):
                continue
            shape = None
            if t.shape is not None:
                shape = tuple(
                    symbols.setdefault(d, f"s{len(symbols)}") if isinstance(d, str) else d
                    for d in t.shape
                )
            sig.append((str(name), str(t.dtype), shape))
    return sig


def _symbolic_infer(
    proto: onnx.ModelProto, guess_output_rank: bool
) -> tuple[onnx.ModelProto | None, bool]:
    """onnxruntime's symbolic shape inference: (result, complete).

    ``SymbolicShapeInference.infer_shapes`` raises when some op is unknown, after saving
    ``sym_shape_infer_temp.onnx`` into the working directory. Running its loop here keeps the
    partial result (what it could infer) and writes nothing.
    """
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    ssi_logger = logging.getLogger("onnxruntime.tools.symbolic_shape_infer")
    level = ssi_logger.level
    ssi_logger.setLevel(logging.ERROR)
    try:
        if all(hasattr(SymbolicShapeInference, m) for m in ("_preprocess", "_infer_impl")):
            if _default_opset(proto) < 7:
                return None, False
            ssi = SymbolicShapeInference(2**31 - 1, True, guess_output_rank, 0)
            ssi._preprocess(proto)
            complete = False
            while ssi.run_:
                complete = ssi._infer_impl()
            if _specializes_inputs(ssi):
                return None, False
            if hasattr(ssi, "_update_output_from_vi"):
                ssi._update_output_from_vi()
            return ssi.out_mp_, bool(complete)
        with _in_temp_dir():  # the public API may write a file into the working directory
            result = SymbolicShapeInference.infer_shapes(
                proto, auto_merge=True, guess_output_rank=guess_output_rank
            )
            return result, result is not None
    finally:
        ssi_logger.setLevel(level)


def _specializes_inputs(ssi) -> bool:
    """Whether ``auto_merge`` bound a symbolic graph-input dim to a number.

    Broadcasting ``(N, 6) + (6, 1)`` is valid for N = 1 and N = 6, but ``auto_merge`` settles it
    as N = 6 and then stamps 6 into every shape that N reaches, so the result describes one
    batch size only. onnxruntime trusts value_info (its MatMul+Add fusion reshapes by it), and a
    lowered model carrying those shapes fails at N = 1. onnx's own inference does not propagate
    backwards, so it is used instead.
    """
    merges = getattr(ssi, "suggested_merge_", {})
    symbols = getattr(ssi, "input_symbols_", set())
    return any(s in symbols and isinstance(v, int) for s, v in merges.items())


@contextlib.contextmanager
def _in_temp_dir() -> Iterator[None]:
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        try:
            yield
        finally:
            os.chdir(cwd)


def _with_known_value_info(partial: onnx.ModelProto, original: onnx.ModelProto) -> onnx.ModelProto:
    """``partial`` plus the value_info of ``original`` for the tensors it did not reach.

    Symbolic inference stops at the first op it does not know; a shape the model declares
    beyond that point (say, the output of a custom op) lets onnx's inference carry on from it.
    """
    g_partial = partial.graph
    declared = {v.name: v for v in original.graph.value_info}
    merged = [
        declared[v.name] if v.name in declared and _untyped(v) else v
        for v in g_partial.value_info  # it leaves an empty type where it stopped
    ]
    known = {v.name for v in (*merged, *g_partial.input, *g_partial.output)}
    known |= {t.name for t in g_partial.initializer}
    merged += [v for name, v in declared.items() if name not in known]
    del g_partial.value_info[:]
    g_partial.value_info.extend(merged)
    return partial


def _untyped(v: onnx.ValueInfoProto) -> bool:
    return v.type.WhichOneof("value") is None or (
        v.type.HasField("tensor_type") and not v.type.tensor_type.elem_type
    )


def _default_opset(proto: onnx.ModelProto) -> int:
    for imp in proto.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 1


#: Float initializers with at least this many elements are given to inference as typed graph
#: inputs instead of values: no shape depends on weight values, and copying them is slow.
_WEIGHT_ELEMENTS = 1024


@contextlib.contextmanager
def _weights_as_inputs(graph: gs.Graph) -> Iterator[None]:
    """Temporarily turn the main graph's large float initializers into typed graph inputs."""
    seen, saved = set(), []
    for node in graph.nodes:
        for t in node.inputs:
            if not isinstance(t, gs.Constant) or id(t) in seen or not t.name:
                continue
            seen.add(id(t))
            try:
                is_float = np.dtype(t.dtype).kind == "f"
            except TypeError:
                is_float = False
            if is_float and math.prod(t.shape) >= _WEIGHT_ELEMENTS:
                saved.append((t, t._values, t.data_location, t._export_dtype, t.dtype))
    inputs = list(graph.inputs)
    try:
        for t, _values, _loc, _export, dtype in saved:
            t.to_variable(dtype=dtype, shape=list(t.shape))
            t.type = "tensor_type"  # what gs's importer sets on every Variable
            graph.inputs.append(t)
        yield
    finally:
        graph.inputs = inputs
        for t, values, loc, export, _dtype in saved:
            if isinstance(t, gs.Variable):
                t.to_constant(values)
                t.__dict__.pop("type", None)
                t.data_location, t._export_dtype = loc, export


def _merge_shapes(old: list | None, new: list) -> list:
    """The inferred shape, keeping a static dim the tensor already had where inference has none."""
    if old is None or len(old) != len(new):
        return new
    return [
        d if isinstance(d, (int, np.integer)) or not isinstance(o, (int, np.integer)) else o
        for o, d in zip(old, new)
    ]


@register_pass("resolve-shapes")
class ResolveShapes(Pass):
    """Infer every tensor's shape (symbolic batch kept); graph inputs/outputs stay as declared.

    Runs onnxruntime's symbolic shape inference with ``auto_merge``; when it raises, or stops at
    an op it does not know, onnx's own shape inference (with data propagation) fills in what it
    can. The inferred types and shapes are copied onto the graph's tensors by name (the tensor
    objects stay the same). Models that already hold internal ``ai.onnx_lower`` nodes are left
    alone.
    """

    def __init__(self, guess_output_rank: bool = False):
        self.guess_output_rank = guess_output_rank

    def run(self, model: LoweringModel) -> PassResult:
        graphs = list(g.all_graphs(model.graph))
        if any(n.domain == g.INTERNAL_DOMAIN for gr in graphs for n in gr.nodes):
            return PassResult(False)
        with _weights_as_inputs(model.graph):
            proto = model.to_proto()
        inferred, complete = None, False
        try:
            inferred, complete = _symbolic_infer(proto, self.guess_output_rank)
        except Exception as exc:  # sympy, asserts, unknown ops: all mean "no symbolic result"
            logger.info("symbolic shape inference failed (%s); using onnx's", exc)
        if not complete:
            base = proto if inferred is None else _with_known_value_info(inferred, proto)
            try:
                inferred = onnx.shape_inference.infer_shapes(base, data_prop=True)
            except Exception as exc:
                logger.info("onnx shape inference failed (%s)", exc)
        if inferred is None:
            return PassResult(False)
        facts = {}
        for gr in g.all_graphs(g.import_graph(inferred)):
            for name, t in gr.tensors().items():
                if isinstance(t, gs.Variable) and name and t.shape is not None:
                    facts[name] = (t.dtype, list(t.shape))
        before = _shape_signature(model.graph)
        snapshot = [
            (t, t.dtype, t.shape)
            for gr in graphs
            for t in gr.tensors().values()
            if isinstance(t, gs.Variable)
        ]
        interface = {id(t) for t in (*model.graph.inputs, *model.graph.outputs)}
        for t, dtype, shape in snapshot:
            fact = facts.get(t.name)
            if fact is None:
                continue
            if id(t) in interface and shape is not None:
                continue  # declared graph inputs and outputs keep their declaration exactly
            new_dtype, new_shape = fact
            if new_dtype is not None and (id(t) not in interface or dtype is None):
                t.dtype = new_dtype
            t.shape = _merge_shapes(shape, new_shape)
        if _shape_signature(model.graph) == before:
            for t, dtype, shape in snapshot:  # at most symbols were renamed: keep the old names
                t.dtype, t.shape = dtype, shape
            return PassResult(False)
        return PassResult(True)


# --------------------------------------------------------------------------------------------
# fold-constants

#: Results larger than this stay computed at run time.
FOLD_LIMIT_BYTES = 64 * 1024 * 1024
_NONDETERMINISTIC = frozenset(
    {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
     "Bernoulli"}
)


def _is_const(t: gs.Tensor) -> bool:
    return isinstance(t, gs.Constant)


def _static_shape(t: gs.Tensor) -> list[int] | None:
    shape = getattr(t, "shape", None)
    if isinstance(t, gs.Constant):
        return list(t.shape)
    if shape is None or not all(isinstance(d, (int, np.integer)) and d >= 0 for d in shape):
        return None
    return [int(d) for d in shape]


def _partial_shape(shape_node: gs.Node) -> list[int | None] | None:
    """The dims a Shape node outputs, ``None`` where a dim is not static."""
    x = shape_node.inputs[0]
    shape = list(x.shape) if x.shape is not None else None
    if shape is None:
        return None
    dims = [int(d) if isinstance(d, (int, np.integer)) and d >= 0 else None for d in shape]
    start, end = g.attr(shape_node, "start", 0), g.attr(shape_node, "end", None)
    return dims[slice(start, end)]  # Python slicing clamps exactly like Shape-15's start/end


def _int_array(t: gs.Tensor) -> np.ndarray | None:
    v = g.const_value(t) if not t.is_empty() else None
    return None if v is None else np.asarray(v).astype(np.int64)


def _fold_shape_consumer(node: gs.Node, opset: int) -> np.ndarray | None:
    """The value of Shape / Size, or of Gather / Slice reading static dims of a Shape."""
    if g.is_op(node, "Shape"):
        dims = _partial_shape(node)
        if dims is None or any(d is None for d in dims):
            return None
        return np.array(dims, dtype=np.int64)
    if g.is_op(node, "Size"):
        dims = _static_shape(node.inputs[0])
        return None if dims is None else np.array(math.prod(dims), dtype=np.int64)
    if not node.inputs or g.producer(node.inputs[0]) is None:
        return None
    src = g.producer(node.inputs[0])
    if not g.is_op(src, "Shape"):
        return None
    dims = _partial_shape(src)
    if dims is None:
        return None
    positions = np.arange(len(dims))
    if g.is_op(node, "Gather"):
        if g.attr(node, "axis", 0) not in (0, -1) or len(node.inputs) < 2:
            return None
        idx = _int_array(node.inputs[1])
        if idx is None or np.any(idx >= len(dims)) or np.any(idx < -len(dims)):
            return None
        selected = positions[idx]
    elif g.is_op(node, "Slice"):
        if opset < 10 or "starts" in node.attrs:
            starts, ends = node.attrs.get("starts"), node.attrs.get("ends")
            axes, steps = node.attrs.get("axes"), None
        else:
            operands = list(node.inputs[1:5]) + [None] * (5 - len(node.inputs))
            values = []
            for t in operands:
                if t is None or t.is_empty():
                    values.append(None)
                    continue
                v = _int_array(t)
                if v is None:
                    return None  # a computed start/end/axis/step
                values.append(v)
            starts, ends, axes, steps = values
        if starts is None or ends is None or len(starts) != 1 or len(ends) != 1:
            return None
        if axes is not None and [int(a) for a in axes] not in ([0], [-1]):
            return None
        step = 1 if steps is None else int(steps[0])
        if step == 0:
            return None
        selected = positions[slice(int(starts[0]), int(ends[0]), step)]
    else:
        return None
    picked = np.asarray([dims[i] for i in np.ravel(selected)], dtype=object)
    if any(d is None for d in picked):
        return None
    return picked.astype(np.int64).reshape(np.shape(selected))


def _reshape_target(node: gs.Node) -> np.ndarray | None:
    """A constant target for a Reshape whose computed shape input has an inferred result."""
    if not g.is_op(node, "Reshape") or len(node.inputs) < 2 or g.attr(node, "allowzero", 0):
        return None
    data, out = node.inputs[0], node.outputs[0]
    if _is_const(node.inputs[1]) or out.shape is None or data.shape is None:
        return None
    dims = list(out.shape)
    if any(isinstance(d, (int, np.integer)) and d == 0 for d in dims):
        return None  # a 0-sized dim in the target would read as "copy"
    dynamic = [i for i, d in enumerate(dims) if not (isinstance(d, (int, np.integer)) and d >= 0)]
    if len(dynamic) == 1:
        target = [-1 if i in dynamic else int(d) for i, d in enumerate(dims)]
    else:
        target, unknown = [], 0
        for i, d in enumerate(dims):
            if i not in dynamic:
                target.append(int(d))
            elif isinstance(d, str) and i < len(data.shape) and data.shape[i] == d:
                target.append(0)
            else:
                unknown += 1
                target.append(-1)
        if unknown > 1:
            return None
    return np.array(target, dtype=np.int64)


def _evaluate(node: gs.Node, opset: int) -> list[np.ndarray] | None:
    """Run ``node`` alone in onnx's reference evaluator on its constant inputs."""
    from onnx.reference import ReferenceEvaluator

    feeds, inputs = {}, []
    for i, t in enumerate(node.inputs):
        if t.is_empty():
            inputs.append(gs.Variable.empty())
            continue
        value = g.const_value(t)
        name = f"in{i}"
        feeds[name] = value
        inputs.append(gs.Variable(name, dtype=value.dtype, shape=list(value.shape)))
    outputs = [gs.Variable.empty() if t.is_empty() else gs.Variable(f"out{k}")
               for k, t in enumerate(node.outputs)]
    one = gs.Node(node.op, name="fold", attrs=dict(node.attrs), inputs=inputs, outputs=outputs)
    graph = gs.Graph(
        nodes=[one],
        inputs=[t for t in inputs if not t.is_empty()],
        outputs=[t for t in outputs if not t.is_empty()],
        opset=opset,
    )
    proto = gs.export_onnx(graph, do_type_check=False)
    results = ReferenceEvaluator(proto).run(None, feeds)
    return [np.asarray(r) if isinstance(r, (np.ndarray, np.generic)) else None for r in results]


def _foldable(node: gs.Node) -> bool:
    if node.domain not in g.DEFAULT_DOMAINS or node.op in _NONDETERMINISTIC:
        return False
    if not node.inputs or any(not t.is_empty() and not _is_const(t) for t in node.inputs):
        return False
    for value in node.attrs.values():
        if isinstance(value, (gs.Graph, gs.Node.AttributeRef)):
            return False
    return True


def _estimated_bytes(t: gs.Tensor) -> int:
    shape = _static_shape(t)
    if shape is None or t.dtype is None:
        return 0
    try:
        itemsize = np.dtype(t.dtype).itemsize
    except TypeError:
        itemsize = 1
    return math.prod(shape) * itemsize


def _fits(value: np.ndarray | None, declared: gs.Tensor) -> bool:
    if value is None or value.dtype.kind not in "biufc" or value.nbytes > FOLD_LIMIT_BYTES:
        return False
    if declared.dtype is not None:
        try:
            if np.dtype(declared.dtype) != value.dtype:
                return False
        except TypeError:
            return False
    return True


def _replace_by_constant(node: gs.Node, values: list[np.ndarray], graph: gs.Graph) -> None:
    outs = list(node.outputs)
    g.detach(node)
    graph.nodes.remove(node)
    for out, value in zip(outs, values):
        if not out.is_empty():
            out.to_constant(np.array(value, order="C"))  # keeps 0-d arrays 0-d


@register_pass("fold-constants")
class FoldConstants(GraphPass):
    """Evaluate nodes with constant inputs (static shapes included) and store their results."""

    def run_on_graph(self, graph: gs.Graph, model: LoweringModel) -> bool:
        opset = getattr(graph, "opset", None) or model.opset
        modified = False
        # evaluate to a fixed point first; targets of Reshape from inferred shapes only then,
        # so that a shape which folds to its actual value is never replaced by a -1/0 form
        while self._sweep(graph, opset, self._fold_node) or self._sweep(
            graph, opset, self._fold_reshape
        ):
            modified = True
        return modified

    @staticmethod
    def _sweep(graph: gs.Graph, opset: int, fold) -> bool:
        changed = False
        for node in list(graph.nodes):
            outs = [t for t in node.outputs if not t.is_empty()]
            if not outs or any(g.is_graph_output(graph, t) for t in outs):
                continue
            changed |= fold(node, graph, opset)
        return changed

    @staticmethod
    def _fold_reshape(node: gs.Node, graph: gs.Graph, opset: int) -> bool:
        target = _reshape_target(node)
        if target is None:
            return False
        node.inputs[1] = gs.Constant(g.Namer(graph)(f"{node.outputs[0].name}_shape"), target)
        return True

    @staticmethod
    def _fold_node(node: gs.Node, graph: gs.Graph, opset: int) -> bool:
        out = node.outputs[0]
        if g.is_op(node, "Constant"):
            value = g.const_value(out)
            if value is None or value.dtype.kind not in "biufc":
                return False  # string or sparse constants stay nodes
            _replace_by_constant(node, [value], graph)
            return True
        if node.domain not in g.DEFAULT_DOMAINS:
            return False
        value = _fold_shape_consumer(node, opset)
        if value is not None:
            _replace_by_constant(node, [value], graph)
            return True
        if not _foldable(node) or any(_estimated_bytes(t) > FOLD_LIMIT_BYTES
                                      for t in node.outputs):
            return False
        try:
            values = _evaluate(node, opset)
        except Exception as exc:  # the reference evaluator lacks some ops and attribute forms
            logger.info("cannot fold %s (%s): %s", node.name, node.op, exc)
            return False
        if values is None or len(values) != len([t for t in node.outputs if not t.is_empty()]):
            return False
        live = [t for t in node.outputs if not t.is_empty()]
        if not all(_fits(v, t) for v, t in zip(values, live)):
            return False
        it = iter(values)
        _replace_by_constant(node, [None if t.is_empty() else next(it) for t in node.outputs],
                             graph)
        return True


# --------------------------------------------------------------------------------------------
# remove-identity


def _onnx_dtype(dtype) -> int | None:
    if dtype is None:
        return None
    if isinstance(dtype, (int, np.integer)) and not isinstance(dtype, bool):
        return int(dtype)
    try:
        return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    except (TypeError, KeyError, ValueError):
        return None


def _used(graph: gs.Graph, t: gs.Tensor) -> bool:
    return not t.is_empty() and bool(t.outputs or g.is_graph_output(graph, t))


def _inference_dropout(node: gs.Node, opset: int) -> bool:
    """Dropout returns its input: not in training mode (spec defaults: ``training_mode`` false,
    ``is_test`` 0, i.e. training, before opset 7)."""
    if opset < 7 and not int(g.attr(node, "is_test", 0)):
        return False
    if len(node.inputs) > 2 and not node.inputs[2].is_empty():
        training = g.const_value(node.inputs[2])
        if training is None or bool(np.asarray(training).any()):
            return False
    return True


def _constant_mask(node: gs.Node, graph: gs.Graph, opset: int) -> bool:
    """An inference Dropout's used mask becomes an all-true initializer (of the same name, so a
    graph output keeps it); True if it did."""
    if not (g.is_op(node, "Dropout") and len(node.outputs) > 1 and node.inputs):
        return False
    mask, x = node.outputs[1], node.inputs[0]
    shape = x.shape if x.shape is not None else mask.shape
    if opset < 12 or not _used(graph, mask) or not _inference_dropout(node, opset):
        return False
    if not shape or not all(isinstance(d, (int, np.integer)) for d in shape):
        return False
    const = gs.Constant(mask.name, np.ones([int(d) for d in shape], dtype=np.bool_))
    _replace_uses(mask, const)
    for sub in g.all_graphs(graph):
        sub.outputs = [const if t is mask else t for t in sub.outputs]
    node.outputs.pop(1)
    return True


def _identity_input(node: gs.Node, graph: gs.Graph, opset: int) -> gs.Tensor | None:
    """The tensor that ``node``'s first output equals, if ``node`` is a no-op at inference."""
    if not node.inputs or node.inputs[0].is_empty():
        return None
    x = node.inputs[0]
    if g.is_op(node, "Identity"):
        return x if len(node.outputs) == 1 else None
    if g.is_op(node, "Dropout"):
        if any(_used(graph, t) for t in node.outputs[1:]):
            return None  # the mask is used
        return x if _inference_dropout(node, opset) else None
    if g.is_op(node, "Cast", "CastLike"):
        to = (node.attrs.get("to") if node.op == "Cast"
              else _onnx_dtype(node.inputs[1].dtype) if len(node.inputs) > 1 else None)
        src = _onnx_dtype(x.dtype)
        return x if src is not None and to is not None and int(to) == src else None
    return None


def _replace_uses(old: gs.Tensor, new: gs.Tensor) -> None:
    for consumer in list(old.outputs):
        for i, t in enumerate(consumer.inputs):
            if t is old:
                consumer.inputs[i] = new


@register_pass("remove-identity")
class RemoveIdentity(GraphPass):
    """Remove Identity, inference Dropout and same-type Cast; graph output names never change."""

    def run_on_graph(self, graph: gs.Graph, model: LoweringModel) -> bool:
        modified = False
        produced_here = {id(t) for n in graph.nodes for t in n.outputs}
        for node in list(graph.nodes):
            modified |= _constant_mask(node, graph, model.opset)
            x = _identity_input(node, graph, model.opset)
            if x is None:
                continue
            y = node.outputs[0]
            if g.is_graph_output(graph, y):
                if (
                    id(x) not in produced_here
                    or any(t is x for t in graph.inputs)
                    or g.is_graph_output(graph, x)
                ):
                    continue  # x cannot take y's name: keep the node
                x.name = y.name
                if y.shape is not None:
                    x.shape = y.shape
                if y.dtype is not None:
                    x.dtype = y.dtype
                graph.outputs = [x if t is y else t for t in graph.outputs]
            elif x.shape is None and y.shape is not None:
                x.shape = y.shape
            for sub in g.all_graphs(graph):
                if sub is not graph and any(t is y for t in sub.outputs):
                    sub.outputs = [x if t is y else t for t in sub.outputs]
            _replace_uses(y, x)
            g.detach(node)
            graph.nodes.remove(node)
            modified = True
        return modified


# --------------------------------------------------------------------------------------------
# explicit-pads

WINDOW_OPS = ("Conv", "MaxPool", "AveragePool", "LpPool")


def _schema_attrs(op: str, opset: int) -> set[str]:
    try:
        return set(onnx.defs.get_schema(op, opset, "").attributes)
    except Exception:
        return set()


def _conv_operand_shape(node: gs.Node, k: int) -> list[int] | None:
    """The static shape of a Conv/ConvTranspose weight (k=1) or bias (k=2), else None."""
    if not g.is_op(node, "Conv", "ConvTranspose") or len(node.inputs) <= k:
        return None
    t = node.inputs[k]
    if not t.name or t.shape is None:
        return None
    if not all(isinstance(d, (int, np.integer)) for d in t.shape):
        return None
    return [int(d) for d in t.shape]


def check_window_node(node: gs.Node) -> tuple[int, ...] | None:
    """Validate a Conv/pool node's window attributes against its input; its kernel, or None.

    The one place every form calls :func:`onnx_lower.windows.window_attributes` with what the
    graph knows (the static input extent and channels, the weight and bias shapes), so that an
    out-of-spec attribute is refused by name whatever pass list runs. None when the kernel is
    not known (a Conv whose weight shape is dynamic).
    """
    kernel = node.attrs.get("kernel_shape")
    if kernel is None and node.op == "Conv" and len(node.inputs) > 1:
        w = node.inputs[1]
        wshape = list(w.shape) if w.shape is not None else None
        if wshape is not None and all(isinstance(d, (int, np.integer)) for d in wshape[2:]):
            kernel = [int(d) for d in wshape[2:]]
    if kernel is None:
        return None
    r = len(kernel)
    x = node.inputs[0]
    shape = list(x.shape) if x.shape is not None and len(x.shape) == r + 2 else None
    static = shape is not None and all(isinstance(d, (int, np.integer)) for d in shape[1:])
    window_attributes(  # refuses what the spec does not allow, naming node and attribute
        node,
        kernel,
        spatial=[int(d) for d in shape[2:]] if static else None,
        channels=int(shape[1]) if static else None,
        weight_shape=_conv_operand_shape(node, 1),
        bias_shape=_conv_operand_shape(node, 2),
    )
    return tuple(int(k) for k in kernel)


@register_pass("explicit-pads")
class ExplicitPads(GraphPass):
    """Replace auto_pad by explicit pads and spell out default strides, dilations and pads."""

    def run_on_graph(self, graph: gs.Graph, model: LoweringModel) -> bool:
        opset = getattr(graph, "opset", None) or model.opset
        modified = False
        for node in graph.nodes:
            if g.is_op(node, *WINDOW_OPS):
                modified |= self._rewrite(node, opset)
        return modified

    @staticmethod
    def _rewrite(node: gs.Node, opset: int) -> bool:
        kernel = check_window_node(node)
        if kernel is None:
            return False
        r = len(kernel)
        known = _schema_attrs(node.op, opset)
        auto_pad = g.attr(node, "auto_pad", "NOTSET") or "NOTSET"
        strides = list(node.attrs.get("strides") or [1] * r)
        dilations = list(node.attrs.get("dilations") or [1] * r)
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            x = node.inputs[0]
            spatial = list(x.shape[2:]) if x.shape is not None and len(x.shape) == r + 2 else None
            if spatial is None or not all(isinstance(d, (int, np.integer)) for d in spatial):
                return False  # needs a static spatial shape
            if g.attr(node, "ceil_mode", 0):
                return False  # SAME with ceil_mode: leave the runtime's own rule alone
            if node.op != "Conv" and any(d != 1 for d in dilations):
                # onnxruntime sizes dilated SAME pools from the undilated kernel, unlike the
                # spec and onnx.reference: the two disagree, so the node keeps its auto_pad
                return False
            pads = list(resolve_pads(spatial, kernel, strides, dilations, None, auto_pad))
        elif auto_pad == "VALID":
            pads = [0] * (2 * r)
        elif auto_pad == "NOTSET":
            pads = list(node.attrs.get("pads") or [0] * (2 * r))
        else:
            return False
        wanted = {"pads": pads, "strides": strides}
        if "dilations" in known:
            wanted["dilations"] = dilations
        if "kernel_shape" in known and "kernel_shape" not in node.attrs:
            wanted["kernel_shape"] = list(kernel)
        if auto_pad != "NOTSET":
            wanted["auto_pad"] = "NOTSET"
        modified = False
        for key, value in wanted.items():
            current = node.attrs.get(key)
            if isinstance(current, bytes):
                current = current.decode()
            if current is None or (list(current) if isinstance(current, (list, tuple))
                                   else current) != value:
                node.attrs[key] = value
                modified = True
        return modified


# --------------------------------------------------------------------------------------------
# dce, toposort, name-nodes


def _structure(graph: gs.Graph) -> list[tuple]:
    """Nodes (by identity, in order) and their connections, per graph: detects any rewiring."""
    out = []
    for gr in g.all_graphs(graph):
        out.append(tuple(
            (id(n), tuple(id(t) for t in n.inputs), tuple(id(t) for t in n.outputs))
            for n in gr.nodes
        ))
    return out


@register_pass("dce")
class DeadCodeElimination(Pass):
    """Remove nodes and initializers that no graph output depends on; keep every graph input."""

    def run(self, model: LoweringModel) -> PassResult:
        before = _structure(model.graph)
        model.graph.cleanup(
            remove_unused_graph_inputs=False, recurse_subgraphs=True, recurse_functions=True
        )
        return PassResult(_structure(model.graph) != before)


@register_pass("toposort")
class TopologicalSort(Pass):
    """Sort the nodes of every graph topologically."""

    def run(self, model: LoweringModel) -> PassResult:
        before = [[id(n) for n in gr.nodes] for gr in g.all_graphs(model.graph)]
        model.graph.toposort(recurse_subgraphs=True, recurse_functions=True)
        after = [[id(n) for n in gr.nodes] for gr in g.all_graphs(model.graph)]
        return PassResult(after != before)


@register_pass("name-nodes")
class NameNodes(Pass):
    """Give unnamed or duplicate-named nodes (and unnamed tensors) deterministic names."""

    def run(self, model: LoweringModel) -> PassResult:
        graphs = list(g.all_graphs(model.graph))
        used = {n.name for gr in graphs for n in gr.nodes if n.name}
        counters: dict[str, int] = {}
        seen: set[str] = set()
        modified = False
        for gr in graphs:
            for node in gr.nodes:
                if node.name and node.name not in seen:
                    seen.add(node.name)
                    continue
                i = counters.get(node.op, 0)
                while f"{node.op}_{i}" in used:
                    i += 1
                node.name = f"{node.op}_{i}"
                counters[node.op] = i + 1
                used.add(node.name)
                seen.add(node.name)
                modified = True
        tensor_names = {str(t.name) for gr in graphs for t in gr.tensors().values() if t.name}
        for gr in graphs:
            for t in self._unnamed_tensors(gr):
                node = g.producer(t)
                k = node.outputs.index(t) if node is not None else 0
                base = f"{node.name}_out{k}" if node is not None else "const"
                name, j = base, 0
                while name in tensor_names:
                    j += 1
                    name = f"{base}_{j}"
                t.name = name
                tensor_names.add(name)
                modified = True
        return PassResult(modified)

    @staticmethod
    def _unnamed_tensors(graph: gs.Graph) -> list[gs.Tensor]:
        """Tensors with no name, in graph order; ``""`` variables are omitted optionals: kept."""
        found, ids = [], set()
        candidates = [*graph.inputs]
        for node in graph.nodes:
            candidates += [*node.inputs, *node.outputs]
        for t in candidates:
            unnamed = t.name is None or (t.name == "" and isinstance(t, gs.Constant))
            if unnamed and id(t) not in ids:
                ids.add(id(t))
                found.append(t)
        return found
