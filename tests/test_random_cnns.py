"""Property tests: random small CNNs lower exactly, in the mlp and the im2col form.

A network is a :class:`Net`: an input ``[N, C, *spatial]`` (C 1-3, 2-D H/W or 1-D L in 4-12,
batch 1 or dynamic), 1-5 layers drawn from Conv (random kernel, stride, asymmetric pads,
dilation, group), BatchNormalization, Relu, LeakyRelu, MaxPool, AveragePool (ceil_mode,
count_include_pad, pads, dilation) and a residual block (Conv → Relu → Conv + skip Add), then
Flatten and Gemm to 1-5 outputs. The layers are small frozen dataclasses, so a failing example
shrinks to something like::

    Net(input=(1, 2, 5, 5), dynamic_batch=False,
        layers=[Conv(out=1, k=2, s=1, pad=(1, 0, 0, 0), d=1, group=1), MaxPool(k=2, s=2, ...)],
        outputs=1, seed=0)

and the failing model is printed as ONNX text (``note``). Weights come from
``np.random.default_rng(seed)`` scaled by 1/sqrt(fan-in), so activations stay O(1).

Every example is lowered with ``form="mlp"`` and ``form="im2col"`` and checked with
``onnx_lower.validate(original, lowered, rtol=1e-4, atol=1e-5)`` on random inputs in [-1, 1];
the mlp result may contain only Flatten/Reshape/MatMul/Add/Relu, the im2col result no conv,
pool or BatchNormalization. The example count comes from the hypothesis profile
(``tests/conftest.py``: 50 by default, ``HYPOTHESIS_PROFILE=slow`` for 300); the ``slow``-marked
variant always runs at least 300.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx
import pytest
from hypothesis import given, note, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from onnx import TensorProto, helper, numpy_helper

import onnx_lower
from onnx_lower.windows import output_extent
from tests.oracles import check_ops, run_model, run_op

#: AveragePool dilations need opset 19. Opset 22 because onnx's shape inference for older opsets
#: keeps a ceil_mode pool window that starts in the end padding, which onnxruntime (and the spec
#: since opset 19's text, the reference evaluator) drops: see test_ceil_mode_pool_shape_before_
#: opset_22 below, which shows the resulting bug on opset 13/19 models.
OPSET = 22
RTOL, ATOL = 1e-4, 1e-5

# --------------------------------------------------------------------------- layer specs


@dataclass(frozen=True)
class Conv:
    out: int
    k: int
    s: int
    pad: tuple[int, ...]  # ONNX order: all begins, then all ends
    d: int = 1
    group: int = 1


@dataclass(frozen=True)
class BatchNorm:
    pass


@dataclass(frozen=True)
class Relu:
    pass


@dataclass(frozen=True)
class LeakyRelu:
    alpha: float = 0.01


@dataclass(frozen=True)
class MaxPool:
    k: int
    s: int
    pad: tuple[int, ...] = ()
    d: int = 1
    ceil: bool = False


@dataclass(frozen=True)
class AveragePool:
    k: int
    s: int
    pad: tuple[int, ...] = ()
    d: int = 1
    ceil: bool = False
    count_include_pad: bool = False


@dataclass(frozen=True)
class Residual:
    """Conv(k, same pads) → Relu → Conv(k, same pads), plus the block's input."""

    k: int


Layer = Conv | BatchNorm | Relu | LeakyRelu | MaxPool | AveragePool | Residual


@dataclass(frozen=True)
class Net:
    input: tuple[int, ...]  # (1, C, *spatial); axis 0 is "N" when dynamic_batch
    dynamic_batch: bool
    layers: list[Layer] = field(default_factory=list)
    outputs: int = 1
    seed: int = 0


# --------------------------------------------------------------------------- shapes


def conv_out(n: int, k: int, s: int, pb: int, pe: int, d: int) -> int:
    return output_extent(n, k, s, d, pb, pe)


def pool_out(n: int, k: int, s: int, pb: int, pe: int, d: int, ceil: bool) -> int:
    """Output extent of a pool (the library's rule, checked against onnxruntime below)."""
    return output_extent(n, k, s, d, pb, pe, ceil)


def _kernels(spatial: tuple[int, ...], max_d: int) -> list[tuple[int, int]]:
    """(k, d) pairs whose dilated kernel fits every axis without padding, simplest first."""
    smallest = min(spatial)
    pairs = [(k, d) for d in range(1, max_d + 1) for k in (1, 2, 3)
             if (d == 1 or k > 1) and d * (k - 1) + 1 <= smallest]
    return sorted(pairs, key=lambda kd: (kd[1], abs(kd[0] - 2)))


# --------------------------------------------------------------------------- strategies


@st.composite
def conv_layer(draw, c: int, spatial: tuple[int, ...]):
    out = draw(st.integers(1, 6))
    groups = [g for g in range(1, min(c, out) + 1) if c % g == 0 and out % g == 0]
    group = draw(st.sampled_from(groups))
    k, d = draw(st.sampled_from(_kernels(spatial, 2)))
    s = draw(st.integers(1, 3))
    pad = tuple(draw(st.integers(0, k - 1)) for _ in range(2 * len(spatial)))
    r = len(spatial)
    new = tuple(conv_out(n, k, s, pad[i], pad[i + r], d) for i, n in enumerate(spatial))
    return Conv(out, k, s, pad, d, group), out, new


@st.composite
def pool_layer(draw, c: int, spatial: tuple[int, ...], average: bool):
    k, d = draw(st.sampled_from(_kernels(spatial, 2)))
    s = draw(st.integers(1, 3))
    r = len(spatial)
    # pads < kernel (onnxruntime requires it); with a dilation, no pads, so that every window
    # keeps at least one tap inside the input (a MaxPool window of padding only is refused).
    pad = (0,) * (2 * r) if d > 1 else tuple(draw(st.integers(0, k - 1)) for _ in range(2 * r))
    ceil = draw(st.booleans())
    new = tuple(pool_out(n, k, s, pad[i], pad[i + r], d, ceil) for i, n in enumerate(spatial))
    if average:
        layer = AveragePool(k, s, pad, d, ceil, draw(st.booleans()))
    else:
        layer = MaxPool(k, s, pad, d, ceil)
    return layer, c, new


KINDS = ("Conv", "Relu", "MaxPool", "AveragePool", "BatchNorm", "LeakyRelu", "Residual")


@st.composite
def nets(draw) -> Net:
    rank = draw(st.sampled_from((2, 1)))
    c = draw(st.integers(1, 3))
    spatial = tuple(draw(st.integers(4, 12)) for _ in range(rank))
    dynamic = draw(st.booleans())
    shape = (1, c, *spatial)
    layers: list[Layer] = []
    for _ in range(draw(st.integers(1, 5))):
        kind = draw(st.sampled_from(KINDS))
        if kind == "Conv":
            layer, c, spatial = draw(conv_layer(c, spatial))
        elif kind in ("MaxPool", "AveragePool"):
            layer, c, spatial = draw(pool_layer(c, spatial, kind == "AveragePool"))
        elif kind == "LeakyRelu":
            layer = LeakyRelu(draw(st.sampled_from((0.01, 0.2, -0.5))))
        elif kind == "Residual":
            layer = Residual(draw(st.sampled_from((3, 1))))
        else:
            layer = {"Relu": Relu, "BatchNorm": BatchNorm}[kind]()
        assert min(spatial) >= 1, (layers, layer)
        layers.append(layer)
    outputs = draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**16))
    return Net(shape, dynamic, layers, outputs, seed)


# --------------------------------------------------------------------------- ONNX model


class _Builder:
    def __init__(self, rng: np.random.Generator):
        self.rng, self.nodes, self.inits, self.n = rng, [], [], 0

    def name(self, base: str) -> str:
        self.n += 1
        return f"{base}{self.n}"

    def const(self, base: str, value: np.ndarray) -> str:
        name = self.name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=self.name(op), **attrs))
        return out

    def conv(self, x: str, c: int, out: int, k: int, rank: int, *, s=1, pad=None, d=1,
             group=1) -> str:
        fan_in = (c // group) * k**rank
        w = self.rng.standard_normal((out, c // group, *(k,) * rank)) / math.sqrt(fan_in)
        b = self.rng.uniform(-0.1, 0.1, out)
        return self.node("Conv", [x, self.const("W", w), self.const("B", b)],
                         kernel_shape=[k] * rank, strides=[s] * rank, dilations=[d] * rank,
                         pads=list(pad or [0] * (2 * rank)), group=group)


def build_model(net: Net) -> onnx.ModelProto:
    rng = np.random.default_rng(net.seed)
    b = _Builder(rng)
    rank = len(net.input) - 2
    c, spatial = net.input[1], net.input[2:]
    x = "input"
    for layer in net.layers:
        if isinstance(layer, Conv):
            x = b.conv(x, c, layer.out, layer.k, rank, s=layer.s, pad=layer.pad, d=layer.d,
                       group=layer.group)
            c = layer.out
            spatial = [conv_out(n, layer.k, layer.s, layer.pad[i], layer.pad[i + rank], layer.d)
                       for i, n in enumerate(spatial)]
        elif isinstance(layer, BatchNorm):
            params = [rng.uniform(0.5, 1.5, c), rng.uniform(-0.2, 0.2, c),
                      rng.uniform(-0.2, 0.2, c), rng.uniform(0.5, 2.0, c)]
            names = [b.const(p, v) for p, v in zip(("scale", "bias", "mean", "var"), params)]
            x = b.node("BatchNormalization", [x, *names], epsilon=1e-5)
        elif isinstance(layer, Relu):
            x = b.node("Relu", [x])
        elif isinstance(layer, LeakyRelu):
            x = b.node("LeakyRelu", [x], alpha=layer.alpha)
        elif isinstance(layer, (MaxPool, AveragePool)):
            attrs = dict(kernel_shape=[layer.k] * rank, strides=[layer.s] * rank,
                         pads=list(layer.pad or [0] * (2 * rank)), dilations=[layer.d] * rank,
                         ceil_mode=int(layer.ceil))
            if isinstance(layer, AveragePool):
                attrs["count_include_pad"] = int(layer.count_include_pad)
            x = b.node(type(layer).__name__, [x], **attrs)
            pad = layer.pad or (0,) * (2 * rank)
            spatial = [pool_out(n, layer.k, layer.s, pad[i], pad[i + rank], layer.d, layer.ceil)
                       for i, n in enumerate(spatial)]
        elif isinstance(layer, Residual):
            p = (layer.k - 1) // 2
            h = b.conv(x, c, c, layer.k, rank, pad=[p] * (2 * rank))
            h = b.node("Relu", [h])
            h = b.conv(h, c, c, layer.k, rank, pad=[p] * (2 * rank))
            x = b.node("Add", [h, x])
        else:  # pragma: no cover - a new layer kind without a builder
            raise TypeError(layer)
    flat = b.node("Flatten", [x], axis=1)
    features = c * math.prod(spatial)
    w = rng.standard_normal((net.outputs, features)) / math.sqrt(features)
    b.nodes.append(helper.make_node(  # PyTorch's Linear: Gemm(x, W^T) + b
        "Gemm", [flat, b.const("fc_W", w), b.const("fc_B", rng.uniform(-0.1, 0.1, net.outputs))],
        ["logits"], name="fc", transB=1))
    batch = "N" if net.dynamic_batch else 1
    graph = helper.make_graph(
        b.nodes, "random_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, *net.input[1:]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, net.outputs])],
        initializer=b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    return model


# --------------------------------------------------------------------------- the property


def _note(text: str) -> None:
    """``hypothesis.note`` inside a property test (printed for the failing example only)."""
    try:
        note(text)
    except InvalidArgument:  # called from a plain test
        pass


def check_net(net: Net, forms=("mlp", "im2col")) -> None:
    model = build_model(net)
    _note(f"original model:\n{onnx.printer.to_text(model.graph)}")
    batch = 2 if net.dynamic_batch else 1
    for form in forms:
        lowered, report = onnx_lower.lower(model, form=form)
        check_ops(model, lowered, form)
        result = onnx_lower.validate(model, lowered, rtol=RTOL, atol=ATOL, samples=2,
                                     seed=net.seed, input_range=(-1.0, 1.0), batch=batch)
        if not result.passed:
            _note(f"lowered ({form}) model:\n{onnx.printer.to_text(lowered.graph)}")
        assert result.passed, f"{form}: " + "; ".join(
            o.message or "" for o in result.outputs if not o.passed)


@given(net=nets())
def test_random_cnn_lowers_exactly(net):
    check_net(net)


@pytest.mark.slow
@settings(max_examples=max(300, settings().max_examples))
@given(net=nets())
def test_random_cnn_lowers_exactly_many(net):
    check_net(net)


# --------------------------------------------------------------------------- the generator


@pytest.mark.parametrize("op", ["MaxPool", "AveragePool"])
def test_pool_out_matches_onnxruntime(op):
    """The strategy's shape arithmetic (ceil_mode's dropped last window) is onnxruntime's."""
    for n in (4, 5, 7):
        for k in (2, 3):
            for s in (2, 3):
                for pb in range(k):
                    for pe in range(k):
                        x = np.zeros((1, 1, n), np.float32)
                        y = run_op(op, x, kernel_shape=[k], strides=[s], pads=[pb, pe],
                                   ceil_mode=1)
                        assert y.shape[-1] == pool_out(n, k, s, pb, pe, 1, True), (n, k, s, pb, pe)


def test_failing_examples_read_well():
    net = Net((1, 3, 8, 8), False, [Conv(out=2, k=3, s=2, pad=(1, 0, 1, 1)),
                                    MaxPool(k=2, s=2, ceil=True), Residual(3)], 2, 7)
    assert repr(net.layers) == (
        "[Conv(out=2, k=3, s=2, pad=(1, 0, 1, 1), d=1, group=1), "
        "MaxPool(k=2, s=2, pad=(), d=1, ceil=True), Residual(k=3)]")
    check_net(net)  # and it builds, lowers and validates


# --------------------------------------------------------------------------- regressions


@pytest.mark.parametrize("out_dims", [["N", 1, 2, 2], ["a", "b", "c", "d"]],
                         ids=["static", "symbolic"])
@pytest.mark.parametrize("opset", [13, 19])
@pytest.mark.parametrize("op", ["MaxPool", "AveragePool"])
@pytest.mark.parametrize("form", ["mlp", "im2col"])
def test_ceil_mode_pool_shape_before_opset_22(form, op, opset, out_dims):
    """A ceil_mode pool whose last window would start past the input (4 → 2 with k=1, s=2).

    onnxruntime and the reference evaluator drop that window (2x2 output), but onnx's shape
    inference for opsets < 22 keeps it (3x3), and so does the symbolic shape inference that
    ``resolve-shapes`` runs. (onnxruntime refuses such a model when a later op depends on the
    pooled shape statically, e.g. Flatten → MatMul, so the pool feeds a Relu here.) The mlp
    MaxPool lowering took its output shape from the inferred 3x3 and refused ("term has 4 rows,
    output has 9"), or with symbolic declared output dims failed with "invalid literal for int()
    with base 10: 'b'". Found by test_random_cnn_lowers_exactly with opset 19 models; fixed in
    passes/pool.py (the tournament's last Affine uses the pool's own output shape).
    """
    pool = helper.make_node(op, ["x"], ["p"], kernel_shape=[1, 1], strides=[2, 2], ceil_mode=1)
    relu = helper.make_node("Relu", ["p"], ["y"])
    graph = helper.make_graph(
        [pool, relu], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_dims)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    x = np.arange(-16, 16, dtype=np.float32).reshape(2, 1, 4, 4)
    (y,) = run_model(model, {"x": x})
    np.testing.assert_array_equal(y, np.maximum(x[:, :, ::2, ::2], 0))  # onnxruntime's 2x2
    if out_dims[2] == 2:
        # the input gate runs onnx's full checker, whose strict shape inference (3x3) refuses
        # the declared 2x2 output: the model is refused before any pass, naming the checker
        from onnx_lower.errors import InvalidModelError

        with pytest.raises(InvalidModelError, match="fails the ONNX checker"):
            onnx_lower.lower(model, form=form)
        return
    lowered, _ = onnx_lower.lower(model, form=form)
    (got,) = run_model(lowered, {"x": x})
    np.testing.assert_array_equal(got, y)
