"""Conv / ConvTranspose matrices (onnx_lower.passes.conv) against two independent oracles.

Oracle 1: basis probing through onnxruntime (tests.oracles.probe_matrix) on random
configurations (hypothesis): 1D/2D/3D, strides, dilations, groups (incl. depthwise), asymmetric
pads, every auto_pad mode, output_padding and output_shape. Where onnxruntime rejects a node, the
functions must raise ValueError, and vice versa. Biases are checked end to end on random inputs.

Oracle 2: the ONNX backend node test cases of Conv and ConvTranspose, with their expected outputs.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import event, given, settings
from hypothesis import strategies as st
from onnx import helper
from onnx.reference import ReferenceEvaluator

from onnx_lower.passes.conv import (
    conv_matrix,
    conv_nnz,
    conv_transpose_matrix,
    conv_transpose_nnz,
)
from tests.oracles import probe_matrix, run_op, single_op_model

AUTO_PADS = ["NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"]
SETTINGS = settings(max_examples=40, deadline=None)  # per parametrized case


# --- helpers -------------------------------------------------------------------------------------


def _ort(fn, *args, **kwargs):
    """``(result, None)`` or ``(None, error)`` of an onnxruntime call."""
    try:
        return fn(*args, **kwargs), None
    except Exception as exc:  # onnxruntime raises its own pybind exception types
        return None, exc


def _reference_probe(op_type, in_shape, params, **attrs):
    """Basis probing through the ONNX reference evaluator (float64), for nodes ORT refuses."""
    n = math.prod(in_shape)
    basis = np.concatenate([np.zeros((1, n)), np.eye(n)]).reshape(n + 1, *in_shape)
    model = single_op_model(op_type, ["N", *in_shape], params, dtype=np.float64, **attrs)
    y = ReferenceEvaluator(model).run(None, {"x": basis})[0]
    flat = y.reshape(n + 1, -1)
    return (flat[1:] - flat[0]).T, flat[0], tuple(y.shape[1:])


def _mode(attrs) -> str:
    mode = attrs.get("auto_pad", "NOTSET")
    return mode + (" + output_shape" if "output_shape" in attrs else "")


def _ours(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs), None
    except ValueError as exc:
        return None, exc


def _check_structure(a: sp.csr_matrix, out_shape, in_shape) -> None:
    assert isinstance(a, sp.csr_matrix)
    assert a.dtype == np.float64
    assert a.shape == (math.prod(out_shape), math.prod(in_shape))
    assert a.indices.dtype == np.int32 and a.indptr.dtype == np.int32
    assert a.has_sorted_indices
    rows = np.repeat(np.arange(a.shape[0]), np.diff(a.indptr))
    # Sorted and duplicate free within each row: (row, col) strictly increasing lexicographically.
    key = rows.astype(np.int64) * a.shape[1] + a.indices
    assert np.all(np.diff(key) > 0)


def _assert_matrix_close(a: sp.csr_matrix, probe: np.ndarray) -> None:
    dense = a.toarray()
    scale = max(1.0, float(np.abs(probe).max(initial=0.0)))
    np.testing.assert_allclose(dense, probe, rtol=1e-6, atol=1e-6 * scale)


def _assert_bias_end_to_end(op_type, in_shape, weight, bias, a, c, attrs, rng) -> None:
    """ORT with bias on random inputs equals ``A x + c`` (float32 ORT, so loose tolerance)."""
    x = rng.standard_normal((2, *in_shape)).astype(np.float32)
    y = run_op(op_type, x, [weight, bias], **attrs)
    ours = (a @ x.reshape(2, -1).astype(np.float64).T).T + c
    scale = float(np.abs(ours).max(initial=1.0))
    np.testing.assert_allclose(ours, y.reshape(2, -1), rtol=1e-5, atol=1e-5 * scale)


@st.composite
def channels(draw):
    """``(C_in, C_out, group)`` with at most 4 channels each, depthwise in about 1/3 of cases."""
    if draw(st.integers(0, 2)) == 0:
        c = draw(st.integers(1, 4))
        mult = draw(st.integers(1, max(1, 4 // c)))
        return c, c * mult, c
    group = draw(st.integers(1, 2))
    return group * draw(st.integers(1, 2)), group * draw(st.integers(1, 2)), group


@st.composite
def geometry(draw, rank=None):
    r = draw(st.integers(1, 3)) if rank is None else rank
    max_n, max_k = (7, 4) if r < 3 else (4, 3)
    spatial = tuple(draw(st.integers(1, max_n)) for _ in range(r))
    kernel = tuple(draw(st.integers(1, max_k)) for _ in range(r))
    strides = [draw(st.integers(1, 3)) for _ in range(r)]
    dilations = [draw(st.integers(1, 2)) for _ in range(r)]
    pads = [draw(st.integers(0, 2)) for _ in range(2 * r)]
    return spatial, kernel, strides, dilations, pads


@st.composite
def conv_configs(draw, rank=None, auto_pad=None):
    spatial, kernel, strides, dilations, pads = draw(geometry(rank))
    c, m, group = draw(channels())
    if auto_pad is None:
        auto_pad = draw(st.sampled_from(AUTO_PADS))
    attrs = {"strides": strides, "dilations": dilations, "group": group}
    if auto_pad == "NOTSET":
        attrs["pads"] = pads
    else:
        attrs["auto_pad"] = auto_pad
    return (c, *spatial), (m, c // group, *kernel), attrs


@st.composite
def conv_transpose_configs(draw, rank=None, mode=None):
    spatial, kernel, strides, dilations, pads = draw(geometry(rank))
    c, m, group = draw(channels())
    r = len(spatial)
    out_pad = [draw(st.integers(0, max(s, d) - 1)) for s, d in zip(strides, dilations, strict=True)]
    attrs = {"strides": strides, "dilations": dilations, "group": group}
    if any(out_pad) or draw(st.booleans()):
        attrs["output_padding"] = out_pad
    if mode is None:
        mode = draw(st.sampled_from([*AUTO_PADS, "output_shape"]))
    if mode == "NOTSET":
        attrs["pads"] = pads
    elif mode == "output_shape":
        full = [
            s * (n - 1) + a + (k - 1) * d + 1
            for n, k, s, d, a in zip(spatial, kernel, strides, dilations, out_pad, strict=True)
        ]
        attrs["output_shape"] = [f - draw(st.integers(-1, 3)) for f in full]
        auto_pad = draw(st.sampled_from(AUTO_PADS))
        if auto_pad != "NOTSET":
            attrs["auto_pad"] = auto_pad
    else:
        attrs["auto_pad"] = mode
    assert len(attrs["strides"]) == r
    return (c, *spatial), (c, m // group, *kernel), attrs


# --- oracle 1: basis probing ---------------------------------------------------------------------


@pytest.mark.parametrize("auto_pad", AUTO_PADS)
@pytest.mark.parametrize("rank", [1, 2, 3])
@SETTINGS
@given(data=st.data(), seed=st.integers(0, 2**32 - 1))
def test_conv_matches_onnxruntime(rank, auto_pad, data, seed):
    in_shape, w_shape, attrs = data.draw(conv_configs(rank, auto_pad), label="config")
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal(w_shape).astype(np.float32)
    probe, ort_err = _ort(probe_matrix, "Conv", in_shape, [weight], **attrs)
    ort_refuses = ort_err is not None and "Dilation not supported for AutoPadType" in str(ort_err)
    if ort_refuses:
        # onnxruntime has no SAME_* auto_pad with dilation; the spec defines it (pads from the
        # dilated kernel extent), and the ONNX reference evaluator implements it.
        probe, ort_err = _ort(_reference_probe, "Conv", in_shape, [weight], **attrs)
    _check_against_probe("Conv", conv_matrix, conv_nnz, in_shape, weight, attrs, probe, ort_err,
                         rng, end_to_end=not ort_refuses)


def _check_against_probe(op, matrix, nnz, in_shape, weight, attrs, probe, ort_err, rng, *,
                         end_to_end=True):
    """Our ``matrix(...)`` against onnxruntime's basis-probed one: both reject or both agree
    on the matrix, its structure and nnz (``nnz`` without building it), and the bias."""
    ours, our_err = _ours(matrix, in_shape, weight, **attrs)
    if ort_err is not None or our_err is not None:
        assert ort_err is not None and our_err is not None, (ort_err, our_err)
        event("both reject")
        with pytest.raises(ValueError):
            nnz(in_shape, weight.shape, **attrs)
        return
    event(f"valid, rank {len(in_shape) - 1}, {_mode(attrs)}")
    a, c, out_shape = ours
    p, p_bias, p_shape = probe
    assert c is None and not p_bias.any()
    assert out_shape == p_shape
    _check_structure(a, out_shape, in_shape)
    _assert_matrix_close(a, p)
    assert a.nnz == nnz(in_shape, weight.shape, **attrs)

    bias = rng.standard_normal(out_shape[0]).astype(np.float32)
    a2, c2, _ = matrix(in_shape, weight, bias, **attrs)
    assert (a2 != a).nnz == 0
    np.testing.assert_array_equal(c2, np.repeat(bias.astype(np.float64), math.prod(out_shape[1:])))
    if end_to_end:
        _assert_bias_end_to_end(op, in_shape, weight, bias, a2, c2, attrs, rng)


@pytest.mark.parametrize("mode", [*AUTO_PADS, "output_shape"])
@pytest.mark.parametrize("rank", [1, 2, 3])
@SETTINGS
@given(data=st.data(), seed=st.integers(0, 2**32 - 1))
def test_conv_transpose_matches_onnxruntime(rank, mode, data, seed):
    in_shape, w_shape, attrs = data.draw(conv_transpose_configs(rank, mode), label="config")
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal(w_shape).astype(np.float32)
    probe, ort_err = _ort(probe_matrix, "ConvTranspose", in_shape, [weight], **attrs)
    _check_against_probe("ConvTranspose", conv_transpose_matrix, conv_transpose_nnz, in_shape,
                         weight, attrs, probe, ort_err, rng)


@settings(max_examples=40, deadline=None)
@given(config=conv_configs())
def test_conv_transpose_is_transpose_of_conv(config):
    """ConvTranspose(W) with the Conv's pads, sized back to the Conv input, is Conv(W)^T."""
    in_shape, w_shape, attrs = config
    weight = np.random.default_rng(0).standard_normal(w_shape)
    ours, err = _ours(conv_matrix, in_shape, weight, **attrs)
    if err is not None or "auto_pad" in attrs:  # ConvTranspose's auto_pad means something else
        return
    a, _, out_shape = ours
    kernel, pads = w_shape[2:], attrs["pads"]
    r = len(kernel)
    natural = [
        s * (o - 1) + (k - 1) * d + 1 - pads[i] - pads[r + i]
        for i, (o, k, s, d) in enumerate(
            zip(out_shape[1:], kernel, attrs["strides"], attrs["dilations"], strict=True)
        )
    ]
    out_pad = [n - f for n, f in zip(in_shape[1:], natural, strict=True)]
    if not all(0 <= p < s for p, s in zip(out_pad, attrs["strides"], strict=True)):
        return  # the Conv drops trailing input that no ConvTranspose of its output can reach
    t, _, t_shape = conv_transpose_matrix(out_shape, weight, **attrs, output_padding=out_pad)
    assert t_shape == tuple(in_shape)
    assert (t != a.T.tocsr()).nnz == 0


# --- explicit cases -------------------------------------------------------------------------------


def test_explicit_zero_weights_are_kept():
    weight = np.zeros((2, 3, 3, 3), np.float32)
    weight[0, 0, 1, 1] = 1.0
    a, _, _ = conv_matrix((3, 5, 5), weight, pads=[1, 1, 1, 1])
    assert a.nnz == conv_nnz((3, 5, 5), weight.shape, pads=[1, 1, 1, 1])
    # per axis: 5 windows x 3 taps, minus the 2 that read padding; M x C/group = 2 x 3
    assert a.nnz == 2 * 3 * 13**2
    assert np.count_nonzero(a.data) == 25


def test_float32_weights_are_composed_in_float64():
    weight = np.full((1, 1, 2), 0.1, np.float32)
    a, c, _ = conv_matrix((1, 3), weight, np.array([0.1], np.float32))
    assert a.dtype == np.float64 and c.dtype == np.float64
    assert np.all(a.data == np.float64(np.float32(0.1)))


def test_default_attributes_follow_the_spec():
    weight = np.arange(1.0, 5.0).reshape(1, 1, 2, 2)
    a, _, out_shape = conv_matrix((1, 3, 3), weight)
    assert out_shape == (1, 2, 2)
    x = np.arange(9.0).reshape(3, 3)
    expected = [(x[i : i + 2, j : j + 2] * weight[0, 0]).sum() for i in range(2) for j in range(2)]
    np.testing.assert_allclose(a @ x.ravel(), expected)
    t, _, t_shape = conv_transpose_matrix((1, 2, 2), weight)
    assert t_shape == (1, 3, 3)
    assert (t != a.T.tocsr()).nnz == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"in_shape": (3, 5), "weight": np.ones((2, 2, 3))}, "input channels 3"),
        ({"in_shape": (4, 5), "weight": np.ones((3, 2, 3)), "group": 2}, "not divisible"),
        ({"in_shape": (4, 5), "weight": np.ones((2, 2, 3)), "group": 0}, "group must be"),
        ({"in_shape": (2, 5, 5), "weight": np.ones((2, 2, 3))}, "spatial axes"),
        ({"in_shape": (5,), "weight": np.ones((2, 5))}, "spatial axis"),
        ({"in_shape": (2, 5), "weight": np.ones((2, 2, 3)), "bias": np.ones(3)}, "bias"),
        ({"in_shape": (2, 5), "weight": np.ones((2, 2, 3)), "auto_pad": "SAME"}, "auto_pad"),
        ({"in_shape": (2, 5), "weight": np.ones((2, 2, 3)), "kernel_shape": [2]}, "kernel_shape"),
        ({"in_shape": (2, 5), "weight": np.ones((2, 2, 3)), "strides": [1, 1]}, "strides"),
        ({"in_shape": (2, 5), "weight": np.ones((2, 2, 3)), "strides": [0]}, "strides"),
        ({"in_shape": (2, 5), "weight": np.ones((2, 2, 3)), "pads": [1, 1, 1]}, "pads"),
        ({"in_shape": (2, 5), "weight": np.ones((2, 2, 3)), "pads": [-1, 0]}, "pads"),
        ({"in_shape": (2, 2), "weight": np.ones((2, 2, 3))}, "empty"),
    ],
)
def test_conv_errors(kwargs, match):
    kwargs = dict(kwargs)
    in_shape, weight = kwargs.pop("in_shape"), kwargs.pop("weight")
    bias = kwargs.pop("bias", None)
    with pytest.raises(ValueError, match=match):
        conv_matrix(in_shape, weight, bias, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"in_shape": (3, 5), "weight": np.ones((2, 2, 3))}, "input channels 3"),
        ({"in_shape": (3, 5), "weight": np.ones((3, 2, 3)), "group": 2}, "not divisible"),
        ({"in_shape": (2, 5), "weight": np.ones((2, 2, 3)), "output_padding": [1]}, "output_pad"),
        ({"in_shape": (2, 5), "weight": np.ones((2, 2, 3)), "output_shape": [7, 7]}, "output_sh"),
        ({"in_shape": (2, 5), "weight": np.ones((2, 2, 3)), "output_shape": [9]}, "inconsistent"),
        ({"in_shape": (2, 5), "weight": np.ones((2, 2, 3)), "bias": np.ones(3)}, "bias"),
        ({"in_shape": (2, 2), "weight": np.ones((2, 2, 3)), "pads": [2, 2]}, "empty"),
    ],
)
def test_conv_transpose_errors(kwargs, match):
    kwargs = dict(kwargs)
    in_shape, weight = kwargs.pop("in_shape"), kwargs.pop("weight")
    bias = kwargs.pop("bias", None)
    with pytest.raises(ValueError, match=match):
        conv_transpose_matrix(in_shape, weight, bias, **kwargs)


# --- oracle 2: ONNX backend node tests -----------------------------------------------------------

_OPS = ("Conv", "ConvTranspose")


def _single_op(case) -> str | None:
    nodes = case.model.graph.node
    return nodes[0].op_type if len(nodes) == 1 else None


def _backend_cases() -> list:
    """The backend node cases of Conv and ConvTranspose.

    ``collect_testcases`` keeps its cases in a process-wide list, filled once by the first call;
    if an earlier call filtered it to another op type, re-run the two exporters directly.
    """
    from onnx.backend.test.case import node as node_cases

    cases = [c for c in node_cases.collect_testcases(None) if _single_op(c) in _OPS]
    if not cases:
        from onnx.backend.test.case.node.conv import Conv
        from onnx.backend.test.case.node.convtranspose import ConvTranspose

        saved = node_cases._TargetOpType, len(node_cases._NodeTestCases)
        try:
            for cls in (Conv, ConvTranspose):
                node_cases._TargetOpType = cls.__name__
                for name in dir(cls):
                    if name.startswith("export"):
                        getattr(cls, name)()
            new = node_cases._NodeTestCases[saved[1] :]
            cases = [c for c in new if _single_op(c) in _OPS]
        finally:
            node_cases._TargetOpType = saved[0]
            del node_cases._NodeTestCases[saved[1] :]
    return sorted(cases, key=lambda c: c.name)


_CASES = {c.name: c for c in _backend_cases()}


def test_backend_cases_were_found():
    assert sum(_single_op(c) == "Conv" for c in _CASES.values()) >= 6
    assert sum(_single_op(c) == "ConvTranspose" for c in _CASES.values()) >= 11


@pytest.mark.parametrize("name", sorted(_CASES))
def test_onnx_backend_case(name):
    case = _CASES[name]
    node = case.model.graph.node[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    for inputs, outputs in case.data_sets:
        inputs = [np.asarray(v) for v in inputs]
        if any(v.dtype.kind != "f" for v in inputs):
            pytest.skip(f"non-float inputs {[v.dtype for v in inputs]}")
        x, weight, *rest = inputs
        bias = rest[0] if rest else None
        fn = conv_matrix if node.op_type == "Conv" else conv_transpose_matrix
        a, c, out_shape = fn(x.shape[1:], weight, bias, **attrs)
        expected = np.asarray(outputs[0])
        assert expected.shape == (x.shape[0], *out_shape)
        y = (a @ x.reshape(x.shape[0], -1).astype(np.float64).T).T
        if c is not None:
            y = y + c
        np.testing.assert_allclose(y, expected.reshape(x.shape[0], -1), rtol=1e-5, atol=1e-5)
