"""The real-model corpus (``../shared/corpus``) in every form, validated against onnxruntime.

For every model and form (mlp with ``max_weight_mb=4096``, im2col, auto):

* the lowered model's ops are those of the form used: mlp → Flatten/Reshape/MatMul/Add/Relu and
  the elementwise ops the form keeps (Tanh, Softmax, ...); im2col → no Conv/ConvTranspose/pools/
  BatchNormalization, and nothing beyond the im2col op set but ops the original already had;
* onnxruntime gives the same outputs as on the original for 3 random inputs in [0, 1]:
  ``|a - b| <= atol + rtol·|b|`` with rtol = 1e-4 and ``atol = 1e-4 · max|ref|``. Why an atol
  relative to the output scale: the lowered model sums the same float32 products in another
  order (folded matrices are composed in float64 and rounded once), so its error is a few ulps of
  the *terms* of each sum, i.e. of the output's scale, not of each output; a logit that happens
  to be near 0 has a large relative error at that absolute error, and a fixed atol means nothing
  for outputs of magnitude 1e3 or 1e-3. A failure reports both the max absolute and the max
  relative error;
* a model with a dynamic batch keeps it, and at batch 7 gives per sample what the ORIGINAL
  model gives for that sample alone at batch 1.

``amandashi95__resnet20.onnx`` needs ~9 GB of dense mlp weights: the mlp form must refuse it
with BudgetExceededError even at 4096 MB (and auto must fall back to im2col). Lowering the same
model twice gives byte-identical files (determinism), checked for three models.

The default run keeps the fast models; ``SLOW`` lists the (model, form) pairs that take over
~2 s (measured: lowering plus validation), which run with ``-m slow``.
"""

from __future__ import annotations

import functools
import time

import numpy as np
import onnx
import pytest

import onnx_lower
from onnx_lower.errors import BudgetExceededError
from onnx_lower.validate import graph_inputs, make_session, random_inputs
from tests.oracles import CORPUS, check_ops

if not CORPUS.is_dir() or not any(CORPUS.glob("*.onnx")):
    pytest.skip(f"the real-model corpus is not at {CORPUS} (it lives beside the project as "
                f"../shared/corpus and is not committed)", allow_module_level=True)

pytestmark = pytest.mark.corpus

MODELS = sorted(p.name for p in CORPUS.glob("*.onnx"))
FORMS = ("mlp", "im2col", "auto")
MLP_BUDGET_MB = 4096
#: Models whose mlp form needs more than MLP_BUDGET_MB of dense weights.
MLP_REFUSED = {"amandashi95__resnet20.onnx"}
RTOL = 1e-4
SCALE_ATOL = 1e-4  # atol = SCALE_ATOL * max|ref|, see the module docstring
SAMPLES = 3
BATCH = 7

#: (model, form) pairs over ~2 s each (pytest --durations, lowering + 3 samples + batch 7):
#: Convnet_maxpool mlp 5.5 / auto 5.5 (a 28x28 MaxPool as a dense ReLU tournament), hwang2409
#: mnist_cnn mlp 5.0 / auto 3.8, NN_rul mlp 2.2. The other 39 pairs take 0.1-2.8 s, 25 s in all.
SLOW = frozenset({
    ("stanleybak__Convnet_maxpool.onnx", "mlp"),
    ("stanleybak__Convnet_maxpool.onnx", "auto"),
    ("hwang2409__mnist_cnn.onnx", "mlp"),
    ("hwang2409__mnist_cnn.onnx", "auto"),
    ("christopherbrix__NN_rul_full_window_20.onnx", "mlp"),
})
DETERMINISM = ("emclab-sinica__mnist-8.onnx", "debjyoti0891__lenet5.onnx",
               "stanleybak__resnet_2b.onnx")


def _params(pairs):
    return [pytest.param(m, f, id=f"{m.removesuffix('.onnx')}-{f}",
                         marks=[pytest.mark.slow] if (m, f) in SLOW else [])
            for m, f in pairs]


@functools.cache
def _original(name: str) -> onnx.ModelProto:
    return onnx.load(str(CORPUS / name))


def _lower(name: str, form: str):
    kwargs = {"max_weight_mb": MLP_BUDGET_MB} if form == "mlp" else {}
    return onnx_lower.lower(CORPUS / name, form=form, **kwargs)


def _dynamic_batch(model: onnx.ModelProto) -> bool:
    return any(isinstance(s.dims[0], str) or s.dims[0] is None
               for s in graph_inputs(model) if s.dims)


def _run(sess, feed):
    return sess.run(None, feed)


def _compare(ref: list[np.ndarray], got: list[np.ndarray], what: str) -> None:
    """rtol 1e-4 with atol 1e-4·max|ref| (the scale over every output of the run)."""
    scale = max(float(np.max(np.abs(r))) for r in ref)
    atol = SCALE_ATOL * scale
    for k, (r, g) in enumerate(zip(ref, got, strict=True)):
        assert g.shape == r.shape and g.dtype == r.dtype, (what, k, g.shape, r.shape)
        err = np.abs(g.astype(np.float64) - r.astype(np.float64))
        ok = err <= atol + RTOL * np.abs(r)
        rel = err / np.maximum(np.abs(r), np.finfo(np.float64).tiny)
        assert ok.all(), (
            f"{what}, output {k}: {int((~ok).sum())} of {r.size} elements off; max abs err "
            f"{err.max():.3g} (atol {atol:.3g} = {SCALE_ATOL:g}·max|ref| {scale:.3g}), max rel "
            f"err {rel.max():.3g} (rtol {RTOL:g})")


# --------------------------------------------------------------------------- the models


def test_corpus_is_complete():
    assert len(MODELS) >= 15, MODELS
    assert MLP_REFUSED <= set(MODELS)
    assert {m for m, _ in SLOW} <= set(MODELS) and set(DETERMINISM) <= set(MODELS)


@pytest.mark.parametrize(("name", "form"), _params((m, f) for m in MODELS for f in FORMS))
def test_corpus_model(name, form):
    original = _original(name)
    if form == "mlp" and name in MLP_REFUSED:
        with pytest.raises(BudgetExceededError, match="max-weight-mb"):
            _lower(name, form)
        return
    start = time.perf_counter()
    lowered, report = _lower(name, form)
    used = report.form_used
    if form == "auto" and name in MLP_REFUSED:
        assert used == "im2col", report.form_reason
    assert used in ("mlp", "im2col")
    check_ops(original, lowered, used)
    assert [o.name for o in lowered.graph.output] == [o.name for o in original.graph.output]

    s_orig, s_low = make_session(original), make_session(lowered)
    rng = np.random.default_rng(0)
    for i in range(SAMPLES):
        feed = random_inputs(original, rng=rng)
        _compare(_run(s_orig, feed), _run(s_low, feed), f"{name} [{used}] sample {i}")

    if _dynamic_batch(original):
        low_specs = graph_inputs(lowered)
        assert all(isinstance(s.dims[0], str) or s.dims[0] is None for s in low_specs), \
            f"the dynamic batch became {[s.dims[0] for s in low_specs]}"
        feed = random_inputs(original, rng=rng, batch=BATCH)
        per_sample = [_run(s_orig, {k: v[j:j + 1] for k, v in feed.items()})
                      for j in range(BATCH)]
        ref = [np.concatenate([p[k] for p in per_sample]) for k in range(len(per_sample[0]))]
        _compare(ref, _run(s_low, feed), f"{name} [{used}] batch {BATCH}")
    print(f"{name} [{form} → {used}]: {time.perf_counter() - start:.1f} s")


@pytest.mark.parametrize("name", DETERMINISM)
@pytest.mark.parametrize("form", ["mlp", "im2col"])
def test_lowering_is_deterministic(name, form):
    first, _ = _lower(name, form)
    second, _ = _lower(name, form)
    assert first.SerializeToString() == second.SerializeToString()
