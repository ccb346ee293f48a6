"""im2col on whole networks: samples, the corpus, ImageNet-scale models, old opsets."""

from __future__ import annotations

import onnx
import pytest
from onnx import helper

from onnx_lower.passes import im2col
from tests.im2col import CORPUS, CORPUS_DIR, REPO, SAMPLES, check, make_model, rand


@pytest.mark.parametrize("opset", [9, 11])
def test_old_opsets(opset):
    """Pad, Slice and ReduceSum take attributes before opsets 11/10/13."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("AveragePool", ["c"], ["a"], kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                              strides=[2, 2]),
             helper.make_node("MaxPool", ["a"], ["m"], kernel_shape=[2, 2], pads=[0, 0, 1, 1]),
             helper.make_node("GlobalAveragePool", ["m"], ["y"])]
    check(make_model(nodes, ["N", 2, 7, 7], {"w": rand(3, 2, 3, 3)}, opset=opset),
          batches=(1, 2))


def _dynamic_batch(model: onnx.ModelProto) -> bool:
    inits = {t.name for t in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name not in inits:
            d = vi.type.tensor_type.shape.dim
            return bool(d) and not d[0].HasField("dim_value")
    return False


@pytest.mark.parametrize("path", SAMPLES, ids=[p.stem for p in SAMPLES])
def test_sample_models(path):
    model = onnx.load(path)
    check(model, batches=(1, 3) if _dynamic_batch(model) else (1,), input_range=(0.0, 1.0))


@pytest.mark.corpus
@pytest.mark.parametrize("path", CORPUS, ids=[p.stem for p in CORPUS])
def test_corpus_models(path):
    model = onnx.load(path)
    check(model, batches=(1, 3) if _dynamic_batch(model) else (1,), input_range=(0.0, 1.0))


def test_corpus_present():
    if not CORPUS:
        pytest.skip(f"the real-model corpus is not at {CORPUS_DIR} (../shared/corpus)")
    assert len(CORPUS) >= 10


@pytest.mark.parametrize("name", [
    "resnet18", "mobilenetv2", "squeezenet",
    pytest.param("resnet50", marks=pytest.mark.slow), pytest.param("vgg11", marks=pytest.mark.slow),
])
def test_imagenet_models(name):
    path = REPO / "models" / "imagenet" / f"{name}.onnx"
    if not path.is_file():
        pytest.skip(f"{path} is missing: run python tools/make_models.py --imagenet")
    check(onnx.load(path), input_range=(0.0, 1.0))


def test_module_docstring_states_the_math():
    doc = im2col.__doc__
    for phrase in ("(N, S, C)", "zero row", "relu(a - b)", "space-to-depth"):
        assert phrase in doc, phrase
