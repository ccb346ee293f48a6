"""Independent oracles for the tests: onnxruntime on single ops, and basis probing; and the check
of which ops a lowered model may hold (:func:`check_ops`).

Basis probing recovers the matrix of a linear map f by running onnxruntime on the unit vectors:
column j of A is f(e_j) - f(0), and f(0) is the bias. The batch of unit vectors runs in one call.
onnxruntime has no float64 Conv kernel, so probing runs in float32: on a unit vector every output
is a single weight times 1.0 plus zeros, which float32 computes exactly; only the bias subtraction
``(w + b) - b`` rounds. Pass bias-free parameters for an exact matrix.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnx_lower.passes.activations import KEPT_ELEMENTWISE
from onnx_lower.passes.im2col import ALLOWED_OPS, LOWERED_OPS

__all__ = ["single_op_model", "run_model", "run_op", "probe_matrix", "check_ops", "MLP_OPS",
           "REPO_ROOT", "CORPUS"]

REPO_ROOT = Path(__file__).resolve().parents[1]
#: the real-model corpus: read in place, never committed; tests skip where it is absent
CORPUS = REPO_ROOT.parent / "shared" / "corpus"

#: The ops of the mlp form, besides the kept elementwise ops of the original.
MLP_OPS = frozenset({"Flatten", "Reshape", "MatMul", "Add", "Relu"})

_DTYPES = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float64): TensorProto.DOUBLE}


def single_op_model(
    op_type: str,
    in_shape: Sequence[int | str],
    params: Sequence[np.ndarray] = (),
    *,
    dtype=np.float64,
    n_outputs: int = 1,
    opset: int = 19,
    **attrs,
) -> onnx.ModelProto:
    """A model with one node ``op_type(x, *params)``; ``params`` become initializers.

    A ``None`` entry in ``params`` becomes an omitted optional input ("").
    """
    elem = _DTYPES[np.dtype(dtype)]
    inits, names = [], ["x"]
    for i, p in enumerate(params):
        if p is None:
            names.append("")
            continue
        name = f"p{i}"
        p = np.asarray(p)
        if p.dtype.kind == "f":
            p = p.astype(dtype)
        inits.append(numpy_helper.from_array(p, name))
        names.append(name)
    outs = [f"y{i}" for i in range(n_outputs)]
    node = helper.make_node(op_type, names, outs, **attrs)
    graph = helper.make_graph(
        [node],
        "probe",
        [helper.make_tensor_value_info("x", elem, list(in_shape))],
        [helper.make_tensor_value_info(o, elem, None) for o in outs],
        initializer=inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def run_model(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def run_op(op_type: str, x: np.ndarray, params: Sequence[np.ndarray] = (), **attrs) -> np.ndarray:
    """Run one ONNX op in onnxruntime on ``x`` (batch first) and return its first output."""
    model = single_op_model(op_type, ["N", *x.shape[1:]], params, dtype=x.dtype, **attrs)
    return run_model(model, {"x": x})[0]


def probe_matrix(
    op_type: str,
    in_shape: Sequence[int],
    params: Sequence[np.ndarray] = (),
    dtype=np.float32,
    **attrs,
) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """Recover ``(A, c, out_shape)`` of a linear single-op map by running it on unit vectors.

    ``in_shape`` is the per-sample shape (no batch). ``A`` has shape (out_size, in_size), so
    ``y.ravel() = A @ x.ravel() + c``.
    """
    n = math.prod(in_shape)
    basis = np.concatenate([np.zeros((1, n)), np.eye(n)]).reshape(n + 1, *in_shape).astype(dtype)
    y = run_op(op_type, basis, params, **attrs)
    flat = y.reshape(n + 1, -1)
    c = flat[0]
    return (flat[1:] - c).T.astype(np.float64), c.astype(np.float64), tuple(y.shape[1:])


def check_ops(original: onnx.ModelProto, lowered: onnx.ModelProto, form: str) -> None:
    """The lowered model has only its form's ops, plus ops of the original it may keep."""
    ops = {n.op_type for n in lowered.graph.node}
    kept = {n.op_type for n in original.graph.node}
    if form == "mlp":
        allowed = MLP_OPS | (KEPT_ELEMENTWISE & kept)
        assert ops <= allowed, f"mlp form left {sorted(ops - allowed)}"
    else:
        assert not ops & LOWERED_OPS, f"im2col form left {sorted(ops & LOWERED_OPS)}"
        extra = ops - ALLOWED_OPS - kept
        assert not extra, f"im2col form introduced {sorted(extra)}"
