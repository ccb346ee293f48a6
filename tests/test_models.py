"""The committed sample models in models/ are valid, runnable, and reproducible.

Regenerate them with ``python tools/make_models.py``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = REPO_ROOT / "models"
MAKE_MODELS = REPO_ROOT / "tools" / "make_models.py"

# name -> (input shape with the batch as None, number of classes)
SAMPLES = {
    "lenet_maxpool": ((None, 1, 28, 28), 10),
    "avgpool_strided": ((1, 3, 16, 16), 10),
    "resblock_bn": ((1, 4, 8, 8), 10),
}
CASES = [
    ("lenet_maxpool", 1),
    ("lenet_maxpool", 3),
    ("avgpool_strided", 1),
    ("resblock_bn", 1),
]


def _load_make_models():
    spec = importlib.util.spec_from_file_location("make_models", MAKE_MODELS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sample_path(name: str) -> Path:
    path = MODELS_DIR / f"{name}.onnx"
    if not path.is_file():
        pytest.skip(f"{path} is missing: run python tools/make_models.py")
    return path


@pytest.mark.parametrize("name", list(SAMPLES))
def test_sample_passes_checker(name):
    path = _sample_path(name)
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == 8
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 13)]
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["logits"]
    assert path.stat().st_size < 1_000_000


def test_lenet_batch_is_dynamic():
    model = onnx.load(_sample_path("lenet_maxpool"))
    in_batch = model.graph.input[0].type.tensor_type.shape.dim[0]
    out_batch = model.graph.output[0].type.tensor_type.shape.dim[0]
    assert in_batch.dim_param == "N" and out_batch.dim_param == "N"


@pytest.mark.parametrize(("name", "batch"), CASES)
def test_sample_runs_in_onnxruntime(name, batch):
    path = _sample_path(name)
    shape, classes = SAMPLES[name]
    shape = tuple(batch if d is None else d for d in shape)
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (y,) = sess.run(["logits"], {"input": x})
    assert y.shape == (batch, classes)
    assert y.dtype == np.float32
    assert np.isfinite(y).all()
    assert 1e-2 < float(y.std()) < 1e2, "activations vanished or exploded"
    if batch > 1:  # rows are independent: each equals the batch-1 result
        (y0,) = sess.run(["logits"], {"input": x[:1]})
        np.testing.assert_allclose(y[:1], y0, rtol=1e-5, atol=1e-5)


def test_regenerated_samples_are_byte_identical(tmp_path, capsys):
    committed = {name: _sample_path(name) for name in SAMPLES}
    make_models = _load_make_models()
    assert make_models.main(["--out", str(tmp_path), "--no-check"]) == 0
    capsys.readouterr()
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == sorted(f"{name}.onnx" for name in SAMPLES)
    for name, path in committed.items():
        fresh = (tmp_path / f"{name}.onnx").read_bytes()
        assert fresh == path.read_bytes(), (
            f"{name}.onnx differs from the committed file: regenerate with "
            "python tools/make_models.py (onnx/numpy versions can change the bytes)"
        )
