"""im2col pools (passes/im2col/pools.py): MaxPool plans, AveragePool, global pools."""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

import onnx_lower
from onnx_lower.errors import LoweringError
from onnx_lower.passes.im2col import max_pool_plan
from onnx_lower.windows import output_extent
from tests.im2col import HYP, check, make_model


def test_max_pool_plan_separable_cheaper_for_overlapping_windows():
    stages, out = max_pool_plan((12, 12), (3, 3), strides=(2, 2), pads=(1, 1, 1, 1))
    assert out == (6, 6) and len(stages) == 2
    stages, out = max_pool_plan((12, 12), (2, 2), strides=(2, 2))
    assert out == (6, 6) and len(stages) == 1 and stages[0].taps.shape == (36, 4)


@st.composite
def pool_cases(draw, *, dilate: bool):
    rank = draw(st.integers(1, 3))
    max_n = {1: 12, 2: 8, 3: 5}[rank]
    kernel = [draw(st.integers(1, 3)) for _ in range(rank)]
    strides = [draw(st.integers(1, 3)) for _ in range(rank)]
    dilations = [draw(st.integers(1, 2)) if dilate else 1 for _ in range(rank)]
    begins = [draw(st.integers(0, k - 1)) for k in kernel]
    ends = [draw(st.integers(0, k - 1)) for k in kernel]
    ceil_mode = draw(st.booleans())
    spatial = [draw(st.integers(max(1, (k - 1) * d + 1 - b - e), max_n))
               for k, d, b, e in zip(kernel, dilations, begins, ends)]
    return kernel, strides, dilations, begins + ends, ceil_mode, spatial


@HYP
@given(pool_cases(dilate=True))
def test_max_pool_matches_onnxruntime(case):
    kernel, strides, dilations, pads, ceil_mode, spatial = case
    r = len(kernel)
    for i in range(r):  # every window needs a tap inside the input (else its max is -inf)
        n = spatial[i]
        out = output_extent(n, kernel[i], strides[i], dilations[i], pads[i], pads[r + i],
                            ceil_mode)
        last = (out - 1) * strides[i] - pads[i]
        assume(out >= 1 and any(0 <= last + t * dilations[i] < n for t in range(kernel[i])))
    node = helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=kernel, strides=strides,
                            dilations=dilations, pads=pads, ceil_mode=int(ceil_mode))
    check(make_model([node], ["N", 3, *spatial]), batches=(2,))


@settings(HYP, max_examples=25)
@given(pool_cases(dilate=False), st.sampled_from(["first", "last", "gather"]),
       st.sampled_from([1, "N"]), st.booleans())
def test_max_pool_slices_and_gathers_match_onnxruntime(case, mode, batch, relu):
    """Dilation-1 MaxPools as Slices of an edge-padded input (both axis orders) and as the
    gathered plan, after a Relu or not, with odd sizes, asymmetric pads and ceil_mode."""
    from onnx_lower.passes.im2col import cost

    kernel, strides, _, pads, ceil_mode, spatial = case
    r = len(kernel)
    for i in range(r):
        out = output_extent(spatial[i], kernel[i], strides[i], 1, pads[i], pads[r + i],
                            ceil_mode)
        assume(out >= 1 and (out - 1) * strides[i] - pads[i] < spatial[i])
    nodes = [helper.make_node("MaxPool", ["r" if relu else "x"], ["y"], kernel_shape=kernel,
                              strides=strides, pads=pads, ceil_mode=int(ceil_mode))]
    if relu:
        nodes.insert(0, helper.make_node("Relu", ["x"], ["r"]))
    saved = cost.POOL_SLICES, cost.POOL_AXIS_ORDER
    cost.POOL_SLICES, cost.POOL_AXIS_ORDER = mode != "gather", mode
    try:
        lowered = check(make_model(nodes, [batch, 3, *spatial]),
                        batches=(1,) if batch == 1 else (1, 2))
    finally:
        cost.POOL_SLICES, cost.POOL_AXIS_ORDER = saved
    if mode != "gather":
        assert "Gather" not in {n.op_type for n in lowered.graph.node}


@HYP
@given(pool_cases(dilate=False), st.booleans())
def test_average_pool_matches_onnxruntime(case, count_include_pad):
    kernel, strides, _, pads, ceil_mode, spatial = case
    node = helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=kernel, strides=strides,
                            pads=pads, ceil_mode=int(ceil_mode),
                            count_include_pad=int(count_include_pad))
    check(make_model([node], ["N", 3, *spatial]), batches=(2,))


@pytest.mark.parametrize("op", ["GlobalAveragePool", "GlobalMaxPool"])
@pytest.mark.parametrize("spatial", [(7,), (5, 6), (3, 4, 2), (1, 1)])
def test_global_pools(op, spatial):
    check(make_model([helper.make_node(op, ["x"], ["y"])], ["N", 4, *spatial]), batches=(1, 3))


def test_maxpool_indices_output_is_refused():
    node = helper.make_node("MaxPool", ["x"], ["y", "idx"], kernel_shape=[2, 2])
    model = make_model([node], [1, 2, 4, 4])
    model.graph.output.append(helper.make_tensor_value_info("idx", TensorProto.INT64, [1, 2, 3, 3]))
    with pytest.raises(LoweringError, match="Indices"):
        onnx_lower.lower(model, form="im2col")


def test_integer_maxpool_refusal_names_the_dtype():
    from onnx import TensorProto, helper

    from onnx_lower.errors import UnsupportedOpError

    node = helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2])
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 1, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, [1, 1, 3, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    with pytest.raises(UnsupportedOpError, match="type uint8; only float activations"):
        onnx_lower.lower(model, form="im2col")
