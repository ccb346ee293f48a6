"""``--target VERIFIER`` (issue 15): profile tables, each rewrite against onnxruntime, and Marabou.

* Every rewrite (hypothesis over shapes, pads, strides, kernels): the ``--target`` output is
  inside the profile, by the checker driven by the same tables (:func:`violations`), and equals
  onnxruntime on the original.
* Marabou itself (maraboupy, the test extra): a padded MaxPool it mis-evaluates in the original
  and evaluates right after ``--target marabou``; a static batch it reads for sample 0 only
  in the original and for every sample once split; corpus models it reads and evaluates right
  (a few small ones by default, every model marked slow), with sizes near the original's.
  "Evaluates" is Marabou's parsed query with the input fixed, by its solver where that fits in
  memory and always by :func:`onnx_lower.marabou.evaluate_equations` (the parsed equations
  and constraints evaluated in float64 and checked), which also shows a misread as an output
  no equation reaches.
* Attributes a reader ignores (read at source: ERAN's onnx_translator.py, auto_LiRPA's
  pooling.py) are rewritten away.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnx_lower import graph as g
from onnx_lower import marabou as mb
from onnx_lower.api import lower
from onnx_lower.cli import main
from onnx_lower.errors import LoweringError, TargetUnsupportedError
from onnx_lower.targets import PREDICATES, PROFILES, violations
from tests.oracles import run_model

CORPUS = Path(__file__).resolve().parents[1] / ".." / "shared" / "corpus"
# each example lowers a model (~0.5 s): 2 in the default profile, more under HYPOTHESIS_PROFILE=slow
FEW = settings(max_examples=max(2, settings.default.max_examples // 25), deadline=None)


def chain(x_shape, nodes, inits, opset=17, y_shape=None) -> onnx.ModelProto:
    """A model reading ``x`` through ``nodes`` (the last writes ``y``); inits are name → array."""
    initializers = [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()]
    graph = helper.make_graph(
        nodes, "t",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
        initializer=initializers,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    if y_shape is None:  # the output's shape, from onnx's own inference
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        model.graph.output[0].CopyFrom(inferred.graph.output[0])
    onnx.checker.check_model(model)
    return model


def check_target(model: onnx.ModelProto, target: str, x: np.ndarray, rewritten: bool = True):
    """Lower for ``target``: inside its profile, same numbers as onnxruntime; returns the result."""
    lowered, report = lower(model, target=target)
    left = violations(g.import_graph(lowered), PROFILES[target])
    assert not left, left
    want = run_model(model, {"x": x})[0]
    got = run_model(lowered, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(want).max()))
    if rewritten:
        assert report.target["rewritten"], "nothing was rewritten"
        assert all(r["rule"] and r["became"] for r in report.target["rewritten"])
    return lowered, report


def _rng(seed):
    return np.random.default_rng(seed)


def _w(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


# -- the tables -------------------------------------------------------------------------------


def test_every_profile_rule_names_known_predicates_and_a_source():
    for profile in PROFILES.values():
        assert profile.form or profile.rules
        for rule in profile.rules:
            assert set(rule.requires) <= set(PREDICATES)
            assert rule.source.strip()


def test_list_targets_prints_every_profile_and_rule(capsys):
    assert main(["--list-targets"]) == 0
    out = capsys.readouterr().out
    for name, profile in PROFILES.items():
        assert f"{name}:" in out
        for rule in profile.rules:
            assert rule.source in out


def test_unknown_target_is_a_user_error(tmp_path, capsys):
    model = chain([1, 2, 4, 4], [helper.make_node("Relu", ["x"], ["y"])], {})
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    assert main([str(path), str(tmp_path / "o.onnx"), "--target", "nosuch"]) == 2
    assert "unknown target 'nosuch'" in capsys.readouterr().err


def test_nnet_is_the_layered_form():
    model = chain([1, 4], [helper.make_node("Relu", ["x"], ["y"])], {})
    lowered, report = lower(model, target="nnet")
    assert report.form_used == "layered"
    ops = [n.op_type for n in lowered.graph.node]
    assert ops[0] in ("Flatten", "Reshape") and ops[-1] == "Reshape"
    assert "Relu" in ops and set(ops) <= {"Flatten", "Reshape", "MatMul", "Add", "Relu"}


def test_sign_is_refused_by_name_with_the_rule():
    model = chain([1, 2, 4, 4], [helper.make_node("Sign", ["x"], ["y"], name="the_sign")], {})
    with pytest.raises(TargetUnsupportedError) as err:
        lower(model, target="marabou")
    assert "'the_sign' (Sign)" in str(err.value) and "not read" in str(err.value)


# -- each rewrite against onnxruntime -------------------------------------------------------


@FEW
@given(st.integers(1, 3), st.integers(1, 4), st.integers(4, 8), st.lists(st.integers(0, 2),
       min_size=4, max_size=4), st.integers(1, 2), st.integers(1, 3), st.integers(0, 9))
def test_pad_folds_into_conv(c, m, n, pads, stride, k, seed):
    rng = _rng(seed)
    nodes = [
        helper.make_node("Pad", ["x", "pads"], ["p"]),
        helper.make_node("Conv", ["p", "w", "b"], ["y"], kernel_shape=[k, k], strides=[stride] * 2),
    ]
    inits = {"pads": np.array([0, 0, *pads[:2], 0, 0, *pads[2:]], np.int64),
             "w": _w(rng, m, c, k, k), "b": _w(rng, m)}
    model = chain([1, c, n, n], nodes, inits)
    lowered, _ = check_target(model, "marabou", _w(rng, 1, c, n, n))
    assert [n.op_type for n in lowered.graph.node] == ["Conv"]


@FEW
@given(st.integers(1, 3), st.integers(3, 7), st.lists(st.integers(0, 2), min_size=4, max_size=4),
       st.integers(0, 9))
def test_pad_alone_is_an_identity_conv(c, n, pads, seed):
    rng = _rng(seed)
    nodes = [helper.make_node("Pad", ["x", "pads"], ["y"])]
    inits = {"pads": np.array([0, 0, *pads[:2], 0, 0, *pads[2:]], np.int64)}
    check_target(chain([1, c, n, n], nodes, inits), "marabou", _w(rng, 1, c, n, n))


@FEW
@given(st.integers(1, 3), st.integers(4, 9), st.integers(1, 3), st.integers(1, 3),
       st.integers(0, 1), st.booleans(), st.integers(0, 9))
def test_average_pool_as_conv(c, n, k, stride, pad, include, seed):
    rng = _rng(seed)
    pad = min(pad, k - 1)
    attrs = dict(kernel_shape=[k, k], strides=[stride] * 2, pads=[pad] * 4,
                 count_include_pad=int(include or pad == 0))
    nodes = [helper.make_node("AveragePool", ["x"], ["y"], **attrs)]
    model = chain([1, c, n, n], nodes, {})
    x = _w(rng, 1, c, n, n)
    for target in ("marabou", "nnenum"):  # group=1 block weights / depthwise
        lowered, _ = check_target(model, target, x, rewritten=target == "marabou")


def test_average_pool_before_a_small_gemm_folds_into_it_for_marabou():
    """Block weights would cost |y|·C·|K| equation terms; folded into the Gemm, |x|·10."""
    rng = _rng(0)
    nodes = [
        helper.make_node("AveragePool", ["x"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "w", "b"], ["y"], transB=1),
    ]
    model = chain([1, 8, 6, 6], nodes, {"w": _w(rng, 3, 72), "b": _w(rng, 3)})
    lowered, report = check_target(model, "marabou", _w(rng, 1, 8, 6, 6))
    assert "Conv" not in {n.op_type for n in lowered.graph.node}
    assert "folded with Flatten" in report.target["rewritten"][0]["became"]


@FEW
@given(st.integers(1, 4), st.integers(1, 6), st.integers(1, 6), st.integers(0, 9))
def test_global_average_pool_as_conv(c, h, w, seed):
    nodes = [helper.make_node("GlobalAveragePool", ["x"], ["y"])]
    check_target(chain([1, c, h, w], nodes, {}), "marabou", _w(_rng(seed), 1, c, h, w))


@FEW
@given(st.integers(1, 3), st.integers(4, 9), st.integers(2, 3), st.integers(1, 3),
       st.lists(st.integers(0, 1), min_size=4, max_size=4), st.booleans(), st.integers(0, 9))
def test_padded_maxpool_over_relu_as_unpadded(c, n, k, stride, pads, ceil, seed):
    rng = _rng(seed)
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("MaxPool", ["r"], ["y"], kernel_shape=[k, k], strides=[stride] * 2,
                         pads=pads, ceil_mode=int(ceil)),
    ]
    model = chain([1, c, n, n], nodes, {})
    check_target(model, "marabou", _w(rng, 1, c, n, n), rewritten=any(pads) or ceil)


@FEW
@given(st.integers(1, 3), st.integers(4, 9), st.integers(1, 3), st.integers(1, 3),
       st.lists(st.integers(0, 1), min_size=4, max_size=4), st.booleans(), st.booleans(),
       st.integers(0, 9))
def test_maxpool_as_relu_layers_for_nnenum(c, n, k, stride, pads, ceil, relu, seed):
    pads = [min(p, k - 1) for p in pads] if relu else [0, 0, 0, 0]  # pads < kernel (spec);
    # zero padding is exact over a nonnegative input only
    ceil = ceil and relu
    src = "r" if relu else "x"
    nodes = [helper.make_node("Relu", ["x"], ["r"])] if relu else []
    nodes.append(helper.make_node("MaxPool", [src], ["y"], kernel_shape=[k, k],
                                  strides=[stride] * 2, pads=pads, ceil_mode=int(ceil)))
    lowered, _ = check_target(chain([1, c, n, n], nodes, {}), "nnenum", _w(_rng(seed), 1, c, n, n))
    assert "MaxPool" not in {n.op_type for n in lowered.graph.node}


def _batch_chain(n, opset, seed):
    """BatchNormalization → Conv → Tanh → MaxPool → Conv on a static batch of ``n`` (each node
    reads sample 0 only, or mixes samples, in maraboupy), then Flatten → Gemm, which read the
    batch as rows."""
    rng = _rng(seed)
    nodes = [
        helper.make_node("BatchNormalization", ["x", "g", "beta", "mu", "var"], ["xb"],
                         epsilon=1e-3),
        helper.make_node("Conv", ["xb", "w1", "b1"], ["c1"], kernel_shape=[3, 3], pads=[1] * 4),
        helper.make_node("Tanh", ["c1"], ["t"]),
        helper.make_node("MaxPool", ["t"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p", "w2"], ["c2"], kernel_shape=[2, 2]),
        helper.make_node("Flatten", ["c2"], ["f"]),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["y"], transB=1),
    ]
    inits = {"w1": _w(rng, 3, 2, 3, 3), "b1": _w(rng, 3), "w2": _w(rng, 2, 3, 2, 2),
             "w3": _w(rng, 4, 18), "b3": _w(rng, 4), "g": _w(rng, 2), "beta": _w(rng, 2),
             "mu": _w(rng, 2), "var": (np.abs(_w(rng, 2)) + 0.5).astype(np.float32)}
    return chain([n, 2, 8, 8], nodes, inits, opset=opset), _w(rng, n, 2, 8, 8)


@FEW
@given(st.integers(2, 4), st.sampled_from([11, 13, 18]), st.integers(0, 9))
def test_a_static_batch_is_split_per_sample_for_marabou(n, opset, seed):
    model, x = _batch_chain(n, opset, seed)
    lowered, report = check_target(model, "marabou", x)
    ops = [node.op_type for node in lowered.graph.node]
    assert ops.count("Split") == 1 and ops.count("Concat") == 1  # split once, joined once
    assert ops.count("Conv") == 2 * n and ops.count("MaxPool") == n
    assert ops.count("BatchNormalization") == n
    before = sum(t.ByteSize() for t in model.graph.initializer)
    after = sum(t.ByteSize() for t in lowered.graph.initializer)
    assert after <= before + 200  # the clones share the weights; only the split's constants


def _maxpool_with_indices(batch: int, pads: list[int]) -> onnx.ModelProto:
    out = [batch, 1, 3 + pads[0] + pads[2], 3 + pads[1] + pads[3]]
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("MaxPool", ["r"], ["y", "i"], kernel_shape=[2, 2], pads=pads,
                              name="pool")]
    graph = helper.make_graph(
        nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 1, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out),
         helper.make_tensor_value_info("i", TensorProto.INT64, out)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize(("target", "batch", "pads", "rule"), [
    ("marabou", 2, [0, 0, 0, 0], "batch 1.*make_dynamic_shape_fixed"),  # no per-sample split
    ("marabou", 1, [1, 1, 1, 1], "pads all zero"),  # no zero-padded rewrite
    ("nnenum", 1, [1, 1, 1, 1], "not read"),  # no Relu tournament
])
def test_a_maxpool_whose_indices_are_an_output_is_refused_not_cut(target, batch, pads, rule):
    """The rewrites rebuild the pooled values only: with the Indices a graph output, each
    declines (they would lose it) and the node is refused by name with its rule."""
    with pytest.raises(TargetUnsupportedError, match=f"'pool' .*{rule}"):
        lower(_maxpool_with_indices(batch, pads), target=target)


def test_batchnorm_without_epsilon_gets_the_spec_default_for_marabou(tmp_path):
    """maraboupy's batchNorm reads ``epsilon`` as None when the attribute is absent."""
    marabou = pytest.importorskip("maraboupy.Marabou")
    rng = _rng(4)
    nodes = [helper.make_node("BatchNormalization", ["x", "g", "beta", "mu", "var"], ["y"])]
    inits = {"g": _w(rng, 3), "beta": _w(rng, 3), "mu": _w(rng, 3),
             "var": (np.abs(_w(rng, 3)) + 0.01).astype(np.float32)}
    model = chain([1, 3, 4, 4], nodes, inits)
    onnx.save(model, tmp_path / "orig.onnx")
    with pytest.raises(TypeError):
        marabou.read_onnx(str(tmp_path / "orig.onnx"))
    x = _w(rng, 1, 3, 4, 4)
    lowered, report = check_target(model, "marabou", x)
    assert "epsilon" in report.target["rewritten"][0]["became"]
    onnx.save(lowered, tmp_path / "target.onnx")
    want = run_model(model, {"x": x})[0]
    got = _marabou_eval(tmp_path / "target.onnx", x).reshape(want.shape)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


@pytest.mark.parametrize("opset", [11, 13, 18])
def test_marabou_reads_a_split_batch_right_and_misses_the_original_batch(opset, tmp_path):
    """Marabou's query of the original has no equation for samples 1.. of a Conv; of the
    target output it has them all, and its values match onnxruntime (every opset's Split)."""
    marabou = pytest.importorskip("maraboupy.Marabou")
    model, x = _batch_chain(3, opset, 1)
    want = run_model(model, {"x": x})[0]
    onnx.save(model, tmp_path / "orig.onnx")
    with pytest.raises(mb.MarabouEquationError, match="undetermined"):
        mb.evaluate_equations(marabou.read_onnx(str(tmp_path / "orig.onnx")), x)
    lowered, _ = lower(model, target="marabou")
    onnx.save(lowered, tmp_path / "target.onnx")
    net = marabou.read_onnx(str(tmp_path / "target.onnx"))
    got = mb.evaluate_equations(net, x)  # every parsed equation holds, or it raises
    assert np.abs(got.reshape(want.shape) - want).max() <= 1e-5 * np.abs(want).max()
    solver = _marabou_eval(tmp_path / "target.onnx", x, net=net).reshape(want.shape)
    assert np.abs(solver - want).max() <= 1e-5 * np.abs(want).max()  # small: the solver fits


def test_padded_maxpool_over_a_signed_input_falls_back_to_the_mlp_form_of_the_node(tmp_path):
    nodes = [helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                              name="pool")]
    x = _w(_rng(1), 1, 2, 5, 5)
    model = chain([1, 2, 5, 5], nodes, {})
    lowered, report = check_target(model, "marabou", x)
    (entry,) = report.target["rewritten"]
    assert entry["node"] == "pool" and "pads all zero" in entry["rule"]
    assert "mlp form" in entry["became"]
    onnx.save(lowered, tmp_path / "t.onnx")
    want = run_model(model, {"x": x})[0]
    got = _marabou_eval(tmp_path / "t.onnx", x).reshape(want.shape)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


@FEW
@given(st.integers(1, 3), st.integers(1, 4), st.integers(5, 12), st.integers(1, 3),
       st.integers(1, 2), st.integers(1, 2), st.integers(0, 2), st.integers(0, 9))
def test_conv1d_as_2d(c, m, length, k, stride, dilation, pad, seed):
    rng = _rng(seed)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], kernel_shape=[k], strides=[stride],
                              dilations=[dilation], pads=[pad, pad])]
    model = chain([1, c, length], nodes, {"w": _w(rng, m, c, k), "b": _w(rng, m)})
    check_target(model, "marabou", _w(rng, 1, c, length))


@FEW
@given(st.integers(1, 3), st.integers(1, 2), st.integers(1, 3), st.integers(1, 2),
       st.integers(5, 8), st.integers(0, 9))
def test_grouped_dilated_conv_ungrouped_and_undilated(groups, cg, k, dilation, n, seed):
    rng = _rng(seed)
    c, m = groups * cg, groups * 2
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[k, k], group=groups,
                              dilations=[dilation] * 2, pads=[1, 0, 0, 1])]
    model = chain([1, c, n, n], nodes, {"w": _w(rng, m, cg, k, k)})
    check_target(model, "marabou", _w(rng, 1, c, n, n), rewritten=groups > 1 or dilation > 1)


@FEW
@given(st.integers(1, 4), st.integers(1, 5), st.booleans(), st.integers(0, 9))
def test_div_sub_mul_by_constants(c, n, per_channel, seed):
    rng = _rng(seed)
    shape = (c, 1, 1) if per_channel else (1,)
    nodes = [
        helper.make_node("Div", ["x", "d"], ["a"]),
        helper.make_node("Sub", ["a", "s"], ["b"]),
        helper.make_node("Mul", ["m", "b"], ["y"]),
    ]
    d = (np.abs(_w(rng, *shape)) + 0.5).astype(np.float32)
    inits = {"d": d, "s": np.broadcast_to(_w(rng, *shape), (c, n, n)).copy(), "m": _w(rng, *shape)}
    check_target(chain([1, c, n, n], nodes, inits), "marabou", _w(rng, 1, c, n, n))


def test_squeeze_unsqueeze_with_axes_attributes_as_reshape():
    nodes = [
        helper.make_node("Unsqueeze", ["x"], ["u"], axes=[2]),
        helper.make_node("Relu", ["u"], ["r"]),
        helper.make_node("Squeeze", ["r"], ["y"], axes=[2]),
    ]
    model = chain([1, 3, 5], nodes, {}, opset=11)
    lowered, _ = check_target(model, "marabou", _w(_rng(0), 1, 3, 5))
    assert {n.op_type for n in lowered.graph.node} == {"Reshape", "Relu"}


@FEW
@given(st.integers(1, 4), st.integers(3, 6), st.booleans(), st.integers(0, 9))
def test_batchnorm_folded_or_per_channel_for_eran(c, n, after_conv, seed):
    rng = _rng(seed)
    nodes, inits = [], {}
    src = "x"
    if after_conv:
        nodes.append(helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[1, 1]))
        inits["w"] = _w(rng, c, c, 1, 1)
        src = "c"
    nodes.append(helper.make_node("BatchNormalization", [src, "s", "b", "mu", "var"], ["y"]))
    inits.update(s=_w(rng, c), b=_w(rng, c), mu=_w(rng, c),
                 var=(np.abs(_w(rng, c)) + 0.1).astype(np.float32))
    lowered, _ = check_target(chain([1, c, n, n], nodes, inits), "eran", _w(rng, 1, c, n, n))
    assert "BatchNormalization" not in {n.op_type for n in lowered.graph.node}


#: attributes the reader does not read (checked at source, see onnx_lower/targets.py): each
#: must be rewritten away, and the output must still match onnxruntime
SILENTLY_IGNORED = [
    ("eran", "Conv", {"kernel_shape": [2, 2], "dilations": [2, 2]}),
    ("eran", "Conv", {"kernel_shape": [2, 2], "group": 2}),
    ("eran", "MaxPool", {"kernel_shape": [2, 2], "dilations": [2, 2]}),
    ("eran", "MaxPool", {"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1}),
    ("eran", "AveragePool", {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1],
                             "count_include_pad": 1}),
    ("crown", "MaxPool", {"kernel_shape": [2, 2], "strides": [2, 2], "dilations": [2, 2]}),
    ("crown", "AveragePool", {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}),
    ("crown", "AveragePool", {"kernel_shape": [2, 2], "dilations": [2, 2]}),
]


@pytest.mark.parametrize(("target", "op", "attrs"), SILENTLY_IGNORED)
def test_attributes_a_reader_ignores_are_rewritten_away(target, op, attrs):
    rng = _rng(2)
    inits = {}
    inputs = ["x"]
    if op == "Conv":
        inits["w"] = _w(rng, 4, 4 // attrs.get("group", 1), 2, 2)
        inputs.append("w")
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node(op, ["r", *inputs[1:]],
                                                                      ["y"], **attrs)]
    model = chain([1, 4, 7, 7], nodes, inits, opset=19)
    assert violations(g.import_graph(model), PROFILES[target])
    check_target(model, target, _w(rng, 1, 4, 7, 7))


def test_report_lists_each_rewrite_with_rule_and_result(tmp_path):
    nodes = [helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[2, 2], name="pool")]
    path, out, rep = tmp_path / "m.onnx", tmp_path / "o.onnx", tmp_path / "r.json"
    onnx.save(chain([1, 2, 4, 4], nodes, {}), path)
    assert main([str(path), str(out), "--target", "marabou", "--report", str(rep), "-q"]) == 0
    target = json.loads(rep.read_text())["target"]
    assert target["name"] == "marabou"
    (entry,) = target["rewritten"]
    assert entry["node"] == "pool" and entry["op"] == "AveragePool"
    assert "AveragePool is not read" in entry["rule"] and entry["became"].startswith("Conv")


def test_target_with_passes_is_refused():
    with pytest.raises(LoweringError, match="not both"):
        lower(chain([1, 4], [helper.make_node("Relu", ["x"], ["y"])], {}), target="marabou",
              passes=["dce"])


# -- Marabou itself ---------------------------------------------------------------------------


def _marabou_eval(path: Path, x: np.ndarray, net=None) -> np.ndarray:
    """Marabou's own value of the parsed query at ``x`` (its solver, the input fixed).

    ``evaluateWithoutMarabou`` would run onnxruntime on the file, blind to a misread.
    """
    marabou = pytest.importorskip("maraboupy.Marabou")
    net = net or marabou.read_onnx(str(path))
    return mb.evaluate_with_solver(net, x, timeout=600)  # a TIMEOUT is named, not an unsat


def test_marabou_misreads_a_padded_maxpool_and_reads_the_target_output(tmp_path):
    pytest.importorskip("maraboupy")
    rng = _rng(3)
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("MaxPool", ["r"], ["y"], kernel_shape=[3, 3], strides=[2, 2],
                         pads=[1, 1, 1, 1]),
    ]
    model = chain([1, 2, 8, 8], nodes, {"w": _w(rng, 3, 2, 3, 3), "b": _w(rng, 3)})
    x = _w(rng, 1, 2, 8, 8)
    want = run_model(model, {"x": x})[0]
    onnx.save(model, tmp_path / "orig.onnx")
    got = _marabou_eval(tmp_path / "orig.onnx", x)  # pads ignored: 3×3×3 values, not 3×4×4
    assert got.size != want.size or np.abs(got.reshape(-1) - want.reshape(-1)).max() > 1e-3
    lowered, _ = lower(model, target="marabou")
    onnx.save(lowered, tmp_path / "target.onnx")
    got = _marabou_eval(tmp_path / "target.onnx", x).reshape(want.shape)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


SMALL = ["fastmachinelearning__conv1d_small_keras"]
#: above this many variables Marabou's solver (evaluateWithMarabou) runs out of memory: lenet5's
#: batch-10 target (296,660 variables) took > 14 GB, resnet20's (678,922) > 10 GB; both are
#: checked by propagation only
SOLVER_VARS = 200_000
ALL = sorted(p.stem for p in CORPUS.glob("*.onnx")) if CORPUS.is_dir() else []


def _corpus_case(name: str, tmp_path: Path) -> None:
    pytest.importorskip("maraboupy")
    import onnxruntime as ort

    path = CORPUS / f"{name}.onnx"
    if not path.exists():
        pytest.skip("corpus not present")
    lowered, _ = lower(path, target="marabou")
    out = tmp_path / "t.onnx"
    onnx.save(lowered, out)
    original = onnx.load(path)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    shape = [d if isinstance(d, int) and d > 0 else 1 for d in inp.shape]
    x = _rng(0).standard_normal(shape).astype(np.float32)  # nonzero borders: padding matters
    want = sess.run(None, {inp.name: x})[0]
    net = pytest.importorskip("maraboupy.Marabou").read_onnx(str(out))
    got = mb.evaluate_equations(net, x)  # the parsed query, no solver: every model
    assert np.abs(got.reshape(want.shape) - want).max() <= 1e-5 * np.abs(want).max()
    if net.numVars <= SOLVER_VARS:  # and Marabou's solver where it fits in memory
        got = _marabou_eval(out, x, net=net)
    got = got.reshape(want.shape)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    before = sum(t.ByteSize() for t in original.graph.initializer)
    after = sum(t.ByteSize() for t in lowered.graph.initializer)
    assert after <= 1.5 * before + 2**20  # near the original, not the mlp form's dense matrices


@pytest.mark.corpus
@pytest.mark.parametrize("name", SMALL)
def test_marabou_reads_small_corpus_targets(name, tmp_path):
    _corpus_case(name, tmp_path)


@pytest.mark.slow
@pytest.mark.corpus
@pytest.mark.parametrize("name", [n for n in ALL if n not in SMALL])
def test_marabou_reads_every_corpus_target(name, tmp_path):
    _corpus_case(name, tmp_path)


# -- profiles without an installable verifier: inside the table, same numbers --------------

OTHER = [("eran", "hwang2409__mnist_cnn"), ("crown", "stanleybak__Convnet_avgpool")]
OTHER_SLOW = [(t, n) for t in ("eran", "crown") for n in ALL
              if (t, n) not in OTHER and n not in ("amandashi95__resnet20",
                                                   "fastmachinelearning__conv1d_small_keras")]


def _other_case(target: str, name: str) -> None:
    import onnxruntime as ort

    path = CORPUS / f"{name}.onnx"
    if not path.exists():
        pytest.skip("corpus not present")
    lowered, _ = lower(path, target=target)
    assert not violations(g.import_graph(lowered), PROFILES[target])
    s0 = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    s1 = ort.InferenceSession(lowered.SerializeToString(), providers=["CPUExecutionProvider"])
    inp = s0.get_inputs()[0]
    shape = [d if isinstance(d, int) and d > 0 else 1 for d in inp.shape]
    x = _rng(0).standard_normal(shape).astype(np.float32)
    want = s0.run(None, {inp.name: x})[0]
    got = s1.run(None, {s1.get_inputs()[0].name: x})[0]
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


@pytest.mark.corpus
@pytest.mark.parametrize(("target", "name"), OTHER)
def test_other_profiles_on_corpus_models(target, name):
    _other_case(target, name)


@pytest.mark.slow
@pytest.mark.corpus
@pytest.mark.parametrize(("target", "name"), OTHER_SLOW)
def test_other_profiles_on_every_corpus_model(target, name):
    _other_case(target, name)


def test_nnenum_refuses_a_skip_over_a_relu_by_name():
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Add", ["x", "r"], ["y"], name="skip"),
    ]
    with pytest.raises(TargetUnsupportedError, match="one Relu stage"):
        lower(chain([1, 4], nodes, {}), target="nnenum")
