"""passes/pool.py against onnxruntime and the ONNX backend node tests.

AveragePool matrices are compared entry by entry with the matrix probed from onnxruntime;
MaxPool plans (every one of MAX_POOL_PLANS) are evaluated in numpy and compared with
onnxruntime's MaxPool; the plan ``auto`` picks never spends more ReLUs than the per-window
tournament, and fewer for 3×3 pools of stride 1 and 2.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper

from onnx_lower.passes.pool import (
    MAX_POOL_PLANS,
    Tournament,
    avg_pool_matrix,
    global_pool_kernel,
    max_pool_taps,
    max_pool_tournament,
    pool_windows,
    run_tournament,
)
from onnx_lower.passes.pool_max import max_pool_relu_counts
from tests.oracles import probe_matrix, run_op

AUTO_PADS = ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER")
HYP = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- strategies -----------------------------------------------------------------------------


@st.composite
def pool_configs(draw, *, max_extent: int = 7):
    """A pool over (C, *spatial): kernel 1-4, stride 1-3, dilation 1-2, pads < kernel, modes.

    Input extents are chosen so that at least one window exists for the drawn auto_pad.
    """
    rank = draw(st.integers(1, 3))
    kernel = tuple(draw(st.integers(1, 4)) for _ in range(rank))
    strides = tuple(draw(st.integers(1, 3)) for _ in range(rank))
    dilations = tuple(draw(st.integers(1, 2)) for _ in range(rank))
    begins = [draw(st.integers(0, k - 1)) for k in kernel]
    ends = [draw(st.integers(0, k - 1)) for k in kernel]
    auto_pad = draw(st.sampled_from(AUTO_PADS))
    ceil_mode = draw(st.booleans())
    spatial = []
    for i in range(rank):
        dk = (kernel[i] - 1) * dilations[i] + 1
        lo = dk if auto_pad == "VALID" else max(1, dk - begins[i] - ends[i])
        if auto_pad.startswith("SAME"):
            lo = 1
        hi = max(lo, max_extent if rank < 3 else 5)
        spatial.append(draw(st.integers(lo, hi)))
    channels = draw(st.integers(1, 2))
    pads = tuple(begins + ends) if auto_pad == "NOTSET" else None
    return {
        "in_shape": (channels, *spatial),
        "kernel": kernel,
        "strides": strides,
        "pads": pads,
        "dilations": dilations,
        "ceil_mode": ceil_mode,
        "auto_pad": auto_pad,
    }


def onnx_attrs(cfg: dict, **extra) -> dict:
    """ONNX node attributes for a config from :func:`pool_configs`."""
    attrs = {"kernel_shape": list(cfg["kernel"]), "ceil_mode": int(cfg["ceil_mode"])}
    for key in ("strides", "pads", "dilations"):
        if cfg.get(key) is not None:
            attrs[key] = list(cfg[key])
    if cfg.get("auto_pad", "NOTSET") != "NOTSET":
        attrs["auto_pad"] = cfg["auto_pad"]
    attrs.update(extra)
    return attrs


def fn_kwargs(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k not in ("in_shape", "kernel")}


def same_with_dilation(cfg: dict) -> bool:
    """auto_pad SAME_* with a dilation > 1: ORT and the spec disagree, the pool functions refuse."""
    return cfg["auto_pad"].startswith("SAME") and any(d > 1 for d in cfg["dilations"])


def has_empty_window(cfg: dict) -> bool:
    """A window without any in-bounds tap (only possible with dilations)."""
    win, _ = pool_windows(cfg["in_shape"], cfg["kernel"], **fn_kwargs(cfg))
    return bool((~win.valid.any(axis=1)).any())


# --- AveragePool ------------------------------------------------------------------------------


@HYP
@given(cfg=pool_configs(), count_include_pad=st.booleans())
def test_avg_pool_matrix_matches_ort_probe(cfg, count_include_pad):
    if same_with_dilation(cfg):
        with pytest.raises(ValueError, match="undilated"):
            avg_pool_matrix(cfg["in_shape"], cfg["kernel"], **fn_kwargs(cfg))
        return
    a, out_shape = avg_pool_matrix(
        cfg["in_shape"], cfg["kernel"], count_include_pad=count_include_pad, **fn_kwargs(cfg)
    )
    expected, bias, ort_shape = probe_matrix(
        "AveragePool",
        cfg["in_shape"],
        **onnx_attrs(cfg, count_include_pad=int(count_include_pad)),
    )
    assert out_shape == ort_shape
    assert isinstance(a, sp.csr_matrix) and a.dtype == np.float64
    assert a.shape == expected.shape
    np.testing.assert_array_equal(bias, 0.0)
    np.testing.assert_allclose(a.toarray(), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("count_include_pad", [False, True])
def test_avg_pool_window_with_single_valid_tap(count_include_pad):
    # kernel 3, pads (2, 2): the first and last windows hold one input element and two pads.
    cfg = {"in_shape": (1, 4), "kernel": (3,), "pads": (2, 2)}
    a, _ = avg_pool_matrix(**cfg, count_include_pad=count_include_pad)
    expected, _, _ = probe_matrix(
        "AveragePool",
        (1, 4),
        kernel_shape=[3],
        pads=[2, 2],
        count_include_pad=int(count_include_pad),
    )
    np.testing.assert_allclose(a.toarray(), expected, rtol=1e-6)
    assert a[0, 0] == pytest.approx(1 / 3 if count_include_pad else 1.0)


@pytest.mark.parametrize("count_include_pad", [False, True])
def test_avg_pool_ceil_overhang_not_counted(count_include_pad):
    # n=6, k=3, s=2, ceil_mode: the last window [4, 7) overhangs the (unpadded) input by 1.
    a, out_shape = avg_pool_matrix(
        (1, 6), (3,), strides=(2,), ceil_mode=True, count_include_pad=count_include_pad
    )
    expected, _, ort_shape = probe_matrix(
        "AveragePool",
        (1, 6),
        kernel_shape=[3],
        strides=[2],
        ceil_mode=1,
        count_include_pad=int(count_include_pad),
    )
    assert out_shape == ort_shape == (1, 3)
    np.testing.assert_allclose(a.toarray(), expected, rtol=1e-6)
    # divisor 2 either way: the overhang lies outside the padded input and is never counted
    assert a[2, 4] == a[2, 5] == 0.5


@pytest.mark.parametrize("count_include_pad,divisor", [(False, 1), (True, 2)])
def test_avg_pool_ceil_overhang_past_end_pad(count_include_pad, divisor):
    # n=5, k=3, s=2, pads (0, 1), ceil_mode: the last window reads 4 (input), 5 (end pad, inside
    # the padded input) and 6 (past the padded input, never counted).
    a, out_shape = avg_pool_matrix(
        (1, 5),
        (3,),
        strides=(2,),
        pads=(0, 1),
        ceil_mode=True,
        count_include_pad=count_include_pad,
    )
    expected, _, ort_shape = probe_matrix(
        "AveragePool",
        (1, 5),
        kernel_shape=[3],
        strides=[2],
        pads=[0, 1],
        ceil_mode=1,
        count_include_pad=int(count_include_pad),
    )
    assert out_shape == ort_shape == (1, 3)
    np.testing.assert_allclose(a.toarray(), expected, rtol=1e-6)
    assert a[2, 4] == 1 / divisor


@pytest.mark.parametrize("count_include_pad", [False, True])
def test_avg_pool_all_padding_window_is_zero(count_include_pad):
    # kernel 2, dilation 2, pads (1, 1) over one element: taps -1 and 1 are both padding.
    a, out_shape = avg_pool_matrix(
        (2, 1), (2,), pads=(1, 1), dilations=(2,), count_include_pad=count_include_pad
    )
    expected, _, ort_shape = probe_matrix(
        "AveragePool",
        (2, 1),
        kernel_shape=[2],
        pads=[1, 1],
        dilations=[2],
        count_include_pad=int(count_include_pad),
    )
    assert out_shape == ort_shape == (2, 1)
    assert a.nnz == 0
    np.testing.assert_array_equal(expected, 0.0)


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER"])
@pytest.mark.parametrize("n,k,s", [(8, 2, 4), (9, 2, 5), (3, 1, 3), (10, 1, 4), (11, 2, 6)])
def test_same_with_negative_total_pad(auto_pad, n, k, s):
    # (ceil(n/s) - 1)·s + k - n < 0: the windows shift into the input (ORT AveragePool's rule).
    cfg = {
        "in_shape": (2, n, 4),
        "kernel": (k, 2),
        "strides": (s, 2),
        "auto_pad": auto_pad,
        "ceil_mode": False,
        "dilations": (1, 1),
        "pads": None,
    }
    _, pads = pool_windows(cfg["in_shape"], cfg["kernel"], **fn_kwargs(cfg))
    assert pads[0] + pads[2] < 0
    a, out_shape = avg_pool_matrix(cfg["in_shape"], cfg["kernel"], **fn_kwargs(cfg))
    expected, _, ort_shape = probe_matrix("AveragePool", cfg["in_shape"], **onnx_attrs(cfg))
    assert out_shape == ort_shape
    np.testing.assert_allclose(a.toarray(), expected, rtol=1e-6)
    _check_tournament(cfg, _max_inputs(np.random.default_rng(n), cfg["in_shape"]))


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER"])
def test_same_with_dilation_is_refused(auto_pad):
    # ORT: n=7, k=3, d=2, s=1 gives 5 outputs; the spec promises ceil(7/1) = 7.
    assert run_op(
        "AveragePool",
        np.zeros((1, 1, 7), np.float32),
        kernel_shape=[3],
        dilations=[2],
        auto_pad=auto_pad,
    ).shape == (1, 1, 5)
    for fn in (avg_pool_matrix, max_pool_tournament):
        with pytest.raises(ValueError, match="undilated"):
            fn((1, 7), (3,), dilations=(2,), auto_pad=auto_pad)
    avg_pool_matrix((1, 7), (3,), dilations=(1,), auto_pad=auto_pad.encode())  # bytes accepted


def test_avg_pool_channels_are_block_diagonal():
    a, _ = avg_pool_matrix((3, 4, 4), (2, 2), strides=(2, 2))
    one, _ = avg_pool_matrix((1, 4, 4), (2, 2), strides=(2, 2))
    np.testing.assert_array_equal(a.toarray(), sp.block_diag([one] * 3).toarray())


# --- MaxPool ----------------------------------------------------------------------------------


def _max_inputs(rng: np.random.Generator, in_shape, n: int = 3) -> np.ndarray:
    """Mostly negative values with a few large magnitudes: padding acting as 0 would show."""
    x = rng.standard_normal((n, *in_shape)) - 3.0
    x *= rng.choice([1.0, 1e3, 1e-3], size=x.shape, p=[0.8, 0.1, 0.1])
    return x


def _ort_max_pool(cfg: dict, x: np.ndarray) -> np.ndarray:
    """ORT MaxPool; negative resolved pads (SAME with kernel < stride, which ORT's MaxPool rejects)
    become a crop of the input followed by a MaxPool with the remaining non-negative pads."""
    _, pads = pool_windows(cfg["in_shape"], cfg["kernel"], **fn_kwargs(cfg))
    if min(pads) >= 0:
        return run_op("MaxPool", x, **onnx_attrs(cfg))
    r = len(cfg["kernel"])
    crop = tuple(slice(max(-pads[i], 0), x.shape[2 + i] - max(-pads[r + i], 0)) for i in range(r))
    explicit = dict(cfg, auto_pad="NOTSET", pads=tuple(max(p, 0) for p in pads))
    return run_op("MaxPool", np.ascontiguousarray(x[(..., *crop)]), **onnx_attrs(explicit))


def _check_tournament(cfg: dict, x: np.ndarray, plans=MAX_POOL_PLANS) -> Tournament:
    """Every plan in ``plans`` matches ORT; the per-window one has depth ceil(log2 K) and K-1
    ReLUs per output, and auto's count is the fewest. Returns the auto (or only) plan."""
    expected = _ort_max_pool(cfg, x)
    k = math.prod(cfg["kernel"])
    built = {}
    for plan in plans:
        t = max_pool_tournament(cfg["in_shape"], cfg["kernel"], plan=plan, **fn_kwargs(cfg))
        assert t.out_shape == expected.shape[1:]
        got = run_tournament(t, x.reshape(len(x), -1))
        np.testing.assert_allclose(got, expected.reshape(len(x), -1), rtol=1e-6, atol=0)
        built[plan] = t
    if "tournament" in built:
        t = built["tournament"]
        assert t.depth == math.ceil(math.log2(k))
        assert t.relu_count == math.prod(t.out_shape) * (k - 1)
    if len(built) > 1:
        counts = {plan: t.relu_count for plan, t in built.items()}
        assert counts["auto"] == min(counts.values()) <= counts["tournament"]
        win, _ = pool_windows(cfg["in_shape"], cfg["kernel"], **fn_kwargs(cfg))
        predicted = max_pool_relu_counts(win)
        assert {p: c * cfg["in_shape"][0] for p, c in predicted.items()} == counts
    return built.get("auto", t)


@HYP
@given(cfg=pool_configs(), seed=st.integers(0, 2**32 - 1))
def test_max_pool_tournament_matches_ort(cfg, seed):
    x = _max_inputs(np.random.default_rng(seed), cfg["in_shape"])
    if same_with_dilation(cfg):
        with pytest.raises(ValueError, match="undilated"):
            max_pool_tournament(cfg["in_shape"], cfg["kernel"], **fn_kwargs(cfg))
        return
    if has_empty_window(cfg):
        # Only reachable with dilations: every tap of some window is padding, max is -inf.
        for plan in MAX_POOL_PLANS:
            with pytest.raises(ValueError, match="all padding"):
                max_pool_tournament(cfg["in_shape"], cfg["kernel"], plan=plan, **fn_kwargs(cfg))
        return
    _check_tournament(cfg, x)


@HYP
@given(
    n=st.integers(1, 6),
    k=st.integers(2, 4),
    s=st.integers(1, 3),
    ceil_mode=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_max_pool_single_valid_tap_windows(n, k, s, ceil_mode, seed):
    # pads = kernel - 1 on both sides: the first window sees one input element, the rest -inf.
    cfg = {
        "in_shape": (2, n),
        "kernel": (k,),
        "strides": (s,),
        "pads": (k - 1, k - 1),
        "ceil_mode": ceil_mode,
    }
    x = _max_inputs(np.random.default_rng(seed), cfg["in_shape"])
    _check_tournament(cfg, x)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("extent,pad", [(9, 0), (8, 1), (13, 1), (5, 0)])
def test_3x3_plans_beat_the_tournament(stride, extent, pad):
    # the common pools: overlapping 3x3 windows share row maxima (and, at stride 1, pairs)
    cfg = {"in_shape": (2, extent, extent + 1), "kernel": (3, 3), "strides": (stride, stride),
           "pads": (pad,) * 4, "ceil_mode": False}
    t = _check_tournament(cfg, _max_inputs(np.random.default_rng(extent), cfg["in_shape"]))
    tournament = math.prod(t.out_shape) * 8
    assert t.relu_count < tournament
    per_output = t.relu_count / math.prod(t.out_shape)
    assert per_output <= (7 if stride == 2 else 4.5)
    assert t.plan.startswith("separable")


@pytest.mark.parametrize("plan", MAX_POOL_PLANS)
def test_plan_levels_are_honest(plan):
    # each diff row is one pairwise max (two entries, +1 and -1); place/keep one entry per row
    t = max_pool_tournament((2, 7, 6), (3, 2), strides=(1, 2), pads=(1, 0, 1, 1), plan=plan)
    size = t.gather.shape[0]
    assert (t.gather.getnnz(axis=1) == 1).all()
    for level in t.levels:
        assert level.in_size == size
        assert (level.diff.getnnz(axis=1) == 2).all()
        assert sorted(np.unique(level.diff.data)) == [-1.0, 1.0]
        assert (level.keep.getnnz(axis=1) == 1).all()
        assert (level.place.getnnz(axis=1) <= 1).all()
        assert (level.place.getnnz(axis=0) >= 1).all()  # every ReLU is used
        size = level.out_size
    assert size == math.prod(t.out_shape)
    assert t.relu_count == sum(level.diff.shape[0] for level in t.levels)


def test_unknown_plan_is_refused():
    with pytest.raises(ValueError, match="unknown MaxPool plan"):
        max_pool_tournament((1, 4), (2,), plan="magic")


def test_max_pool_negative_and_large_values():
    # All-negative input with pads: if padding acted as 0, every border output would be 0.
    x = -np.abs(np.random.default_rng(0).standard_normal((3, 2, 5, 5))) * 1e6 - 1.0
    cfg = {
        "in_shape": (2, 5, 5),
        "kernel": (3, 3),
        "pads": (1, 2, 2, 1),
        "strides": (2, 1),
        "ceil_mode": True,
    }
    _check_tournament(cfg, x)
    t = max_pool_tournament(cfg["in_shape"], cfg["kernel"], **fn_kwargs(cfg))
    assert (run_tournament(t, x.reshape(3, -1)) < 0).all()
    big = np.full((1, 1, 2, 2), 3e38)
    t = max_pool_tournament((1, 2, 2), (2, 2))
    np.testing.assert_array_equal(run_tournament(t, big.reshape(1, -1)), [[3e38]])


def test_max_pool_ceil_overhang_windows():
    # axis 0: n=5, k=3, s=2, pads (1, 0): last window [3, 6) overhangs by 1;
    # axis 1: n=7, k=2, s=3: last window [6, 8) overhangs by 1.
    cfg = {
        "in_shape": (1, 5, 7),
        "kernel": (3, 2),
        "strides": (2, 3),
        "pads": (1, 0, 0, 0),
        "ceil_mode": True,
    }
    t = _check_tournament(cfg, _max_inputs(np.random.default_rng(1), cfg["in_shape"]))
    assert t.out_shape == (1, 3, 3)


@pytest.mark.parametrize(
    "kernel,depth", [((2, 2), 2), ((3, 3), 4), ((1,), 0), ((3,), 2), ((2, 2, 2), 3), ((5,), 3)]
)
def test_tournament_depth_and_shapes(kernel, depth):
    in_shape = (2, *(k + 2 for k in kernel))
    t = max_pool_tournament(in_shape, kernel)
    assert t.depth == depth
    m = math.prod(t.out_shape)
    k = math.prod(kernel)
    assert t.gather.shape == (m * k, math.prod(in_shape))
    for level in t.levels:
        h, p = -(-k // 2), k // 2
        assert level.diff.shape == (m * p, m * k)  # no zero row for an odd candidate
        assert level.keep.shape == (m * h, m * k) and level.place.shape == (m * h, m * p)
        assert (level.keep.getnnz(axis=1) == 1).all()
        k = h
    assert k == 1
    assert t.relu_count == m * (math.prod(kernel) - 1)


def test_max_pool_taps_fill_and_errors():
    win, _ = pool_windows((1, 3), (3,), pads=(2, 2))
    taps = max_pool_taps(win)
    assert (taps >= 0).all()
    np.testing.assert_array_equal(taps[0], [0, 0, 0])
    valid = win.valid
    np.testing.assert_array_equal(taps[valid], win.taps[valid])
    # kernel 2, dilation 2, pad 1 over one element: taps at -1 and 1, both padding.
    empty, _ = pool_windows((1, 1), (2,), pads=(1, 1), dilations=(2,))
    with pytest.raises(ValueError, match="all padding"):
        max_pool_taps(empty)
    # onnxruntime outputs the lowest double there, a value no MatMul/Relu network should invent.
    assert (
        run_op("MaxPool", np.ones((1, 1, 1)), kernel_shape=[2], pads=[1, 1], dilations=[2])[0, 0, 0]
        == np.finfo(np.float64).min
    )


# --- global pools -----------------------------------------------------------------------------


@pytest.mark.parametrize("in_shape", [(3, 5), (2, 4, 3), (1, 1, 1), (2, 3, 2, 2)])
def test_global_pools_match_ort(in_shape):
    rng = np.random.default_rng(2)
    x = _max_inputs(rng, in_shape).astype(np.float32)  # ORT has no float64 global pools
    kernel = global_pool_kernel(in_shape)
    a, out_shape = avg_pool_matrix(in_shape, kernel)
    expected = run_op("GlobalAveragePool", x)
    assert out_shape == expected.shape[1:] == (in_shape[0],) + (1,) * (len(in_shape) - 1)
    np.testing.assert_allclose(x.reshape(3, -1) @ a.T.toarray(), expected.reshape(3, -1), rtol=1e-5)
    expected = run_op("GlobalMaxPool", x)
    for plan in MAX_POOL_PLANS:
        t = max_pool_tournament(in_shape, kernel, plan=plan)
        assert t.out_shape == expected.shape[1:]
        np.testing.assert_array_equal(run_tournament(t, x.reshape(3, -1)), expected.reshape(3, -1))


# --- ONNX backend node tests ------------------------------------------------------------------


POOL_OPS = ("MaxPool", "AveragePool", "GlobalMaxPool", "GlobalAveragePool")


def _backend_cases(op_types) -> list:
    """The ONNX backend node test cases of ``op_types``, one param per case name.

    ``collect_testcases`` imports the case modules once per process and its ``op_type`` filter
    only acts on that first import, so collect everything and filter here.
    """
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = collect_testcases()
    by_name = {}
    for case in cases:
        node = case.model.graph.node
        if len(node) == 1 and node[0].op_type in op_types:
            by_name.setdefault(case.name, case)
    return [pytest.param(case, id=name) for name, case in sorted(by_name.items())]


BACKEND_CASES = _backend_cases(POOL_OPS)
# Cases whose expected outputs were typed in by hand, rounded: (rtol, atol, why).
BACKEND_TOLERANCE = {
    "test_averagepool_2d_ceil_last_window_starts_on_pad": (
        0.0,
        6e-5,
        "expected values rounded to 4 decimals (onnxruntime agrees with ours)",
    ),
}


def test_backend_cases_collected():
    ops = {p.values[0].model.graph.node[0].op_type for p in BACKEND_CASES}
    assert ops == set(POOL_OPS) and len(BACKEND_CASES) >= 40


@pytest.mark.parametrize("case", BACKEND_CASES)
def test_onnx_backend_node_case(case):
    node = case.model.graph.node[0]
    if len(case.model.graph.output) != 1:
        pytest.skip("Indices output (argmax) is not a pooled value; not lowered")
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if isinstance(attrs.get("auto_pad"), bytes):
        attrs["auto_pad"] = attrs["auto_pad"].decode()
    for inputs, outputs in case.data_sets:
        x, expected = inputs[0], outputs[0]
        if x.dtype.kind != "f":
            pytest.skip(f"{x.dtype} input: only float pools are lowered")
        in_shape = x.shape[1:]
        if node.op_type.startswith("Global"):
            kernel, kw = global_pool_kernel(in_shape), {}
        else:
            kernel = attrs["kernel_shape"]
            kw = {
                k: attrs[k]
                for k in ("strides", "pads", "dilations", "ceil_mode", "auto_pad")
                if k in attrs
            }
        flat = x.reshape(len(x), -1).astype(np.float64)
        if node.op_type.endswith("AveragePool"):
            a, out_shape = avg_pool_matrix(
                in_shape, kernel, count_include_pad=bool(attrs.get("count_include_pad", 0)), **kw
            )
            got = (a @ flat.T).T
        else:
            t = max_pool_tournament(in_shape, kernel, plan="auto", **kw)
            out_shape, got = t.out_shape, run_tournament(t, flat)
        assert out_shape == expected.shape[1:]
        rtol, atol, _ = BACKEND_TOLERANCE.get(case.name, (1e-5, 1e-6, ""))
        np.testing.assert_allclose(got, expected.reshape(len(x), -1), rtol=rtol, atol=atol)
