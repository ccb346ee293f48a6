"""onnx_lower.winograd: the transforms exactly, and the pipeline against a direct correlation."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onnx_lower import winograd as wg

HYP = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _exact_correlation_identity(t: wg.WinogradTransform) -> None:
    """Aᵀ[(G g) ⊙ (Bᵀ d)] equals the correlation for every basis pair (g_k, d_q), in rationals."""
    bt, g, at = t.exact
    for k in range(t.r):
        for q in range(t.a):
            # (G e_k) ⊙ (Bᵀ e_q) = G[:, k] ⊙ Bᵀ[:, q]; the correlation of e_k with e_q is
            # y_j = [j + k == q]
            got = at.dot(g[:, k] * bt[:, q])
            want = [int(j + k == q) for j in range(t.m)]
            assert list(got) == want, (t.m, t.r, k, q, list(got))


@pytest.mark.parametrize("m,r", wg.SUPPORTED)
def test_transforms_are_exact_minimal_filters(m, r):
    t = wg.transform(m, r)
    assert t.bt.shape == (t.a, t.a) and t.g.shape == (t.a, r) and t.at.shape == (m, t.a)
    _exact_correlation_identity(t)


@pytest.mark.parametrize("m,r", wg.SUPPORTED)
@pytest.mark.parametrize("rank", [1, 2])
def test_kronecker_form_is_the_nested_form(m, r, rank):
    """On one tile, Aᵀ_d[(G_d g) ⊙ (Bᵀ_d d)] is Aᵀ[(G g Gᵀ) ⊙ (Bᵀ d B)]A and the correlation."""
    t = wg.transform(m, r)
    rng = np.random.default_rng(rank)
    d = rng.standard_normal((t.a,) * rank)
    g = rng.standard_normal((r,) * rank)
    bt, gd, at = (wg.kron_power(x, rank) for x in (t.bt, t.g, t.at))
    y = (at @ ((gd @ g.ravel()) * (bt @ d.ravel()))).reshape((m,) * rank)
    if rank == 2:
        nested = t.at @ ((t.g @ g @ t.g.T) * (t.bt @ d @ t.bt.T)) @ t.at.T
        np.testing.assert_allclose(y, nested, rtol=0, atol=1e-12)
    ref = wg.correlate_direct(d[None], g[None, None], None).reshape((m,) * rank)
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-12)


def test_unknown_tile_is_refused():
    with pytest.raises(ValueError, match="F\\(3, 3\\)"):
        wg.transform(3, 3)


@st.composite
def conv_cases(draw):
    rank = draw(st.sampled_from([1, 2]))
    m = draw(st.sampled_from([2, 4]))
    c_in, c_out = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    in_shape = tuple(draw(st.integers(1, 11)) for _ in range(rank))
    pads = tuple(draw(st.integers(0, 3)) for _ in range(2 * rank))
    for i, n in enumerate(in_shape):  # a non-empty output on every axis
        if n + pads[i] + pads[rank + i] < 3:
            pads = pads[:rank + i] + (3 - n - pads[i],) + pads[rank + i + 1:]
    seed = draw(st.integers(0, 2**31 - 1))
    return rank, m, c_in, c_out, in_shape, pads, seed


@HYP
@given(conv_cases())
def test_winograd_pipeline_matches_direct_correlation(case):
    rank, m, c_in, c_out, in_shape, pads, seed = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((c_in,) + in_shape)
    w = rng.standard_normal((c_out, c_in) + (3,) * rank)
    ref = wg.correlate_direct(x, w, pads)
    got = wg.correlate_winograd(x, w, pads, m)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12 * max(1.0, np.abs(ref).max()))


@HYP
@given(conv_cases())
def test_tile_geometry(case):
    rank, m, _, _, in_shape, pads, _ = case
    grid = wg.tile_grid(in_shape, pads, m)
    a = m + 2
    assert grid.taps.shape == (grid.n_tiles, a ** rank)
    assert grid.taps.min() >= -1 and grid.taps.max() < np.prod(in_shape)
    # every input element that an output reads is covered; overhang only in the last tiles
    assert 0 <= grid.overhang < grid.n_tiles * m ** rank
    for i, o in enumerate(grid.out_shape):
        assert (grid.tiles[i] - 1) * m < o <= grid.tiles[i] * m
    for layout in ("tap", "tile"):
        rows = wg.output_rows(grid, layout)
        assert rows.shape == (np.prod(grid.out_shape),)
        assert np.unique(rows).size == rows.size and rows.max() < grid.n_tiles * m ** rank


def test_weight_transform_shape_and_values():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((4, 3, 3, 3))
    t = wg.transform(2)
    u = wg.weight_transform(w, t)
    assert u.shape == (16, 3, 4)
    ref = np.einsum("ak,oikl,bl->abio", t.g, w, t.g).reshape(16, 3, 4)  # G g Gᵀ per (o, i)
    np.testing.assert_allclose(u, ref, rtol=0, atol=1e-13)


def test_error_grows_with_the_tile():
    """F(4,3) has the larger bound and the larger measured float32 error, both in a sane range."""
    assert wg.amplification(2, rank=1) < wg.amplification(4, rank=1)
    assert wg.amplification(2) < wg.amplification(4)
    w = np.random.default_rng(2).standard_normal((32, 64, 3, 3)).astype(np.float32)
    e2, e4 = wg.probe_error(w, 2), wg.probe_error(w, 4)
    assert 0 < e2 < e4 < 1e-4
    assert wg.probe_error(w, 2, dtype=np.float64) < 1e-13
