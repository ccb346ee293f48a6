"""Winograd convs in the im2col form, and the per-conv choice among its algorithms (issue 13).

Math (:mod:`onnx_lower.winograd`): a 3×3 (or 3-tap) stride-1 conv, groups 1, as F(m, 3) on
channels-last rows ``x`` ``(N, S, C)`` (``a = m + 2``, ``d`` spatial axes, ``T`` tiles)::

    D = Gather(Pad(x, zero row), taps_tᵀ, axis=1)       (N, a^d, T, C)      tap-major tiles
    V = Bᵀ_d · D                                         input transform, a MatMul with a constant
    M[p] = V[p] @ U[p]      p = 0 … a^d − 1              U = G g Gᵀ (float64, cast once)
    Y = Aᵀ_d · M                                         (N, m^d, T, C_out)
    y = Gather(Y, output_rows) + bias                    (N·S_out, C_out): the overhang dropped

then the conv's consumers (residual Add, Relu, Clip …) run on ``y`` as after any im2col conv.
Formulation (tools/bench_winograd.py, BENCHMARKS.md "Winograd (issue 13)"): the ``a^d`` GEMMs are
a Split and ``a^d`` 2-D MatMuls with ``U[p]`` as input 1 (onnxruntime prepacks constant 2-D B),
then a Concat — one 3-D MatMul against ``U`` is not prepacked and lost where the tiles are few
(256→256 @ 14²: F(4,3) 1.38× vs 0.91× native). Transforms: F(4,3) separable in 2-D (two
MatMuls with Bᵀ (6, 6) instead of one with Bᵀ⊗Bᵀ (36, 36): 0.79–0.90× vs 0.85–1.03×), F(2,3)
Kronecker (its 4×4 transform is cheap; separable measured slower).

Choice per conv (:func:`choose`), ``conv_algo``:

* ``im2col``: never Winograd. ``winograd``: F(4,3) where it passes the numerics gate, else
  F(2,3), for every eligible conv (3-tap kernels on 1-2 spatial axes, stride 1, dilation 1,
  groups 1; any pads). ``auto`` (default): the cheapest by :func:`estimate_ms`, a cost model of
  GEMM MACs at a tile-count-dependent efficiency, bytes moved, and per-node overhead, calibrated
  on this machine (AMD EPYC, 1 thread, onnxruntime 1.32; min-time ratios to the native Conv):

  ========================  ======  =====================  ======================
  layer                     im2col  F(2,3) kron split      F(4,3) separable split
  ========================  ======  =====================  ======================
  64→64 @ 56²               1.79    1.25                   0.90
  128→128 @ 28²             1.34    1.06                   0.79
  256→256 @ 14²             1.26    0.99                   0.93
  512→512 @ 7²              1.25    1.41                   1.97
  ========================  ======  =====================  ======================

  (The 3-channel 224² stem and other thin layers stay im2col: few channels make the
  transforms and copies dominate.) Whole networks, auto against im2col, A/B: VGG-11 0.69×
  (1 thread) / 0.79× (2 threads), ResNet-18 0.96× / 0.90×, ResNet-50 0.96× (BENCHMARKS.md).
* Numerics gate: F(4,3) only if :func:`onnx_lower.winograd.probe_error` of the layer's own
  weights (its first 32 output channels, 2×2 tiles of standard-normal input) in float32 is at
  most :data:`ERROR_GATE`; F(2,3) is about as accurate as direct and is not gated.

Every choice is noted in ``model.notes["conv_algos"]`` (one dict per conv: name, algorithm,
reason, estimated ms per algorithm, probe error) for the report and ``--dry-run``.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx_graphsurgeon as gs

from onnx_lower import winograd as wg
from onnx_lower.errors import LoweringError
from onnx_lower.pass_manager import CONV_ALGOS
from onnx_lower.windows import resolve_pads

from . import cost
from .grouped import depthwise_slice_reason
from .layout import CL

__all__ = ["ERROR_GATE", "ConvChoice", "WinogradOps", "eligible", "estimate_ms", "choose"]

#: Largest float32 scaled error (probe) a layer may have to get F(4,3). The validation default
#: is rtol 1e-4 for the whole network; a deep net stacks ~20 such layers.
ERROR_GATE = 2e-5

# Cost model constants (ns; calibrated on the table in the module docstring).
# A least-squares fit of the table's 12 times gave 81 GMAC/s, 48 rows and 0.054 ns/byte (the
# transforms' MACs and the node count got weight 0 there; the node cost is onnxruntime's known
# ~4 µs, and the transform MACs are kept at a tenth of SGEMM speed so huge tiles cost something).
_NS_PER_MAC = 1 / 80.0          # MLAS SGEMM at full speed, ~80 GMAC/s on one thread
_TILE_ROWS_HALF = 48            # GEMM efficiency rows / (rows + this): small GEMMs run slower
_NS_PER_BYTE = 0.054            # a copy pass (Gather, Pad, Split, Concat, transforms)
_NS_PER_NODE = 4000             # onnxruntime's fixed cost of one node
_TRANSFORM_NS_PER_MAC = 1 / 80.0  # the thin transform MatMuls
_PROBE_CHANNELS = 32  # output channels the numerics probe runs
_CHUNK_BYTES = 2 << 20  # gathered tiles per chunk (im2col's chunk size)


@dataclasses.dataclass(frozen=True)
class ConvChoice:
    """The algorithm of one conv: ``im2col``, ``winograd-f2`` or ``winograd-f4``."""

    algo: str
    reason: str
    m: int | None = None
    estimates: dict[str, float] = dataclasses.field(default_factory=dict)
    probe_error: float | None = None
    pads: tuple[int, ...] = ()
    kernel: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()

    def to_note(self, name: str) -> dict:
        return {"name": name, "algo": self.algo, "reason": self.reason,
                "estimated_ms": {k: round(v, 4) for k, v in self.estimates.items()},
                "probe_error": self.probe_error}


def eligible(kernel, strides, dilations, group: int) -> str | None:
    """None if Winograd applies, else why not."""
    if len(kernel) not in (1, 2) or any(k != 3 for k in kernel):
        return f"kernel {tuple(kernel)} is not 3 or 3×3"
    if any(s != 1 for s in strides):
        return f"strides {tuple(strides)}"
    if any(d != 1 for d in dilations):
        return f"dilations {tuple(dilations)}"
    if group != 1:
        return f"group {group}"
    return None


def _eff(rows: int) -> float:
    return rows / (rows + _TILE_ROWS_HALF)


def estimate_ms(c_in: int, c_out: int, out_shape, m: int | None) -> float:
    """Modelled time of one conv in the im2col form (``m`` None) or as F(m, 3), in ms."""
    d, s_out = len(out_shape), math.prod(out_shape)
    if m is None:
        k = 3 ** d
        ns = (k * s_out * c_in * c_out * _NS_PER_MAC / _eff(s_out)
              + 4 * (k + 2) * s_out * c_in * _NS_PER_BYTE + 3 * _NS_PER_NODE)
        return ns / 1e6
    a = m + 2
    t = math.prod(-(-o // m) for o in out_shape)
    p = a ** d
    gemm = p * t * c_in * c_out * _NS_PER_MAC / _eff(t)
    tr_in = (2 * d * a) if d == 2 and m == 4 else p  # MACs per transformed value
    transforms = (tr_in * p * t * c_in + (m ** d) * p * t * c_out) * _TRANSFORM_NS_PER_MAC
    copies = 4 * (4 * p * t * c_in + 3 * p * t * c_out + 2 * s_out * c_out) * _NS_PER_BYTE
    nodes = (p + 10) * _NS_PER_NODE
    return (gemm + transforms + copies + nodes) / 1e6


def choose(conv_algo: str, weight: np.ndarray, out_shape, strides, dilations,
           group: int) -> ConvChoice:
    """The algorithm for one conv (see the module docstring)."""
    if conv_algo not in CONV_ALGOS:
        raise LoweringError(f"unknown conv algorithm '{conv_algo}'; choose one of "
                            f"{', '.join(CONV_ALGOS)}")
    c_out, c_in, *kernel = weight.shape
    if conv_algo == "im2col":
        return ConvChoice("im2col", "--conv-algo im2col")
    why = eligible(kernel, strides, dilations, group)
    if why is not None:
        return ConvChoice("im2col", f"not Winograd: {why}")
    est = {"im2col": estimate_ms(c_in, c_out, out_shape, None),
           "winograd-f2": estimate_ms(c_in, c_out, out_shape, 2),
           "winograd-f4": estimate_ms(c_in, c_out, out_shape, 4)}
    err = None
    if conv_algo == "winograd" or min(est, key=est.get) == "winograd-f4":
        # the error of one output channel does not depend on the others: probe a subset
        err = wg.probe_error(weight[:_PROBE_CHANNELS], 4, tiles=2)
        if err > ERROR_GATE:
            del est["winograd-f4"]
    if conv_algo == "winograd":
        algo = "winograd-f4" if "winograd-f4" in est else "winograd-f2"
        reason = "--conv-algo winograd"
    else:
        algo = min(est, key=est.get)
        others = ", ".join(f"{k} {v:.3g}" for k, v in est.items() if k != algo)
        reason = f"cheapest by the cost model: {est[algo]:.3g} ms est. (vs {others})"
    if err is not None and err > ERROR_GATE:
        reason += f"; F(4,3) refused: probe error {err:.1e} > {ERROR_GATE:g}"
    m = int(algo[-1]) if algo.startswith("winograd") else None
    return ConvChoice(algo, reason, m, est, err)


class WinogradOps:
    """The conv mixin of :class:`.lowering.Lowering` for F(m, 3): the choice and the emission."""

    def conv_choice(self, node: gs.Node, x: CL, weight: np.ndarray, strides, dilations,
                    group: int, pads, auto_pad) -> ConvChoice:
        """The algorithm of one Conv (see the module docstring), noted for the report."""
        kernel = tuple(weight.shape[2:])
        pads = resolve_pads(x.spatial, kernel, strides, dilations, pads, auto_pad)
        name = node.name or node.outputs[0].name
        dw = None
        if group > 1 and weight.shape[1] == 1:
            r = len(kernel)
            s_out = math.prod((n + pads[i] + pads[r + i] - dilations[i] * (k - 1) - 1)
                              // strides[i] + 1 for i, (n, k) in enumerate(zip(x.spatial, kernel)))
            dw = depthwise_slice_reason(x.channels, x.dtype.itemsize, weight.shape[0] // group,
                                        strides, self.e.opset, s_out)
        if dw is not None:
            choice = ConvChoice("depthwise-slices", dw)
        elif group > 1 and weight.shape[1] == 1 and cost.DEPTHWISE == "mul":
            choice = ConvChoice("depthwise", f"depthwise, {x.channels} channels: Gather + Mul + "
                                "ReduceSum (wide channel blocks or small maps)")
        elif group > cost.DENSE_GROUPS:
            choice = ConvChoice("grouped", f"group {group}: batched per-group MatMul")
        elif all(k == 1 for k in kernel) and not any(pads):
            choice = ConvChoice("matmul" if all(s == 1 for s in strides) else "im2col",
                                "1×1 conv: one MatMul on the (strided) rows")
        else:
            out_shape = tuple(n + pads[i] + pads[len(kernel) + i] - k + 1
                              for i, (n, k) in enumerate(zip(x.spatial, kernel)))
            choice = choose(getattr(self.model.options, "conv_algo", "auto"), weight,
                            out_shape, strides, dilations, group)
        self.model.note("conv_algos", choice.to_note(name))
        return dataclasses.replace(choice, pads=tuple(pads), kernel=kernel,
                                   strides=tuple(strides), dilations=tuple(dilations))

    def emit_winograd(self, x: CL, wg_: np.ndarray, b: gs.Constant | None, plan, out_t,
                      base: str, choice: ConvChoice) -> gs.Variable:
        """F(m, 3) for channels-last ``x`` with weights ``(1, K, C, M)`` (``plan`` unused: the
        tiles have their own gather table). Returns ``(N·S_out, C_out)`` rows when the batch is
        1, else ``(N, S_out, C_out)``."""
        e, dtype, m = self.e, x.dtype, choice.m
        _, _, c_in, c_out = wg_.shape
        weight = wg_[0].transpose(2, 1, 0).reshape(c_out, c_in, *choice.kernel)
        t = wg.transform(m, 3)
        grid = wg.tile_grid(x.spatial, choice.pads, m, 3)
        d, n, n_t = grid.rank, x.batch, grid.n_tiles
        p, mm_ = t.a ** d, m ** d
        s_out = math.prod(grid.out_shape)
        taps = grid.taps.T                                           # (a^d, T)
        src = self.source(self.t3(x), bool((taps < 0).any()), base)
        idx = np.where(taps >= 0, taps, x.s)
        sep = d == 2 and m == 4
        mats = {tag: (mat if sep else wg.kron_power(mat, d)).astype(dtype)
                for tag, mat in (("wino_bt", t.bt), ("wino_at", t.at))}
        bt_c, at_c = (e.const(f"{base}/{tag}", v) for tag, v in mats.items())
        u = wg.weight_transform(weight, t).astype(dtype)           # (a^d, C_in, C_out)
        u_c = [e.const(f"{base}/wino_u{q}", u[q]) for q in range(p)]
        # Column (1, …, 1) of Aᵀ_d is all ones (Aᵀ's column 1 is, for F(2,3) and F(4,3)), so
        # the bias added to that one position's GEMM reaches every output:
        # Aᵀ(M + e_q b) = AᵀM + b.
        q_bias = sum(t.a ** i for i in range(d))
        assert np.all(wg.kron_power(t.at, d)[:, q_bias] == 1)

        def transform(v, k, rows, a, cols, tag):
            """``kron_power(mat, d) @ v`` on ``(N, a^d, cols)`` → ``(N, rows^d, cols)``."""
            if not sep:
                flat = e.reshape(v, [-1, a ** d, cols], [n, a ** d, cols], f"{tag}_in")
                return e.binary("MatMul", k, flat, [n, rows ** d, cols], tag)
            v1 = e.reshape(v, [-1, a, a * cols], [n, a, a * cols], f"{tag}_in")
            h = e.binary("MatMul", k, v1, [n, rows, a * cols], f"{tag}_rows")
            h4 = e.reshape(h, [-1, rows, a, cols], [n, rows, a, cols], f"{tag}_mid")
            return e.binary("MatMul", k, h4, [n, rows, rows, cols], f"{tag}_cols")

        def chunk(lo: int, hi: int, tag: str) -> gs.Variable:
            """Tiles ``lo … hi − 1``: gather, transform, GEMMs, transform → (N, m^d, T_c, M)."""
            tc = hi - lo
            tiles = e.gather(src, idx[:, lo:hi], [n, p, tc, c_in], tag + "/wino_tiles")
            v = transform(tiles, bt_c, t.a, t.a, tc * c_in, tag + "/wino_bt")
            v4 = e.reshape(v, [-1, p, tc, c_in], [n, p, tc, c_in], tag + "/wino_v")
            parts = [gs.Variable(e.namer(f"{tag}/wino_v{q}"), dtype=dtype,
                                 shape=[n, 1, tc, c_in]) for q in range(p)]
            if e.opset >= 13:
                inputs, attrs = [v4, e.ints(tag + "/wino_split", [1] * p)], {"axis": 1}
            else:
                inputs, attrs = [v4], {"axis": 1, "split": [1] * p}
            e.graph.nodes.append(gs.Node("Split", e.namer(tag + "/wino_split"), attrs, inputs,
                                         parts))
            prods = [e.binary("MatMul", part, u_c[q], [n, 1, tc, c_out], f"{tag}/wino_gemm{q}")
                     for q, part in enumerate(parts)]
            if b is not None:
                prods[q_bias] = e.binary("Add", prods[q_bias], b, [n, 1, tc, c_out],
                                         tag + "/bias")
            mprod = e.concat(prods, 1, [n, p, tc, c_out], tag + "/wino_m")
            y = transform(mprod, at_c, m, t.a, tc * c_out, tag + "/wino_at")
            return e.reshape(y, [-1, mm_, tc, c_out], [n, mm_, tc, c_out], tag + "/wino_y")

        bounds = cost.chunk_bounds(n_t, p * c_in * dtype.itemsize, _CHUNK_BYTES)
        ys = [chunk(lo, hi, f"{base}/c{i}" if len(bounds) > 1 else base)
              for i, (lo, hi) in enumerate(bounds)]
        y = ys[0] if len(ys) == 1 else e.concat(ys, 2, [n, mm_, n_t, c_out],
                                                base + "/wino_concat")
        rows_idx = wg.output_rows(grid, "tap")
        if isinstance(n, (int, np.integer)) and n == 1:
            y2 = e.reshape(y, [mm_ * n_t, c_out], [mm_ * n_t, c_out], base + "/wino_rows")
            return e.gather(y2, rows_idx, [s_out, c_out], base + "/wino_out", axis=0)
        y3 = e.reshape(y, [-1, mm_ * n_t, c_out], [n, mm_ * n_t, c_out], base + "/wino_rows")
        return e.gather(y3, rows_idx, [n, s_out, c_out], base + "/wino_out", axis=1)
