"""Winograd minimal filtering F(m, r) as index arrays and matrices, for any spatial rank.

Math (Lavin & Gray 2016, https://arxiv.org/abs/1509.09308; matrices from andravin/wincnn).
In 1-D, F(m, r) computes ``m`` outputs of an ``r``-tap correlation ``y_j = Σ_k g_k · d_{j+k}``
from an input tile of ``a = m + r − 1`` values:

    y = Aᵀ [ (G g) ⊙ (Bᵀ d) ]          Bᵀ: (a, a), G: (a, r), Aᵀ: (m, a)

For ``d`` spatial axes the transforms are Kronecker products over the axes (C-order
flattening of a tile, ``vec(X D Z) = (X ⊗ Zᵀ) vec(D)``):

    Bᵀ_d = Bᵀ ⊗ … ⊗ Bᵀ   (a^d, a^d)     G_d = G ⊗ … ⊗ G   (a^d, r^d)     Aᵀ_d = Aᵀ ⊗ … ⊗ Aᵀ

and, summed over input channels inside the ⊙ stage, a multi-channel conv is ``a^d`` independent
GEMMs of shape ``[tiles, C_in] × [C_in, C_out]`` against ``U[p] = (G_d · g)[p]``
(:func:`weight_transform`, float64).

Tile geometry (stride 1, dilation 1, pads ``(b_i, e_i)``): axis ``i`` has
``out_i = n_i + b_i + e_i − r + 1`` outputs and ``ceil(out_i / m)`` tiles. Tile ``t`` produces
outputs ``t·m … t·m + m − 1`` and reads input positions ``t·m − b_i + (0 … a − 1)``: exactly the
windows of a "conv" with kernel ``a``, stride ``m`` and end pad ``(tiles − 1)·m + a − n − b``
(≥ e_i), so :func:`onnx_lower.windows.sliding_windows` builds the gather table; taps outside the
input are ``−1`` and read the zero row, as im2col's padding taps do. The last tile may overhang
the output; :func:`output_rows` drops the overhang when it scatters tiles back to output rows.

Numerics: float32 error grows with the tile (Barabasz et al., https://arxiv.org/abs/1803.10986).
:func:`amplification` is a worst-case growth factor of the transforms (the ∞-norm product
``‖|Aᵀ_d|·(|G_d|·1 ⊙ |Bᵀ_d|·1)‖``, 1 for direct correlation in the same units), and
:func:`probe_error` measures the scaled error ``max|y32 − y64| / max|y64|`` of the float32
pipeline on random input with a layer's own weights; the im2col pass gates F(4, 3) on the latter.

Everything is vectorised numpy; no Python loop runs over tiles, taps or channels.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from fractions import Fraction as Fr

import numpy as np

from onnx_lower.windows import Windows, sliding_windows

__all__ = [
    "WinogradTransform", "TileGrid", "transform", "kron_power", "weight_transform",
    "tile_grid", "output_rows", "correlate_direct", "correlate_winograd",
    "amplification", "probe_error", "SUPPORTED",
]

_H, _Q, _S, _T, _W = Fr(1, 2), Fr(1, 4), Fr(1, 6), Fr(1, 12), Fr(1, 24)

#: Exact (Bᵀ, G, Aᵀ) per (m, r), from andravin/wincnn
#: (interpolation points 0, ±1 for F(2,3); 0, ±1, ±2 for F(4,3); both with the point at ∞).
_TABLES: dict[tuple[int, int], tuple[list, list, list]] = {
    (2, 3): (
        [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
        [[1, 0, 0], [_H, _H, _H], [_H, -_H, _H], [0, 0, 1]],
        [[1, 1, 1, 0], [0, 1, -1, -1]],
    ),
    (4, 3): (
        [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
         [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]],
        [[_Q, 0, 0], [-_S, -_S, -_S], [-_S, _S, -_S], [_W, _T, _S], [_W, -_T, _S], [0, 0, 1]],
        [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
    ),
}

#: The (m, r) pairs with a transform table.
SUPPORTED = tuple(sorted(_TABLES))


@dataclasses.dataclass(frozen=True)
class WinogradTransform:
    """The 1-D F(m, r) transforms: ``bt`` (a, a), ``g`` (a, r), ``at`` (m, a), float64.

    ``exact`` holds the same three matrices as object arrays of :class:`fractions.Fraction`.
    """

    m: int
    r: int
    bt: np.ndarray
    g: np.ndarray
    at: np.ndarray
    exact: tuple[np.ndarray, np.ndarray, np.ndarray]

    @property
    def a(self) -> int:
        """Input tile length ``m + r − 1``."""
        return self.m + self.r - 1


def transform(m: int, r: int = 3) -> WinogradTransform:
    """The F(m, r) transforms (see :data:`SUPPORTED`)."""
    if (m, r) not in _TABLES:
        raise ValueError(f"no Winograd table for F({m}, {r}); have {SUPPORTED}")
    exact = tuple(np.array([[Fr(v) for v in row] for row in t], dtype=object)
                  for t in _TABLES[(m, r)])
    bt, g, at = (e.astype(np.float64) for e in exact)
    return WinogradTransform(m, r, bt, g, at, exact)


def kron_power(mat: np.ndarray, rank: int) -> np.ndarray:
    """``mat ⊗ … ⊗ mat`` (``rank`` factors): the transform on C-order flattened rank-d tiles."""
    out = np.ones((1, 1), dtype=mat.dtype)
    for _ in range(rank):
        out = np.kron(out, mat)
    return out


def weight_transform(weight: np.ndarray, t: WinogradTransform) -> np.ndarray:
    """``U = G_d g G_dᵀ`` of an ONNX weight ``(C_out, C_in, r, …, r)``, as ``(a^d, C_in, C_out)``.

    Composed in float64; the caller casts once.
    """
    weight = np.asarray(weight, dtype=np.float64)
    c_out, c_in, *kernel = weight.shape
    if any(k != t.r for k in kernel):
        raise ValueError(f"kernel {tuple(kernel)} is not {t.r} on every axis")
    gd = kron_power(t.g, len(kernel))
    u = weight.reshape(c_out * c_in, -1) @ gd.T                   # (C_out·C_in, a^d), one GEMM
    return np.ascontiguousarray(u.reshape(c_out, c_in, -1).transpose(2, 1, 0))


@dataclasses.dataclass(frozen=True)
class TileGrid:
    """The Winograd tiles of one stride-1 conv over a spatial grid.

    Attributes:
        m, r: the F(m, r) tile: ``m`` outputs per axis from ``a = m + r − 1`` inputs.
        in_shape, out_shape: spatial extents of the conv's input and output.
        tiles: tiles per axis (``ceil(out_i / m)``).
        windows: the tile windows; ``windows.taps`` is the gather table ``(T, a^d)`` of flat
            input indices, ``−1`` where the tap reads padding (the zero row).
    """

    m: int
    r: int
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    tiles: tuple[int, ...]
    windows: Windows

    @property
    def taps(self) -> np.ndarray:
        return self.windows.taps

    @property
    def n_tiles(self) -> int:
        return math.prod(self.tiles)

    @property
    def rank(self) -> int:
        return len(self.in_shape)

    @property
    def overhang(self) -> int:
        """Computed outputs that are dropped (ragged last tiles)."""
        return self.n_tiles * self.m ** self.rank - math.prod(self.out_shape)


def tile_grid(in_shape: Sequence[int], pads: Sequence[int] | None, m: int, r: int = 3) -> TileGrid:
    """Tile geometry and gather table of an ``r``-tap stride-1 conv (pads: begins, then ends)."""
    in_shape = tuple(int(v) for v in in_shape)
    d = len(in_shape)
    pads = tuple(int(p) for p in pads) if pads is not None and len(pads) else (0,) * (2 * d)
    a = m + r - 1
    out_shape = tuple(n + pads[i] + pads[d + i] - r + 1 for i, n in enumerate(in_shape))
    if min(out_shape) <= 0:
        raise ValueError(f"empty conv output {out_shape} for input {in_shape}, pads {pads}")
    tiles = tuple(-(-o // m) for o in out_shape)
    ends = tuple((t - 1) * m + a - n - pads[i] for i, (t, n) in enumerate(zip(tiles, in_shape)))
    win = sliding_windows(in_shape, (a,) * d, strides=(m,) * d, pads=pads[:d] + ends)
    assert win.out_shape == tiles, (win.out_shape, tiles)
    return TileGrid(m, r, in_shape, out_shape, tiles, win)


def output_rows(grid: TileGrid, layout: str = "tap") -> np.ndarray:
    """For each output position (C-order over ``out_shape``), its row in the tile outputs.

    ``layout="tap"``: tile outputs are ``(m^d, T)`` rows (row ``j·T + t``);
    ``layout="tile"``: ``(T, m^d)`` rows (row ``t·m^d + j``). Overhanging outputs are never read.
    """
    d, m = grid.rank, grid.m
    coords = np.indices(grid.out_shape).reshape(d, -1)
    t = np.ravel_multi_index(tuple(coords // m), grid.tiles)
    j = np.ravel_multi_index(tuple(coords % m), (m,) * d)
    if layout == "tap":
        return (j * grid.n_tiles + t).astype(np.int64)
    if layout == "tile":
        return (t * m ** d + j).astype(np.int64)
    raise ValueError(f"unknown layout {layout!r}")


def _with_zero_row(x: np.ndarray) -> np.ndarray:
    return np.concatenate([x, np.zeros((1, x.shape[1]), dtype=x.dtype)], axis=0)


def correlate_direct(x: np.ndarray, weight: np.ndarray, pads: Sequence[int] | None) -> np.ndarray:
    """Reference stride-1 correlation by im2col, float64: ``(C_in, *in)`` → ``(S_out, C_out)``."""
    x = np.asarray(x, dtype=np.float64)
    weight = np.asarray(weight, dtype=np.float64)
    c_out, c_in, *kernel = weight.shape
    win = sliding_windows(x.shape[1:], kernel, pads=pads)
    rows = _with_zero_row(x.reshape(c_in, -1).T)
    cols = rows[win.taps].reshape(win.out_size, -1)              # (S_out, K·C_in)
    w = weight.reshape(c_out, c_in, -1).transpose(2, 1, 0).reshape(-1, c_out)
    return cols @ w


def correlate_winograd(x: np.ndarray, weight: np.ndarray, pads: Sequence[int] | None, m: int,
                       dtype=np.float64) -> np.ndarray:
    """The Winograd pipeline in numpy, computed in ``dtype``: ``(C_in, *in)`` → ``(S_out, C_out)``.

    Mirrors the emitted graph: gather tap-major tiles, input transform, per-position GEMMs
    against ``U``, output transform, gather of the output rows.
    """
    dtype = np.dtype(dtype)
    c_out, c_in, *kernel = np.shape(weight)
    t = transform(m, kernel[0])
    grid = tile_grid(np.shape(x)[1:], pads, m, t.r)
    d = grid.rank
    bt, at = kron_power(t.bt, d).astype(dtype), kron_power(t.at, d).astype(dtype)
    u = weight_transform(weight, t).astype(dtype)
    rows = _with_zero_row(np.asarray(x, dtype=dtype).reshape(c_in, -1).T)
    tiles = rows[grid.taps.T]                                     # (a^d, T, C_in)
    v = (bt @ tiles.reshape(bt.shape[1], -1)).reshape(tiles.shape)
    mm = np.matmul(v, u)                                          # (a^d, T, C_out)
    y = (at @ mm.reshape(at.shape[1], -1)).reshape(-1, c_out)     # (m^d · T, C_out)
    return y[output_rows(grid, "tap")]


def amplification(m: int, r: int = 3, rank: int = 2) -> float:
    """Worst-case float error growth of F(m, r) on rank-``rank`` tiles, relative to direct.

    ``max_j Σ_p |Aᵀ_d|[j, p] · (Σ_k |G_d|[p, k]) · (Σ_q |Bᵀ_d|[p, q])``, divided by the same
    sum for direct correlation (``r^d``): the bound on ``|y|`` of unit-magnitude data.
    """
    t = transform(m, r)
    bt, g, at = (np.abs(kron_power(x, rank)) for x in (t.bt, t.g, t.at))
    return float(np.max(at @ (g.sum(axis=1) * bt.sum(axis=1)))) / r ** rank


def probe_error(weight: np.ndarray, m: int, *, tiles: int = 3, seed: int = 0,
                dtype=np.float32) -> float:
    """Measured scaled error ``max|y − y_ref| / max|y_ref|`` of the ``dtype`` pipeline.

    Runs :func:`correlate_winograd` in ``dtype`` against :func:`correlate_direct` in float64 on
    standard-normal input of ``tiles`` tiles per axis (same-padded), with the layer's own
    ``weight`` (``(C_out, C_in, r, …)``).
    """
    weight = np.asarray(weight, dtype=np.float64)
    c_out, c_in, *kernel = weight.shape
    d, r = len(kernel), kernel[0]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((c_in,) + (tiles * m,) * d)
    pads = ((r - 1) // 2,) * d + (r // 2,) * d
    ref = correlate_direct(x, weight, pads)
    got = correlate_winograd(x.astype(dtype), weight, pads, m, dtype=dtype).astype(np.float64)
    scale = float(np.max(np.abs(ref)))
    return float(np.max(np.abs(got - ref))) / scale if scale > 0 else 0.0
