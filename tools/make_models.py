"""Build the ONNX CNNs that onnx_lower is tested and benchmarked on.

Every model is built with ``onnx.helper`` and numpy from a fixed seed, so each run writes
byte-identical files. All models are float32, NCHW, opset 13, ir_version 8 (loadable by older
onnxruntime builds), with one input ``input`` and one output ``logits``.

Sample models (default mode, written to ``models/``; small, committed to the repository):

* ``lenet_maxpool.onnx``   LeNet-style MNIST CNN, input [N,1,28,28] with a dynamic batch ``N``:
  Conv 1->6 5x5 pad 2, Relu, MaxPool 2x2/2, Conv 6->16 5x5, Relu, MaxPool 2x2/2, Flatten,
  Gemm 400->120, Relu, Gemm 120->84, Relu, Gemm 84->10.
* ``avgpool_strided.onnx`` input [1,3,16,16]: Conv 3->8 3x3 stride 2 pad 1, Relu,
  AveragePool 2x2/2 (count_include_pad=0), Conv 8->8 3x3 pad 1, Relu, GlobalAveragePool,
  Flatten, Gemm 8->10.
* ``resblock_bn.onnx``     input [1,4,8,8]: Conv 4->8 3x3 pad 1 (with bias), BatchNormalization,
  Relu, then a residual block (Conv 8->8 3x3 pad 1, BN, Relu, Conv 8->8 3x3 pad 1, BN, Add skip,
  Relu; these convs have no bias, as in torchvision), Flatten, Gemm 512->10.

ImageNet-scale models (``--imagenet``, written to ``models/imagenet/``; large, never committed),
input [1,3,S,S] with S = ``--size`` (224), output [1,C] with C = ``--classes`` (1000):

* ``resnet18.onnx``    ResNet-18: 7x7/2 conv, BN, Relu, 3x3/2 MaxPool, 4 stages of 2 basic
  blocks (64/128/256/512, 1x1/2 conv+BN downsample on the skip), GlobalAveragePool, Gemm.
* ``resnet50.onnx``    ResNet-50 (v1.5, stride on the 3x3): bottleneck blocks [3,4,6,3], widths
  64/128/256/512, expansion 4.
* ``vgg11.onnx``       VGG-11 (config "A", no BN), then Gemm 512*(S/32)^2 -> F -> F -> C with Relu,
  F = ``--vgg-fc`` (4096: about 500 MB of weights; torchvision's AdaptiveAvgPool(7,7) is omitted,
  it is the identity at S=224).
* ``mobilenetv2.onnx`` MobileNetV2 (width 1.0, the standard t/c/n/s table): inverted residuals
  with Clip(0,6) as ReLU6, depthwise 3x3 convs (group = channels), linear 1x1 projections,
  residual Add when stride is 1 and channels match; 1x1 conv to 1280, GlobalAveragePool, Gemm.
* ``shufflenet.onnx``  ShuffleNet V1 (g = 3, width 1.0): 3x3/2 conv, MaxPool 3x3/2, stages of
  [4, 8, 4] units with 240/480/960 channels; a unit is grouped 1x1 conv + BN + Relu, channel
  shuffle (Reshape, Transpose, Reshape), depthwise 3x3 + BN, grouped 1x1 conv + BN, then a
  residual Add (stride 1) or a Concat with AveragePool 3x3/2 (stride 2), Relu.
* ``shufflenet_v2.onnx`` ShuffleNet V2 x1.0 (torchvision): stages of [4, 8, 4] units with
  116/232/464 channels; a unit splits the channels (Split), runs 1x1 + BN + Relu, depthwise 3x3
  + BN, 1x1 + BN + Relu on one half (stride 2: on the input, with a second depthwise + 1x1
  branch), Concat, channel shuffle of 2 groups; 1x1 conv to 1024, GlobalAveragePool, Gemm.
* ``squeezenet.onnx``  SqueezeNet 1.1: fire modules (squeeze 1x1 + Relu; expand 1x1 and 3x3 +
  Relu; Concat on channels), MaxPool 3x3/2 ceil_mode=1, final 1x1 conv to C, Relu,
  GlobalAveragePool, Flatten.

Weights are He-style (uniform, variance gain/fan_in) and BatchNorm parameters are random
(var in [0.5, 1.5], scale ~ sqrt(var) so each BN roughly preserves the activation scale), so
activations and logits stay O(1): numeric comparisons against onnxruntime stay meaningful.

Each written model is checked (``--check``, on by default): ``onnx.checker`` with full_check,
then one onnxruntime run on a random input, which must give finite logits with a sane std.

Commands (from the repository root)::

    python tools/make_models.py                                 # the 3 samples -> models/
    python tools/make_models.py --out /tmp/m --only lenet_maxpool
    python tools/make_models.py --imagenet                      # all 7 -> models/imagenet/
    python tools/make_models.py --imagenet --size 64 --out /tmp/in64 --only resnet18,vgg11
    python tools/make_models.py --imagenet --vgg-fc 256 --classes 10 --no-check
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLES_DIR = REPO_ROOT / "models"
IMAGENET_DIR = SAMPLES_DIR / "imagenet"

OPSET = 13
IR_VERSION = 8
PRODUCER = "onnx_lower/tools/make_models.py"

# A layer with weights of variance gain/fan_in multiplies the mean square of its input by
# ``gain``. A Relu (or ReLU6) halves the mean square of a zero-mean input, so a layer followed
# by one uses gain 2 (He) and a layer followed by no activation uses gain 1: either way the
# activation scale is kept from layer to layer.
RELU_GAIN = 2.0
LINEAR_GAIN = 1.0
# Scale of the last BN of a residual branch, so that the residual stream does not grow by a
# factor of ~2 in variance at every block of a deep net.
RESIDUAL_BN_SCALE = 0.5


_SHORT_NAMES = {"BatchNormalization": "bn", "AveragePool": "avgpool", "GlobalAveragePool": "gap"}


def _seed(name: str) -> int:
    """Per-model seed: stable across runs and Python processes (unlike ``hash``)."""
    return zlib.crc32(name.encode())


class GraphBuilder:
    """Appends nodes and initializers with unique, deterministic names.

    Each layer method takes the input tensor name and returns the output tensor name. Tensors
    are named after the node that produces them (``<scope>/<op><k>``, k counting per op type);
    parameters are ``<node>.weight``, ``<node>.bias``, ... .
    """

    def __init__(self, name: str, seed: int | None = None):
        self.name = name
        self.rng = np.random.default_rng(_seed(name) if seed is None else seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._counts: dict[str, int] = {}
        self._scope: list[str] = []
        self._consts: dict[str, str] = {}

    # -- naming and parameters ------------------------------------------------------------

    @contextlib.contextmanager
    def scope(self, name: str) -> Iterator[None]:
        """Prefix the names of the nodes created inside the block with ``name/``."""
        self._scope.append(name)
        try:
            yield
        finally:
            self._scope.pop()

    def _new_name(self, op: str) -> str:
        key = _SHORT_NAMES.get(op, op.lower())
        k = self._counts.get(key, 0)
        self._counts[key] = k + 1
        return "/".join([*self._scope, f"{key}{k}"])

    def _param(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.asarray(array, np.float32), name))
        return name

    def _uniform(self, shape: Sequence[int], low: float, high: float) -> np.ndarray:
        # rng.random (53 bits of a PCG64 draw) is the most version-stable numpy stream.
        u = self.rng.random(tuple(shape))
        u *= high - low
        u += low
        return u.astype(np.float32)

    def _he(self, shape: Sequence[int], fan_in: int, gain: float) -> np.ndarray:
        """Uniform with variance gain / fan_in (He / Kaiming uniform when gain = 2)."""
        bound = float(np.sqrt(3.0 * gain / fan_in))
        return self._uniform(shape, -bound, bound)

    def _const(self, name: str, value: float) -> str:
        """A shared scalar float initializer (e.g. Clip bounds)."""
        if name not in self._consts:
            self.initializers.append(numpy_helper.from_array(np.array(value, np.float32), name))
            self._consts[name] = name
        return self._consts[name]

    def _node(self, op: str, inputs: Sequence[str], **attrs) -> str:
        name = self._new_name(op)
        self.nodes.append(helper.make_node(op, list(inputs), [name], name=name, **attrs))
        return name

    # -- layers ---------------------------------------------------------------------------

    def conv(
        self,
        x: str,
        cin: int,
        cout: int,
        k: int,
        stride: int = 1,
        pad: int = 0,
        group: int = 1,
        bias: bool = True,
        gain: float = RELU_GAIN,
    ) -> str:
        """Conv with a [cout, cin/group, k, k] He-initialized weight (and a small bias).

        ``gain`` is RELU_GAIN if a Relu/ReLU6 follows (possibly after a BN), else LINEAR_GAIN.
        """
        name = self._new_name("Conv")
        fan_in = cin // group * k * k
        inputs = [
            x,
            self._param(f"{name}.weight", self._he((cout, cin // group, k, k), fan_in, gain)),
        ]
        if bias:
            inputs.append(self._param(f"{name}.bias", self._uniform((cout,), -0.1, 0.1)))
        attrs = {"kernel_shape": [k, k], "strides": [stride, stride], "pads": [pad] * 4}
        if group != 1:
            attrs["group"] = group
        self.nodes.append(helper.make_node("Conv", inputs, [name], name=name, **attrs))
        return name

    def bn(self, x: str, c: int, scale: float = 1.0) -> str:
        """Inference BatchNormalization with random statistics (var in [0.5, 1.5]).

        gamma = scale * sqrt(var) * U(0.8, 1.2), so the layer keeps its input's magnitude
        up to ``scale`` while still scaling every channel differently.
        """
        name = self._new_name("BatchNormalization")
        var = self._uniform((c,), 0.5, 1.5)
        gamma = scale * np.sqrt(var) * self._uniform((c,), 0.8, 1.2)
        beta = self._uniform((c,), -0.1, 0.1)
        mean = self._uniform((c,), -0.1, 0.1)
        inputs = [
            x,
            self._param(f"{name}.scale", gamma),
            self._param(f"{name}.bias", beta),
            self._param(f"{name}.mean", mean),
            self._param(f"{name}.var", var),
        ]
        self.nodes.append(
            helper.make_node("BatchNormalization", inputs, [name], name=name, epsilon=1e-5)
        )
        return name

    def relu(self, x: str) -> str:
        return self._node("Relu", [x])

    def relu6(self, x: str) -> str:
        """ReLU6 as opset-13 Clip, whose min/max are (shared) scalar initializers."""
        return self._node("Clip", [x, self._const("clip.min", 0.0), self._const("clip.max", 6.0)])

    def maxpool(self, x: str, k: int, stride: int, pad: int = 0, ceil_mode: bool = False) -> str:
        attrs = {"kernel_shape": [k, k], "strides": [stride, stride], "pads": [pad] * 4}
        if ceil_mode:
            attrs["ceil_mode"] = 1
        return self._node("MaxPool", [x], **attrs)

    def avgpool(self, x: str, k: int, stride: int, pad: int = 0) -> str:
        return self._node(
            "AveragePool",
            [x],
            kernel_shape=[k, k],
            strides=[stride, stride],
            pads=[pad] * 4,
            count_include_pad=0,
        )

    def global_avgpool(self, x: str) -> str:
        return self._node("GlobalAveragePool", [x])

    def flatten(self, x: str) -> str:
        return self._node("Flatten", [x], axis=1)

    def gemm(self, x: str, fin: int, fout: int, gain: float = RELU_GAIN) -> str:
        """Fully connected layer, PyTorch layout: y = x @ W.T + b with W [fout, fin]."""
        name = self._new_name("Gemm")
        w = self._param(f"{name}.weight", self._he((fout, fin), fin, gain))
        b = self._param(f"{name}.bias", self._uniform((fout,), -0.1, 0.1))
        self.nodes.append(helper.make_node("Gemm", [x, w, b], [name], name=name, transB=1))
        return name

    def add(self, a: str, b: str) -> str:
        return self._node("Add", [a, b])

    def concat(self, xs: Sequence[str]) -> str:
        return self._node("Concat", list(xs), axis=1)

    def split_channels(self, x: str, c: int) -> tuple[str, str]:
        """``x.chunk(2, dim=1)`` as PyTorch exports it at opset 13: Split with a ``split`` input."""
        name = self._new_name("Split")
        sizes = f"{name}.split"
        self.initializers.append(numpy_helper.from_array(np.array([c // 2, c // 2], np.int64),
                                                         sizes))
        outs = [f"{name}.0", f"{name}.1"]
        self.nodes.append(helper.make_node("Split", [x, sizes], outs, name=name, axis=1))
        return outs[0], outs[1]

    def channel_shuffle(self, x: str, c: int, hw: int, groups: int) -> str:
        """ShuffleNet's shuffle as PyTorch exports it: Reshape (1, g, C/g, H, W), Transpose of
        the two channel axes, Reshape (1, C, H, W)."""
        shapes = []
        for dims in ([1, groups, c // groups, hw, hw], [1, c, hw, hw]):
            shapes.append(f"shape.{'x'.join(map(str, dims))}")
            if shapes[-1] not in self._consts:  # int64 shapes, shared like _const's scalars
                self.initializers.append(
                    numpy_helper.from_array(np.array(dims, np.int64), shapes[-1]))
                self._consts[shapes[-1]] = shapes[-1]
        y = self._node("Reshape", [x, shapes[0]])
        y = self._node("Transpose", [y], perm=[0, 2, 1, 3, 4])
        return self._node("Reshape", [y, shapes[1]])

    # -- composite blocks -----------------------------------------------------------------

    def conv_bn(
        self,
        x: str,
        cin: int,
        cout: int,
        k: int,
        stride: int = 1,
        pad: int = 0,
        group: int = 1,
        act: str | None = "relu",
        bn_scale: float = 1.0,
    ) -> str:
        """Bias-free Conv, BN, then ``act`` ("relu", "relu6" or None)."""
        gain = LINEAR_GAIN if act is None else RELU_GAIN
        y = self.conv(x, cin, cout, k, stride, pad, group, bias=False, gain=gain)
        y = self.bn(y, cout, bn_scale)
        if act == "relu":
            return self.relu(y)
        if act == "relu6":
            return self.relu6(y)
        return y

    # -- model ----------------------------------------------------------------------------

    def build(
        self,
        y: str,
        input_shape: Sequence[int | str],
        output_shape: Sequence[int | str],
        doc: str = "",
    ) -> onnx.ModelProto:
        """Rename the final tensor ``y`` to ``logits`` and wrap everything in a ModelProto."""
        last = self.nodes[-1]
        if list(last.output) != [y]:
            raise ValueError(f"{self.name}: {y!r} is not the output of the last node")
        last.output[0] = "logits"
        graph = helper.make_graph(
            self.nodes,
            self.name,
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(input_shape))],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, list(output_shape))],
            initializer=self.initializers,
            doc_string=doc,
        )
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            ir_version=IR_VERSION,
            producer_name=PRODUCER,
            producer_version="1",
        )
        model.doc_string = doc
        return model


# ---------------------------------------------------------------------------------------
# Sample models
# ---------------------------------------------------------------------------------------


def lenet_maxpool() -> onnx.ModelProto:
    b = GraphBuilder("lenet_maxpool")
    x = b.relu(b.conv("input", 1, 6, 5, pad=2))
    x = b.maxpool(x, 2, 2)
    x = b.relu(b.conv(x, 6, 16, 5))
    x = b.maxpool(x, 2, 2)
    x = b.flatten(x)
    x = b.relu(b.gemm(x, 16 * 5 * 5, 120))
    x = b.relu(b.gemm(x, 120, 84))
    x = b.gemm(x, 84, 10, gain=LINEAR_GAIN)
    return b.build(x, ["N", 1, 28, 28], ["N", 10], "LeNet-style MNIST CNN with max pooling")


def avgpool_strided() -> onnx.ModelProto:
    b = GraphBuilder("avgpool_strided")
    x = b.relu(b.conv("input", 3, 8, 3, stride=2, pad=1))  # 16 -> 8
    x = b.avgpool(x, 2, 2)  # 8 -> 4
    x = b.relu(b.conv(x, 8, 8, 3, pad=1))
    x = b.flatten(b.global_avgpool(x))
    x = b.gemm(x, 8, 10, gain=LINEAR_GAIN)
    return b.build(x, [1, 3, 16, 16], [1, 10], "strided conv, AveragePool, GlobalAveragePool")


def resblock_bn() -> onnx.ModelProto:
    b = GraphBuilder("resblock_bn")
    x = b.relu(b.bn(b.conv("input", 4, 8, 3, pad=1), 8))  # this conv has a bias
    with b.scope("block"):
        y = b.conv_bn(x, 8, 8, 3, pad=1)
        y = b.conv_bn(y, 8, 8, 3, pad=1, act=None, bn_scale=RESIDUAL_BN_SCALE)
        x = b.relu(b.add(y, x))
    x = b.gemm(b.flatten(x), 8 * 8 * 8, 10, gain=LINEAR_GAIN)
    return b.build(x, [1, 4, 8, 8], [1, 10], "Conv+BN+Relu stem and one residual basic block")


SAMPLES: dict[str, Callable[[], onnx.ModelProto]] = {
    "lenet_maxpool": lenet_maxpool,
    "avgpool_strided": avgpool_strided,
    "resblock_bn": resblock_bn,
}


# ---------------------------------------------------------------------------------------
# ImageNet-scale models
# ---------------------------------------------------------------------------------------


def _stem(b: GraphBuilder) -> str:
    """ResNet stem: 7x7/2 conv 3->64, BN, Relu, 3x3/2 MaxPool pad 1."""
    with b.scope("stem"):
        x = b.conv_bn("input", 3, 64, 7, stride=2, pad=3)
        return b.maxpool(x, 3, 2, pad=1)


def _basic_block(b: GraphBuilder, x: str, cin: int, cout: int, stride: int) -> str:
    y = b.conv_bn(x, cin, cout, 3, stride, pad=1)
    y = b.conv_bn(y, cout, cout, 3, pad=1, act=None, bn_scale=RESIDUAL_BN_SCALE)
    if stride != 1 or cin != cout:
        x = b.conv_bn(x, cin, cout, 1, stride, act=None)
    return b.relu(b.add(y, x))


def _bottleneck(b: GraphBuilder, x: str, cin: int, width: int, stride: int) -> str:
    cout = 4 * width
    y = b.conv_bn(x, cin, width, 1)
    y = b.conv_bn(y, width, width, 3, stride, pad=1)
    y = b.conv_bn(y, width, cout, 1, act=None, bn_scale=RESIDUAL_BN_SCALE)
    if stride != 1 or cin != cout:
        x = b.conv_bn(x, cin, cout, 1, stride, act=None)
    return b.relu(b.add(y, x))


def _head(b: GraphBuilder, x: str, c: int, classes: int) -> str:
    return b.gemm(b.flatten(b.global_avgpool(x)), c, classes, gain=LINEAR_GAIN)


def resnet18(size: int = 224, classes: int = 1000) -> onnx.ModelProto:
    b = GraphBuilder("resnet18")
    x, cin = _stem(b), 64
    for stage, width in enumerate([64, 128, 256, 512], start=1):
        for i in range(2):
            with b.scope(f"layer{stage}.{i}"):
                x = _basic_block(b, x, cin, width, 2 if (i == 0 and stage > 1) else 1)
            cin = width
    x = _head(b, x, cin, classes)
    return b.build(x, [1, 3, size, size], [1, classes], "ResNet-18")


def resnet50(size: int = 224, classes: int = 1000) -> onnx.ModelProto:
    b = GraphBuilder("resnet50")
    x, cin = _stem(b), 64
    for stage, (width, blocks) in enumerate([(64, 3), (128, 4), (256, 6), (512, 3)], start=1):
        for i in range(blocks):
            with b.scope(f"layer{stage}.{i}"):
                x = _bottleneck(b, x, cin, width, 2 if (i == 0 and stage > 1) else 1)
            cin = 4 * width
    x = _head(b, x, cin, classes)
    return b.build(x, [1, 3, size, size], [1, classes], "ResNet-50 (v1.5 bottlenecks)")


VGG11_CFG: list[int | str] = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]


def vgg11(size: int = 224, classes: int = 1000, fc: int = 4096) -> onnx.ModelProto:
    b = GraphBuilder("vgg11")
    x, cin, s = "input", 3, size
    with b.scope("features"):
        for v in VGG11_CFG:
            if v == "M":
                x, s = b.maxpool(x, 2, 2), s // 2
            else:
                x, cin = b.relu(b.conv(x, cin, int(v), 3, pad=1)), int(v)
    x = b.flatten(x)
    with b.scope("classifier"):
        x = b.relu(b.gemm(x, cin * s * s, fc))
        x = b.relu(b.gemm(x, fc, fc))
        x = b.gemm(x, fc, classes, gain=LINEAR_GAIN)
    return b.build(x, [1, 3, size, size], [1, classes], f"VGG-11, classifier width {fc}")


# t (expansion), c (output channels), n (blocks), s (stride of the first block)
MOBILENETV2_CFG = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]


def _inverted_residual(b: GraphBuilder, x: str, cin: int, cout: int, stride: int, t: int) -> str:
    hidden = cin * t
    y = x
    if t != 1:
        y = b.conv_bn(y, cin, hidden, 1, act="relu6")
    y = b.conv_bn(y, hidden, hidden, 3, stride, pad=1, group=hidden, act="relu6")
    use_res = stride == 1 and cin == cout
    y = b.conv_bn(y, hidden, cout, 1, act=None, bn_scale=RESIDUAL_BN_SCALE if use_res else 1.0)
    return b.add(y, x) if use_res else y


def mobilenetv2(size: int = 224, classes: int = 1000) -> onnx.ModelProto:
    b = GraphBuilder("mobilenetv2")
    with b.scope("stem"):
        x, cin = b.conv_bn("input", 3, 32, 3, stride=2, pad=1, act="relu6"), 32
    k = 0
    for t, c, n, s in MOBILENETV2_CFG:
        for i in range(n):
            with b.scope(f"features.{k}"):
                x = _inverted_residual(b, x, cin, c, s if i == 0 else 1, t)
            cin, k = c, k + 1
    with b.scope("last"):
        x = b.conv_bn(x, cin, 1280, 1, act="relu6")
    x = _head(b, x, 1280, classes)
    return b.build(x, [1, 3, size, size], [1, classes], "MobileNetV2 (width 1.0)")


def _fire(b: GraphBuilder, x: str, cin: int, squeeze: int, e1: int, e3: int) -> str:
    s = b.relu(b.conv(x, cin, squeeze, 1))
    return b.concat([b.relu(b.conv(s, squeeze, e1, 1)), b.relu(b.conv(s, squeeze, e3, 3, pad=1))])


def squeezenet(size: int = 224, classes: int = 1000) -> onnx.ModelProto:
    b = GraphBuilder("squeezenet")
    x = b.relu(b.conv("input", 3, 64, 3, stride=2))
    fires = [
        (16, 64),
        (16, 64),
        "M",
        (32, 128),
        (32, 128),
        "M",
        (48, 192),
        (48, 192),
        (64, 256),
        (64, 256),
    ]
    x, cin = b.maxpool(x, 3, 2, ceil_mode=True), 64
    for k, f in enumerate(fires):
        if f == "M":
            x = b.maxpool(x, 3, 2, ceil_mode=True)
            continue
        squeeze, expand = f
        with b.scope(f"fire{k}"):
            x, cin = _fire(b, x, cin, squeeze, expand, expand), 2 * expand
    with b.scope("classifier"):
        x = b.relu(b.conv(x, cin, classes, 1))
        x = b.flatten(b.global_avgpool(x))
    return b.build(x, [1, 3, size, size], [1, classes], "SqueezeNet 1.1")


#: ShuffleNet V1, g = 3, width 1.0: output channels and repeats of stages 2-4.
SHUFFLENET_G3 = ((240, 4), (480, 8), (960, 4))


def _shuffle_unit(b: GraphBuilder, x: str, cin: int, cout: int, hw: int, stride: int,
                  groups: int, first_groups: int) -> str:
    """ShuffleNet V1 unit: grouped 1x1 conv, BN, Relu, channel shuffle, depthwise 3x3 (stride),
    BN, grouped 1x1 conv, BN; then + x and Relu (stride 1) or Concat with AveragePool 3x3/2 of
    x and Relu (stride 2, the branch makes ``cout - cin`` channels)."""
    out = cout - cin if stride == 2 else cout
    mid = cout // 4
    y = b.conv_bn(x, cin, mid, 1, group=first_groups)
    y = b.channel_shuffle(y, mid, hw, first_groups) if first_groups > 1 else y
    y = b.conv_bn(y, mid, mid, 3, stride, pad=1, group=mid, act=None)
    y = b.conv_bn(y, mid, out, 1, group=groups, act=None,
                  bn_scale=RESIDUAL_BN_SCALE if stride == 1 else 1.0)
    if stride == 1:
        return b.relu(b.add(y, x))
    return b.relu(b.concat([b.avgpool(x, 3, 2, pad=1), y]))


def shufflenet(size: int = 224, classes: int = 1000) -> onnx.ModelProto:
    b = GraphBuilder("shufflenet")
    groups = 3
    with b.scope("stem"):
        x = b.conv_bn("input", 3, 24, 3, stride=2, pad=1)
        x, cin, hw = b.maxpool(x, 3, 2, pad=1), 24, size // 4
    for s, (cout, repeats) in enumerate(SHUFFLENET_G3):
        for i in range(repeats):
            with b.scope(f"stage{s + 2}.{i}"):
                stride = 2 if i == 0 else 1
                first = 1 if s == 0 and i == 0 else groups  # 24 input channels: no groups
                x = _shuffle_unit(b, x, cin, cout, hw, stride, groups, first)
            cin, hw = cout, hw // stride
    x = _head(b, x, cin, classes)
    return b.build(x, [1, 3, size, size], [1, classes], "ShuffleNet V1 (g = 3, width 1.0)")


#: ShuffleNet V2 x1.0 (torchvision): output channels and repeats of stages 2-4.
SHUFFLENET_V2 = ((116, 4), (232, 8), (464, 4))


def _shuffle_v2_unit(b: GraphBuilder, x: str, cin: int, cout: int, hw: int, stride: int) -> str:
    """ShuffleNet V2 unit (torchvision's InvertedResidual): stride 1 splits the channels in two
    halves and runs 1x1 + BN + Relu, depthwise 3x3 + BN, 1x1 + BN + Relu on the second; stride 2
    runs that branch and a depthwise 3x3/2 + BN, 1x1 + BN + Relu branch on the whole input;
    then Concat and a channel shuffle of 2 groups."""
    half = cout // 2
    if stride == 1:
        x1, x2 = b.split_channels(x, cin)
        left, cin2 = x1, cin // 2
    else:
        x2, cin2 = x, cin
        left = b.conv_bn(x, cin, cin, 3, stride, pad=1, group=cin, act=None)
        left = b.conv_bn(left, cin, half, 1)
    y = b.conv_bn(x2, cin2, half, 1)
    y = b.conv_bn(y, half, half, 3, stride, pad=1, group=half, act=None)
    y = b.conv_bn(y, half, half, 1)
    return b.channel_shuffle(b.concat([left, y]), cout, hw // stride, 2)


def shufflenet_v2(size: int = 224, classes: int = 1000) -> onnx.ModelProto:
    b = GraphBuilder("shufflenet_v2")
    with b.scope("stem"):
        x = b.conv_bn("input", 3, 24, 3, stride=2, pad=1)
        x, cin, hw = b.maxpool(x, 3, 2, pad=1), 24, size // 4
    for s, (cout, repeats) in enumerate(SHUFFLENET_V2):
        for i in range(repeats):
            with b.scope(f"stage{s + 2}.{i}"):
                stride = 2 if i == 0 else 1
                x = _shuffle_v2_unit(b, x, cin, cout, hw, stride)
            cin, hw = cout, hw // stride
    with b.scope("conv5"):
        x = b.conv_bn(x, cin, 1024, 1)
    x = _head(b, x, 1024, classes)
    return b.build(x, [1, 3, size, size], [1, classes], "ShuffleNet V2 x1.0")


IMAGENET: dict[str, Callable[..., onnx.ModelProto]] = {
    "resnet18": resnet18,
    "resnet50": resnet50,
    "vgg11": vgg11,
    "mobilenetv2": mobilenetv2,
    "squeezenet": squeezenet,
    "shufflenet": shufflenet,
    "shufflenet_v2": shufflenet_v2,
}


# ---------------------------------------------------------------------------------------
# Validation and CLI
# ---------------------------------------------------------------------------------------

STD_RANGE = (1e-2, 1e2)


def check(model: onnx.ModelProto, path: Path, batch: int = 1) -> float:
    """Run the ONNX checker and onnxruntime once; return the std of the logits.

    Raises RuntimeError if the logits are not finite, have the wrong shape, or have a std
    outside ``STD_RANGE`` (a vanished or exploded network makes comparisons meaningless).
    """
    import onnxruntime as ort

    onnx.checker.check_model(model, full_check=True)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    shape = [d.dim_value if d.HasField("dim_value") else batch for d in dims]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {"input": x})
    want = [
        d.dim_value if d.HasField("dim_value") else batch
        for d in model.graph.output[0].type.tensor_type.shape.dim
    ]
    std, (lo, hi) = float(y.std()), STD_RANGE
    if list(y.shape) != want:
        raise RuntimeError(f"{path.name}: output shape {list(y.shape)}, expected {want}")
    if not np.isfinite(y).all():
        raise RuntimeError(f"{path.name}: non-finite logits")
    if not lo < std < hi:
        raise RuntimeError(f"{path.name}: logits std {std:.3g} outside ({lo}, {hi})")
    return std


def write(model: onnx.ModelProto, path: Path, do_check: bool) -> None:
    t0 = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    size = path.stat().st_size
    size_txt = f"{size / 1e6:.1f} MB" if size >= 1e6 else f"{size / 1e3:.1f} kB"
    line = f"{path.name:22s} {size_txt:>10s} {len(model.graph.node):4d} nodes"
    if do_check:
        line += f"  logits std {check(model, path):.3g}"
    print(f"{line}  ({time.perf_counter() - t0:.1f} s)", flush=True)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Build the onnx_lower test models (see the module docstring).",
    )
    p.add_argument("--out", type=Path, help="output folder (default models/ or models/imagenet/)")
    p.add_argument(
        "--imagenet",
        action="store_true",
        help="build the ImageNet-scale models instead of the samples",
    )
    p.add_argument("--only", help="comma-separated model names to build (default: all)")
    p.add_argument("--size", type=int, default=224, help="ImageNet input size (default 224)")
    p.add_argument("--classes", type=int, default=1000, help="ImageNet classes (default 1000)")
    p.add_argument("--vgg-fc", type=int, default=4096, help="VGG-11 classifier width (4096)")
    p.add_argument(
        "--check",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="validate every written model with onnx.checker + onnxruntime (default)",
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    registry: dict[str, Callable[[], onnx.ModelProto]]
    if args.imagenet:
        if args.size < 32:
            sys.exit("error: --size must be at least 32")
        kw = {"size": args.size, "classes": args.classes}
        registry = {name: (lambda f=f: f(**kw)) for name, f in IMAGENET.items()}
        registry["vgg11"] = lambda: vgg11(fc=args.vgg_fc, **kw)
        out = args.out or IMAGENET_DIR
    else:
        registry, out = dict(SAMPLES), args.out or SAMPLES_DIR
    names = list(registry) if not args.only else [n.strip() for n in args.only.split(",")]
    unknown = [n for n in names if n not in registry]
    if unknown:
        sys.exit(f"error: unknown model(s) {', '.join(unknown)}; choose from {', '.join(registry)}")
    for name in names:
        write(registry[name](), Path(out) / f"{name}.onnx", args.check)
    return 0


if __name__ == "__main__":
    sys.exit(main())
