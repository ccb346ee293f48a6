"""Shared helpers of the im2col-form tests (passes/im2col/) against onnxruntime.

Every lowered model must validate against the original (rtol = atol = 1e-4, on batch 1 and on a
batch of several samples when the batch is dynamic), contain no Conv, pool or
BatchNormalization, and use only the im2col ops plus elementwise ops the original already had.
Inputs are drawn from [-1, 1) so that max pooling over padding (which is -inf, never 0) is
exercised. One test module per family of the package: layout, conv, pools, elementwise,
networks.
"""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx
from hypothesis import HealthCheck, settings
from onnx import TensorProto, helper, numpy_helper

import onnx_lower
from onnx_lower.passes.im2col import ALLOWED_OPS, ELEMENTWISE_BINARY, ELEMENTWISE_UNARY, LOWERED_OPS
from onnx_lower.validate import validate

__all__ = ["CORPUS", "CORPUS_DIR", "HYP", "KEPT", "REPO", "SAMPLES", "check", "make_model",
           "ops_of", "rand"]

REPO = Path(__file__).resolve().parents[2]
SAMPLES = sorted((REPO / "models").glob("*.onnx"))
CORPUS_DIR = Path(__file__).resolve().parents[3] / "shared" / "corpus"
CORPUS = sorted(CORPUS_DIR.glob("*.onnx")) if CORPUS_DIR.is_dir() else []
KEPT = ELEMENTWISE_UNARY | ELEMENTWISE_BINARY | {"Softmax", "LogSoftmax"}
HYP = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
RNG = np.random.default_rng(0)


def make_model(nodes, x_shape, inits=(), *, out_name="y", opset=17, x_name="x"):
    graph = helper.make_graph(
        nodes, "t", [helper.make_tensor_value_info(x_name, TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(np.asarray(v, dtype=np.float32), k)
                     if np.asarray(v).dtype.kind == "f" else numpy_helper.from_array(v, k)
                     for k, v in dict(inits).items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    model.graph.output[0].CopyFrom(inferred.graph.output[0])
    return model


def ops_of(model: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph.node)


def check(model: onnx.ModelProto, *, batches=(1,), input_range=(-1.0, 1.0)) -> onnx.ModelProto:
    """Lower ``model`` to im2col, check its ops and validate it against onnxruntime."""
    lowered, _ = onnx_lower.lower(model, form="im2col")
    ops = ops_of(lowered)
    assert not set(ops) & LOWERED_OPS, ops
    extra = set(ops) - ALLOWED_OPS
    assert extra <= set(ops_of(model)) & KEPT, f"unexpected ops {extra}"
    assert [o.name for o in lowered.graph.output] == [o.name for o in model.graph.output]
    for batch in batches:
        report = validate(model, lowered, rtol=1e-4, atol=1e-4, batch=batch, samples=2,
                          input_range=input_range)
        assert report.passed, "\n".join(report.summary_lines())
    return lowered


def rand(*shape, scale=1.0):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)
