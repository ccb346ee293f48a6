"""Loading and saving: atomic writes, the input is never overwritten, external data, bad inputs."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_lower import model_io
from onnx_lower.errors import InvalidModelError, OutputPathError
from onnx_lower.model_io import load_model, save_model


def small_model(opset: int = 13, weight_elements: int = 4) -> onnx.ModelProto:
    w = np.arange(weight_elements, dtype=np.float32).reshape(1, weight_elements)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", weight_elements])],
        initializer=[numpy_helper.from_array(w, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def assert_one_line(exc: BaseException) -> None:
    text = str(exc)
    assert text and "\n" not in text


# ------------------------------------------------------------------------------ saving


def test_save_then_load_round_trip(tmp_path):
    path = save_model(small_model(), tmp_path / "m.onnx")
    assert path == tmp_path / "m.onnx"
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]
    loaded = load_model(path)
    assert loaded.graph == small_model().graph


def test_save_replaces_an_existing_output_file(tmp_path):
    target = tmp_path / "out.onnx"
    target.write_bytes(b"old")
    save_model(small_model(), target)
    assert load_model(target).graph == small_model().graph
    assert sorted(os.listdir(tmp_path)) == ["out.onnx"]


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), RuntimeError("boom")])
def test_failed_save_leaves_nothing_behind(tmp_path, monkeypatch, error):
    def half_write(model, path, *args, **kwargs):
        with open(path, "wb") as f:  # part of the file, then the failure
            f.write(model.SerializeToString()[:10])
        raise error

    monkeypatch.setattr(model_io, "write_model", half_write)
    target = tmp_path / "out.onnx"
    expected = OutputPathError if isinstance(error, OSError) else RuntimeError
    with pytest.raises(expected) as info:
        save_model(small_model(), target)
    if expected is OutputPathError:
        assert "out.onnx" in str(info.value) and "No space left" in str(info.value)
        assert_one_line(info.value)
    assert os.listdir(tmp_path) == []


def test_failed_save_keeps_the_previous_output(tmp_path, monkeypatch):
    target = tmp_path / "out.onnx"
    save_model(small_model(weight_elements=3), target)
    before = target.read_bytes()

    def failing(model, path, *args, **kwargs):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(model_io, "write_model", failing)
    with pytest.raises(OutputPathError):
        save_model(small_model(weight_elements=5), target)
    assert target.read_bytes() == before
    assert os.listdir(tmp_path) == ["out.onnx"]


def test_failed_external_data_save_leaves_nothing_behind(tmp_path, monkeypatch):
    real_save = onnx.save_model

    def save_then_fail(model, path, *args, **kwargs):
        real_save(model, path, *args, **kwargs)  # model and .data written into the temp folder
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(onnx, "save_model", save_then_fail)
    with pytest.raises(OutputPathError):
        save_model(small_model(weight_elements=2048), tmp_path / "big.onnx", external_data=True)
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="needs POSIX permissions and a non-root user")
def test_save_into_read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(OutputPathError) as info:
            save_model(small_model(), folder / "m.onnx")
        assert_one_line(info.value)
        assert os.listdir(folder) == []
    finally:
        folder.chmod(0o755)


def test_folder_that_refuses_new_files(tmp_path, monkeypatch):
    """What a read-only folder does to a non-root user, simulated so that it runs as root."""

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(model_io.tempfile, "mkdtemp", refuse)
    with pytest.raises(OutputPathError, match="Permission denied") as info:
        save_model(small_model(), tmp_path / "m.onnx")
    assert_one_line(info.value)
    assert os.listdir(tmp_path) == []


def test_missing_output_folder(tmp_path):
    with pytest.raises(OutputPathError, match="does not exist") as info:
        save_model(small_model(), tmp_path / "nope" / "m.onnx")
    assert_one_line(info.value)
    assert not (tmp_path / "nope").exists()


def test_output_path_that_is_a_folder(tmp_path):
    with pytest.raises(OutputPathError, match="folder"):
        save_model(small_model(), tmp_path)


@pytest.mark.parametrize("link", ["same", "symlink", "hardlink", "relative"])
def test_refuses_to_overwrite_the_input(tmp_path, monkeypatch, link):
    source = tmp_path / "in.onnx"
    onnx.save_model(small_model(), str(source))
    original = source.read_bytes()
    if link == "same":
        target = source
    elif link == "symlink":
        target = tmp_path / "alias.onnx"
        target.symlink_to(source)
    elif link == "hardlink":
        target = tmp_path / "hard.onnx"
        os.link(source, target)
    else:
        monkeypatch.chdir(tmp_path)
        target = "./sub/../in.onnx"
        (tmp_path / "sub").mkdir()
    with pytest.raises(OutputPathError, match="input") as info:
        save_model(small_model(weight_elements=7), target, input_path=source)
    assert_one_line(info.value)
    assert source.read_bytes() == original
    leftovers = {p for p in os.listdir(tmp_path)} - {"in.onnx", "alias.onnx", "hard.onnx", "sub"}
    assert not leftovers


# ------------------------------------------------------------------------------ external data


def test_external_data_round_trip(tmp_path):
    model = small_model(weight_elements=4096)
    path = save_model(model, tmp_path / "big.onnx", external_data=True)
    assert sorted(os.listdir(tmp_path)) == ["big.onnx", "big.onnx.data"]
    assert (tmp_path / "big.onnx").stat().st_size < 4096
    assert (tmp_path / "big.onnx.data").stat().st_size >= 4096 * 4
    loaded = load_model(path)
    np.testing.assert_array_equal(weights(loaded)["w"], weights(model)["w"])
    assert [n.op_type for n in loaded.graph.node] == ["MatMul"]


def _rich_model() -> onnx.ModelProto:
    """Every kind of field write_model streams: metadata, a function, a sparse initializer,
    a subgraph (If), value_info and several initializers."""
    model = small_model(weight_elements=64)
    model.producer_name, model.doc_string = "test", "doc"
    helper.set_model_props(model, {"k": "v"})
    g = model.graph
    g.sparse_initializer.append(helper.make_sparse_tensor(
        numpy_helper.from_array(np.array([1.5, -2.0], np.float32), "s"),
        numpy_helper.from_array(np.array([0, 3], np.int64), "s_i"), [4]))
    branch = helper.make_graph([helper.make_node("Identity", ["y"], ["z"])], "b", [],
                               [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)])
    g.node.append(helper.make_node("If", ["c"], ["o"], then_branch=branch, else_branch=branch))
    g.initializer.append(numpy_helper.from_array(np.array(True), "c"))
    g.value_info.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 64]))
    model.functions.append(helper.make_function(
        "local", "F", ["a"], ["b"], [helper.make_node("Relu", ["a"], ["b"])],
        [helper.make_opsetid("", 13)]))
    return model


@pytest.mark.parametrize("make", [small_model, _rich_model])
def test_write_model_is_byte_identical_to_serialize(tmp_path, make):
    """The streamed writer produces exactly ``SerializeToString()`` (so its output is as
    deterministic as the serializer's) and says how many bytes it wrote."""
    model = make()
    n = model_io.write_model(model, tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx").read_bytes() == model.SerializeToString()
    assert n == model.ByteSize()


def test_write_model_never_serialises_the_whole_graph(tmp_path, monkeypatch):
    """No message larger than one initializer is serialised at once: the point of streaming."""
    model = small_model(weight_elements=4096)
    sizes = []
    real, real_graph = onnx.TensorProto.SerializeToString, onnx.GraphProto.SerializeToString

    def graph_serialize(self, **kw):  # a part (one small field) is fine; the weights are not
        if len(self.initializer):
            pytest.fail("the graph was serialised with its initializers")
        return real_graph(self, **kw)

    monkeypatch.setattr(onnx.GraphProto, "SerializeToString", graph_serialize)
    monkeypatch.setattr(onnx.ModelProto, "ByteSize",
                        lambda self: pytest.fail("ByteSize serialises the model"))
    monkeypatch.setattr(onnx.TensorProto, "SerializeToString",
                        lambda self, **kw: sizes.append(len(real(self))) or real(self))
    model_io.stage_model(model, tmp_path / "m.onnx").commit(check=False)
    assert sizes and max(sizes) < 4096 * 4 + 64


def test_models_over_the_protobuf_limit_use_external_data(tmp_path, monkeypatch):
    monkeypatch.setattr(model_io, "PROTOBUF_LIMIT", 1000)
    save_model(small_model(weight_elements=4096), tmp_path / "auto.onnx")
    assert sorted(os.listdir(tmp_path)) == ["auto.onnx", "auto.onnx.data"]
    np.testing.assert_array_equal(weights(load_model(tmp_path / "auto.onnx"))["w"],
                                  weights(small_model(weight_elements=4096))["w"])


def test_missing_external_data_file_is_named(tmp_path):
    save_model(small_model(weight_elements=4096), tmp_path / "big.onnx", external_data=True)
    (tmp_path / "big.onnx.data").unlink()
    with pytest.raises(InvalidModelError) as info:
        load_model(tmp_path / "big.onnx")
    assert "big.onnx.data" in str(info.value) and "'w'" in str(info.value)
    assert_one_line(info.value)


# ------------------------------------------------------------------------------ bad inputs


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(InvalidModelError, match="does not exist") as info:
        load_model(tmp_path / "absent.onnx")
    assert_one_line(info.value)
    with pytest.raises(InvalidModelError, match="folder"):
        load_model(tmp_path)


def test_bytes_that_are_not_onnx(tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_bytes(b"this is plain text, not a protobuf\n\x00\xff" * 10)
    with pytest.raises(InvalidModelError) as info:
        load_model(path)
    assert "notes.onnx" in str(info.value)
    assert_one_line(info.value)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    with pytest.raises(InvalidModelError, match="no graph") as info:
        load_model(path)
    assert_one_line(info.value)


@pytest.mark.parametrize("fraction", [0.3, 0.6, 0.9])
def test_truncated_model(tmp_path, fraction):
    data = small_model(weight_elements=256).SerializeToString()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(InvalidModelError) as info:
        load_model(path)
    assert "cut.onnx" in str(info.value)
    assert_one_line(info.value)


def test_checker_failure(tmp_path):
    model = small_model()
    model.graph.node[0].input[1] = "undefined_weight"
    path = tmp_path / "bad.onnx"
    onnx.save_model(model, str(path))
    with pytest.raises(InvalidModelError, match="checker") as info:
        load_model(path)
    assert_one_line(info.value)
    load_model(path, check=False)  # the check can be turned off


@pytest.mark.parametrize("opset", [1, 6])
def test_opset_too_old(tmp_path, opset):
    model = small_model()
    model.opset_import[0].version = opset
    path = tmp_path / "old.onnx"
    onnx.save_model(model, str(path))
    with pytest.raises(InvalidModelError, match=f"opset {opset}") as info:
        load_model(path)
    assert_one_line(info.value)
    assert "convert_version" in str(info.value)


def test_load_accepts_a_model_proto():
    model = small_model()
    assert load_model(model) is model
    broken = small_model()
    broken.graph.node[0].input[0] = "nowhere"
    with pytest.raises(InvalidModelError, match="the model fails the ONNX checker"):
        load_model(broken)


def test_header_keeps_metadata_and_no_graph():
    """The template of a LoweringModel is built field by field: no copy of the weights."""
    model = small_model(weight_elements=300_000)
    model.producer_name, model.doc_string = "p", "d"
    helper.set_model_props(model, {"k": "v"})
    head = model_io.header(model)
    assert not head.HasField("graph") and not head.functions
    assert head.ByteSize() < 200
    for field in ("ir_version", "producer_name", "doc_string"):
        assert getattr(head, field) == getattr(model, field)
    assert list(head.opset_import) == list(model.opset_import)
    assert list(head.metadata_props) == list(model.metadata_props)


def test_const_value_does_not_cache_lazy_weights():
    """Reading a weight backed by the input proto leaves the tensor lazy, so the copy is freed."""
    from onnx_graphsurgeon.ir.tensor import LazyValues

    from onnx_lower import graph as g

    gs_graph = g.import_graph(small_model(weight_elements=300_000))
    w = gs_graph.tensors()["w"]
    assert isinstance(w._values, LazyValues)
    value = g.const_value(w)
    assert value.shape == (1, 300_000) and value[0, -1] == 299_999
    assert isinstance(w._values, LazyValues)


def test_export_fills_large_weights_in_place():
    """Large eager constants are written into the proto directly, bit for bit, any dtype."""
    import onnx_graphsurgeon as gs

    from onnx_lower import graph as g

    model = small_model(weight_elements=300_000)
    gs_graph = g.import_graph(model)
    values = {
        "w": np.linspace(-1, 1, 300_000, dtype=np.float32).reshape(1, -1),
        "i": np.arange(400_000, dtype=np.int64),
        "h": np.linspace(0, 1, 600_000).astype(np.float16),
    }
    gs_graph.tensors()["w"].values = values["w"]
    for name in ("i", "h"):
        y = gs.Variable(f"{name}_out")
        gs_graph.nodes.append(gs.Node("Identity", inputs=[gs.Constant(name, values[name])],
                                      outputs=[y]))
        gs_graph.outputs.append(y)
    out = g.export_model(gs_graph, model, release=True)
    inits = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    for name, want in values.items():
        assert inits[name].dtype == want.dtype and np.array_equal(inits[name], want), name


def test_owned_weights_leave_no_reference_to_the_input_proto():
    """After own_weights the pass graph holds no protobuf object of the input (so lower()
    can free a model it loaded): no lazy weights, and the opset list is a copy."""
    from onnx_graphsurgeon.ir.tensor import LazyValues

    from onnx_lower.pass_manager import LoweringModel

    model = small_model(weight_elements=300_000)
    work = LoweringModel.from_proto(model)
    assert isinstance(work.graph.import_domains, list)  # not the proto's repeated field
    work.own_weights()
    w = work.graph.tensors()["w"]
    assert not isinstance(w._values, LazyValues) and w.values[0, -1] == 299_999
    assert work.template.ByteSize() < 200


def test_graph_that_tips_over_the_limit_uses_external_data(tmp_path, monkeypatch):
    """The weights alone fit (the estimate says inline), the written model does not: it is
    written again with external data, and nothing of the first attempt is left."""
    model = small_model(weight_elements=512)  # 2 KB: over save_model's external threshold
    monkeypatch.setattr(model_io, "PROTOBUF_LIMIT", 512 * 4 + 8)  # above the weight bytes
    save_model(model, tmp_path / "tip.onnx")
    assert sorted(os.listdir(tmp_path)) == ["tip.onnx", "tip.onnx.data"]
    np.testing.assert_array_equal(weights(load_model(tmp_path / "tip.onnx"))["w"],
                                  weights(model)["w"])
