"""Trust at the edges: the input gate before any pass and the output gate before any file.

A model is accepted, and a lowered model is written, only when it passes both:

* ``onnx.checker.check_model(model, full_check=True)``: the structural checks plus strict shape
  inference (https://onnx.ai/onnx/api/checker.html#onnx.checker.check_model);
* an onnxruntime ``InferenceSession`` on the CPU (graph optimisations off): onnxruntime defines
  the semantics the numerics are validated against, so a model it cannot load has none to
  check.

The input gate raises :class:`~onnx_lower.errors.InvalidModelError` (exit 2); the output gate
:class:`~onnx_lower.errors.OutputGateError` (exit 3: the input passed, so a failure is a bug in
a pass). Either message is the checker's or onnxruntime's own, on one line; both name the node
when the failure is a node's.

Memory: the checker runs on :func:`~onnx_lower.model_io.skeleton` (weights above 4 KB and
sparse initializers become typed graph inputs), so models over 2 GB and external data need no
second copy and no path; the output is read back from its file without its external data.
onnxruntime loads from the file when there is one (the only way beyond 2 GB, and it resolves
external data beside the file); the session is dropped at once. ``ort_check=False``
(``--no-ort-check``) skips the input's onnxruntime load, for models too large to load twice;
the report's ``options.ort_check`` says so. The output gate then still loads the output in
onnxruntime, unless the model keeps ops of a domain onnxruntime cannot know (a custom op passed
through): those are the models that need the flag for reasons other than size.
"""

from __future__ import annotations

import gc
import os
import re
from collections.abc import Iterable
from pathlib import Path

import onnx

from .errors import InvalidModelError, LoweringError, OutputGateError
from .model_io import is_repeated_field, skeleton

#: Domains onnxruntime's CPU provider implements (beside the default one).
RUNTIME_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "com.microsoft"}

__all__ = [
    "RUNTIME_DOMAINS",
    "foreign_domains",
    "check_input",
    "check_input_loads",
    "check_output",
    "checker_problem",
    "ort_problem",
    "text_problem",
    "runtime_problem",
    "one_line",
]


def checker_problem(model: onnx.ModelProto | str | os.PathLike) -> str | None:
    """The full checker's message on one line, or None when ``model`` passes.

    The checker sees the model's skeleton (a path is read without its external data): its
    sparse initializers become typed inputs too, which onnx's strict shape inference needs
    (it types a sparse initializer as a sparse tensor, which MatMul's inference refuses).
    """
    try:
        if not isinstance(model, onnx.ModelProto):
            model = onnx.load(os.fspath(model), load_external_data=False)
        onnx.checker.check_model(skeleton(model), full_check=True)
    except Exception as exc:  # ValidationError, InferenceError, ValueError, DecodeError...
        return one_line(exc)
    return None


def text_problem(message, path: str = "model") -> str | None:
    """The path of the first string field of ``message`` that is not valid UTF-8, or None.

    protobuf decodes a string field only when it is read, so a damaged file parses and fails
    later, anywhere. Only string fields are read: tensor bytes (``raw_data``) are not copied.
    """
    from google.protobuf.descriptor import FieldDescriptor

    for field in message.DESCRIPTOR.fields:
        repeated = is_repeated_field(field)
        if field.type == FieldDescriptor.TYPE_STRING:
            # invalid UTF-8 comes back as bytes (or raises, depending on the protobuf backend)
            try:
                value = getattr(message, field.name)
                values = list(value) if repeated else [value]
            except UnicodeDecodeError:
                return f"{path}.{field.name}"
            if any(isinstance(v, bytes) for v in values):
                return f"{path}.{field.name}"
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            if repeated:
                for k, item in enumerate(getattr(message, field.name)):
                    bad = text_problem(item, f"{path}.{field.name}[{k}]")
                    if bad:
                        return bad
            elif message.HasField(field.name):
                bad = text_problem(getattr(message, field.name), f"{path}.{field.name}")
                if bad:
                    return bad
    return None


def ort_problem(model: onnx.ModelProto | str | os.PathLike) -> str | None:
    """onnxruntime's load error on one line, or None when the model loads on the CPU."""
    from .validate import make_session

    try:
        session = make_session(model, 1, label="model", optimize=False)
    except LoweringError as exc:
        cause = exc.__cause__ if exc.__cause__ is not None else exc
        return one_line(cause)
    del session
    gc.collect()
    return None


def check_input(model: onnx.ModelProto, *, where: str = "the model") -> None:
    """The checker half of the input gate (text fields, then the full checker);
    :class:`InvalidModelError` on failure."""
    bad = text_problem(model)
    if bad:
        raise InvalidModelError(
            f"{where} has a text field ({bad}) that is not valid UTF-8, which ONNX requires; "
            f"the file is damaged: export or download it again"
        )
    problem = checker_problem(model)
    if problem:
        raise InvalidModelError(
            f"{where} fails the ONNX checker (full check): {problem}. Fix the model at its "
            f"source, or check it with `python -c \"import onnx; "
            f"onnx.checker.check_model('MODEL.onnx', full_check=True)\"`"
        )


def check_input_loads(model: onnx.ModelProto | str | os.PathLike, *, where: str) -> None:
    """The onnxruntime half of the input gate; :class:`InvalidModelError` on failure."""
    problem = ort_problem(model)
    if problem:
        raise InvalidModelError(
            f"onnxruntime cannot load {where}: {problem}. onnx_lower checks its output against "
            f"onnxruntime, so the input must load there (--no-ort-check skips this load, not "
            f"the problem)"
        )


def foreign_domains(op_keys: Iterable[str]) -> list[str]:
    """Domains of ``op_keys`` (``Op`` or ``domain::Op``, as in the report's op counts) that
    onnxruntime's CPU provider does not implement without a custom-op library."""
    domains = {key.split("::")[0] for key in op_keys if "::" in key}
    return sorted(domains - RUNTIME_DOMAINS)


def check_output(path: str | os.PathLike, *, ort_load: bool = True) -> None:
    """The output gate on a written (temporary) file: :class:`OutputGateError` on failure.

    ``ort_load=False`` leaves out the onnxruntime load: for a model whose custom-domain ops
    (passed through from an input that skipped its own load) onnxruntime cannot know.
    """
    path = Path(path)
    problem = checker_problem(path)
    if problem:
        raise OutputGateError(f"ONNX checker: {problem}")
    problem = ort_problem(path) if ort_load else None
    if problem:
        raise OutputGateError(f"onnxruntime load: {problem}")


def runtime_problem(model: onnx.ModelProto | str | os.PathLike, batch: int = 1) -> str | None:
    """Why onnxruntime cannot run ``model`` as it declares itself, or None.

    Runs it once on seeded random inputs: an error, or an output whose static declared shape
    differs from what it computes, is the model's own inconsistency (the static checks cannot
    see it: a Gemm whose input was resized, a declared output shape the graph does not
    produce). Used only after the output gate failed, to tell such an input from a bug.
    """
    from .validate import load_proto, make_session, random_inputs

    try:
        session = make_session(model, 1, label="model", optimize=False)
        feed = random_inputs(load_proto(model), batch=batch)
        values = session.run(None, feed)
    except Exception as exc:
        cause = exc.__cause__ if exc.__cause__ is not None else exc
        return f"onnxruntime cannot run it: {one_line(cause)}"
    declared = {o.name: o.type.tensor_type.shape.dim for o in load_proto(model).graph.output}
    for out, value in zip(session.get_outputs(), values, strict=True):
        dims = declared.get(out.name)
        if not dims:
            continue
        want = [d.dim_value if d.HasField("dim_value") else None for d in dims]
        got = list(getattr(value, "shape", ()))
        if len(want) != len(got) or any(w is not None and w != v for w, v in zip(want, got)):
            return f"its output '{out.name}' is declared {want} but computes {got}"
    return None


def one_line(exc: BaseException) -> str:
    """An exception's message on one line: whitespace collapsed, onnxruntime's status prefix
    and the temporary file's path dropped, cut at 500 characters."""
    text = " ".join(part.strip() for part in str(exc).splitlines() if part.strip())
    text = text.replace("==> Context: ", "")
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    text = re.sub(r"Load model from \S+ failed:\s*", "", text)
    text = text or type(exc).__name__
    return text[:500] + ("…" if len(text) > 500 else "")
