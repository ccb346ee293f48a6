#!/usr/bin/env python3
"""Single-layer experiments behind the im2col limits quoted in BENCHMARKS.md.

Usage::

    python tools/bench_layers.py                    # every experiment
    python tools/bench_layers.py --only dwslices --repeat 30
    python tools/bench_layers.py --only maxpool --repeat 30
    python tools/bench_layers.py --only gather --repeat 100
    python tools/bench_layers.py --only grouped
    python tools/bench_layers.py --only residual,clip,stem --repeat 60

``gather``: onnxruntime's Gather copying the 3×3 taps of a stride-1 conv as 9 blocks of C
floats per output row (what ``lower-im2col`` emits) against 3 blocks of 3·C floats (one per
kernel row, as a tap layout built for it would allow). Equal times mean Gather is bound by the
bytes it moves, not by the number of blocks.

``depthwise``: a depthwise 3×3 conv in chunks of ~1 MB of taps, as ``lower-im2col`` emits it
(``Gather (rows, K, C)``, ``Mul w[K, C]``, ``ReduceSum`` over K) against a tap-major variant
(``Gather (K, rows, C)``, ``Mul``, then the sum over K as ``MatMul(ones(1, K), ·)``), and against
onnxruntime's native depthwise Conv.

``grouped`` (issue 13): ShuffleNet-style grouped 1×1 convs (+ Relu), alone and followed by a
channel shuffle (Reshape → Transpose → Reshape of the channels), lowered by ``lower-im2col``
itself on a channels-last input (an NHWC input and output, whose Transposes the form absorbs,
so only the layer is timed) under each formulation of :mod:`onnx_lower.passes.im2col.cost`
(``DENSE_GROUPS``): the batched per-group MatMul (``(N, g, S, C/g)``, two Transposes) against
one block-diagonal MatMul (g× the FLOPs, no Transpose), and against the native grouped Conv
(+ the native shuffle) on NCHW.

``dwslices`` (issue 13): depthwise 3×3 convs + bias + Clip(0, 6) (MobileNetV2/ShuffleNet
layers) lowered by ``lower-im2col`` on an NHWC input in both forms of
:mod:`onnx_lower.passes.im2col.grouped`: the gathered taps (``DW_SLICE_MAX_BYTES = 0``) and the
tap Slices (forced on: ``DW_SLICE_MIN_ROWS = 1``), against the native depthwise Conv + Clip.

``maxpool`` (issue 13): ReLU + MaxPool 3×3/2 (SqueezeNet's ceil_mode pools, ResNet's padded
one) lowered on an NHWC input as the gathered plan (``POOL_SLICES = False``) and as Slices of
an edge-padded input reducing the outer axis first or the last axis first
(``POOL_AXIS_ORDER``), against onnxruntime's Relu + MaxPool.

``residual`` (issue 13, epilogues): a 1×1 conv's GEMM on channels-last rows + a residual + Relu:
``Gemm(A, W, b)`` + Add + Relu (what a conv with its own bias gives) against ``Gemm(A, W, C=R)``
+ Relu (bias already in R), ``Add(R, b)`` first, and ``MatMul(A, W)`` + Add(R) + Relu (bias in
R: what ``im2col-fold``'s residual-bias move emits; onnxruntime fuses it into one FusedGemm).

``clip`` (issue 13, epilogues): a 1×1 conv's GEMM + bias + Clip(0, 6) (MobileNetV2's expand
convs) against the same GEMM with HardSigmoid(x/6) (onnxruntime fuses HardSigmoid into its
FusedGemm, Clip it does not; ``6·HardSigmoid(x/6)`` = Clip(x, 0, 6)), with Relu (fused) and
with no activation.

``stem`` (issue 13): a 3-channel stem conv + Relu: the im2col form as ``lower-im2col`` emits it
against "planes" (NCHW input, one strided Slice per tap and channel plane, a Concat of whole
planes, ``MatMul(W (M, K), cols (K, S))``: no small-block Gather) with and without the
Transpose back to channels-last rows, and the native Conv.

Every variant is checked against the native result first (``residual`` and ``clip``: against
the variant it should equal, as those place the bias or the scale differently). Sessions use
one thread; A/B/C runs are interleaved after warm-up and the medians are quoted with their
ratios.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO_ROOT))

from onnx_lower.benchmark import machine_info  # noqa: E402
from onnx_lower.validate import make_session  # noqa: E402
from tools.bench_knobs import lowered  # noqa: E402

F = TensorProto.FLOAT


def _model(nodes, inputs, inits):
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", F, None)],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _interleaved(runs, repeat: int, warmup: int = 5) -> list[float]:
    """Median ms of each (session, feed), run round-robin."""
    for sess, feed in runs:
        for _ in range(warmup):
            sess.run(None, feed)
    times = [[] for _ in runs]
    for _ in range(repeat):
        for i, (sess, feed) in enumerate(runs):
            start = time.perf_counter()
            sess.run(None, feed)
            times[i].append(time.perf_counter() - start)
    return [float(np.median(t)) * 1e3 for t in times]


def gather_blocks(repeat: int) -> list[str]:
    lines = ["| C | H=W | MB gathered | 9 blocks of C ms | 3 blocks of 3C ms | GB/s (9 / 3) |",
             "|---:|---:|---:|---:|---:|---|"]
    rng = np.random.default_rng(0)
    for c, hw in ((64, 56), (128, 28), (256, 14)):
        rows, width = (hw + 3) * (hw + 2), hw + 2
        out_rows = hw * width
        base = np.arange(out_rows)
        idx9 = np.stack([base + i * width + j for i in range(3) for j in range(3)], 1)
        idx3 = np.stack([base + i * width for i in range(3)], 1)
        runs = []
        for block, idx in ((c, idx9), (3 * c, idx3)):
            x = rng.standard_normal((rows, block)).astype(np.float32)
            node = helper.make_node("Gather", ["x", "i"], ["y"], axis=0)
            model = _model([node], [helper.make_tensor_value_info("x", F, [rows, block])],
                           {"i": idx.astype(np.int64)})
            runs.append((make_session(model), {"x": x}))
        ms = _interleaved(runs, repeat)
        mb = out_rows * 9 * c * 4 / 1e6
        lines.append(f"| {c} | {hw} | {mb:.1f} | {ms[0]:.3f} | {ms[1]:.3f} | "
                     f"{mb / ms[0]:.1f} / {mb / ms[1]:.1f} |")
    return lines


def _dw_taps(hw: int, stride: int) -> np.ndarray:
    out = (hw + 2 - 3) // stride + 1
    r0, c0 = np.meshgrid(np.arange(out), np.arange(out), indexing="ij")
    taps = []
    for di in range(3):
        for dj in range(3):
            r, c = r0 * stride + di - 1, c0 * stride + dj - 1
            ok = (r >= 0) & (r < hw) & (c >= 0) & (c < hw)
            taps.append(np.where(ok, r * hw + c, hw * hw).reshape(-1))  # padding: zero row
    return np.stack(taps, 1).astype(np.int64)


def depthwise(repeat: int) -> list[str]:
    lines = ["| C | H=W | stride | chunks | emitted ms | tap-major ms | native ms | "
             "emitted / native | tap-major / emitted |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    rng = np.random.default_rng(0)
    for c, hw, stride in ((32, 112, 1), (96, 112, 2), (144, 56, 1), (192, 28, 1),
                          (576, 14, 1), (960, 7, 1)):
        s = hw * hw
        w = rng.standard_normal((c, 1, 3, 3)).astype(np.float32)
        x = rng.standard_normal((1, c, hw, hw)).astype(np.float32)
        x_cl = np.ascontiguousarray(x.reshape(c, s).T)[None]
        taps = _dw_taps(hw, stride)
        wk = np.ascontiguousarray(w.reshape(c, 9).T)
        step = max(1, (1 << 20) // (9 * c * 4))
        bounds = [*range(0, len(taps), step), len(taps)]
        common = {"pads": np.array([0, 0, 0, 0, 1, 0], np.int64),
                  "shape": np.array([s + 1, c], np.int64)}
        head = [helper.make_node("Pad", ["x", "pads"], ["xp"]),
                helper.make_node("Reshape", ["xp", "shape"], ["x2"])]
        emitted, tap_major = list(head), list(head)
        inits_e = {**common, "w": wk, "axis": np.array([1], np.int64)}
        inits_t = {**common, "w": wk[:, None, :], "ones": np.ones((1, 9), np.float32)}
        for q, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            inits_e[f"i{q}"] = taps[lo:hi]
            emitted += [
                helper.make_node("Gather", ["x2", f"i{q}"], [f"g{q}"], axis=0),
                helper.make_node("Mul", [f"g{q}", "w"], [f"m{q}"]),
                helper.make_node("ReduceSum", [f"m{q}", "axis"], [f"y{q}"], keepdims=0),
            ]
            inits_t[f"i{q}"] = np.ascontiguousarray(taps[lo:hi].T)
            inits_t[f"flat{q}"] = np.array([9, (hi - lo) * c], np.int64)
            inits_t[f"back{q}"] = np.array([hi - lo, c], np.int64)
            tap_major += [
                helper.make_node("Gather", ["x2", f"i{q}"], [f"g{q}"], axis=0),
                helper.make_node("Mul", [f"g{q}", "w"], [f"m{q}"]),
                helper.make_node("Reshape", [f"m{q}", f"flat{q}"], [f"r{q}"]),
                helper.make_node("MatMul", ["ones", f"r{q}"], [f"p{q}"]),
                helper.make_node("Reshape", [f"p{q}", f"back{q}"], [f"y{q}"]),
            ]
        outs = [f"y{q}" for q in range(len(bounds) - 1)]
        emitted.append(helper.make_node("Concat", outs, ["y"], axis=0))
        tap_major.append(helper.make_node("Concat", outs, ["y"], axis=0))
        x_in = [helper.make_tensor_value_info("x", F, [1, s, c])]
        conv = helper.make_node("Conv", ["x", "wc"], ["y"], pads=[1, 1, 1, 1], group=c,
                                strides=[stride, stride])
        runs = [
            (make_session(_model(emitted, x_in, inits_e)), {"x": x_cl}),
            (make_session(_model(tap_major, x_in, inits_t)), {"x": x_cl}),
            (make_session(_model([conv], [helper.make_tensor_value_info("x", F, [1, c, hw, hw])],
                             {"wc": w})), {"x": x}),
        ]
        want = runs[2][0].run(None, runs[2][1])[0].reshape(c, -1).T
        for sess, feed in runs[:2]:
            got = sess.run(None, feed)[0].reshape(want.shape)
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
        ms = _interleaved(runs, repeat)
        lines.append(f"| {c} | {hw} | {stride} | {len(bounds) - 1} | {ms[0]:.3f} | "
                     f"{ms[1]:.3f} | {ms[2]:.3f} | {ms[0] / ms[2]:.2f} | {ms[1] / ms[0]:.3f} |")
    return lines


def _grouped_model(c: int, m: int, hw: int, group: int, shuffle: int, nhwc: bool):
    """Conv 1×1 (``group``) + Relu (+ a channel shuffle of ``shuffle`` groups), NCHW or NHWC."""
    rng = np.random.default_rng(0)
    inits = {"w": (rng.standard_normal((m, c // group, 1, 1)) / np.sqrt(c // group)
                   ).astype(np.float32), "b": rng.standard_normal(m).astype(np.float32)}
    nodes, x = [], "x"
    if nhwc:
        nodes.append(helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 3, 1, 2]))
        x = "xt"
    nodes += [helper.make_node("Conv", [x, "w", "b"], ["c"], kernel_shape=[1, 1], group=group),
              helper.make_node("Relu", ["c"], ["r"])]
    y = "r"
    if shuffle:
        inits["s1"] = np.array([1, shuffle, m // shuffle, hw, hw], np.int64)
        inits["s2"] = np.array([1, m, hw, hw], np.int64)
        nodes += [helper.make_node("Reshape", ["r", "s1"], ["r5"]),
                  helper.make_node("Transpose", ["r5"], ["t5"], perm=[0, 2, 1, 3, 4]),
                  helper.make_node("Reshape", ["t5", "s2"], ["sh"])]
        y = "sh"
    if nhwc:
        nodes.append(helper.make_node("Transpose", [y], ["y"], perm=[0, 2, 3, 1]))
    else:
        nodes[-1].output[0] = "y"
    shape = [1, hw, hw, c] if nhwc else [1, c, hw, hw]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, shape)],
                              [helper.make_tensor_value_info("y", F, None)],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return onnx.shape_inference.infer_shapes(model)


def _lowered(model, **knobs):
    """``model`` lowered to im2col with the :mod:`~onnx_lower.passes.im2col.cost` ``knobs``."""
    return lowered(model, knobs)


def _against_native(variants: list[dict], cl, feed_cl: dict, native, x: np.ndarray,
                    repeat: int, tol: float = 1e-4) -> list[float]:
    """Each knob set of ``variants`` lowers the channels-last ``cl``; every lowered model is
    checked against ``native`` (NCHW, input ``x``) and all run interleaved: their medians, the
    native one last."""
    runs = [(make_session(_lowered(cl, **knobs)), feed_cl) for knobs in variants]
    runs.append((make_session(native), {"x": x}))
    want = runs[-1][0].run(None, runs[-1][1])[0].transpose(0, 2, 3, 1)
    for sess, feed in runs[:-1]:
        np.testing.assert_allclose(sess.run(None, feed)[0], want, rtol=tol, atol=tol)
    return _interleaved(runs, repeat)


#: ShuffleNet V1 (g = 3) and V2-like grouped 1×1 layers: (C, M, H=W, groups, shuffle groups).
GROUPED_LAYERS = ((240, 60, 28, 3, 0), (60, 240, 28, 3, 0), (480, 120, 14, 3, 0),
                  (120, 480, 14, 3, 0), (960, 240, 7, 3, 0), (240, 240, 28, 8, 0),
                  (240, 60, 28, 3, 3), (480, 120, 14, 3, 3), (960, 240, 7, 3, 3))


def grouped(repeat: int) -> list[str]:
    lines = ["| C→M | H=W | g | shuffle | batched ms | block-diagonal ms | native ms | "
             "batched / native | block-diag / native |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    rng = np.random.default_rng(0)
    for c, m, hw, group, shuffle in GROUPED_LAYERS:
        x = rng.standard_normal((1, c, hw, hw)).astype(np.float32)
        feed_cl = {"x": np.ascontiguousarray(x.transpose(0, 2, 3, 1))}
        cl = _grouped_model(c, m, hw, group, shuffle, nhwc=True)
        native = _grouped_model(c, m, hw, group, shuffle, nhwc=False)
        ms = _against_native([{"DENSE_GROUPS": 1}, {"DENSE_GROUPS": 1 << 30}], cl, feed_cl,
                             native, x, repeat)
        lines.append(f"| {c}→{m} | {hw} | {group} | {shuffle or '-'} | {ms[0]:.3f} | "
                     f"{ms[1]:.3f} | {ms[2]:.3f} | {ms[0] / ms[2]:.2f} | {ms[1] / ms[2]:.2f} |")
    return lines


def _nhwc_wrap(nodes, x_in: str, y_out: str, c: int, hw: int, inits: dict):
    """``nodes`` (NCHW ``x_in`` → ``y_out``) between an NHWC input Transpose and an NHWC output
    Transpose (which the im2col form absorbs), shape-inferred."""
    nodes = [helper.make_node("Transpose", ["x"], [x_in], perm=[0, 3, 1, 2]), *nodes,
             helper.make_node("Transpose", [y_out], ["y"], perm=[0, 2, 3, 1])]
    model = _model(nodes, [helper.make_tensor_value_info("x", F, [1, hw, hw, c])], inits)
    return onnx.shape_inference.infer_shapes(model)


#: MobileNetV2 / ShuffleNet V2 depthwise layers: (C, H=W, stride).
DW_LAYERS = ((32, 112, 1), (96, 112, 2), (144, 56, 1), (144, 56, 2), (192, 28, 1),
             (58, 28, 1), (116, 14, 1), (384, 14, 1), (576, 14, 1), (960, 7, 1))


def dwslices(repeat: int) -> list[str]:
    lines = ["| C | H=W | stride | gather ms | slices ms | native ms | gather / native | "
             "slices / native | slices / gather |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    rng = np.random.default_rng(0)
    for c, hw, stride in DW_LAYERS:
        inits = {"w": rng.standard_normal((c, 1, 3, 3)).astype(np.float32),
                 "b": rng.standard_normal(c).astype(np.float32),
                 "lo": np.float32(0), "hi": np.float32(6)}
        conv = helper.make_node("Conv", ["xt", "w", "b"], ["c"], pads=[1, 1, 1, 1], group=c,
                                strides=[stride, stride])
        clip = helper.make_node("Clip", ["c", "lo", "hi"], ["r"])
        cl = _nhwc_wrap([conv, clip], "xt", "r", c, hw, inits)
        x = rng.standard_normal((1, c, hw, hw)).astype(np.float32)
        feed_cl = {"x": np.ascontiguousarray(x.transpose(0, 2, 3, 1))}
        conv.input[0], clip.output[0] = "x", "y"
        native = _model([conv, clip], [helper.make_tensor_value_info("x", F, [1, c, hw, hw])],
                        inits)
        ms = _against_native([{"DW_SLICE_MAX_BYTES": 0},
                              {"DW_SLICE_MAX_BYTES": 1 << 30, "DW_SLICE_MIN_ROWS": 1}],
                             cl, feed_cl, native, x, repeat)
        lines.append(f"| {c} | {hw} | {stride} | {ms[0]:.3f} | {ms[1]:.3f} | {ms[2]:.3f} | "
                     f"{ms[0] / ms[2]:.2f} | {ms[1] / ms[2]:.2f} | {ms[1] / ms[0]:.2f} |")
    return lines


#: Max pools (C, H=W, kernel, pads, ceil_mode), stride 2: SqueezeNet 1.1 / 1.0 and ResNet /
#: ShuffleNet 3×3, VGG-11 2×2.
POOL_LAYERS = ((64, 111, 3, 0, 1), (128, 55, 3, 0, 1), (256, 27, 3, 0, 1), (96, 109, 3, 0, 1),
               (64, 112, 3, 1, 0), (24, 112, 3, 1, 0), (64, 224, 2, 0, 0), (128, 112, 2, 0, 0),
               (256, 56, 2, 0, 0), (512, 28, 2, 0, 0), (512, 14, 2, 0, 0))


def maxpool(repeat: int) -> list[str]:
    lines = ["| C | H=W | kernel | pads | ceil | gather ms | slices outer-first ms | "
             "slices last-first ms | native ms | gather / native | outer-first / native | "
             "last-first / native |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    rng = np.random.default_rng(0)
    for c, hw, k, pad, ceil in POOL_LAYERS:
        relu = helper.make_node("Relu", ["xt"], ["r"])
        pool = helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[k, k], strides=[2, 2],
                                pads=[pad] * 4, ceil_mode=ceil)
        cl = _nhwc_wrap([relu, pool], "xt", "p", c, hw, {})
        x = rng.standard_normal((1, c, hw, hw)).astype(np.float32)
        feed_cl = {"x": np.ascontiguousarray(x.transpose(0, 2, 3, 1))}
        relu.input[0], pool.output[0] = "x", "y"
        native = _model([relu, pool], [helper.make_tensor_value_info("x", F, [1, c, hw, hw])],
                        {})
        ms = _against_native([{"POOL_SLICES": False}, {"POOL_AXIS_ORDER": "first"},
                              {"POOL_AXIS_ORDER": "last"}], cl, feed_cl, native, x, repeat,
                             tol=1e-6)
        lines.append(f"| {c} | {hw} | {k}×{k} | {pad} | {ceil} | {ms[0]:.3f} | {ms[1]:.3f} | "
                     f"{ms[2]:.3f} | {ms[3]:.3f} | {ms[0] / ms[3]:.2f} | {ms[1] / ms[3]:.2f} | "
                     f"{ms[2] / ms[3]:.2f} |")
    return lines


RESIDUAL_LAYERS = ((3136, 64, 256), (784, 128, 512), (196, 256, 1024), (49, 512, 2048),
                   (3136, 64, 64), (784, 128, 128))
CLIP_LAYERS = ((12544, 16, 96), (3136, 24, 144), (784, 32, 192), (196, 64, 384), (49, 160, 960),
               (49, 320, 1280))
STEM_LAYERS = ((3, 64, 224, 3, 1, 1), (3, 64, 224, 7, 2, 3), (3, 64, 224, 3, 2, 0),
               (3, 32, 224, 3, 2, 1), (3, 24, 224, 3, 2, 1))


def _gemm_variants(variants: dict, m: int, k: int, n: int, repeat: int, extra_input: bool,
                   same: tuple = ()):
    """Median ms of each ``name: nodes`` variant over ``a (m, k)`` [and ``r (m, n)``], after
    checking each ``(i, j, scale)`` of ``same``: variant i's output is ``scale`` × variant j's."""
    rng = np.random.default_rng(0)
    inits = {"w": rng.standard_normal((k, n)).astype(np.float32),
             "b": rng.standard_normal(n).astype(np.float32)}
    feed = {"a": rng.standard_normal((m, k)).astype(np.float32)}
    inputs = [helper.make_tensor_value_info("a", F, [m, k])]
    if extra_input:
        feed["r"] = rng.standard_normal((m, n)).astype(np.float32)
        inputs.append(helper.make_tensor_value_info("r", F, [m, n]))
    runs = []
    for nodes in variants.values():
        used = {i for node in nodes for i in node.input}
        model = _model(nodes, inputs, {key: v for key, v in inits.items() if key in used})
        runs.append((make_session(model), feed))
    outs = [sess.run(None, fd)[0] for sess, fd in runs]
    for i, j, scale in same:
        np.testing.assert_allclose(outs[i], scale * outs[j], rtol=1e-5, atol=1e-4)
    return _interleaved(runs, repeat)


def _gemm_table(variants: dict, layers, repeat: int, extra_input: bool,
                same: tuple = ()) -> list[str]:
    """A table row per ``(M, K, N)`` layer: the first variant's ms, the others' ratios to it."""
    names = list(variants)
    lines = [f"| M×K×N | {names[0]} ms | " + " | ".join(f"{v} / first" for v in names[1:]) + " |",
             "|---|---:|" + "---:|" * (len(names) - 1)]
    for m, k, n in layers:
        ms = _gemm_variants(variants, m, k, n, repeat, extra_input=extra_input, same=same)
        lines.append(f"| {m}×{k}×{n} | {ms[0]:.3f} | "
                     + " | ".join(f"{t / ms[0]:.2f}" for t in ms[1:]) + " |")
    return lines


def residual(repeat: int) -> list[str]:
    node = helper.make_node
    variants = {
        "Gemm(b) + Add + Relu": [node("Gemm", ["a", "w", "b"], ["g"]),
                                 node("Add", ["g", "r"], ["s"]), node("Relu", ["s"], ["y"])],
        "Gemm(C=R) + Relu": [node("Gemm", ["a", "w", "r"], ["g"]), node("Relu", ["g"], ["y"])],
        "Add(R, b) + Gemm(C) + Relu": [node("Add", ["r", "b"], ["rb"]),
                                       node("Gemm", ["a", "w", "rb"], ["g"]),
                                       node("Relu", ["g"], ["y"])],
        "MatMul + Add(R) + Relu": [node("MatMul", ["a", "w"], ["g"]),
                                   node("Add", ["g", "r"], ["s"]), node("Relu", ["s"], ["y"])],
    }
    # the same R is fed to all: variants 1 and 3 stand for a bias already inside R
    return _gemm_table(variants, RESIDUAL_LAYERS, repeat, extra_input=True,
                       same=((0, 2, 1.0), (1, 3, 1.0)))


def clip(repeat: int) -> list[str]:
    node = helper.make_node
    gemm = node("Gemm", ["a", "w", "b"], ["g"])
    lo_hi = [helper.make_node("Constant", [], ["lo"], value_float=0.0),
             helper.make_node("Constant", [], ["hi"], value_float=6.0)]
    variants = {
        "Clip(0, 6)": [gemm, *lo_hi, node("Clip", ["g", "lo", "hi"], ["y"])],
        "6·HardSigmoid(x/6), 6 folded into the consumer": [
            gemm, node("HardSigmoid", ["g"], ["y"], alpha=1 / 6, beta=0.0)],
        "Relu": [gemm, node("Relu", ["g"], ["y"])],
        "none": [gemm, node("Identity", ["g"], ["y"])],
    }
    return _gemm_table(variants, CLIP_LAYERS, repeat, extra_input=False, same=((0, 1, 6.0),))


def _stem_planes(c, k, s, p, w, b, out_hw, transpose: bool):
    """The conv as one Slice per tap of the padded NCHW planes, a Concat, ``W @ cols``."""
    node = helper.make_node
    inits = {"pads": np.array([0, 0, p, p, 0, 0, p, p], np.int64),
             "axes": np.array([2, 3], np.int64), "steps": np.array([s, s], np.int64),
             "shape": np.array([k * k * c, out_hw * out_hw], np.int64),
             "wt": w.transpose(0, 2, 3, 1).reshape(w.shape[0], -1),
             "bc": b.reshape(-1, 1)}
    nodes, taps = [node("Pad", ["x", "pads"], ["xp"])], []
    span = s * (out_hw - 1) + 1
    for ky in range(k):
        for kx in range(k):
            inits[f"st{ky}_{kx}"] = np.array([ky, kx], np.int64)
            inits[f"en{ky}_{kx}"] = np.array([ky + span, kx + span], np.int64)
            nodes.append(node("Slice", ["xp", f"st{ky}_{kx}", f"en{ky}_{kx}", "axes", "steps"],
                              [f"t{ky}_{kx}"]))
            taps.append(f"t{ky}_{kx}")
    nodes += [node("Concat", taps, ["cat"], axis=1), node("Reshape", ["cat", "shape"], ["cols"]),
              node("MatMul", ["wt", "cols"], ["mm"]), node("Add", ["mm", "bc"], ["ab"]),
              node("Relu", ["ab"], ["r"]),
              node("Transpose", ["r"], ["y"], perm=[1, 0]) if transpose
              else node("Identity", ["r"], ["y"])]
    return nodes, inits


def stem(repeat: int) -> list[str]:
    lines = ["| C→M | H=W | kernel/stride | native ms | im2col / native | planes + Transpose / "
             "native | planes (no Transpose) / native |", "|---|---:|---|---:|---:|---:|---:|"]
    rng = np.random.default_rng(0)
    for c, m, hw, k, s, p in STEM_LAYERS:
        out_hw = (hw + 2 * p - k) // s + 1
        w = rng.standard_normal((m, c, k, k)).astype(np.float32)
        b = rng.standard_normal(m).astype(np.float32)
        x_in = [helper.make_tensor_value_info("x", F, [1, c, hw, hw])]
        native = _model([helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[k, k],
                                          strides=[s, s], pads=[p] * 4),
                         helper.make_node("Relu", ["c"], ["y"])], x_in, {"w": w, "b": b})
        typed = onnx.shape_inference.infer_shapes(native)  # the input gate wants a typed output
        native.graph.output[0].CopyFrom(typed.graph.output[0])
        x = rng.random((1, c, hw, hw), dtype=np.float32)
        ref = make_session(native).run(None, {"x": x})[0].reshape(m, -1)
        models = [native, lowered(native, {})]
        for transpose in (True, False):
            nodes, inits = _stem_planes(c, k, s, p, w, b, out_hw, transpose)
            models.append(_model(nodes, x_in, inits))
        sessions = [make_session(mdl) for mdl in models]
        for sess, want in zip(sessions[1:], (ref, ref.T, ref)):  # NCHW, rows, channel-major
            got = sess.run(None, {"x": x})[0].reshape(want.shape)
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
        ms = _interleaved([(sess, {"x": x}) for sess in sessions], repeat)
        lines.append(f"| {c}→{m} | {hw} | {k}×{k}/{s} | {ms[0]:.3f} | {ms[1] / ms[0]:.2f} | "
                     f"{ms[2] / ms[0]:.2f} | {ms[3] / ms[0]:.2f} |")
    return lines


EXPERIMENTS = {"gather": gather_blocks, "depthwise": depthwise, "grouped": grouped,
               "dwslices": dwslices, "maxpool": maxpool, "residual": residual, "clip": clip,
               "stem": stem}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", help="comma-separated experiments: " + ", ".join(EXPERIMENTS))
    ap.add_argument("--repeat", type=int, default=40, help="timed rounds (default 40)")
    args = ap.parse_args(argv)
    info = machine_info()
    print(f"machine: {info['cpu']}, {info['cores']} cores; onnxruntime {info['onnxruntime']}; "
          f"{info['date']}; 1 thread, {args.repeat} interleaved rounds, medians")
    only = args.only.split(",") if args.only else list(EXPERIMENTS)
    unknown = set(only) - set(EXPERIMENTS)
    if unknown:
        ap.error(f"unknown experiment(s) {sorted(unknown)}; choose from {', '.join(EXPERIMENTS)}")
    for name, run in EXPERIMENTS.items():
        if name in only:
            print(f"\n{name}\n")
            print("\n".join(run(args.repeat)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
