"""Proof by a real verifier: Marabou (maraboupy 2.0) reads what onnx_lower writes.

* ``Marabou.read_nnet`` reads the ``.nnet`` and ``Marabou.read_onnx`` the lowered ONNX; both
  evaluate like onnxruntime on the ORIGINAL model (scaled error ``max|Δ| / max|original|``
  ≤ 1e-5 on seeded inputs): the ``.nnet`` through the reader's own ``evaluateWithoutMarabou``
  (its parsed weights), the ONNX through Marabou's solver with the input fixed (its equations;
  ``evaluateWithoutMarabou`` of an ONNX network runs onnxruntime, which proves nothing);
* a local-robustness query ("the argmax does not change on an L∞ box around a seeded input")
  gets the same verdict from Marabou on the original, on the lowered ONNX and on the ``.nnet``
  (whose input bounds ARE the box: nothing is set on the reader's query). An ``unsat``
  (robust) box and a ``sat`` box (around a point on the decision boundary, found by bisection
  between two inputs of different labels) are both checked; each counterexample is checked on
  the original with onnxruntime;
* every corpus model in ``--form layered`` (a model the form refuses, by a kept op's name or
  the budget, skips here with that refusal; tests/test_layered.py pins the refusals);
* the same for a CNN, ``stanleybak__cifar10_small`` (slow).

Default profile: the fully-connected model (about 15 s on a quiet machine). The CNN cases are
slow: Marabou's query for a CNN's robustness takes minutes (``tools/marabou_census.py``).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import onnx
import pytest

pytest.importorskip("maraboupy", reason="maraboupy is not installed (wheels for CPython <= 3.12)")

import onnx_lower  # noqa: E402
from onnx_lower import marabou as mb  # noqa: E402
from onnx_lower.errors import BudgetExceededError, UnsupportedOpError  # noqa: E402
from onnx_lower.nnet import chain_layers, write_nnet  # noqa: E402
from onnx_lower.validate import graph_inputs, make_session  # noqa: E402

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"
if not CORPUS.is_dir() or not any(CORPUS.glob("*.onnx")):
    pytest.skip(f"the real-model corpus is not at {CORPUS}", allow_module_level=True)
pytestmark = pytest.mark.corpus

FC = "stanleybak__mnist-net_256x2.onnx"
MODELS = sorted(p.name for p in CORPUS.glob("*.onnx"))
#: The default profile's cases; the others take 15 s to minutes (Marabou's ONNX reader turns
#: every dense coefficient into an equation addend: 16-25 s for cifar10_small's 25 MB).
FAST = {FC}
SCALED_ERR = 1e-5
EPS_ROBUST = 0.01  # Marabou: unsat in ~1 s on mnist-net_256x2 (0.1 times out after 60 s)
TIMEOUT = 120


def _params():
    out = []
    for name in MODELS:
        marks = [] if name in FAST else [pytest.mark.slow]
        out.append(pytest.param(name, marks=marks, id=name.removesuffix(".onnx")))
    return out


@functools.cache
def _written(name: str, tmp: Path) -> tuple[Path, Path]:
    """``(lowered .onnx, .nnet)`` of a corpus model, written once per session."""
    lowered = _layered(name)
    onnx_path, nnet_path = tmp / f"{name}.lowered.onnx", tmp / f"{name}.nnet"
    onnx_lower.save_model(lowered, onnx_path)
    write_nnet(chain_layers(lowered), nnet_path, source=name)
    return onnx_path, nnet_path


#: Marabou's ONNX and NNet readers hold about 40× the dense weights (cifar10_small: 25 MB of
#: weights, 1 GB read; tools/marabou_census.py): above this the read exhausts a 24 GB machine.
MARABOU_MAX_WEIGHT_MB = 150


def _layered(name: str, form: str = "layered") -> onnx.ModelProto:
    try:
        lowered, report = onnx_lower.lower(CORPUS / name, form=form)
    except (UnsupportedOpError, BudgetExceededError) as exc:
        pytest.skip(f"--form {form} refuses {name}: {exc.fact}")
    mb_ = report.after.weight_bytes / 2**20
    if mb_ > MARABOU_MAX_WEIGHT_MB:
        pytest.skip(f"{name}: {mb_:.0f} MB of dense weights; Marabou's reader would need about "
                    f"{40 * mb_ / 1024:.0f} GB (cap {MARABOU_MAX_WEIGHT_MB} MB)")
    return lowered


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("marabou")


def _feed(name: str, seed: int) -> tuple[str, np.ndarray]:
    spec = graph_inputs(onnx.load(str(CORPUS / name)))[0]
    shape = [d if isinstance(d, int) else 1 for d in spec.dims]
    return spec.name, np.random.default_rng(seed).uniform(0, 1, shape).astype(spec.dtype)


def _original(name: str, x: np.ndarray) -> np.ndarray:
    sess = _session(name)
    return sess.run(None, {sess.get_inputs()[0].name: x})[0].reshape(-1).astype(np.float64)


@functools.cache
def _session(name: str):
    return make_session(CORPUS / name, 1, label=name)


def _scaled(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(np.asarray(got, np.float64).reshape(-1) - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("name", _params())
def test_marabou_reads_and_evaluates(name, out_dir):
    onnx_path, nnet_path = _written(name, out_dir)
    nnet, net = mb.read(nnet_path), mb.read(onnx_path)
    for seed in range(3):
        _, x = _feed(name, seed)
        ref = _original(name, x)
        assert _scaled(nnet.evaluateWithoutMarabou(x.reshape(1, -1))[0], ref) <= SCALED_ERR
    _, x = _feed(name, 7)
    ref = _original(name, x)
    assert _scaled(mb.evaluate_with_solver(net, x, TIMEOUT), ref) <= SCALED_ERR
    assert _scaled(mb.evaluate_with_solver(nnet, x.reshape(-1), TIMEOUT), ref) <= SCALED_ERR


def _boundary_point(name: str) -> tuple[np.ndarray, int]:
    """A point within 1e-6 (L∞) of where the argmax changes, and its label."""
    _, a = _feed(name, 0)
    la = int(_original(name, a).argmax())
    for seed in range(1, 50):
        _, b = _feed(name, seed)
        if int(_original(name, b).argmax()) != la:
            break
    else:
        pytest.skip("no seeded input with another label")
    lo_t, hi_t = 0.0, 1.0  # a + t (b - a): label la at lo_t, another at hi_t
    while np.abs((hi_t - lo_t) * (b - a)).max() > 1e-6:
        mid = (lo_t + hi_t) / 2
        if int(_original(name, (a + mid * (b - a)).astype(a.dtype)).argmax()) == la:
            lo_t = mid
        else:
            hi_t = mid
    return (a + lo_t * (b - a)).astype(np.float64), la


def _same_verdicts(name: str, out_dir: Path, center: np.ndarray, label: int, eps: float,
                   form: str = "layered"):
    """Marabou's verdicts on the original, the lowered ONNX and (for a chain) the ``.nnet``."""
    lowered = _layered(name, form)
    onnx_path = out_dir / f"{name}.{form}.onnx"
    onnx_lower.save_model(lowered, onnx_path)
    lo, hi = center.reshape(-1) - eps, center.reshape(-1) + eps
    results = {
        "original": mb.robustness(mb.read(CORPUS / name), lo, hi, label, timeout=TIMEOUT),
        "lowered onnx": mb.robustness(mb.read(onnx_path), lo, hi, label, timeout=TIMEOUT),
    }
    if form == "layered" or name in (FC, CNN):  # the mlp forms of these two are chains
        boxed = out_dir / f"{name}.eps{eps:g}.nnet"
        write_nnet(chain_layers(lowered), boxed, (lo, hi), source=name)
        results[".nnet"] = mb.robustness(mb.read(boxed), lo, hi, label, timeout=TIMEOUT,
                                         set_box=False)
    verdicts = {k: r.verdict for k, r in results.items()}
    assert set(verdicts.values()) <= {"robust", "not robust"}, verdicts  # no timeout, no error
    assert len(set(verdicts.values())) == 1, verdicts
    shape = _feed(name, 0)[1].shape
    for key, r in results.items():
        if r.counterexample is not None:
            x = r.counterexample
            assert np.all(x >= lo - 1e-9) and np.all(x <= hi + 1e-9), key
            y = _original(name, x.reshape(shape).astype(np.float32))
            others = np.delete(y, label)
            assert others.max() - y[label] >= -1e-4 * np.abs(y).max(), key  # a real flip
    return verdicts["original"]


@pytest.mark.skipif(FC not in MODELS, reason=f"{FC} is not in the corpus")
def test_robustness_same_verdict_fc(out_dir):
    _, x = _feed(FC, 0)
    label = int(_original(FC, x).argmax())
    assert _same_verdicts(FC, out_dir, x.astype(np.float64), label, EPS_ROBUST) == "robust"
    center, label = _boundary_point(FC)
    assert _same_verdicts(FC, out_dir, center, label, 1e-3) == "not robust"


CNN = "stanleybak__cifar10_small.onnx"
EPS_CNN = 2e-4  # Marabou: unsat in 30-60 s on each (cnn_max_mninst2 times out at 2e-3)


@pytest.mark.slow
@pytest.mark.skipif(CNN not in MODELS, reason=f"{CNN} is not in the corpus")
@pytest.mark.parametrize("form", ["mlp", "layered"])
def test_robustness_same_verdict_cnn(out_dir, form):
    """cifar10_small (Conv, Relu, Gemm: its mlp form is already a chain) as ONNX and .nnet."""
    _, x = _feed(CNN, 0)
    label = int(_original(CNN, x).argmax())
    verdict = _same_verdicts(CNN, out_dir, x.astype(np.float64), label, EPS_CNN, form)
    assert verdict == "robust"
