"""Numerical validation of a lowered model against its original (Polygraphy-comparator style).

onnxruntime (CPU execution provider, one intra-op thread) runs the *original* and the *lowered*
model on identical inputs -- ``samples`` independent random input sets drawn with
``np.random.default_rng(seed)``, or inputs the user gives -- and compares every output of the
original, matched by name, with the lowered model's output of the same name.

Pass rule, per element, numpy ``allclose`` semantics with ``b`` = the original's value and ``a``
= the lowered model's value::

    |a - b| <= atol + rtol * |b|

An output passes when, over all samples:

* the lowered model has an output of that name, with the same dtype and shape;
* NaN and +/-inf sit at exactly the same positions in both (identical non-finite positions are
  fine and are left out of the error statistics; any difference is a failure);
* every remaining element satisfies the rule above.

The model passes when every output passes. Besides the verdict, each output reports its max /
mean / p99 absolute error, max relative error ``|a-b| / (|b| + tiny)``, ``required_atol`` (the
smallest atol that passes with rtol=0, i.e. the max abs error) and ``required_rtol`` (the
smallest rtol that passes with the given atol: ``max((|a-b| - atol) / |b|)``, clipped at 0;
infinite when an element with ``b == 0`` is off by more than atol).
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from onnx_lower.errors import InvalidModelError, LoweredRunError, LoweringError

__all__ = [
    "InputSpec",
    "InputsLike",
    "ModelLike",
    "OutputComparison",
    "ValidationReport",
    "graph_inputs",
    "load_inputs",
    "load_proto",
    "make_session",
    "random_inputs",
    "resolve_inputs",
    "validate",
]

ModelLike = onnx.ModelProto | str | os.PathLike[str]
"""An in-memory model or the path of an ``.onnx`` file."""

InputsLike = (
    Mapping[str, np.ndarray]
    | Sequence[Mapping[str, np.ndarray]]
    | Sequence[str | os.PathLike[str]]
    | str
    | os.PathLike[str]
)
"""A feed dict, a list of feed dicts, or paths of .npy / .npz / .pb files (or folders of them)."""

_TWO_GB = 2**31 - 1
_TINY = float(np.finfo(np.float64).tiny)
_INPUT_SUFFIXES = (".npy", ".npz", ".pb")


# --------------------------------------------------------------------------- model handling


def load_proto(model: ModelLike) -> onnx.ModelProto:
    """The model's graph structure (a path is loaded without its external data)."""
    if isinstance(model, onnx.ModelProto):
        return model
    path = Path(os.fspath(model))
    if not path.is_file():
        raise InvalidModelError(f"model file '{path}' does not exist")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise InvalidModelError(f"cannot read '{path}' as an ONNX model: {exc}") from exc


def make_session(model: ModelLike, threads: int = 1, *, label: str = "model",
                 optimize: bool = True) -> ort.InferenceSession:
    """An onnxruntime CPU session: ``threads`` intra-op threads, 1 inter-op thread, sequential.

    A path is handed to onnxruntime as a path (needed for models over 2 GB and for external
    data); a ``ModelProto`` is passed serialised, or through a temporary file with external data
    when it is too large to serialise. ``optimize=False`` skips onnxruntime's graph
    optimisations (a load that only checks the model).
    """
    so = ort.SessionOptions()
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 4  # errors are raised, with their message
    providers = ["CPUExecutionProvider"]
    try:
        if not isinstance(model, onnx.ModelProto):
            return ort.InferenceSession(os.fspath(model), so, providers=providers)
        if model.ByteSize() < _TWO_GB:
            return ort.InferenceSession(model.SerializeToString(), so, providers=providers)
        with tempfile.TemporaryDirectory(prefix="onnx_lower_") as tmp:
            path = os.path.join(tmp, "model.onnx")
            detached = onnx.ModelProto()  # saving as external data empties the proto saved
            detached.CopyFrom(model)
            onnx.save_model(detached, path, save_as_external_data=True,
                            location="model.onnx.data")
            del detached
            return ort.InferenceSession(path, so, providers=providers)
    except LoweringError:
        raise
    except Exception as exc:
        raise InvalidModelError(f"onnxruntime cannot load the {label}: {exc}") from exc


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class InputSpec:
    """One graph input: name, numpy dtype and dims (int = static, str/None = dynamic)."""

    name: str
    dtype: np.dtype
    dims: tuple[int | str | None, ...] | None  # None: unknown rank; str/None entries: dynamic

    def describe(self) -> str:
        dims = "?" if self.dims is None else "[" + ", ".join(
            str(d) if d is not None else "?" for d in self.dims) + "]"
        return f"'{self.name}' {dims} {self.dtype}"


def graph_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    """The model's real inputs (``graph.input`` minus initializers), with dtype and dims."""
    inits = {t.name for t in model.graph.initializer}
    inits |= {t.values.name for t in model.graph.sparse_initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        if not vi.type.HasField("tensor_type"):
            raise LoweringError(
                f"input '{vi.name}' is not a tensor; only tensor inputs are supported")
        tt = vi.type.tensor_type
        try:
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type))
        except Exception as exc:
            raise LoweringError(
                f"input '{vi.name}' has an unsupported element type {tt.elem_type}") from exc
        dims: tuple[int | str | None, ...] | None = None
        if tt.HasField("shape"):
            dims = tuple(
                d.dim_value if d.HasField("dim_value") and d.dim_value > 0
                else (d.dim_param or None)
                for d in tt.shape.dim
            )
        specs.append(InputSpec(vi.name, dtype, dims))
    return specs


def _concrete_shape(spec: InputSpec, batch: int) -> tuple[int, ...]:
    if spec.dims is None:
        raise LoweringError(
            f"input '{spec.name}' has no shape in the model, so random inputs cannot be made; "
            f"pass concrete inputs with --inputs (.npy/.npz/.pb files)")
    shape = []
    for axis, d in enumerate(spec.dims):
        if isinstance(d, int):
            shape.append(d)
        elif axis == 0:
            shape.append(int(batch))
        else:
            raise LoweringError(
                f"input '{spec.name}' has a dynamic dimension {axis} ({d or '?'}) that is not the "
                f"batch axis, so random inputs cannot be made for it; pass concrete inputs with "
                f"--inputs (.npy/.npz/.pb files)")
    return tuple(shape)


def _random_array(rng: np.random.Generator, shape: tuple[int, ...], dtype: np.dtype,
                  lo: float, hi: float, name: str) -> np.ndarray:
    if dtype == np.bool_:
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        ilo = max(math.ceil(lo), int(info.min))
        ihi = min(math.floor(hi), int(info.max))
        ihi = max(ihi, ilo)
        return rng.integers(ilo, ihi, size=shape, endpoint=True).astype(dtype)
    if dtype.kind in "fc" or dtype.name == "bfloat16":
        return rng.uniform(lo, hi, size=shape).astype(dtype)
    raise LoweringError(
        f"input '{name}' has dtype {dtype}, for which random inputs cannot be made; "
        f"pass concrete inputs with --inputs")


def random_inputs(model: ModelLike, *, seed: int = 0,
                  input_range: tuple[float, float] = (0.0, 1.0), batch: int = 1,
                  rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    """One random feed for ``model``: floats uniform in ``input_range``, ints in it (inclusive).

    Dynamic axis 0 is set to ``batch``; any other dynamic axis raises :class:`LoweringError`.
    ``rng`` (if given) is drawn from instead of ``np.random.default_rng(seed)``, so successive
    calls give independent samples; sample 0 of :func:`validate` equals ``random_inputs(seed=s)``.
    """
    proto = load_proto(model)
    lo, hi = float(input_range[0]), float(input_range[1])
    if hi < lo:
        raise LoweringError(f"input range ({lo}, {hi}) is empty: the low end is above the high end")
    if rng is None:
        rng = np.random.default_rng(seed)
    specs = graph_inputs(proto)
    shapes = {s.name: _concrete_shape(s, batch) for s in specs}  # validate all before drawing
    return {s.name: _random_array(rng, shapes[s.name], s.dtype, lo, hi, s.name) for s in specs}


def _natural_key(p: Path) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]


def _expand_paths(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        path = Path(os.fspath(p))
        if path.is_dir():
            files = sorted((f for f in path.iterdir() if f.suffix in _INPUT_SUFFIXES),
                           key=_natural_key)
            if not files:
                raise LoweringError(f"input folder '{path}' holds no .npy, .npz or .pb files")
            out.extend(files)
        elif path.is_file():
            out.append(path)
        else:
            raise LoweringError(f"input file '{path}' does not exist")
    return out


def load_inputs(paths: Iterable[str | os.PathLike[str]] | str | os.PathLike[str],
                model: ModelLike) -> list[dict[str, np.ndarray]]:
    """Read input samples from files and check them against ``model``'s inputs.

    * ``.npz``: one complete sample; keys are input names.
    * ``.npy``: one tensor, named by the file stem if that is an input name, else (single-input
      models only) the model's only input.
    * ``.pb``: an ONNX ``TensorProto``, named by its ``name`` field, else the file stem (else the
      only input of a single-input model).
    * a folder: its .npy/.npz/.pb files in natural order (the ONNX ``test_data_set_N`` layout).

    Single tensors (.npy/.pb) are collected in order into samples; a new sample starts whenever
    a name repeats, so ``x.npy y.npy`` is one sample and ``a.npy b.npy`` for a one-input model is
    two. Raises :class:`LoweringError` when a file can't be read or doesn't fit the model.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    proto = load_proto(model)
    specs = graph_inputs(proto)
    names = [s.name for s in specs]
    only = names[0] if len(names) == 1 else None

    def tensor_name(candidate: str | None, path: Path) -> str:
        for c in (candidate, path.stem):
            if c and c in names:
                return c
        if only is not None:
            return only
        raise LoweringError(
            f"cannot tell which input '{path}' is for: name it after an input "
            f"({', '.join(names)}) or use one .npz file with a key per input")

    samples: list[dict[str, np.ndarray]] = []
    loose: dict[str, np.ndarray] = {}
    for path in _expand_paths(paths):
        suffix = path.suffix.lower()
        try:
            if suffix == ".npz":
                if loose:
                    samples.append(loose)
                    loose = {}
                with np.load(path, allow_pickle=False) as z:
                    samples.append({k: z[k] for k in z.files})
                continue
            if suffix == ".npy":
                arr = np.load(path, allow_pickle=False)
                name = tensor_name(None, path)
            elif suffix == ".pb":
                tensor = onnx.TensorProto()
                tensor.ParseFromString(path.read_bytes())
                arr = numpy_helper.to_array(tensor)
                name = tensor_name(tensor.name or None, path)
            else:
                raise LoweringError(
                    f"input file '{path}' is not .npy, .npz or .pb (ONNX TensorProto)")
        except LoweringError:
            raise
        except Exception as exc:
            raise LoweringError(f"cannot read input file '{path}': {exc}") from exc
        if name in loose:
            samples.append(loose)
            loose = {}
        loose[name] = arr
    if loose:
        samples.append(loose)
    if not samples:
        raise LoweringError("no input files given")
    return [_check_feed(s, specs, f"input sample {i}") for i, s in enumerate(samples)]


def _check_feed(feed: Mapping[str, Any], specs: list[InputSpec],
                where: str) -> dict[str, np.ndarray]:
    """Match ``feed`` to the model inputs by name, rank, static dims and dtype kind."""
    if not isinstance(feed, Mapping):
        raise LoweringError(f"{where}: expected a mapping of input name to array, got "
                            f"{type(feed).__name__}")
    expected = {s.name: s for s in specs}
    model_desc = "; ".join(s.describe() for s in specs) or "(none)"
    unknown = [k for k in feed if k not in expected]
    missing = [k for k in expected if k not in feed]
    if unknown or missing:
        parts = []
        if missing:
            parts.append("missing " + ", ".join(f"'{m}'" for m in missing))
        if unknown:
            parts.append("unknown " + ", ".join(f"'{u}'" for u in unknown))
        raise LoweringError(f"{where}: {' and '.join(parts)}; the model's inputs are {model_desc}")
    out: dict[str, np.ndarray] = {}
    for name, spec in expected.items():
        arr = np.asarray(feed[name])
        if spec.dims is not None:
            if arr.ndim != len(spec.dims):
                raise LoweringError(
                    f"{where}: input '{name}' has shape {tuple(arr.shape)} (rank {arr.ndim}) but "
                    f"the model expects rank {len(spec.dims)}: {spec.describe()}")
            for axis, (got, want) in enumerate(zip(arr.shape, spec.dims, strict=True)):
                if isinstance(want, int) and got != want:
                    raise LoweringError(
                        f"{where}: input '{name}' has shape {tuple(arr.shape)} but the model "
                        f"expects {want} on axis {axis}: {spec.describe()}")
        if arr.dtype != spec.dtype:
            if not np.can_cast(arr.dtype, spec.dtype, casting="same_kind"):
                raise LoweringError(
                    f"{where}: input '{name}' has dtype {arr.dtype}, which cannot be converted "
                    f"to the model's {spec.dtype}")
            arr = arr.astype(spec.dtype)
        out[name] = arr
    return out


def resolve_inputs(inputs: InputsLike, proto: onnx.ModelProto) -> list[dict[str, np.ndarray]]:
    """Normalise an ``inputs`` argument (dict, list of dicts, paths) to checked feeds."""
    specs = graph_inputs(proto)
    if isinstance(inputs, Mapping):
        return [_check_feed(inputs, specs, "given inputs")]
    if isinstance(inputs, (str, os.PathLike)):
        return load_inputs([inputs], proto)
    items = list(inputs)
    if not items:
        raise LoweringError("the list of inputs is empty")
    if all(isinstance(i, (str, os.PathLike)) for i in items):
        return load_inputs(items, proto)
    if all(isinstance(i, Mapping) for i in items):
        return [_check_feed(f, specs, f"input sample {i}") for i, f in enumerate(items)]
    raise LoweringError("inputs must be a dict of arrays, a list of such dicts, or a list of "
                        ".npy/.npz/.pb file paths")


# --------------------------------------------------------------------------- report


def _plain(x: float) -> float | str:
    """A JSON-safe float: non-finite values become the strings 'inf', '-inf', 'nan'."""
    x = float(x)
    if math.isfinite(x):
        return x
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")


@dataclass
class OutputComparison:
    """How one output of the lowered model compares with the original's, over all samples.

    Error statistics cover the elements finite in both models; they are 0.0 when nothing could
    be compared (missing output, shape or dtype mismatch). ``max_rel_err`` is elementwise, so a
    logit near zero makes it large however small the error; ``scaled_err`` is the largest error
    relative to the output's largest magnitude, ``max |lowered - original| / max |original|``
    (the max abs error itself when the original is all zeros).
    """

    name: str
    dtype: str
    lowered_dtype: str | None = None
    shape: list[int] | None = None
    lowered_shape: list[int] | None = None
    elements: int = 0
    max_abs_err: float = 0.0
    max_rel_err: float = 0.0
    scaled_err: float = 0.0  # max |lowered - original| / max |original|
    mean_abs_err: float = 0.0
    p99_abs_err: float = 0.0
    required_atol: float = 0.0
    required_rtol: float = 0.0
    nan_mismatch: int = 0
    inf_mismatch: int = 0
    out_of_tolerance: int = 0
    passed: bool = True
    message: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        for k, v in self.__dict__.items():
            d[k] = _plain(v) if isinstance(v, float) else v
        return d


@dataclass
class ValidationReport:
    """The outcome of :func:`validate`; ``passed`` is True only if every output passed."""

    passed: bool
    outputs: list[OutputComparison]
    samples: int
    seed: int
    rtol: float
    atol: float
    input_range: tuple[float, float]
    batch: int = 1
    input_source: str = "random"
    extra_outputs: list[str] = field(default_factory=list)

    def failures(self) -> list[str]:
        """One human-readable message per failed output, naming it."""
        return [o.message or f"output '{o.name}' failed" for o in self.outputs if not o.passed]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (non-finite floats are the strings 'inf'/'-inf'/'nan')."""
        return {
            "passed": bool(self.passed),
            "samples": int(self.samples),
            "seed": int(self.seed),
            "rtol": float(self.rtol),
            "atol": float(self.atol),
            "input_range": [float(self.input_range[0]), float(self.input_range[1])],
            "batch": int(self.batch),
            "input_source": self.input_source,
            "rule": "|lowered - original| <= atol + rtol * |original|",
            "outputs": [o.to_dict() for o in self.outputs],
            "extra_outputs": list(self.extra_outputs),
            "failures": self.failures(),
        }

    def summary_lines(self) -> list[str]:
        """A verdict line and a short aligned table, one row per output."""
        head = ("output", "max abs", "max rel", "mean abs", "p99 abs", "needed rtol", "status")
        rows = [head]
        for o in self.outputs:
            if o.elements or o.passed:
                nums = tuple(f"{v:.2e}" for v in (o.max_abs_err, o.max_rel_err, o.mean_abs_err,
                                                   o.p99_abs_err, o.required_rtol))
            else:
                nums = ("-",) * 5
            rows.append((o.name, *nums, "ok" if o.passed else "FAIL"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        verdict = "PASS" if self.passed else "FAIL"
        src = "given" if self.input_source == "given" else f"random, seed {self.seed}"
        head_line = (f"validation {verdict}: {self.samples} sample(s) ({src}), "
                     f"rtol={self.rtol:g}, atol={self.atol:g}")
        lines = [head_line]
        for r in rows:
            nums = [c.rjust(w) for c, w in zip(r[1:-1], widths[1:-1], strict=True)]
            lines.append("  ".join([r[0].ljust(widths[0]), *nums, r[-1]]).rstrip())
        return lines


# --------------------------------------------------------------------------- comparison


class _Accumulator:
    """Collects one output's comparisons over all samples."""

    def __init__(self, name: str, rtol: float, atol: float):
        self.name, self.rtol, self.atol = name, rtol, atol
        self.res = OutputComparison(name=name, dtype="?")
        self.abs_errs: list[np.ndarray] = []
        self.max_rel = 0.0
        self.max_mag = 0.0
        self.req_rtol = 0.0
        self.problem: str | None = None

    def fail(self, msg: str) -> None:
        if self.problem is None:
            self.problem = msg

    def add(self, b: np.ndarray | None, a: np.ndarray | None, sample: int) -> None:
        r = self.res
        if b is not None:
            r.dtype, r.shape = str(b.dtype), [int(d) for d in b.shape]
        if a is None:
            self.fail(f"output '{self.name}' is missing from the lowered model")
            return
        r.lowered_dtype, r.lowered_shape = str(a.dtype), [int(d) for d in a.shape]
        assert b is not None
        if a.dtype != b.dtype:
            self.fail(f"output '{self.name}': dtype mismatch: original {b.dtype} vs lowered "
                      f"{a.dtype}")
            return
        if a.shape != b.shape:
            self.fail(f"output '{self.name}': shape mismatch: original {tuple(b.shape)} vs lowered "
                      f"{tuple(a.shape)} (sample {sample})")
            return
        if a.dtype.kind not in "biufc" and a.dtype.name != "bfloat16":
            bad = int(np.count_nonzero(a != b))
            r.elements += a.size
            r.out_of_tolerance += bad
            return
        a64 = a.astype(np.complex128 if a.dtype.kind == "c" else np.float64).ravel()
        b64 = b.astype(np.complex128 if b.dtype.kind == "c" else np.float64).ravel()
        nan_a, nan_b = np.isnan(a64), np.isnan(b64)
        inf_a, inf_b = np.isinf(a64), np.isinf(b64)
        special = nan_a | nan_b | inf_a | inf_b
        same_special = (nan_a & nan_b) | (inf_a & inf_b & (a64 == b64))
        nan_x = nan_a ^ nan_b
        r.nan_mismatch += int(np.count_nonzero(nan_x))
        r.inf_mismatch += int(np.count_nonzero(special & ~same_special & ~nan_x))
        fin = ~special
        a64, b64 = a64[fin], b64[fin]
        r.elements += int(a64.size)
        if a64.size == 0:
            return
        err = np.abs(a64 - b64)
        mag = np.abs(b64)
        self.abs_errs.append(err)
        self.max_mag = max(self.max_mag, float(mag.max()))
        with np.errstate(over="ignore"):  # error at b == 0: relative error is huge or inf
            self.max_rel = max(self.max_rel, float(np.max(err / (mag + _TINY))))
        r.out_of_tolerance += int(np.count_nonzero(err > self.atol + self.rtol * mag))
        excess = err - self.atol
        over = excess > 0
        if np.any(over):
            with np.errstate(divide="ignore"):
                need = np.where(mag[over] > 0, excess[over] / np.where(mag[over] > 0, mag[over], 1),
                                np.inf)
            self.req_rtol = max(self.req_rtol, float(np.max(need)))

    def finish(self) -> OutputComparison:
        r = self.res
        if self.abs_errs:
            err = np.concatenate(self.abs_errs)
            r.max_abs_err = float(err.max())
            r.mean_abs_err = float(err.mean())
            r.p99_abs_err = float(np.percentile(err, 99))
            r.required_atol = r.max_abs_err
            r.max_rel_err = self.max_rel
            r.scaled_err = r.max_abs_err / self.max_mag if self.max_mag > 0 else r.max_abs_err
            r.required_rtol = self.req_rtol
        if self.problem is None and (r.nan_mismatch or r.inf_mismatch):
            self.fail(f"output '{self.name}': NaN/Inf differ between the models "
                      f"({r.nan_mismatch} NaN and {r.inf_mismatch} inf position(s) differ)")
        if self.problem is None and r.out_of_tolerance:
            self.fail(
                f"output '{self.name}': {r.out_of_tolerance} of {r.elements} element(s) break "
                f"|a-b| <= atol + rtol*|b| (atol={self.atol:g}, rtol={self.rtol:g}); max abs "
                f"error {r.max_abs_err:.3g}, max rel error {r.max_rel_err:.3g}; it would pass "
                f"with rtol >= {r.required_rtol:.3g} at this atol, or atol >= "
                f"{r.required_atol:.3g} with rtol=0")
        r.passed = self.problem is None
        r.message = self.problem
        return r


def _run(sess: ort.InferenceSession, feed: dict[str, np.ndarray], label: str,
         sample: int) -> dict[str, np.ndarray]:
    names = [o.name for o in sess.get_outputs()]
    try:
        values = sess.run(names, feed)
    except Exception as exc:
        error = LoweredRunError if label.startswith("lowered") else LoweringError
        raise error(f"onnxruntime failed to run the {label} on input sample {sample}: "
                    f"{exc}") from exc
    return {n: np.asarray(v) for n, v in zip(names, values, strict=True)}


def validate(original: ModelLike, lowered: ModelLike, *, inputs: InputsLike | None = None,
             samples: int = 4, seed: int = 0, input_range: tuple[float, float] = (0.0, 1.0),
             rtol: float = 1e-4, atol: float = 1e-5, batch: int = 1) -> ValidationReport:
    """Run ``original`` and ``lowered`` on the same inputs and compare every output by name.

    ``inputs``: None for ``samples`` random input sets (``seed``, ``input_range``, ``batch`` for
    dynamic axis 0); a dict (one sample, used as given); a list of dicts; or file paths (see
    :func:`load_inputs`). Returns a :class:`ValidationReport`; raises :class:`LoweringError` for
    unusable models or inputs, not for numerical mismatches.
    """
    if rtol < 0 or atol < 0:
        raise LoweringError(f"tolerances must be >= 0 (got rtol={rtol}, atol={atol})")
    orig_proto, low_proto = load_proto(original), load_proto(lowered)
    if inputs is None:
        if samples < 1:
            raise LoweringError(f"samples must be >= 1 (got {samples})")
        rng = np.random.default_rng(seed)
        feeds = [random_inputs(orig_proto, input_range=input_range, batch=batch, rng=rng)
                 for _ in range(samples)]
        source = "random"
    else:
        feeds = resolve_inputs(inputs, orig_proto)
        source = "given"

    orig_names = [s.name for s in graph_inputs(orig_proto)]
    low_names = [s.name for s in graph_inputs(low_proto)]
    if set(orig_names) != set(low_names):
        raise LoweringError(
            f"the lowered model's inputs ({', '.join(low_names) or 'none'}) differ from the "
            f"original's ({', '.join(orig_names) or 'none'}); they must have the same names")

    s_orig = make_session(original, 1, label="original model")
    s_low = make_session(lowered, 1, label="lowered model")
    out_names = [o.name for o in s_orig.get_outputs()]
    low_out = [o.name for o in s_low.get_outputs()]
    accs = {n: _Accumulator(n, rtol, atol) for n in out_names}
    for i, feed in enumerate(feeds):
        ref = _run(s_orig, feed, "original model", i)
        got = _run(s_low, feed, "lowered model", i)
        for n in out_names:
            accs[n].add(ref[n], got.get(n), i)
    outputs = [accs[n].finish() for n in out_names]
    return ValidationReport(
        passed=all(o.passed for o in outputs),
        outputs=outputs,
        samples=len(feeds),
        seed=int(seed),
        rtol=float(rtol),
        atol=float(atol),
        input_range=(float(input_range[0]), float(input_range[1])),
        batch=int(batch),
        input_source=source,
        extra_outputs=[n for n in low_out if n not in accs],
    )
