"""Loading and saving models: the one place that touches files.

Loading accepts a path or a ``ModelProto`` and honours external data. Saving is atomic: the model
(and its external data file, if any) is written into a temporary folder beside the target and
moved into place with ``os.replace``; nothing is left behind on failure. The input file is never
overwritten. Models over 2 GB, or any model when asked, are saved with external data.

:func:`write_model` writes the protobuf wire format field by field instead of serialising the
whole model at once (``SerializeToString`` holds the model's bytes twice while it copies them
into a Python ``bytes``: ResNet-50's lowered model peaked at 2.1× its size there). A message is
the concatenation of its fields' encodings in field-number order, so the ModelProto is written
as its fields, its GraphProto as a length-delimited field (key ``7 << 3 | 2``, then
``ByteSize()`` as a varint) whose repeated message fields (initializers, sparse initializers,
nodes) go one element at a time. The bytes are those of ``model.SerializeToString()``; the
transient peak is the largest single tensor, not the model.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnx

from .errors import InvalidModelError, OutputPathError

__all__ = [
    "load_model",
    "save_model",
    "stage_model",
    "write_model",
    "is_repeated_field",
    "StagedModel",
    "check_output_path",
    "skeleton",
    "to_sparse_storage",
    "MIN_OPSET",
    "PROTOBUF_LIMIT",
]

#: Oldest default-domain opset the tool accepts (opset 7 fixed broadcasting to numpy's rules).
MIN_OPSET = 7
#: Protobuf's hard limit on one serialised message.
PROTOBUF_LIMIT = 2**31 - 1

ModelSource = str | os.PathLike | onnx.ModelProto


def load_model(source: ModelSource, *, check: bool = True) -> onnx.ModelProto:
    """Load and check a model; every failure is an :class:`InvalidModelError`."""
    if isinstance(source, onnx.ModelProto):
        model, where = source, "the model"
    else:
        path = Path(source)
        where = f"'{path}'"
        if not path.exists():
            raise InvalidModelError(f"{where} does not exist; check the path and the file name")
        if path.is_dir():
            raise InvalidModelError(f"{where} is a folder, not an ONNX file")
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as exc:  # protobuf raises DecodeError, RuntimeWarning...
            raise InvalidModelError(
                f"{where} is not a readable ONNX model ({type(exc).__name__}: "
                f"{_first_line(exc)}); check that the file is complete and is an .onnx file"
            ) from None
        _load_external(model, path)
    if not model.HasField("graph") or not model.graph.node and not model.graph.output:
        raise InvalidModelError(f"{where} has no graph; is it really an ONNX model?")
    opset = default_opset(model)
    if opset is not None and opset < MIN_OPSET:
        raise InvalidModelError(
            f"{where} uses opset {opset}; onnx_lower needs opset {MIN_OPSET} or newer. Convert it "
            f"with onnx.version_converter.convert_version(model, 13)"
        )
    if check:
        try:
            onnx.checker.check_model(skeleton(model))
        except (onnx.checker.ValidationError, ValueError) as exc:
            raise InvalidModelError(
                f"{where} fails the ONNX checker: {_one_line(exc)}. Fix the model at its source, "
                f"or check it with `python -m onnx.checker`"
            ) from None
    return model


def tensor_bytes(t: onnx.TensorProto) -> int:
    """Bytes of a tensor's data, from its dims and type (reading ``raw_data`` would copy it)."""
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    except (KeyError, ValueError):  # UNDEFINED or unknown: the checker names the tensor
        return len(t.raw_data)
    return math.prod(t.dims) * itemsize


def _load_external(model: onnx.ModelProto, path: Path) -> None:
    from onnx.external_data_helper import load_external_data_for_model, uses_external_data

    tensors = [t for t in _all_tensors(model) if uses_external_data(t)]
    if not tensors:
        return
    base = path.parent
    for t in tensors:
        location = next((e.value for e in t.external_data if e.key == "location"), None)
        if location and not (base / location).exists():
            raise InvalidModelError(
                f"'{path}' keeps tensor '{t.name}' in external data file '{location}', which is "
                f"missing beside it; copy the .data file next to the model"
            )
    try:
        load_external_data_for_model(model, str(base))
    except Exception as exc:
        raise InvalidModelError(f"cannot read the external data of '{path}': {exc}") from None


def _all_tensors(model: onnx.ModelProto):
    from onnx.external_data_helper import _get_all_tensors

    return _get_all_tensors(model)


def default_opset(model: onnx.ModelProto) -> int | None:
    """Version of the default ('' or 'ai.onnx') domain, or None if absent."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return None


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    *,
    input_path: str | os.PathLike | None = None,
    external_data: bool = False,
    check: bool = True,
) -> Path:
    """Write ``model`` to ``path`` atomically and return the path.

    Uses external data (``<name>.data`` beside the model) when ``external_data`` is set or the
    model would exceed protobuf's 2 GB limit. With ``check`` the output gate
    (:func:`onnx_lower.gates.check_output`: full checker and an onnxruntime load of the
    temporary file) runs before the rename; a failure raises
    :class:`~onnx_lower.errors.OutputGateError` and writes nothing.
    """
    staged = stage_model(model, path, input_path=input_path, external_data=external_data)
    return staged.commit(check=check)


def stage_model(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    *,
    input_path: str | os.PathLike | None = None,
    external_data: bool = False,
) -> StagedModel:
    """Write ``model`` into a temporary folder beside ``path``; :meth:`StagedModel.commit`
    moves it into place. The caller may free ``model`` in between (the CLI does, so that the
    output gate's onnxruntime load does not sit beside the lowered proto)."""
    target = check_output_path(path, input_path)
    parent = target.parent
    # the tensors' data, from their dims: ByteSize() would serialise the whole model to count
    external_data = external_data or sum(map(tensor_bytes, _all_tensors(model))) > PROTOBUF_LIMIT
    try:
        tmpdir = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=parent))
    except OSError as exc:  # a read-only or full folder
        raise OutputPathError(f"cannot write into '{parent}': {exc.strerror or exc}") from None
    staged = StagedModel(tmpdir, target, None)
    staged.ort_load = not _foreign_domains(model)
    try:
        if not external_data and write_model(model, staged.file) > PROTOBUF_LIMIT:
            external_data = True  # the graph itself tipped it over: too large to parse back
        if external_data:
            staged.location = target.name + ".data"
            # onnx.save_model moves tensor data out of the proto it is given: save a copy so
            # the caller's model keeps its weights
            detached = onnx.ModelProto()
            detached.CopyFrom(model)
            onnx.save_model(
                detached,
                str(staged.file),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=staged.location,
                size_threshold=1024,
            )
            del detached
    except OSError as exc:
        staged.discard()
        raise OutputPathError(f"cannot write '{target}': {exc.strerror or exc}") from None
    except BaseException:
        staged.discard()
        raise
    return staged


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _encode(msg, nested: frozenset[str]) -> Iterator[bytes]:
    """``msg``'s wire encoding as a stream of chunks, made one at a time: its repeated message
    fields element by element, the singular message fields named in ``nested`` recursively (their
    length prefix is counted by one encoding pass first: upb's ``ByteSize()`` serialises the whole
    message to measure it, which is the copy this avoids)."""
    from google.protobuf.descriptor import FieldDescriptor

    for fd, value in msg.ListFields():  # ordered by field number, as the serializer writes
        key = _varint(fd.number << 3 | 2)
        if fd.type == FieldDescriptor.TYPE_MESSAGE and is_repeated_field(fd):
            for item in value:
                chunk = item.SerializeToString()
                yield key + _varint(len(chunk))
                yield chunk
                del chunk
        elif fd.type == FieldDescriptor.TYPE_MESSAGE and fd.name in nested:
            yield key + _varint(sum(len(c) for c in _encode(value, nested)))
            yield from _encode(value, nested)
        else:  # a scalar, a packed list or a small message: serialised alone
            part = type(msg)()
            if is_repeated_field(fd):
                getattr(part, fd.name).extend(value)
            elif fd.type == FieldDescriptor.TYPE_MESSAGE:
                getattr(part, fd.name).CopyFrom(value)
            else:
                setattr(part, fd.name, value)
            yield part.SerializeToString()


def is_repeated_field(fd) -> bool:
    """Whether a protobuf field descriptor is repeated."""
    repeated = getattr(fd, "is_repeated", None)  # protobuf >= 5.28; `label` is deprecated
    return bool(repeated) if repeated is not None else fd.label == fd.LABEL_REPEATED


def write_model(model: onnx.ModelProto, path: str | os.PathLike) -> int:
    """Write ``model`` to ``path`` as ``model.SerializeToString()`` would, field by field (see
    the module docstring), without holding a second copy of its weights; the bytes written."""
    written = 0
    with open(path, "wb") as f:
        for chunk in _encode(model, frozenset({"graph"})):
            written += f.write(chunk)
    return written


class StagedModel:
    """A model written to a temporary folder beside its target, not yet in place."""

    def __init__(self, tmpdir: Path, target: Path, location: str | None):
        self.tmpdir, self.target, self.location = tmpdir, target, location
        self.file = tmpdir / target.name
        #: whether the output gate loads the model in onnxruntime (see gates.check_output)
        self.ort_load = True

    def commit(self, *, check: bool = True) -> Path:
        """Run the output gate (if ``check``), then move the files into place; the temporary
        folder is removed either way."""
        from .gates import check_output

        try:
            if check:
                check_output(self.file, ort_load=self.ort_load)
            data = self.tmpdir / self.location if self.location else None
            if data is not None and data.exists():
                os.replace(data, self.target.parent / self.location)
            os.replace(self.file, self.target)
        except OSError as exc:
            raise OutputPathError(
                f"cannot write '{self.target}': {exc.strerror or exc}"
            ) from None
        finally:
            self.discard()
        return self.target

    def discard(self) -> None:
        shutil.rmtree(self.tmpdir, ignore_errors=True)


def _foreign_domains(model: onnx.ModelProto) -> list[str]:
    from .gates import foreign_domains

    return foreign_domains(f"{n.domain}::{n.op_type}" for n in model.graph.node)


def check_output_path(
    path: str | os.PathLike, input_path: str | os.PathLike | None = None, what: str = "output path"
) -> Path:
    """``path`` if a file can be written there: its folder exists, it is not a folder, and it
    is not the input model (also through a link); else :class:`OutputPathError`."""
    target = Path(path)
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise OutputPathError(f"the output folder '{parent}' does not exist; create it first")
    if target.is_dir():
        raise OutputPathError(f"the {what} '{target}' is a folder; give a file name")
    if input_path is not None and _same_file(target, Path(input_path)):
        raise OutputPathError(f"the {what} '{target}' is the input model; choose another file")
    return target


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


def _one_line(exc: BaseException) -> str:
    """The checker's whole message on one line (its first line alone is often cut mid-clause)."""
    text = " ".join(part.strip() for part in str(exc).splitlines() if part.strip())
    text = text.replace("==> Context: ", "")
    return text[:400] + ("…" if len(text) > 400 else "")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def to_sparse_storage(model: onnx.ModelProto, max_density: float = 0.5) -> int:
    """Move float initializers of density ≤ ``max_density`` into ``sparse_initializer``.

    onnxruntime densifies sparse initializers at load time, so the model computes the same and
    the file shrinks by roughly the density. Indices are the flat (linearised) positions, as
    the ONNX spec allows (https://onnx.ai/onnx/repo-docs/IR.html#sparse-tensors).
    ``sparse_initializer`` needs IR version 6, so an older model is raised to it; below IR 4
    every initializer was also a graph input, a listing that later IR versions drop. Other
    initializers that are graph inputs (overridable at run time) stay dense. Returns the number
    of tensors moved.
    """
    import numpy as np
    from onnx import numpy_helper

    graph = model.graph
    if model.ir_version < 4:
        names = {t.name for t in graph.initializer}
        kept = [i for i in graph.input if i.name not in names]
        del graph.input[:]
        graph.input.extend(kept)
    model.ir_version = max(model.ir_version, 6)
    inputs = {i.name for i in graph.input}
    keep, moved = [], 0
    for t in graph.initializer:
        array = numpy_helper.to_array(t) if t.name not in inputs else None
        if array is None or array.dtype.kind != "f" or array.size < 64:
            keep.append(t)
            continue
        nz = np.flatnonzero(array)
        if nz.size > max_density * array.size:
            keep.append(t)
            continue
        values = numpy_helper.from_array(array.reshape(-1)[nz], t.name)
        indices = numpy_helper.from_array(nz.astype(np.int64), t.name + "_indices")
        graph.sparse_initializer.append(
            onnx.helper.make_sparse_tensor(values, indices, list(array.shape))
        )
        moved += 1
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return moved


def header(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` without its graph and functions: IR version, opsets, producer, metadata.

    Built field by field for the reason :func:`skeleton` gives; ``CopyFrom`` then ``Clear`` of
    the graph would keep every weight's bytes resident in the copy's arena.
    """
    light = onnx.ModelProto()
    for name in ("ir_version", "producer_name", "producer_version", "domain", "model_version",
                 "doc_string"):
        setattr(light, name, getattr(model, name))
    for name in ("opset_import", "metadata_props"):
        getattr(light, name).extend(getattr(model, name))
    return light


def skeleton(model: onnx.ModelProto, max_bytes: int = 4096) -> onnx.ModelProto:
    """A copy of ``model`` whose large (or external) initializers are typed graph inputs instead.

    Structure, shapes and small constants (Reshape targets, pads …) stay, so the checker and
    shape inference see the same graph, without copying hundreds of MB of weights. The copy is
    built field by field: protobuf arenas never return memory, so even a temporary full copy
    would stay resident.
    """
    light = header(model)
    light.functions.extend(model.functions)
    src, dst = model.graph, light.graph
    dst.name, dst.doc_string = src.name, src.doc_string
    for name in ("node", "input", "output", "value_info", "quantization_annotation"):
        getattr(dst, name).extend(getattr(src, name))
    listed = {i.name for i in src.input}
    for t in src.initializer:
        # an external tensor's location is relative to the model's folder, which a proto
        # does not know: the checker would look it up in the working directory
        if tensor_bytes(t) <= max_bytes and t.data_location != onnx.TensorProto.EXTERNAL:
            dst.initializer.append(t)
        elif t.name not in listed:
            dst.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, t.dims))
    for st in src.sparse_initializer:
        if st.values.name not in listed:
            dst.input.append(
                onnx.helper.make_tensor_value_info(st.values.name, st.values.data_type, st.dims)
            )
    return light
