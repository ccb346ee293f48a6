"""MaxPool as ReLU levels, with plans that share the pairwise maxima of overlapping windows.

MaxPool (https://onnx.ai/onnx/operators/onnx__MaxPool.html) pads with −inf, so a padded tap never
wins. It is realised with MatMul/Add/Relu only, through

    max(a, b) = b + relu(a − b).

Every plan here has the same shape, a :class:`Tournament`: the candidates ``c_0 = gather · x``
(``x`` one sample, flattened in C order), then per level ``l``

    d = diff · c_l,   r = relu(d),   c_{l+1} = place · r + keep · c_l,

where each ``diff`` row is one pairwise max ``a − b`` (so a level's ReLU count is exactly its
number of ``diff`` rows: no zero rows), ``place`` puts each ReLU into the rows of ``c_{l+1}`` it
feeds, and ``keep`` adds the ``b`` of those maxima or carries a value unchanged to the next level.
The last ``c_L`` is the output in C order ``(channel, output position)``. The ReLU count of a
plan is ``Σ_l diff_l.shape[0]``; every channel gets the same block (``kron(I_C, ·)``).

Plans (:data:`MAX_POOL_PLANS`; ``"auto"`` takes the one with the fewest ReLUs, the per-window
tournament on ties, so it is never above today's count):

* ``tournament`` — per window, a halving tournament over its ``K`` taps: ``K − 1`` ReLUs per
  output and channel, depth ``ceil(log2 K)``. Padded taps are replaced by a valid tap of the same
  window (its first; ``max(a, a) = a``). A window without any valid tap raises ``ValueError``
  (onnxruntime outputs the lowest double there).
* ``separable`` — a max of maxes: reduce the axes one by one (the order with the fewest ReLUs;
  ties keep the last axis first). Reducing axis ``i`` computes, for every line along ``i`` that a
  later axis or the output reads, the max over each distinct 1-D window of that axis; only the
  positions some window reads are kept on the axes not reduced yet. Padded taps are simply left
  out (padding stays −inf, never zero). On each axis the taps of a window form a contiguous run
  of one residue class ``mod dilation``; the 1-D maxima of all windows of a class are built from
  a shared, memoised set of interval maxima (identical intervals are computed once), split by a
  rule chosen per axis for the fewest ReLUs:

  - halving: ``[lo, hi] = [lo, lo + h) ∪ [lo + h, hi]``, ``h`` the largest power of two
    ``< len`` (aligned halves are shared by windows with stride ``< kernel``);
  - ``sliding`` (van Herk / Gil-Werman): blocks of ``g`` taps (``g = 2 … k``, every offset); a
    window crossing a block boundary is the max of a block suffix and a block prefix, and those
    suffix/prefix chains are shared by every window crossing that boundary. For ``k = 3``,
    stride 1 this costs 1.5 ReLUs per output instead of 2;
  - ``doubling`` (sparse table): ``m_{2j}[i] = max(m_j[i], m_j[i + j])``, a window of ``k`` is
    ``max(m_p[lo], m_p[hi − p + 1])`` with ``p`` the largest power of two ``≤ k``.

  ``separable`` itself uses the halving rule; ``sliding`` and ``doubling`` force their rule on
  every axis where windows can share (an axis of one distinct window, or ``k = 1``, always
  halves); ``auto`` takes the best rule per axis. 3×3 stride 2 over 2-D costs about 6 ReLUs
  per output instead of 8, 3×3 stride 1 about 3 instead of 8.

The levels are an as-soon-as-possible schedule of the max DAG: a value lives in ``c_l`` from the
level it is computed at until the last level that reads it (those carries are linear, ``keep``
rows, no ReLU).

Note for a strictly layered form: a carry past a Relu costs two neurons in general
(``v = relu(v) − relu(−v)``), but where the pool input is known nonnegative (it is a Relu output,
a nonnegative combination of them, or a max of such values — every ``c_l`` of such an input is),
``max(a, b) = relu(a − b) + b`` needs no split carry: ``b ≥ 0`` rides as ``relu(b)``.

DNNV's ReluifyMaxPool spends 3 ReLUs per pairwise max; every plan here spends 1.

Python loops run over levels, axes and one axis' distinct 1-D windows (at most its output extent
times its kernel); everything per element is vectorised index arithmetic.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable

import numpy as np
import scipy.sparse as sp

from onnx_lower.windows import Windows

__all__ = [
    "MAX_POOL_PLANS",
    "Tournament",
    "TournamentLevel",
    "max_pool_taps",
    "max_pool_levels",
    "max_pool_relu_counts",
    "run_tournament",
]

#: Plans :func:`max_pool_levels` accepts (module docstring).
MAX_POOL_PLANS = ("auto", "tournament", "separable", "sliding", "doubling")

#: Largest sliding block tried per axis (the block search costs ~g² memo steps per window).
_MAX_BLOCK = 16


def max_pool_taps(windows: Windows) -> np.ndarray:
    """``(S_out, K)`` taps with every padding tap replaced by the window's first valid tap.

    Raises ``ValueError`` if a window has no valid tap (its max would be −inf).
    """
    valid = windows.valid
    has_valid = valid.any(axis=1)
    if not has_valid.all():
        o = int(np.flatnonzero(~has_valid)[0])
        raise ValueError(f"max pool window {o} has no tap inside the input (all padding)")
    first = windows.taps[np.arange(valid.shape[0]), valid.argmax(axis=1)]
    return np.where(valid, windows.taps, first[:, None])


@dataclasses.dataclass(frozen=True)
class TournamentLevel:
    """One level ``c' = place · relu(diff · c) + keep · c``.

    ``diff`` is (relus, in_size): one ``a − b`` row per pairwise max; ``place`` (out_size, relus)
    and ``keep`` (out_size, in_size) have one entry per row (``keep`` selects the ``b`` of a max,
    or a carried value).
    """

    diff: sp.csr_matrix
    keep: sp.csr_matrix
    place: sp.csr_matrix

    @property
    def in_size(self) -> int:
        return self.diff.shape[1]

    @property
    def out_size(self) -> int:
        return self.keep.shape[0]

    @property
    def relus(self) -> int:
        return self.diff.shape[0]


@dataclasses.dataclass(frozen=True)
class Tournament:
    """MaxPool as ``c_0 = gather · x``, then ``c_{l+1} = place·relu(diff·c_l) + keep·c_l``.

    ``gather`` is (size of c_0, C*S_in); the final ``c_L`` has size C*S_out in C order (c, o).
    ``plan`` names the plan that built it (with the rule of each axis for separable plans).
    """

    gather: sp.csr_matrix
    levels: list[TournamentLevel]
    out_shape: tuple[int, ...]
    plan: str = "tournament"

    @property
    def depth(self) -> int:
        return len(self.levels)

    @property
    def relu_count(self) -> int:
        """ReLU neurons per sample: the ``diff`` rows of every level."""
        return sum(level.relus for level in self.levels)


def run_tournament(t: Tournament, x_flat: np.ndarray) -> np.ndarray:
    """Evaluate a plan in numpy: ``x_flat`` (N, C*S_in) -> (N, C*S_out)."""
    c = t.gather @ np.asarray(x_flat, dtype=np.float64).T
    for level in t.levels:
        c = level.place @ np.maximum(level.diff @ c, 0.0) + level.keep @ c
    return np.ascontiguousarray(c.T)


def _selection(cols: np.ndarray, n_cols: int) -> sp.csr_matrix:
    """Rows selecting ``cols`` (one 1 per row)."""
    cols = np.asarray(cols, dtype=np.int64)
    return sp.csr_matrix(
        (np.ones(cols.size), cols, np.arange(cols.size + 1, dtype=np.int64)),
        shape=(cols.size, n_cols),
    )


def _per_channel(t: Tournament, channels: int) -> Tournament:
    """Repeat a one-channel plan block-diagonally over ``channels``."""

    def rep(m: sp.csr_matrix) -> sp.csr_matrix:
        return sp.kron(sp.identity(channels, format="csr"), m, format="csr")

    levels = [TournamentLevel(rep(lv.diff), rep(lv.keep), rep(lv.place)) for lv in t.levels]
    return Tournament(rep(t.gather), levels, t.out_shape, t.plan)


# --- the per-window tournament ----------------------------------------------------------------


def _tournament_level(k: int) -> TournamentLevel:
    """Pairs ``(2j, 2j+1)`` of one window of ``k`` candidates; an odd last one is carried."""
    h, p = -(-k // 2), k // 2
    diff = sp.csr_matrix(
        (np.tile([1.0, -1.0], p), np.arange(2 * p), np.arange(0, 2 * p + 1, 2)), shape=(p, k)
    )
    keep = _selection(np.minimum(2 * np.arange(h) + 1, k - 1), k)
    place = sp.csr_matrix((np.ones(p), np.arange(p), np.r_[np.arange(p + 1), [p] * (h - p)]),
                          shape=(h, p))
    return TournamentLevel(diff, keep, place)


def _window_tournament(win: Windows) -> Tournament:
    """One channel's per-window tournament (``K − 1`` ReLUs per output)."""
    taps = max_pool_taps(win)
    s_out, k = taps.shape
    gather = _selection(taps.ravel(), win.in_size)
    levels = []
    while k > 1:
        one = _tournament_level(k)
        rep = sp.identity(s_out, format="csr")
        levels.append(TournamentLevel(*(sp.kron(rep, m, format="csr") for m in
                                        (one.diff, one.keep, one.place))))
        k = -(-k // 2)
    return Tournament(gather, levels, win.out_shape, "tournament")


# --- 1-D interval maxima on one axis ----------------------------------------------------------

Split = Callable[[int, int], tuple[tuple[int, int], tuple[int, int]]]


def _halving(lo: int, hi: int):
    h = 1 << ((hi - lo).bit_length() - 1)  # largest power of two < hi - lo + 1
    return (lo, lo + h - 1), (lo + h, hi)


def _doubling(lo: int, hi: int):
    n = hi - lo + 1
    p = 1 << (n.bit_length() - 1)
    if p == n:
        return (lo, lo + p // 2 - 1), (lo + p // 2, hi)
    return (lo, lo + p - 1), (hi - p + 1, hi)


def _sliding(g: int, off: int) -> Split:
    def split(lo: int, hi: int):
        b = lo + 1 + (off - lo - 1) % g  # first block start after lo
        if b <= hi:
            return (lo, b - 1), (b, hi)
        if hi == b - 1:  # a block suffix
            return (lo, lo), (lo + 1, hi)
        return (lo, hi - 1), (hi, hi)  # a block prefix (or inner run)

    return split


@dataclasses.dataclass(frozen=True)
class _AxisPlan:
    """The maxima of one axis' distinct windows, as binary max ops over that axis' positions.

    ``leaves`` are the positions some window reads; node ``i < len(leaves)`` is leaf ``i``, node
    ``len(leaves) + j`` is op ``j = max(node a[j], node b[j])``. ``outputs`` holds one node per
    distinct window, ``inverse`` maps each window to it.
    """

    rule: str
    leaves: np.ndarray
    a: np.ndarray
    b: np.ndarray
    depth: int
    outputs: np.ndarray
    inverse: np.ndarray

    @property
    def ops(self) -> int:
        return self.a.size


def _axis_windows(pos: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Distinct (first, last) valid positions of the windows ``pos`` (out, k), their inverse and
    the tap step; raises ``ValueError`` for a window without a valid tap."""
    valid = (pos >= 0) & (pos < n)
    if not valid.any(axis=1).all():
        raise ValueError("max pool window has no tap inside the input (all padding)")
    k = pos.shape[1]
    first = pos[np.arange(len(pos)), valid.argmax(axis=1)]
    last = pos[np.arange(len(pos)), k - 1 - valid[:, ::-1].argmax(axis=1)]
    step = int(pos[0, 1] - pos[0, 0]) if k > 1 else 1
    keys, inverse = np.unique(np.stack([first, last], axis=1), axis=0, return_inverse=True)
    return keys, inverse.reshape(-1), step


def _axis_plan(keys: np.ndarray, inverse: np.ndarray, step: int, rule: str,
               split: Split) -> _AxisPlan:
    """Memoised interval maxima of ``keys`` (first, last position; taps every ``step``)."""
    memo: dict[tuple[int, int], int] = {}  # (lo, hi) position interval -> op index
    ops: list[tuple[tuple[int, int], tuple[int, int]]] = []
    depth: dict[tuple[int, int], int] = {}

    def build(lo: int, hi: int) -> int:  # in positions; returns the node's depth
        if lo == hi:
            return 0
        if (lo, hi) in memo:
            return depth[(lo, hi)]
        r, d = lo % step, step
        (l1, h1), (l2, h2) = split((lo - r) // d, (hi - r) // d)
        left, right = (l1 * d + r, h1 * d + r), (l2 * d + r, h2 * d + r)
        dep = 1 + max(build(*left), build(*right))
        memo[(lo, hi)] = len(ops)
        depth[(lo, hi)] = dep
        ops.append((left, right))
        return dep

    top = max([build(int(lo), int(hi)) for lo, hi in keys], default=0)
    spans = [np.arange(lo, hi + 1, step) for lo, hi in keys]
    leaves = np.unique(np.concatenate(spans))
    n_leaves = leaves.size

    def node(key: tuple[int, int]) -> int:
        if key[0] == key[1]:
            return int(np.searchsorted(leaves, key[0]))
        return n_leaves + memo[key]

    a = np.array([node(left) for left, _ in ops], dtype=np.int64)
    b = np.array([node(right) for _, right in ops], dtype=np.int64)
    outputs = np.array([node((int(lo), int(hi))) for lo, hi in keys], dtype=np.int64)
    return _AxisPlan(rule, leaves, a, b, top, outputs, inverse)


def _axis_candidates(pos: np.ndarray, n: int, rule: str) -> _AxisPlan:
    """The cheapest 1-D plan of one axis under ``rule`` (``auto``: any rule)."""
    keys, inverse, step = _axis_windows(pos, n)
    k = pos.shape[1]
    splits: list[tuple[str, Split]] = []
    share = len(keys) > 1 and k > 1  # one window (or k = 1): nothing to share
    if rule in ("separable", "auto") or not share:
        splits.append(("halving", _halving))
    if rule in ("doubling", "auto") and share:
        splits.append(("doubling", _doubling))
    if rule in ("sliding", "auto") and share:
        blocks = range(2, min(k, _MAX_BLOCK) + 1)
        splits += [(f"sliding{g}", _sliding(g, off)) for g in blocks for off in range(g)]
    plans = [_axis_plan(keys, inverse, step, name, split) for name, split in splits]
    return min(plans, key=lambda p: (p.ops, p.depth))


# --- separable plans --------------------------------------------------------------------------


def _separable_order(axes: list[_AxisPlan]) -> tuple[list[int], int]:
    """Axis order with the fewest ops (ties: last axis first) and that op count, per channel."""
    best: tuple[int, list[int]] | None = None
    for order in itertools.permutations(range(len(axes) - 1, -1, -1)):
        extent = [p.leaves.size for p in axes]
        total = 0
        for i in order:
            total += axes[i].ops * math.prod(e for j, e in enumerate(extent) if j != i)
            extent[i] = axes[i].outputs.size
        if best is None or total < best[0]:
            best = (total, list(order))
    assert best is not None
    return best[1], best[0]


def _separable(win: Windows, axes: list[_AxisPlan], order: list[int], name: str) -> Tournament:
    """One channel's separable plan: the max DAG over axes in ``order``, then its levels."""
    s_in = win.in_size
    grid = np.ix_(*[p.leaves for p in axes])
    t = np.ravel_multi_index(grid, win.in_shape) if axes else np.zeros((), np.int64)
    t = np.broadcast_to(t, tuple(p.leaves.size for p in axes))
    op_a, op_b, op_depth = [], [], []
    depth_of = np.zeros(s_in, dtype=np.int64)  # depths of leaves; grown as ops are added
    base = s_in
    for i in order:
        plan = axes[i]
        moved = np.moveaxis(t, i, -1)
        lines = moved.reshape(-1, plan.leaves.size)
        m, j = lines.shape[0], plan.ops
        ext = np.concatenate(
            [lines, base + np.arange(m, dtype=np.int64)[:, None] * j + np.arange(j)[None, :]],
            axis=1,
        )
        a, b = ext[:, plan.a], ext[:, plan.b]
        dep = np.zeros((m, j), dtype=np.int64)
        depth_of = np.concatenate([depth_of, np.zeros(m * j, np.int64)])
        for op in range(j):  # children of op come before it in the same line
            dep[:, op] = 1 + np.maximum(depth_of[a[:, op]], depth_of[b[:, op]])
            depth_of[base + np.arange(m) * j + op] = dep[:, op]
        op_a.append(a.ravel())
        op_b.append(b.ravel())
        op_depth.append(dep.ravel())
        out = ext[:, plan.outputs].reshape(*moved.shape[:-1], plan.outputs.size)
        t = np.moveaxis(out, -1, i)
        base += m * j
    outputs = t[np.ix_(*[p.inverse for p in axes])].ravel()
    rules = ",".join(axes[i].rule for i in order)
    return _schedule(
        s_in,
        np.concatenate(op_a) if op_a else np.zeros(0, np.int64),
        np.concatenate(op_b) if op_b else np.zeros(0, np.int64),
        np.concatenate(op_depth) if op_depth else np.zeros(0, np.int64),
        outputs,
        win.out_shape,
        f"{name}({rules})",
    )


def _schedule(s_in: int, a: np.ndarray, b: np.ndarray, op_depth: np.ndarray,
              outputs: np.ndarray, out_shape: tuple[int, ...], name: str) -> Tournament:
    """Levels of a max DAG: leaves ``0..s_in-1``, op ``j`` is node ``s_in + j = max(a[j], b[j])``.

    As soon as possible: node ``v`` lives in ``c_l`` for ``depth(v) ≤ l < last(v)``, ``last`` the
    deepest op reading it (the final level for an output); ``c_L`` lists ``outputs`` in order.
    """
    n = s_in + a.size
    depth = np.concatenate([np.zeros(s_in, np.int64), op_depth])
    top = int(depth[outputs].max()) if outputs.size else 0
    if top == 0:
        return Tournament(_selection(outputs, s_in), [], out_shape, name)
    last = np.full(n, -1, dtype=np.int64)
    np.maximum.at(last, a, op_depth)
    np.maximum.at(last, b, op_depth)
    last[outputs] = top
    ops = np.arange(s_in, n)
    c_prev = np.flatnonzero(last[:s_in] >= 1)
    gather = _selection(c_prev, s_in)
    pos = np.full(n, -1, dtype=np.int64)
    pos[c_prev] = np.arange(c_prev.size)
    levels = []
    for lv in range(1, top + 1):
        computed = ops[op_depth == lv]
        rows = outputs if lv == top else np.flatnonzero((depth <= lv) & (last > lv))
        new = depth[rows] == lv
        relu_of = np.searchsorted(computed, rows[new])
        child_b = b[rows[new] - s_in]
        keep_cols = pos[rows].copy()
        keep_cols[new] = pos[child_b]
        diff = sp.csr_matrix(
            (np.tile([1.0, -1.0], computed.size),
             np.stack([pos[a[computed - s_in]], pos[b[computed - s_in]]], axis=1).ravel(),
             np.arange(0, 2 * computed.size + 1, 2)),
            shape=(computed.size, c_prev.size),
        )
        place = sp.csr_matrix(
            (np.ones(relu_of.size), relu_of, np.r_[0, np.cumsum(new)]),
            shape=(rows.size, computed.size),
        )
        levels.append(TournamentLevel(diff, _selection(keep_cols, c_prev.size), place))
        pos = np.full(n, -1, dtype=np.int64)
        pos[rows] = np.arange(rows.size)
        c_prev = rows
    return Tournament(gather, levels, out_shape, name)


# --- entry points -----------------------------------------------------------------------------


def _plans_of(win: Windows, plan: str) -> tuple[list[_AxisPlan], list[int], int]:
    axes = [_axis_candidates(pos, n, plan) for pos, n in zip(win.positions, win.in_shape)]
    order, ops = _separable_order(axes)
    return axes, order, ops


def max_pool_relu_counts(win: Windows) -> dict[str, int]:
    """ReLUs per channel and sample of each plan over ``win`` (no matrices are built)."""
    max_pool_taps(win)  # the empty-window error, with the window's index
    counts = {"tournament": win.out_size * (math.prod(win.kernel) - 1)}
    for plan in MAX_POOL_PLANS[2:]:
        counts[plan] = _plans_of(win, plan)[2]
    counts["auto"] = min(counts["tournament"], _plans_of(win, "auto")[2])
    return counts


def max_pool_levels(win: Windows, channels: int, plan: str = "auto") -> Tournament:
    """ONNX MaxPool over the windows ``win`` of each of ``channels`` as ReLU levels.

    ``plan`` is one of :data:`MAX_POOL_PLANS` (module docstring); ``auto`` picks the fewest
    ReLUs, the per-window tournament on ties. Raises ``ValueError`` for a window without a tap
    inside the input.
    """
    if plan not in MAX_POOL_PLANS:
        raise ValueError(f"unknown MaxPool plan {plan!r}; choose one of {MAX_POOL_PLANS}")
    max_pool_taps(win)
    one: Tournament | None = None
    if plan != "tournament":
        axes, order, ops = _plans_of(win, plan)
        if plan != "auto" or ops < win.out_size * (math.prod(win.kernel) - 1):
            one = _separable(win, axes, order, "separable" if plan == "auto" else plan)
    if one is None:
        one = _window_tournament(win)
    return _per_channel(dataclasses.replace(one, out_shape=(channels, *win.out_shape)), channels)
