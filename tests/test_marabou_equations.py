"""``onnx_lower.marabou.evaluate_equations``: Marabou's parsed equation system, evaluated without
its solver.

* Random DAGs (``tests/test_layered.py``'s :func:`dags`: Relu and linear layers, residual Adds,
  elementwise Max, inputs read late) lowered to ``--form layered`` (ONNX and ``.nnet``) and to
  ``--form mlp`` (ONNX, whose residual Adds of two variables become three-term equations): the
  equations Marabou's readers parse, evaluated at random inputs, match onnxruntime on the
  ORIGINAL model (scaled error ≤ 1e-5);
* each piecewise family (Relu, LeakyRelu, Max, Abs, Sign, Sigmoid, Bilinear) on a network built
  with maraboupy's own API, against the formula;
* the evaluation follows what was parsed: a changed equation scalar moves exactly its output;
  a contradicting, missing or bound-breaking system is refused with the reason;
* Marabou's solver, input fixed, agrees where it can answer, and an infeasible query is named
  unsatisfiable.

About 10 s on a quiet machine (every network is tiny).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("maraboupy", reason="maraboupy is not installed (wheels for CPython <= 3.12)")

from maraboupy import MarabouUtils  # noqa: E402
from maraboupy.MarabouNetwork import MarabouNetwork  # noqa: E402

import onnx_lower  # noqa: E402
from onnx_lower import marabou as mb  # noqa: E402
from onnx_lower.nnet import chain_layers, write_nnet  # noqa: E402
from tests.oracles import run_model  # noqa: E402
from tests.test_layered import build_dag, dags  # noqa: E402

SCALED = 1e-5


def _scaled(got: np.ndarray, ref: np.ndarray) -> float:
    ref = np.asarray(ref, np.float64).reshape(-1)
    return float(np.abs(np.asarray(got).reshape(-1) - ref).max() / max(np.abs(ref).max(), 1e-6))


def _readings(model: onnx.ModelProto, tmp: Path) -> dict[str, object]:
    """Marabou's networks of the layered ONNX, its ``.nnet`` and the mlp ONNX of ``model``.

    A chain without a hidden layer has no ``.nnet`` reading: Marabou's NNet reader indexes the
    last hidden layer (maraboupy 2.0, ``MarabouNetworkNNet.py:386``, IndexError).
    """
    layered, _ = onnx_lower.lower(model, form="layered")
    mlp, _ = onnx_lower.lower(model, form="mlp")
    onnx_lower.save_model(layered, tmp / "layered.onnx")
    onnx_lower.save_model(mlp, tmp / "mlp.onnx")
    names = ["layered.onnx", "mlp.onnx"]
    layers = chain_layers(layered)
    if len(layers) > 1:
        write_nnet(layers, tmp / "layered.nnet")
        names.append("layered.nnet")
    return {k: mb.read(tmp / k) for k in names}


@settings(max_examples=10)
@given(dag=dags())
def test_parsed_equations_of_random_dags_match_onnxruntime(dag):
    model = build_dag(dag)
    rng = np.random.default_rng(dag.seed)
    with tempfile.TemporaryDirectory() as tmp:
        nets = _readings(model, Path(tmp))
    for _ in range(3):
        x = rng.uniform(-4, 4, (1, dag.n_in)).astype(np.float32)
        ref = run_model(model, {"x": x})[0]
        for key, net in nets.items():
            assert _scaled(mb.evaluate_equations(net, x), ref) <= SCALED, key


def _net(n_in: int) -> tuple[MarabouNetwork, np.ndarray]:
    net = MarabouNetwork()
    xs = np.array([net.getNewVariable() for _ in range(n_in)])
    net.inputVars = [xs]
    return net, xs


def _affine(net: MarabouNetwork, coefs, xs, scalar: float) -> int:
    """A new variable ``v = Σ c x + scalar``, written as Marabou's readers write it:
    ``Σ c x − v = −scalar``."""
    v = net.getNewVariable()
    e = MarabouUtils.Equation()
    for c, x in zip(coefs, xs, strict=True):
        e.addAddend(float(c), int(x))
    e.addAddend(-1.0, v)
    e.setScalar(-scalar)
    net.addEquation(e)
    return v


def _families() -> tuple[MarabouNetwork, np.ndarray]:
    net, xs = _net(2)
    b = _affine(net, [2.0, -1.0], xs, 0.5)
    outs = []
    for add in (net.addRelu, net.addAbsConstraint, net.addSignConstraint, net.addSigmoid):
        f = net.getNewVariable()
        add(b, f)
        outs.append(f)
    f = net.getNewVariable()
    net.addLeakyRelu(b, f, 0.1)
    outs.append(f)
    f = net.getNewVariable()
    net.addMaxConstraint({int(xs[0]), int(xs[1]), b}, f)
    outs.append(f)
    f = net.getNewVariable()
    net.addBilinear(int(xs[0]), int(xs[1]), f)
    outs.append(f)
    net.outputVars = [np.array(outs)]
    return net, xs


@settings(max_examples=25)
@given(x=st.lists(st.floats(-10, 10), min_size=2, max_size=2))
def test_piecewise_families_follow_their_formulas(x):
    net, _ = _families()
    b = 2 * x[0] - x[1] + 0.5
    want = [max(b, 0.0), abs(b), 1.0 if b >= 0 else -1.0, 1 / (1 + np.exp(-b)),
            b if b > 0 else 0.1 * b, max(x[0], x[1], b), x[0] * x[1]]
    np.testing.assert_allclose(mb.evaluate_equations(net, np.array(x)), want, rtol=1e-12,
                               atol=1e-12)


def _mlp() -> tuple[MarabouNetwork, np.ndarray]:
    """``y = W₂ relu(W₁ x + b₁) + b₂``, 3 → 4 → 2, as maraboupy's API builds it."""
    rng = np.random.default_rng(3)
    net, xs = _net(3)
    w1, b1, w2, b2 = (rng.standard_normal(s) for s in ((4, 3), 4, (2, 4), 2))
    hidden = [_affine(net, w1[i], xs, b1[i]) for i in range(4)]
    relus = []
    for h in hidden:
        f = net.getNewVariable()
        net.addRelu(h, f)
        relus.append(f)
    net.outputVars = [np.array([_affine(net, w2[i], relus, b2[i]) for i in range(2)])]
    net.params = (w1, b1, w2, b2)
    return net, xs


def _mlp_ref(net, x: np.ndarray) -> np.ndarray:
    w1, b1, w2, b2 = net.params
    return w2 @ np.maximum(w1 @ x + b1, 0) + b2


def test_evaluation_follows_the_parsed_scalars():
    net, _ = _mlp()
    x = np.array([0.3, -0.2, 0.9])
    before = mb.evaluate_equations(net, x)
    np.testing.assert_allclose(before, _mlp_ref(net, x), rtol=1e-12)
    out0 = int(net.outputVars[0][0])
    eq = next(e for e in net.equList if e.addendList[-1][1] == out0)
    eq.setScalar(eq.scalar + 1.0)  # Σ w h − y = s + 1: y one lower
    after = mb.evaluate_equations(net, x)
    np.testing.assert_allclose(after - before, [-1.0, 0.0], atol=1e-12)


def test_all_values_are_returned_on_request():
    net, xs = _mlp()
    x = np.array([1.0, 2.0, -3.0])
    values = mb.evaluate_equations(net, x, assignment=True)
    assert values.shape == (net.numVars,)
    np.testing.assert_array_equal(values[xs], x)


def test_a_contradicting_equation_is_named():
    net, xs = _mlp()
    _affine(net, [1.0, 0.0, 0.0], xs, 0.0)  # a fresh v = x0: consistent
    mb.evaluate_equations(net, np.zeros(3))
    e = MarabouUtils.Equation()  # x0 + x1 = 5, which x = 0 breaks
    e.addAddend(1.0, int(xs[0]))
    e.addAddend(1.0, int(xs[1]))
    e.setScalar(5.0)
    net.addEquation(e)
    with pytest.raises(mb.MarabouEquationError, match="1 equations do not hold"):
        mb.evaluate_equations(net, np.zeros(3))


def test_an_undetermined_output_is_named():
    net, _ = _mlp()
    out0 = int(net.outputVars[0][0])
    net.equList = [e for e in net.equList if e.addendList[-1][1] != out0]
    with pytest.raises(mb.MarabouEquationError, match="1 of 2 output variables stay undetermined"):
        mb.evaluate_equations(net, np.zeros(3))


def test_a_broken_bound_is_named_and_the_solver_calls_it_unsatisfiable():
    net, _ = _mlp()
    x = np.array([0.5, 0.5, 0.5])
    y = _mlp_ref(net, x)
    out1 = int(net.outputVars[0][1])
    net.setUpperBound(out1, y[1] - 1.0)
    with pytest.raises(mb.MarabouEquationError, match="break their upper bound"):
        mb.evaluate_equations(net, x)
    with pytest.raises(mb.LoweringError, match="unsatisfiable"):
        mb.evaluate_with_solver(net, x, timeout=30)


def test_the_solver_agrees_with_the_equations():
    net, _ = _mlp()
    x = np.array([0.1, -0.7, 0.4])
    np.testing.assert_allclose(mb.evaluate_with_solver(net, x, timeout=30),
                               mb.evaluate_equations(net, x), rtol=1e-6, atol=1e-6)


def test_wrong_input_size_is_refused():
    net, _ = _mlp()
    with pytest.raises(mb.MarabouEquationError, match="x has 2 values, the network 3 inputs"):
        mb.evaluate_equations(net, np.zeros(2))


def test_softmax_groups_follow_their_formula():
    """A Softmax constraint (maraboupy reads a final Softmax as one per group) is evaluated."""
    net, _ = _mlp()
    logits = [int(v) for v in np.asarray(net.outputVars[0]).reshape(-1)]
    probs = [net.getNewVariable() for _ in logits]
    net.addSoftmaxConstraint(logits, probs)
    x = np.array([0.3, -0.2, 0.9])
    val = mb.evaluate_equations(net, x, assignment=True)
    z = val[logits]
    np.testing.assert_allclose(val[probs], np.exp(z - z.max()) / np.exp(z - z.max()).sum(),
                               rtol=1e-12)
    np.testing.assert_allclose(val[logits], _mlp_ref(net, x), rtol=1e-12)
