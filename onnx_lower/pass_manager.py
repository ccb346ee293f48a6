"""The pass framework: passes, a registry by name, and a manager that runs ordered lists.

Modelled on onnx-ir's pass infrastructure (``PassBase``, ``PassResult``, ``requires`` /
``ensures``), with what a lowering pipeline also needs:

- every graph is visited: the main graph, If/Loop/Scan bodies at any depth, and model-local
  functions (:class:`GraphPass` runs once per graph);
- each pass's wall time and node-count delta is recorded;
- ``verify_each`` runs the ONNX checker and shape inference after every pass and names the
  pass that broke the model;
- ``dump_dir`` writes the model after every pass (like LLVM's ``-print-after-all``);
- ``fixed_point`` repeats the list until no pass changes anything (a nested PassManager is
  itself a pass, so fixed-point groups nest inside pipelines).
"""

from __future__ import annotations

import dataclasses
import gc
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnx
import onnx.numpy_helper
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from . import graph as g
from .affine import pending_weight_bytes
from .errors import LoweringError, PassVerificationError
from .model_io import header

__all__ = [
    "LoweringModel",
    "Pass",
    "GraphPass",
    "PassResult",
    "PassRecord",
    "PassManager",
    "register_pass",
    "get_pass",
    "registered_passes",
    "Options",
    "CONV_ALGOS",
]


#: Values of ``Options.conv_algo`` / ``--conv-algo`` (:mod:`onnx_lower.passes.im2col.winograd`).
CONV_ALGOS = ("auto", "im2col", "winograd")


@dataclasses.dataclass
class Options:
    """Settings every pass can read. Defaults are the CLI's defaults."""

    form: str = "mlp"
    max_weight_bytes: int = 1024 * 1024 * 1024
    sparse_storage: bool = False
    conv_algo: str = "auto"  # im2col form: "auto" | "im2col" | "winograd" (issue 13)
    verify_each: bool = False
    dump_dir: str | None = None
    progress: Callable[[str], None] | None = None
    #: ``(lo, hi)`` per input element (C order, one sample): the layered form's input box.
    input_box: tuple[np.ndarray, np.ndarray] | None = None
    #: The layered form drops a Softmax that computes the graph output (argmax preserved).
    drop_final_softmax: bool = False


@dataclasses.dataclass
class LoweringModel:
    """The model being lowered: a gs graph plus the protobuf metadata it came with.

    ``notes`` is where passes leave facts for the report (kept ops, fold statistics, plans).
    """

    graph: gs.Graph
    template: onnx.ModelProto
    options: Options = dataclasses.field(default_factory=Options)
    notes: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_proto(cls, model: onnx.ModelProto, options: Options | None = None) -> LoweringModel:
        return cls(g.import_graph(model), header(model), options or Options())

    def own_weights(self) -> None:
        """Copy every weight still backed by the input proto into an array of its own.

        onnx-graphsurgeon imports initializers lazily, as views into the proto; afterwards the
        proto can be freed, and each weight a pass replaces is freed with its old tensor.
        """
        for graph in g.all_graphs(self.graph):
            consts = [t for t in graph.tensors().values() if isinstance(t, gs.Constant)]
            consts += [v for n in graph.nodes for v in n.attrs.values()
                       if isinstance(v, gs.Constant)]
            for t in consts:
                if isinstance(t._values, LazyValues):
                    t._values = _load_once(t._values)

    def to_proto(self, *, release: bool = False) -> onnx.ModelProto:
        """The model as protobuf; ``release=True`` frees weights as they are exported (final)."""
        if release:
            # weights that passes replaced sit in node/tensor cycles until the cyclic collector
            # runs; free them before the export adds the lowered bytes
            gc.collect()
        return g.export_model(self.graph, self.template, release=release)

    @property
    def opset(self) -> int:
        for imp in self.template.opset_import:
            if imp.domain in ("", "ai.onnx"):
                return imp.version
        return 1

    def note(self, key: str, value: Any) -> None:
        self.notes.setdefault(key, []).append(value)


def _load_once(lazy: LazyValues) -> np.ndarray:
    """The array of a lazily imported weight, holding its bytes once.

    gs's ``LazyValues.load`` copies the array numpy_helper makes over the ``raw_data`` bytes, so
    each weight briefly exists twice (VGG-11's classifier: 2 × 411 MB on top of the proto).
    For plain numeric ``raw_data`` the array over those bytes is kept as it is: read-only, as
    weights are never written in place (a pass makes a new array for a new weight).
    """
    tensor = lazy.tensor
    plain = tensor.HasField("raw_data") and tensor.data_type in _PLAIN_DTYPES
    if plain and sys.byteorder == "little":
        return onnx.numpy_helper.to_array(tensor)
    return lazy.load()


_PLAIN_DTYPES = frozenset({
    onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
    onnx.TensorProto.INT8, onnx.TensorProto.INT16, onnx.TensorProto.INT32, onnx.TensorProto.INT64,
    onnx.TensorProto.UINT8, onnx.TensorProto.UINT16, onnx.TensorProto.UINT32,
    onnx.TensorProto.UINT64, onnx.TensorProto.BOOL,
})  # fmt: skip


@dataclasses.dataclass
class PassResult:
    modified: bool


@dataclasses.dataclass
class PassRecord:
    """One run of one pass."""

    name: str
    seconds: float
    nodes_before: int
    nodes_after: int
    modified: bool
    iteration: int = 0
    weight_bytes: int = 0

    @property
    def node_delta(self) -> int:
        return self.nodes_after - self.nodes_before


class Pass:
    """A rewrite of a :class:`LoweringModel`.

    Subclasses set ``description`` (one line) and implement :meth:`run`. ``requires`` and
    ``ensures`` raise :class:`LoweringError` when a pre- or postcondition fails.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""

    def requires(self, model: LoweringModel) -> None:  # noqa: B027 - optional hook
        """Precondition check; raise to refuse the model."""

    def ensures(self, model: LoweringModel) -> None:  # noqa: B027 - optional hook
        """Postcondition check; raise when the pass left the model in a wrong state."""

    def run(self, model: LoweringModel) -> PassResult:
        raise NotImplementedError

    def __call__(self, model: LoweringModel) -> PassResult:
        self.requires(model)
        result = self.run(model)
        if isinstance(result, bool):
            result = PassResult(result)
        self.ensures(model)
        return result

    def __repr__(self) -> str:
        return f"<pass {self.name or type(self).__name__}>"


class GraphPass(Pass):
    """A pass that rewrites each graph on its own: main graph, subgraphs and functions."""

    def run_on_graph(self, graph: gs.Graph, model: LoweringModel) -> bool:
        raise NotImplementedError

    def run(self, model: LoweringModel) -> PassResult:
        modified = False
        for graph in list(g.all_graphs(model.graph)):
            modified |= bool(self.run_on_graph(graph, model))
        return PassResult(modified)


_REGISTRY: dict[str, type[Pass]] = {}


def register_pass(name: str) -> Callable[[type[Pass]], type[Pass]]:
    """Class decorator: make the pass available by ``name`` (``--passes``, pipelines)."""

    def decorate(cls: type[Pass]) -> type[Pass]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"pass name '{name}' is registered twice")
        cls.name = name
        if not cls.description and cls.__doc__:
            cls.description = cls.__doc__.strip().splitlines()[0]
        _REGISTRY[name] = cls
        return cls

    return decorate


def get_pass(name: str) -> Pass:
    """A new instance of the registered pass ``name``."""
    try:
        return _REGISTRY[name]()
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise LoweringError(
            f"unknown pass '{name}'; the registered passes are: {known} (see --list-passes)"
        ) from None


def registered_passes() -> dict[str, type[Pass]]:
    return dict(sorted(_REGISTRY.items()))


class PassManager(Pass):
    """Runs passes in order, once or to a fixed point, recording time and node deltas."""

    description = "an ordered list of passes"

    def __init__(
        self,
        passes: Sequence[Pass | str],
        *,
        fixed_point: bool = False,
        max_iterations: int = 20,
        verify_each: bool = False,
        dump_dir: str | Path | None = None,
        name: str = "pipeline",
    ):
        self.passes = [get_pass(p) if isinstance(p, str) else p for p in passes]
        self.fixed_point = fixed_point
        self.max_iterations = max_iterations
        self.verify_each = verify_each
        self.dump_dir = Path(dump_dir) if dump_dir else None
        self.name = name
        self.records: list[PassRecord] = []
        self._dumps = 0

    def run(self, model: LoweringModel) -> PassResult:
        verify = self.verify_each or model.options.verify_each
        dump = self.dump_dir or (Path(model.options.dump_dir) if model.options.dump_dir else None)
        any_change = False
        for iteration in range(self.max_iterations if self.fixed_point else 1):
            changed = False
            for p in self.passes:
                if isinstance(p, PassManager):
                    p.verify_each = p.verify_each or verify
                    p.dump_dir = p.dump_dir or dump
                    p._dumps = self._dumps
                before = g.count_nodes(model.graph)
                if model.options.progress:
                    model.options.progress(p.name or type(p).__name__)
                start = time.perf_counter()
                result = p(model)
                seconds = time.perf_counter() - start
                if isinstance(p, PassManager):
                    self.records.extend(p.records)
                    p.records = []
                    self._dumps = p._dumps
                else:
                    after = g.count_nodes(model.graph)
                    self.records.append(
                        PassRecord(
                            p.name,
                            seconds,
                            before,
                            after,
                            result.modified,
                            iteration,
                            weight_bytes(model.graph),
                        )
                    )
                    if verify:
                        self._verify(model, p.name)
                    if dump is not None:
                        self._dump(model, dump, p.name)
                changed |= result.modified
            any_change |= changed
            if not changed:
                break
        return PassResult(any_change)

    def _verify(self, model: LoweringModel, pass_name: str) -> None:
        try:
            proto = model.to_proto()
            onnx.checker.check_model(proto)
            onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
        except Exception as exc:  # checker, inference and export all raise their own types
            detail = str(exc).strip().splitlines()
            raise PassVerificationError(pass_name, detail[0] if detail else repr(exc)) from exc

    def _dump(self, model: LoweringModel, folder: Path, pass_name: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self._dumps += 1
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", pass_name)
        onnx.save_model(model.to_proto(), str(folder / f"{self._dumps:03d}-{safe}.onnx"))


def weight_bytes(graph: gs.Graph) -> int:
    """Bytes of the graph's constants plus the dense weights its Affine nodes will emit."""
    return g.constant_bytes(graph) + pending_weight_bytes(graph)


def flatten_records(managers: Iterable[PassManager]) -> list[PassRecord]:
    return [r for m in managers for r in m.records]
