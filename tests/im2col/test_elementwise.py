"""im2col elementwise and dense ops (passes/im2col/elementwise.py, fold.py)."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from onnx_lower.passes.im2col.elementwise import _cl_rows
from tests.im2col import check, make_model, ops_of, rand


def _bn_inits(prefix, c):
    return {f"{prefix}s": rand(c), f"{prefix}b": rand(c), f"{prefix}m": rand(c),
            f"{prefix}v": np.abs(rand(c)) + 0.5}


def _bn(x, y, prefix):
    return helper.make_node("BatchNormalization", [x, f"{prefix}s", f"{prefix}b", f"{prefix}m",
                                                   f"{prefix}v"], [y], epsilon=1e-3)


def test_batchnorm_after_conv_folds_into_the_matmul():
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             _bn("c", "y", "bn")]
    lowered = check(make_model(nodes, ["N", 3, 6, 6], {"w": rand(5, 3, 3, 3),
                                                       **_bn_inits("bn", 5)}), batches=(1, 2))
    assert ops_of(lowered)["Mul"] == 0  # folded, no separate scale


def test_standalone_batchnorm_and_constant_affines():
    nodes = [_bn("x", "a", "bn"),
             helper.make_node("Conv", ["a", "w"], ["c"], kernel_shape=[1, 1]),
             helper.make_node("Mul", ["c", "k"], ["d"]),
             helper.make_node("Sub", ["d", "z"], ["y"])]
    inits = {"w": rand(5, 3, 1, 1), "k": rand(5, 1, 1), "z": rand(1, 5, 1, 1),
             **_bn_inits("bn", 3)}
    check(make_model(nodes, ["N", 3, 4, 5], inits), batches=(1, 2))


def test_residual_add_concat_and_flatten_gemm():
    """conv→relu→conv + skip, concat on channels, flatten → Gemm (weights rows permuted)."""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], kernel_shape=[3, 3],
                         pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "x"], ["s"]),
        helper.make_node("Relu", ["s"], ["r2"]),
        helper.make_node("Conv", ["r2", "w3"], ["c3"], kernel_shape=[1, 1]),
        helper.make_node("Concat", ["r2", "c3"], ["cat"], axis=1),
        helper.make_node("MaxPool", ["cat"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fc", "fcb"], ["y"], transB=1, alpha=0.5),
    ]
    inits = {"w1": rand(4, 4, 3, 3), "b1": rand(4), "w2": rand(4, 4, 3, 3), "w3": rand(2, 4, 1, 1),
             "fc": rand(10, 6 * 3 * 3), "fcb": rand(10)}
    lowered = check(make_model(nodes, ["N", 4, 6, 6], inits), batches=(1, 3))
    ops = ops_of(lowered)
    assert ops["Transpose"] == 1  # only at the entry: no layout change before the classifier
    assert ops["Concat"] == 1


def test_reshape_then_matmul_classifier():
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3]),
             helper.make_node("Reshape", ["c", "shape"], ["f"]),
             helper.make_node("MatMul", ["f", "fc"], ["y"])]
    inits = {"w": rand(3, 2, 3, 3), "shape": np.array([-1, 3 * 4 * 4], np.int64),
             "fc": rand(48, 5)}
    lowered = check(make_model(nodes, ["N", 2, 6, 6], inits), batches=(1, 2))
    assert ops_of(lowered)["Transpose"] == 1


@pytest.mark.parametrize("n,c,s", [(7, 3, 5), (300, 70, 9), (5, 40, 1), (129, 33, 2)])
@pytest.mark.parametrize("trans", [False, True])
def test_cl_rows_reorders_classifier_rows(n, c, s, trans):
    """``_cl_rows``: rows ``c·S + s`` of the (transposed) weight become rows ``s·C + c``."""
    rng = np.random.default_rng(n)
    b = rng.standard_normal((n, c * s) if trans else (c * s, n)).astype(np.float32)
    dense = b.T if trans else b
    want = dense.reshape(c, s, n).transpose(1, 0, 2).reshape(c * s, n)
    got = _cl_rows(b, (c, s), trans)
    assert got.flags.c_contiguous and np.array_equal(got, want)
    assert np.array_equal(_cl_rows(b, None, trans), dense)
