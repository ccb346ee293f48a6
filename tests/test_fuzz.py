"""Fuzz the CLI with mutated models: every case ends cleanly, in exactly one of two ways.

A case takes a source model (a small corpus model from ``../shared/corpus``, a sample from
``models/``, or a built model with an If or a Loop body), applies one seeded
:class:`Mutation`, and runs the CLI in-process (``onnx_lower.cli.main``) in a random form with
validation on. The contract:

* exit 0: the output exists, loads in onnxruntime, and matched onnxruntime on the mutated input
  (validation is on by default, so exit 0 means it did); or
* exit 2: exactly one ``error:`` line on stderr, no traceback, nothing left in the output
  folder.

Anything else (exit 1, 3, a Python exception, a traceback, a file left behind) is a bug.

Mutations: an attribute's value (negated, zero, huge, a list of the wrong length, a garbage
string), an initializer's shape or dtype, the input's dtype or one dimension (symbolic or 0),
the opset, a node (dropped, duplicated, op renamed), bytes of the serialised file (flipped or
truncated), the same on If/Loop bodies, and external data (the ``.data`` file truncated or
missing). Each case is reproducible from its seed (``case(seed)``); ``FUZZ_CASES=N`` sets the
number of seeds the slow test runs (default 1,000, from ``FUZZ_START``, default 50). Every
failure a slow run found is kept below as a named regression (``REGRESSIONS``), with its
mutation written out literally.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_lower.cli import main
from tests.oracles import CORPUS

REPO_ROOT = Path(__file__).resolve().parents[1]
MODELS = REPO_ROOT / "models"
FORMS = ("auto", "mlp", "im2col", "fold-only")
DEFAULT_CASES = 50
SLOW_CASES = int(os.environ.get("FUZZ_CASES", "1000"))
#: first seed of the slow run (the default profile has seeds 0..49)
SLOW_START = int(os.environ.get("FUZZ_START", str(DEFAULT_CASES)))
#: keeps a mutated dense layer from costing seconds: mlp refuses (exit 2), auto takes im2col
MAX_WEIGHT_MB = "8"

KINDS = (
    "attribute",
    "initializer_shape",
    "initializer_dtype",
    "input_dtype",
    "input_dim",
    "opset",
    "drop_node",
    "duplicate_node",
    "rename_op",
    "flip_bytes",
    "truncate_file",
    "external_data",
)


# --------------------------------------------------------------------------- source models


def if_model() -> onnx.ModelProto:
    """x (1,4) → If(cond) then Relu(x·2) else Neg(x) → Add bias: a model with two bodies."""
    then = helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["t0"], name="then_mul"),
         helper.make_node("Relu", ["t0"], ["t"], name="then_relu")],
        "then", [], [helper.make_tensor_value_info("t", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(np.full((1, 4), 2, np.float32), "two")],
    )
    other = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["e"], name="else_neg")],
        "else", [], [helper.make_tensor_value_info("e", TensorProto.FLOAT, [1, 4])],
    )
    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["z"], name="branch", then_branch=then,
                          else_branch=other),
         helper.make_node("Add", ["z", "bias"], ["y"], name="add_bias")],
        "if_model",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(np.array(True), "cond"),
         numpy_helper.from_array(np.arange(4, dtype=np.float32).reshape(1, 4), "bias")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def loop_model() -> onnx.ModelProto:
    """x (1,4) → Loop 3 times: s = Relu(s·w + b) → y: a model with a loop body."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body_cond"),
         helper.make_node("MatMul", ["s_in", "w"], ["s0"], name="body_matmul"),
         helper.make_node("Add", ["s0", "b"], ["s1"], name="body_add"),
         helper.make_node("Relu", ["s1"], ["s_out"], name="body_relu")],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("s_in", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("s_out", TensorProto.FLOAT, [1, 4])],
    )
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trips", "", "x"], ["y"], name="loop", body=body)],
        "loop_model",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(np.array(3, np.int64), "trips"),
         numpy_helper.from_array(rng.normal(size=(4, 4)).astype(np.float32), "w"),
         numpy_helper.from_array(rng.normal(size=4).astype(np.float32), "b")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


BUILT = {"if_model": if_model, "loop_model": loop_model}


def sources() -> list[str]:
    """Every source name: samples, corpus models, built models (sorted: seeds are stable)."""
    names = [f"models/{p.name}" for p in sorted(MODELS.glob("*.onnx"))]
    if CORPUS.is_dir():
        names += [f"corpus/{p.name}" for p in sorted(CORPUS.glob("*.onnx"))]
    return names + sorted(BUILT)


def load_source(name: str) -> onnx.ModelProto:
    if name in BUILT:
        return BUILT[name]()
    folder, _, file = name.partition("/")
    if folder == "corpus" and not CORPUS.is_dir():
        pytest.skip(f"{name}: the corpus folder {CORPUS} is absent")
    return onnx.load(str((MODELS if folder == "models" else CORPUS) / file))


# --------------------------------------------------------------------------- mutations


@dataclasses.dataclass(frozen=True)
class Mutation:
    """One change to a model. ``graph`` is ``""`` for the main graph, else the name of the
    attribute holding the body (``then_branch``, ``else_branch``, ``body``) of ``node``'s
    parent; ``node`` and ``target`` are indices or names; ``value`` the new value."""

    kind: str
    target: object = None
    value: object = None
    node: int | None = None
    graph: str = ""

    def describe(self) -> str:
        where = f" in {self.graph}" if self.graph else ""
        return f"{self.kind}(node={self.node}, target={self.target!r}, value={self.value!r}){where}"


def _graph_of(model: onnx.ModelProto, m: Mutation) -> onnx.GraphProto:
    if not m.graph:
        return model.graph
    for node in model.graph.node:
        for a in node.attribute:
            if a.name == m.graph and a.type == onnx.AttributeProto.GRAPH:
                return a.g
    raise LookupError(m.graph)


def _attr_value(a: onnx.AttributeProto, value):
    """``a`` with ``value`` (ints, floats, strings or lists of them) replacing its contents."""
    new = helper.make_attribute(a.name, value)
    a.CopyFrom(new)


def apply(model: onnx.ModelProto, m: Mutation) -> onnx.ModelProto | bytes | tuple:
    """The mutated model: a proto, raw bytes (file mutations), or ``("external", proto, how)``."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = _graph_of(model, m)
    if m.kind == "attribute":
        node = graph.node[m.node]
        existing = [a for a in node.attribute if a.name == m.target]
        if m.value is None:
            for a in existing:
                node.attribute.remove(a)
        elif existing:
            _attr_value(existing[0], m.value)
        else:
            node.attribute.append(helper.make_attribute(m.target, m.value))
    elif m.kind in ("initializer_shape", "initializer_dtype"):
        t = graph.initializer[m.target]
        if m.kind == "initializer_shape":
            del t.dims[:]
            t.dims.extend(m.value)
        else:
            t.data_type = m.value
    elif m.kind in ("input_dtype", "input_dim"):
        tt = graph.input[0].type.tensor_type
        if m.kind == "input_dtype":
            tt.elem_type = m.value
        else:
            dim = tt.shape.dim[m.target]
            if isinstance(m.value, str):
                dim.dim_param = m.value
            else:
                dim.dim_value = m.value
    elif m.kind == "opset":
        for imp in model.opset_import:
            if imp.domain in ("", "ai.onnx"):
                imp.version = m.value
    elif m.kind == "drop_node":
        del graph.node[m.node]
    elif m.kind == "duplicate_node":
        copy = onnx.NodeProto()
        copy.CopyFrom(graph.node[m.node])
        if m.value:
            copy.name = copy.name + "_dup"
        graph.node.insert(m.node + 1, copy)
    elif m.kind == "rename_op":
        graph.node[m.node].op_type = m.value
    elif m.kind in ("flip_bytes", "truncate_file"):
        data = bytearray(model.SerializeToString())
        if m.kind == "truncate_file":
            return bytes(data[: int(len(data) * m.value)])
        rng = np.random.default_rng(m.target)
        where = rng.integers(0, len(data), size=m.value)
        data_arr = np.frombuffer(bytes(data), np.uint8).copy()
        data_arr[where] ^= rng.integers(1, 256, size=m.value).astype(np.uint8)
        return data_arr.tobytes()
    elif m.kind == "external_data":
        return ("external", model, m.value)
    else:
        raise ValueError(m.kind)
    return model


_OPS = ("Relu", "Sigmoid", "Add", "MatMul", "Conv", "MaxPool", "Identity", "Gemm", "Flatten",
        "Reshape", "Transpose", "Softmax", "NotAnOp", "Concat", "AveragePool", "Abs")
_DTYPES = (TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.INT64, TensorProto.INT32,
           TensorProto.UINT8, TensorProto.BOOL, TensorProto.STRING, 0)


def _attr_mutation(rng: np.random.Generator, a: onnx.AttributeProto | None):
    """A new value for ``a`` (or for an invented attribute when ``a`` is None)."""
    if a is None:
        return ("made_up", int(rng.integers(-3, 4)))
    v = helper.get_attribute_value(a)
    choice = int(rng.integers(0, 6))
    if choice == 0:
        return (a.name, None)  # removed: the spec default applies
    if isinstance(v, int):
        return (a.name, [-v - 1, 0, 2, 10**6, v + 1, -1][choice])
    if isinstance(v, float):
        return (a.name, [float("nan"), -v, 0.0, 1e30, float("inf"), -1.0][choice])
    if isinstance(v, bytes):
        return (a.name, ["GARBAGE", "", "SAME_UPPER", "VALID", "SAME_LOWER", "NOTSET"][choice])
    if isinstance(v, list) and v and isinstance(v[0], int):
        n = len(v)
        options = [[0] * n, [-1] * n, [10**6] * n, v + [1], v[:-1] or [2, 2, 2], [x + 1 for x in v]]
        return (a.name, options[choice])
    if isinstance(v, list) and v and isinstance(v[0], float):
        return (a.name, [float("nan")] * len(v))
    return (a.name, None)


def random_mutation(model: onnx.ModelProto, rng: np.random.Generator) -> Mutation:
    kind = KINDS[int(rng.integers(0, len(KINDS)))]
    graph_name = ""
    bodies = [a.name for n in model.graph.node for a in n.attribute
              if a.type == onnx.AttributeProto.GRAPH]
    if bodies and kind in ("attribute", "drop_node", "duplicate_node", "rename_op",
                           "initializer_shape", "initializer_dtype") and rng.random() < 0.6:
        graph_name = bodies[int(rng.integers(0, len(bodies)))]
    graph = _graph_of(model, Mutation(kind, graph=graph_name))
    n_nodes = len(graph.node)
    if kind == "attribute" and n_nodes:
        i = int(rng.integers(0, n_nodes))
        attrs = [a for a in graph.node[i].attribute if a.type != onnx.AttributeProto.GRAPH]
        a = attrs[int(rng.integers(0, len(attrs)))] if attrs and rng.random() < 0.9 else None
        name, value = _attr_mutation(rng, a)
        return Mutation(kind, name, value, i, graph_name)
    if kind in ("initializer_shape", "initializer_dtype") and len(graph.initializer):
        i = int(rng.integers(0, len(graph.initializer)))
        dims = list(graph.initializer[i].dims)
        if kind == "initializer_dtype":
            return Mutation(kind, i, _DTYPES[int(rng.integers(0, len(_DTYPES)))], graph=graph_name)
        options = [dims[::-1], dims + [1], dims[:-1], [0] + dims[1:], [d * 2 for d in dims],
                   [int(np.prod(dims))] if dims else [1]]
        return Mutation(kind, i, options[int(rng.integers(0, len(options)))], graph=graph_name)
    if kind in ("drop_node", "duplicate_node", "rename_op") and n_nodes:
        i = int(rng.integers(0, n_nodes))
        value = {"drop_node": None, "duplicate_node": bool(rng.random() < 0.5),
                 "rename_op": _OPS[int(rng.integers(0, len(_OPS)))]}[kind]
        return Mutation(kind, None, value, i, graph_name)
    if kind == "input_dtype":
        return Mutation(kind, None, _DTYPES[int(rng.integers(0, len(_DTYPES)))])
    if kind == "input_dim":
        rank = len(model.graph.input[0].type.tensor_type.shape.dim)
        if rank:
            axis = int(rng.integers(0, rank))
            return Mutation(kind, axis, ["N", "dyn", 0, 1, 3][int(rng.integers(0, 5))])
    if kind == "opset":
        return Mutation(kind, None, int(rng.choice([1, 5, 6, 7, 9, 11, 12, 13, 18, 21, 40])))
    if kind == "flip_bytes":
        return Mutation(kind, int(rng.integers(0, 2**31)), int(rng.integers(1, 8)))
    if kind == "truncate_file":
        return Mutation(kind, None, float(rng.choice([0.0, 0.1, 0.5, 0.9, 0.99])))
    if kind == "external_data":
        return Mutation(kind, None, str(rng.choice(["truncate", "missing", "intact"])))
    return Mutation("opset", None, 17)  # a graph without nodes or initializers: a plain opset


def case(seed: int) -> tuple[str, Mutation, str]:
    """The (source, mutation, form) of one seeded case."""
    rng = np.random.default_rng(seed)
    names = sources()
    source = names[int(rng.integers(0, len(names)))]
    mutation = random_mutation(load_source(source), rng)
    return source, mutation, FORMS[int(rng.integers(0, len(FORMS)))]


# --------------------------------------------------------------------------- running a case


def write_input(mutated, folder: Path) -> Path:
    path = folder / "in.onnx"
    if isinstance(mutated, bytes):
        path.write_bytes(mutated)
    elif isinstance(mutated, tuple):
        _, model, how = mutated
        onnx.save_model(model, str(path), save_as_external_data=True,
                        location="in.onnx.data", size_threshold=128)
        data = folder / "in.onnx.data"
        if how == "truncate" and data.exists():
            data.write_bytes(data.read_bytes()[: data.stat().st_size // 3])
        elif how == "missing" and data.exists():
            data.unlink()
    else:
        # onnx.save would refuse nothing: it serialises whatever the proto holds
        path.write_bytes(mutated.SerializeToString())
    return path


def run_case(source: str, mutation: Mutation, form: str, tmp: Path) -> None:
    """Run one case and assert the contract of the module docstring."""
    label = f"{source} {mutation.describe()} --form {form}"
    indir, outdir = tmp / "in", tmp / "out"
    indir.mkdir()
    outdir.mkdir()
    src = write_input(apply(load_source(source), mutation), indir)
    out = outdir / "o.onnx"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            code = main([str(src), str(out), "--form", form, "--max-weight-mb", MAX_WEIGHT_MB,
                         "--samples", "2", "-q"])
        except SystemExit as exc:  # argparse only: never expected here
            code = f"SystemExit({exc.code})"
    err = stderr.getvalue()
    assert "Traceback" not in err, f"{label}: traceback\n{err}"
    if code == 0:
        assert out.exists(), f"{label}: exit 0 without an output"
        ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        return
    assert code == 2, f"{label}: exit {code}\n{err}"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), f"{label}: stderr {err!r}"
    left = sorted(p.name for p in outdir.iterdir())
    assert left == [], f"{label}: left behind {left}"


# --------------------------------------------------------------------------- the tests

#: Failures the fuzz runs found (seeds of the first 1,000-case run in brackets), each kept as a
#: literal mutation: name -> (source, mutation, form). All were exit 3 before the fix.
REGRESSIONS: dict[str, tuple[str, Mutation, str]] = {
    # [3493] onnxruntime's run-time message held line breaks: the error took three lines
    "input-batch-zero-multiline-ort-message": (
        "corpus/stanleybak__cifar10_small.onnx", Mutation("input_dim", 0, 0), "im2col"),
    # [116 172 403 512 518 563 675 902] KeyError in skeleton(): tensor_bytes of dtype 0
    "initializer-dtype-undefined": (
        "corpus/emclab-sinica__HAR-CNN.onnx", Mutation("initializer_dtype", 6, 0), "auto"),
    "initializer-dtype-undefined-im2col": (
        "corpus/stanleybak__Convnet_maxpool.onnx", Mutation("initializer_dtype", 0, 0), "im2col"),
    # [182] a Conv bias of shape (8, 1) passes checker and onnxruntime's load; the output gate
    # caught the broken Add: now refused by the conv reader
    "conv-bias-2d": (
        "corpus/stanleybak__cifar_base_kw.onnx", Mutation("initializer_shape", 0, [8, 1]), "auto"),
    # [238 727] input channels that the conv weight does not take (output gate: broken MatMul)
    "input-channels-mismatch": (
        "models/lenet_maxpool.onnx", Mutation("input_dim", 1, 3), "auto"),
    # [674] an input smaller than the kernel: ValueError in the im2col reshape
    "input-smaller-than-kernel": (
        "corpus/stanleybak__Convnet_maxpool.onnx", Mutation("input_dim", 2, 1), "im2col"),
    # [473 559] a flipped byte in a string field: invalid UTF-8, UnicodeDecodeError in skeleton()
    "invalid-utf8-string": (
        "models/resblock_bn.onnx", Mutation("flip_bytes", 942827576, 6), "fold-only"),
    "invalid-utf8-string-mlp": (
        "corpus/emclab-sinica__HAR-CNN.onnx", Mutation("flip_bytes", 798360682, 3), "mlp"),
    # [second run, 573] a conv weight reshaped to 1-D: IndexError in the window reader
    "conv-weight-1d": (
        "corpus/stanleybak__cifar10_small.onnx", Mutation("initializer_shape", 8, [384]), "mlp"),
    # [third run, seeds 1050-2049: 1132] Gemm alpha=inf folded into the weights: NaN where
    # the original has 0·x (exit 1); a non-finite scale is now refused by the Gemm reader
    "gemm-alpha-inf": (
        "corpus/stanleybak__mnist-net_256x2.onnx", Mutation("attribute", "alpha", float("inf"), 5),
        "fold-only"),
    # [1146] the batch made 3 where the graph declares its output for batch 1, and [1563] a
    # spatial size the Gemm after the convs cannot take: neither runs in onnxruntime as
    # declared, which no static check sees; the output gate failed (exit 3). Now the CLI asks
    # onnxruntime to run the input before blaming itself: exit 2
    "declared-output-batch-contradicted": (
        "corpus/amandashi95__resnet20.onnx", Mutation("input_dim", 0, 3), "auto"),
    "resized-input-breaks-gemm": (
        "corpus/stanleybak__resnet_2b.onnx", Mutation("input_dim", 2, 3), "im2col"),
    # [1895] the same for a Gemm right after the input
    "resized-input-breaks-first-gemm": (
        "corpus/stanleybak__mnist-net_256x2.onnx", Mutation("input_dim", 2, 3), "im2col"),
    # [default seed 48] 0 input channels: the output gate caught a Reshape to 0 elements; the
    # input does not run in onnxruntime as declared either, so it is exit 2 (an empty input
    # as such stays legal: the Reshape allowzero conformance case has one)
    "input-dim-zero": ("models/resblock_bn.onnx", Mutation("input_dim", 1, 0), "im2col"),
    # [fourth run, 3626] a Gemm bias reshaped to (6, 1): (N, 6) + (6, 1) is valid for N = 1 and
    # N = 6; symbolic inference's auto_merge settled N = 6 and wrote (6, 1152) into the lowered
    # value_info, which onnxruntime's MatMul+Add fusion trusted: the output failed at N = 1
    # (exit 3). A merge that binds an input's symbolic dim now discards the symbolic result
    "gemm-bias-binds-dynamic-batch": (
        "corpus/emclab-sinica__HAR-CNN.onnx", Mutation("initializer_shape", 1, [6, 1]), "im2col"),
    # [fifth run, seeds 4000-4999: 4833] a pool's strides made 5: the flatten before the Gemm
    # holds 800 values, its weight takes 1152. The input gate passes it (no static check sees
    # the Gemm's K); im2col's weight-row permutation failed to reshape (exit 3). Now refused
    "gemm-k-contradicts-flatten": (
        "corpus/stanleybak__Convnet_avgpool.onnx", Mutation("attribute", "strides", [5, 5], 3),
        "im2col"),
    "gemm-k-contradicts-flatten-mlp": (
        "corpus/stanleybak__Convnet_avgpool.onnx", Mutation("attribute", "strides", [5, 5], 3),
        "mlp"),
}


@pytest.mark.parametrize("form", ["mlp", "im2col"])
def test_gemm_k_mismatch_is_an_invalid_model(form):
    """[4833] mlp used to answer "use --form im2col", im2col crashed: the model cannot run in
    any form, and both say so, naming the Gemm."""
    from onnx_lower import lower
    from onnx_lower.errors import InvalidModelError

    source, mutation, _ = REGRESSIONS["gemm-k-contradicts-flatten"]
    model = apply(load_source(source), mutation)
    with pytest.raises(InvalidModelError, match=r"node 'Gemm_5' \(Gemm\).*cannot run as declared"):
        lower(model, form=form, max_weight_mb=float(MAX_WEIGHT_MB))


@pytest.mark.parametrize("seed", range(DEFAULT_CASES))
def test_fuzz(seed, tmp_path):
    run_case(*case(seed), tmp_path)


@pytest.mark.parametrize("name", sorted(REGRESSIONS))
def test_fuzz_regression(name, tmp_path):
    run_case(*REGRESSIONS[name], tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(SLOW_START, SLOW_START + SLOW_CASES))
def test_fuzz_slow(seed, tmp_path):
    run_case(*case(seed), tmp_path)


def test_cases_are_reproducible():
    """The same seed gives the same source, mutation and form; the kinds are all reachable."""
    assert [case(s) for s in range(5)] == [case(s) for s in range(5)]
    kinds = {case(s)[1].kind for s in range(200)}
    assert kinds == set(KINDS), set(KINDS) - kinds
