"""``.nnet`` output: the chain reader, the writer's exact layout, and the CLI.

* :func:`chain_layers` on hand-built strict chains (every optional part of the pattern) gives
  layers whose float64 evaluation matches onnxruntime on the ONNX model; graphs that are not a
  chain are refused, naming what breaks it;
* :func:`write_nnet` then :func:`read_nnet` gives back the float32 weights bit for bit (property
  test over random shapes and magnitudes), every line ends with a comma, the sizes lines follow
  sisl/NNet's README, the box (or ±float32 max) is the input bounds, and rows over ReluVal's
  10,240-character buffer are reported;
* the CLI writes ``.nnet`` by suffix or ``--format nnet``, refuses forms that are not a chain
  with exit 2 and no output, and takes a box from ``--vnnlib``.

Marabou reading these files is in ``tests/test_marabou.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnx_lower.cli import main
from onnx_lower.nnet import (
    FLOAT32_MAX,
    NotAChainError,
    chain_layers,
    evaluate_layers,
    read_nnet,
    write_nnet,
)
from onnx_lower.validate import make_session
from tests.oracles import CORPUS

FC = CORPUS / "stanleybak__mnist-net_256x2.onnx"
LENET = Path(__file__).resolve().parents[1] / "models" / "lenet_maxpool.onnx"


def chain_model(
    sizes: list[int],
    *,
    seed: int = 0,
    in_shape: tuple[int, ...] | None = None,
    flatten: str | None = "Flatten",
    reshape_out: bool = False,
    bias_first: bool = False,
    no_bias: tuple[int, ...] = (),
    relu_last: bool = False,
    extra: str | None = None,
) -> onnx.ModelProto:
    """Flatten → (MatMul, Add, Relu)* → MatMul, Add [→ Reshape], with seeded weights."""
    rng = np.random.default_rng(seed)
    in_shape = in_shape or (1, sizes[0])
    nodes, inits = [], []
    cur = "x"
    if flatten == "Flatten":
        nodes.append(helper.make_node("Flatten", [cur], ["flat"], axis=1))
        cur = "flat"
    elif flatten == "Reshape":
        inits.append(numpy_helper.from_array(np.array([1, sizes[0]], np.int64), "shape_in"))
        nodes.append(helper.make_node("Reshape", [cur, "shape_in"], ["flat"]))
        cur = "flat"
    last = len(sizes) - 2
    for k in range(len(sizes) - 1):
        w = (rng.normal(size=(sizes[k], sizes[k + 1])) / np.sqrt(sizes[k])).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"W{k}"))
        nodes.append(helper.make_node("MatMul", [cur, f"W{k}"], [f"m{k}"]))
        cur = f"m{k}"
        if k not in no_bias:
            b = rng.normal(size=sizes[k + 1]).astype(np.float32)
            inits.append(numpy_helper.from_array(b, f"b{k}"))
            ins = [f"b{k}", cur] if bias_first else [cur, f"b{k}"]
            nodes.append(helper.make_node("Add", ins, [f"a{k}"]))
            cur = f"a{k}"
        if k < last or relu_last:
            nodes.append(helper.make_node("Relu", [cur], [f"r{k}"]))
            cur = f"r{k}"
        if k == 1 and extra == "skip":  # a residual around layer 2: not a chain
            nodes.append(helper.make_node("Add", [cur, "r0"], ["res"]))
            cur = "res"
        if k == 0 and extra == "sigmoid":
            nodes.append(helper.make_node("Sigmoid", [cur], ["sig"]))
            cur = "sig"
    out_shape = [1, sizes[-1]]
    if reshape_out:
        out_shape = [1, 1, sizes[-1]]
        inits.append(numpy_helper.from_array(np.array(out_shape, np.int64), "shape_out"))
        nodes.append(helper.make_node("Reshape", [cur, "shape_out"], ["y"]))
    else:
        nodes.append(helper.make_node("Identity", [cur], ["y"]))
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _strip_identity(model: onnx.ModelProto) -> onnx.ModelProto:
    """The Identity that names the output is not part of the pattern: rename instead."""
    nodes = list(model.graph.node)
    if nodes and nodes[-1].op_type == "Identity":
        src = nodes[-1].input[0]
        del model.graph.node[len(nodes) - 1]
        for n in model.graph.node:
            for i, name in enumerate(n.output):
                if name == src:
                    n.output[i] = "y"
            for i, name in enumerate(n.input):
                if name == src:
                    n.input[i] = "y"
    return model


def _ort(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = make_session(model, 1, label="chain")
    return sess.run(None, {"x": x.astype(np.float32)})[0]


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"flatten": "Reshape", "reshape_out": True},
        {"flatten": None, "bias_first": True},
        {"no_bias": (0, 2), "in_shape": (1, 2, 3, 2)},
    ],
    ids=["plain", "reshapes", "2d-input-bias-first", "no-bias-4d-input"],
)
def test_chain_layers_match_onnxruntime(kwargs):
    model = _strip_identity(chain_model([12, 9, 7, 4], **kwargs))
    layers = chain_layers(model)
    assert [w.shape for w, _ in layers] == [(9, 12), (7, 9), (4, 7)]
    shape = kwargs.get("in_shape", (1, 12))
    x = np.random.default_rng(1).normal(size=shape)
    ref = _ort(model, x).reshape(1, -1)
    got = evaluate_layers(layers, x.reshape(1, -1))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize(
    "kwargs, says",
    [
        ({"relu_last": True}, "ends in a Relu"),
        ({"extra": "skip"}, "not by one node"),
        ({"extra": "sigmoid"}, "(Sigmoid) is not MatMul, Add or Relu"),
    ],
    ids=["relu-last", "skip", "sigmoid"],
)
def test_not_a_chain_is_refused(kwargs, says):
    model = _strip_identity(chain_model([6, 5, 5, 3], **kwargs))
    with pytest.raises(NotAChainError, match="--form layered") as err:
        chain_layers(model)
    assert says in str(err.value)


def test_two_linear_layers_are_refused():
    model = _strip_identity(chain_model([6, 5, 3]))
    relu = next(n for n in model.graph.node if n.op_type == "Relu")
    relu.op_type = "Identity"  # same wiring, no ReLU between the two layers
    with pytest.raises(NotAChainError, match="Identity|two linear layers"):
        chain_layers(model)


def _layers(rng: np.random.Generator, sizes: list[int], scale: float):
    return [
        (
            (rng.normal(size=(o, i)) * scale).astype(np.float32),
            (rng.normal(size=o) * scale).astype(np.float32),
        )
        for i, o in zip(sizes[:-1], sizes[1:], strict=True)
    ]


@given(
    sizes=st.lists(st.integers(1, 9), min_size=2, max_size=5),
    scale=st.sampled_from([1e-30, 1e-3, 1.0, 1e4, 1e30]),
    seed=st.integers(0, 2**16),
)
def test_write_read_round_trip_is_exact(tmp_path_factory, sizes, scale, seed):
    """Every float32 weight comes back bit for bit (9 significant digits)."""
    layers = _layers(np.random.default_rng(seed), sizes, scale)
    path = tmp_path_factory.mktemp("nnet") / "n.nnet"
    info = write_nnet(layers, path, source="test")
    back = read_nnet(path)
    assert info.bytes == path.stat().st_size and info.layer_sizes == sizes
    for (w, b), (w2, b2) in zip(layers, back.layers, strict=True):
        assert np.array_equal(w2.astype(np.float32), w) and np.array_equal(b2.astype(np.float32), b)
    lines = path.read_text().splitlines()
    assert all(line.endswith(",") for line in lines if not line.startswith("//"))


def test_layout_follows_the_readme(tmp_path):
    layers = _layers(np.random.default_rng(0), [3, 4, 2], 1.0)
    lo, hi = np.array([-1.0, 0.0, 0.1]), np.array([1.0, 0.5, 1 / 3])
    path = tmp_path / "n.nnet"
    write_nnet(layers, path, (lo, hi), source="m.onnx", box_source="p.vnnlib")
    lines = path.read_text().splitlines()
    header = [x for x in lines if x.startswith("//")]
    body = lines[len(header):]
    assert lines[: len(header)] == header and any("m.onnx" in x for x in header)
    assert any("p.vnnlib" in x for x in header)
    assert body[0] == "2,3,2,4," and body[1] == "3,4,2," and body[2] == "0,"
    assert [float(v) for v in body[3].split(",")[:-1]] == lo.tolist()
    assert [float(v) for v in body[4].split(",")[:-1]] == hi.tolist()  # 1/3 exactly
    assert body[5] == "0,0,0,0," and body[6] == "1,1,1,1,"
    assert len(body) == 7 + 2 * 4 + 2 * 2
    assert body[7].count(",") == 3 and body[11].count(",") == 1  # a W row, then a bias line
    back = read_nnet(path)
    x = np.array([[5.0, 0.25, -2.0]])  # clipped to the box, as every reader does
    np.testing.assert_allclose(back.evaluate(x), evaluate_layers(layers, np.clip(x, lo, hi)))


def test_no_box_is_the_float32_range(tmp_path):
    path = tmp_path / "n.nnet"
    write_nnet(_layers(np.random.default_rng(0), [2, 2], 1.0), path)
    back = read_nnet(path)
    assert np.all(back.mins <= -FLOAT32_MAX) and np.all(back.maxs >= FLOAT32_MAX)
    assert np.all(np.float32(back.maxs) == np.float32(FLOAT32_MAX))
    assert any("float32" in h for h in back.header)


def test_long_rows_warn_naming_reluval(tmp_path):
    short = write_nnet(_layers(np.random.default_rng(0), [50, 3], 1.0), tmp_path / "s.nnet")
    assert short.long_rows == {} and short.warnings() == []
    wide = write_nnet(_layers(np.random.default_rng(0), [1000, 3], 1.0), tmp_path / "w.nnet")
    assert wide.long_rows["ReluVal"]["rows"] >= 3  # the three weight rows (and the bound rows)
    longest = max(len(x) for x in (tmp_path / "w.nnet").read_text().splitlines())
    assert wide.long_rows["ReluVal"]["longest"] == longest
    assert "ReluVal" in wide.warnings()[0] and "10,240" in wide.warnings()[0]


def test_write_is_atomic(tmp_path):
    layers = _layers(np.random.default_rng(0), [3, 2], 1.0)
    with pytest.raises(Exception, match="3 inputs"):
        write_nnet(layers, tmp_path / "n.nnet", (np.zeros(2), np.ones(2)))
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- command line

needs_fc = pytest.mark.skipif(not FC.exists(), reason=f"corpus model {FC.name} not available")


def _scaled_err(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())


@needs_fc
def test_cli_writes_nnet_by_suffix(tmp_path):
    out, report = tmp_path / "fc.nnet", tmp_path / "r.json"
    assert main([str(FC), str(out), "--form", "mlp", "--validate", "--report", str(report),
                 "-q"]) == 0
    back = read_nnet(out)
    x = np.random.default_rng(3).uniform(0, 1, size=(5, 784, 1)).astype(np.float32)
    sess = make_session(onnx.load(str(FC)), 1, label="original")
    ref = np.concatenate([sess.run(None, {"0": x[i : i + 1]})[0] for i in range(5)])
    assert _scaled_err(back.evaluate(x.reshape(5, -1)), ref) <= 1e-5
    assert json.loads(report.read_text())["nnet"]["bytes"] == out.stat().st_size


@needs_fc
def test_cli_vnnlib_box(tmp_path):
    lo = np.random.default_rng(0).uniform(0, 0.5, 784)
    hi = lo + 0.01
    prop = tmp_path / "p.vnnlib"
    lines = [f"(declare-const X_{i} Real)" for i in range(784)] + ["(declare-const Y_0 Real)"]
    lines += [f"(assert (>= X_{i} {v!r}))" for i, v in enumerate(lo.tolist())]
    lines += [f"(assert (<= X_{i} {v!r}))" for i, v in enumerate(hi.tolist())]
    prop.write_text("\n".join(lines) + "\n(assert (<= Y_0 0.0))\n")
    out, report = tmp_path / "fc.txt", tmp_path / "r.json"
    assert main([str(FC), str(out), "--format", "nnet", "--vnnlib", str(prop), "--validate",
                 "--report", str(report), "-q"]) == 0
    back = read_nnet(out)
    assert np.array_equal(back.mins, lo) and np.array_equal(back.maxs, hi)
    r = json.loads(report.read_text())
    assert r["nnet"]["input_box"] is True
    assert r["validation"]["input_range"] == [lo.min(), hi.max()]
    bad = tmp_path / "bad.vnnlib"
    bad.write_text("(declare-const X_0 Real)\n(assert (<= X_0 1))\n(assert (>= X_0 0))\n")
    assert main([str(FC), str(tmp_path / "b.nnet"), "--vnnlib", str(bad), "-q"]) == 2
    assert not (tmp_path / "b.nnet").exists()


@pytest.mark.parametrize(
    "args, says",
    [
        (["--form", "im2col"], "--format nnet needs a strict ReLU chain"),
        (["--form", "mlp"], "not a strict ReLU chain"),
    ],
    ids=["wrong-form", "not-a-chain"],
)
def test_cli_refusals_exit_2(tmp_path, capsys, args, says):
    out = tmp_path / "l.nnet"
    assert main([str(LENET), str(out), *args]) == 2
    assert says in capsys.readouterr().err
    assert not out.exists()
