"""The ``.nnet`` format: read a strict ReLU chain out of an ONNX graph, write and read ``.nnet``.

Math. A strict chain is ``y = A_L(relu(A_{L-1}(… relu(A_1(x)) …)))`` with ``A_k(v) = W_k v + b_k``:
a ReLU after every hidden layer, a linear last layer, no skips. That is exactly what every
``.nnet`` reader evaluates (Reluplex, ReluVal, Neurify, Marabou's NNet reader, NNV).

Patterns covered by :func:`chain_layers` (one graph input, one graph output, every node on
the path, each tensor read by the next node only)::

    [Flatten(axis=1) | Reshape]  (MatMul(v, W) [Add(·, b)] Relu)*  MatMul(v, W) [Add(·, b)]
    [Reshape | Flatten]

``W`` is a constant ``[in, out]`` (ONNX MatMul: ``v @ W``), ``b`` a constant of ``out``
elements on either side of the Add; a missing Add is a zero bias. This is the output of
``--form layered`` (and of ``--form mlp`` on a fully-connected ReLU network). Anything else is
refused with :class:`NotAChainError`, naming the first node that is not on the chain.

Layout written by :func:`write_nnet` (sisl/NNet ``README.md``, https://github.com/sisl/NNet):

1. header lines starting with ``//`` (what wrote the file, the source model, the input box and
   whether the network is exact only inside it);
2. ``numLayers,inputSize,outputSize,maxLayerSize,`` (numLayers counts weight matrices;
   maxLayerSize is the largest of the input size and every layer size);
3. the layer sizes, input first;  4. ``0,`` (an unused flag);
5. input minimums;  6. input maximums: the box, at ``%.17g`` so that no bound moves inward;
   without one, the widest float32 range (``%.9g`` of float32's max, ``3.40282347e+38``, just
   outside it), i.e. no clipping, since every reader clips the input to [min, max];
7. means (inputSize + 1 zeros);  8. ranges (inputSize + 1 ones): no normalisation;
9. per layer, one line per output neuron with its row of ``W`` ``[out, in]``, then one line per
   output neuron with its bias.

Every line ends with a comma: sisl/NNet's ``readNNet.py`` and maraboupy's ``read_nnet`` split on
commas and drop the last field. Numbers are printed with ``%.9g`` for float32 weights (9
significant digits round-trip every float32; writeNNet's ``%.5e`` does not) and ``%.17g`` for
float64. Rows are formatted by ``np.savetxt`` in chunks, never element by element, and the file
is written atomically (a temporary file beside the target, then ``os.replace``).

ReluVal reads each line with ``fgets`` into a 10,240-character buffer (``nnet.c``); a longer
row is split silently. :class:`NnetInfo` lists such rows and :meth:`NnetInfo.warnings` names the
tool.
"""

from __future__ import annotations

import dataclasses
import io
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from . import graph as g
from .errors import InvalidModelError, LoweringError
from .model_io import ModelSource, check_output_path, load_model

__all__ = [
    "NotAChainError",
    "Layers",
    "NnetInfo",
    "Nnet",
    "FLOAT32_MAX",
    "LINE_BUFFERS",
    "chain_layers",
    "write_nnet",
    "read_nnet",
    "evaluate_layers",
    "save_chain",
]

#: ``[(W [out, in], b [out]), …]``, first layer first.
Layers = list[tuple[np.ndarray, np.ndarray]]
#: Input bounds written when no box is given: the widest float32 range (no clipping).
FLOAT32_MAX = float(np.finfo(np.float32).max)
#: Line buffers of C readers that split longer lines: tool -> buffer size in characters.
LINE_BUFFERS = {"ReluVal": 10240}
_CHUNK = 512  # rows formatted per np.savetxt call
_HINT = "Lower it with --form layered, which turns any supported CNN into a strict ReLU chain"


class NotAChainError(LoweringError):
    """The graph is not a strict ReLU chain ``(MatMul, Add, Relu)* MatMul, Add``."""

    def __init__(self, what: str):
        self._fact = f"the model is not a strict ReLU chain: {what}"
        super().__init__(f"{self._fact}. {_HINT}")


# --------------------------------------------------------------------------- ONNX -> layers


def chain_layers(model: ModelSource) -> Layers:
    """The layers ``[(W [out, in], b [out]), …]`` of a strict-chain ONNX graph, in its dtype.

    Raises :class:`NotAChainError` (naming the offending node) for anything else.
    """
    proto = load_model(model)
    graph = g.import_graph(proto)
    if len(graph.inputs) != 1 or len(graph.outputs) != 1:
        raise NotAChainError(
            f"it has {len(graph.inputs)} inputs and {len(graph.outputs)} outputs; .nnet holds "
            f"one input vector and one output vector"
        )
    consumers: dict[str, list] = {}
    for node in graph.nodes:
        for t in node.inputs:
            consumers.setdefault(t.name, []).append(node)
    steps = []  # (node, constant operand or None)
    current = graph.inputs[0]
    while not g.is_graph_output(graph, current):
        readers = consumers.get(current.name, [])
        if len(readers) != 1:
            names = ", ".join(f"'{n.name}' ({n.op})" for n in readers) or "no node"
            raise NotAChainError(f"tensor '{current.name}' is read by {names}, not by one node")
        node = readers[0]
        others = [t for t in node.inputs if t is not current]
        consts = [g.const_value(t) for t in others]
        if any(c is None for c in consts) or len(node.outputs) != 1:
            raise NotAChainError(
                f"node '{node.name}' ({node.op}) reads another computed tensor besides "
                f"'{current.name}': a skip connection or a branch"
            )
        if g.is_op(node, "MatMul") and node.inputs[0] is not current:
            raise NotAChainError(f"MatMul '{node.name}' multiplies from the left (W @ x)")
        steps.append((node, consts[0] if consts else None))
        current = node.outputs[0]
    on_path = {id(n) for n, _ in steps}
    constants = [n for n in graph.nodes if id(n) not in on_path and g.is_op(n, "Constant")]
    extra = [n for n in graph.nodes if id(n) not in on_path and n not in constants]
    if extra:
        raise NotAChainError(f"node '{extra[0].name}' ({extra[0].op}) is off the chain")
    return _layers_from_steps(steps, graph.inputs[0])


def _layers_from_steps(steps: list, source) -> Layers:
    ops = [n.op if n.domain in g.DEFAULT_DOMAINS else f"{n.domain}::{n.op}" for n, _ in steps]
    k = 0
    if ops and ops[0] in ("Flatten", "Reshape"):
        node = steps[0][0]
        if ops[0] == "Flatten" and g.attr(node, "axis", 1) != 1:
            raise NotAChainError(f"Flatten '{node.name}' has axis {g.attr(node, 'axis')}, not 1")
        k = 1
    end = len(ops)
    if end > k and ops[-1] in ("Reshape", "Flatten"):
        end -= 1
    layers: Layers = []
    relu_after: list[bool] = []
    while k < end:
        node, w = steps[k]
        if ops[k] != "MatMul":
            raise NotAChainError(f"node '{node.name}' ({ops[k]}) where a MatMul was expected")
        if w is None or w.ndim != 2:
            raise NotAChainError(f"MatMul '{node.name}' has a {w.ndim}-D weight, not [in, out]")
        k += 1
        bias = np.zeros(w.shape[1], dtype=w.dtype)
        if k < end and ops[k] == "Add":
            add, b = steps[k]
            if b is None:
                raise NotAChainError(f"Add '{add.name}' adds no constant bias")
            if b.size != w.shape[1] or b.ndim > 1 and b.shape[:-1] != (1,) * (b.ndim - 1):
                raise NotAChainError(
                    f"Add '{add.name}' adds shape {list(b.shape)}, not a bias of {w.shape[1]}"
                )
            bias = b.reshape(-1).astype(w.dtype)
            k += 1
        relu = k < end and ops[k] == "Relu"
        k += relu
        if k < end and ops[k] != "MatMul":
            bad = steps[k][0]
            raise NotAChainError(f"node '{bad.name}' ({ops[k]}) is not MatMul, Add or Relu")
        layers.append((w.T, bias))
        relu_after.append(relu)
    if not layers:
        raise NotAChainError("it holds no MatMul")
    if relu_after[-1]:
        raise NotAChainError("it ends in a Relu; the last .nnet layer is linear")
    hidden = [i for i, r in enumerate(relu_after[:-1]) if not r]
    if hidden:
        raise NotAChainError(f"layer {hidden[0] + 1} has no Relu after it (two linear layers)")
    for i in range(1, len(layers)):
        if layers[i][0].shape[1] != layers[i - 1][0].shape[0]:
            raise NotAChainError(f"layer {i + 1} does not take layer {i}'s output size")
    size = _sample_size(source)
    if size is not None and size != layers[0][0].shape[1]:
        raise NotAChainError(
            f"input '{source.name}' has {size} elements per sample but the first MatMul takes "
            f"{layers[0][0].shape[1]}"
        )
    return layers


def _sample_size(tensor) -> int | None:
    shape = tensor.shape
    if not shape or any(not isinstance(d, int | np.integer) for d in shape[1:]):
        return None
    return int(np.prod(shape[1:], dtype=np.int64))


# --------------------------------------------------------------------------- writing


@dataclasses.dataclass
class NnetInfo:
    """What :func:`write_nnet` wrote: sizes, bytes, and rows too long for a C reader."""

    path: str
    bytes: int
    layer_sizes: list[int]
    input_box: bool
    long_rows: dict[str, dict[str, int]]  # tool -> {"rows", "longest", "limit"}

    def warnings(self) -> list[str]:
        return [
            f"{v['rows']} row(s) of the .nnet are longer than {tool}'s {v['limit']:,}-character "
            f"line buffer (longest {v['longest']:,} characters); {tool} would misread them"
            for tool, v in self.long_rows.items()
        ]

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "warnings": self.warnings()}


def write_nnet(
    layers: Layers,
    path: str | os.PathLike,
    input_box: tuple[np.ndarray, np.ndarray] | None = None,
    *,
    source: str | None = None,
    exact_only_in_box: bool = False,
    box_source: str | None = None,
) -> NnetInfo:
    """Write ``layers`` as a ``.nnet`` file (sisl/NNet layout, see the module docstring).

    ``input_box`` is ``(lo, hi)``, one bound per input element in C order; it becomes the input
    minimums and maximums. ``exact_only_in_box`` says (in the header) that the network equals
    its source only inside the box (a layered form whose carries use the box's lower bounds).
    """
    target = check_output_path(path)
    sizes = [int(layers[0][0].shape[1])] + [int(w.shape[0]) for w, _ in layers]
    n_in = sizes[0]
    if input_box is None:
        lo, hi = np.full(n_in, -FLOAT32_MAX), np.full(n_in, FLOAT32_MAX)
    else:
        lo, hi = (np.asarray(v, dtype=np.float64).reshape(-1) for v in input_box)
        if lo.size != n_in or hi.size != n_in:
            raise LoweringError(
                f"the input box has {lo.size} bounds but the network takes {n_in} inputs"
            )
    dtype = np.result_type(*[w.dtype for w, _ in layers])
    fmt = "%.17g" if dtype == np.float64 else "%.9g"
    boxed = input_box is not None
    header = _header(source, boxed, exact_only_in_box, box_source)
    longest = {tool: [0, 0] for tool in LINE_BUFFERS}  # rows over, longest row

    def emit(f, rows: np.ndarray, fmt: str = fmt) -> None:
        rows = rows.reshape(rows.shape[0], -1) if rows.ndim > 1 else rows.reshape(-1, 1)
        for start in range(0, rows.shape[0], _CHUNK):
            buf = io.StringIO()
            np.savetxt(buf, rows[start : start + _CHUNK], fmt=fmt, delimiter=",", newline=",\n")
            text = buf.getvalue()
            f.write(text)
            ends = np.flatnonzero(np.frombuffer(text.encode("ascii"), np.uint8) == 10)
            lengths = np.diff(ends, prepend=-1)  # characters per line, newline included
            for tool, limit in LINE_BUFFERS.items():
                over = lengths > limit - 1  # fgets(buf, limit) reads limit - 1 characters
                longest[tool][0] += int(over.sum())
                longest[tool][1] = max(longest[tool][1], int(lengths.max()) - 1)

    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="ascii", newline="\n") as f:
            f.write("".join(f"// {line}\n" for line in header))
            f.write(f"{len(layers)},{n_in},{sizes[-1]},{max(sizes)},\n")
            f.write(",".join(map(str, sizes)) + ",\n")
            f.write("0,\n")
            for row in (lo, hi, np.zeros(n_in + 1), np.ones(n_in + 1)):
                emit(f, row[None, :], "%.17g" if boxed else "%.9g")
            for w, b in layers:
                emit(f, np.asarray(w))
                emit(f, np.asarray(b).reshape(-1))
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    long_rows = {
        tool: {"rows": over, "longest": most, "limit": LINE_BUFFERS[tool]}
        for tool, (over, most) in longest.items()
        if over
    }
    return NnetInfo(str(target), target.stat().st_size, sizes, input_box is not None, long_rows)


def _header(source: str | None, boxed: bool, exact_only_in_box: bool, box_source: str | None):
    from . import __version__

    lines = [
        f"written by onnx_lower {__version__} (layout of https://github.com/sisl/NNet)",
        f"source model: {source or '(in memory)'}",
    ]
    if boxed:
        where = f" from {box_source}" if box_source else ""
        lines.append(f"input minimums/maximums: the input box{where}")
        lines.append(
            "the network equals the source model only inside this box"
            if exact_only_in_box
            else "the network equals the source model for every input; readers clip to the box"
        )
    else:
        lines.append("no input box: minimums/maximums are the widest float32 range (no clipping)")
        lines.append("the network equals the source model for every input")
    lines.append("means 0 and ranges 1: no normalisation")
    return lines


# --------------------------------------------------------------------------- reading


@dataclasses.dataclass
class Nnet:
    """A parsed ``.nnet`` file."""

    layers: Layers
    mins: np.ndarray
    maxs: np.ndarray
    means: np.ndarray
    ranges: np.ndarray
    header: list[str]

    def evaluate(self, x: np.ndarray) -> np.ndarray:
        """The readers' semantics: clip to [min, max], normalise, the chain, un-normalise."""
        n = self.mins.size
        v = (np.clip(np.asarray(x, np.float64).reshape(-1, n), self.mins, self.maxs)
             - self.means[:n]) / self.ranges[:n]
        return evaluate_layers(self.layers, v) * self.ranges[n] + self.means[n]


def read_nnet(path: str | os.PathLike) -> Nnet:
    """Parse a ``.nnet`` file; every line must end with a comma (as sisl/NNet's readers need)."""
    text = Path(path).read_text().splitlines()
    header = [line for line in text if line.startswith("//")]
    lines = iter(line for line in text if not line.startswith("//"))

    def row(dtype=np.float64) -> np.ndarray:
        line = next(lines, None)
        if line is None:
            raise InvalidModelError(f"'{path}' ends early: it is not a complete .nnet file")
        fields = line.strip().split(",")
        if fields[-1] != "":
            raise InvalidModelError(f"'{path}': line '{line[:40]}' does not end with a comma")
        return np.array(fields[:-1], dtype=dtype)

    n_layers, n_in, n_out, _ = row(np.int64)
    sizes = row(np.int64)
    row()  # the unused flag
    mins, maxs, means, ranges = row(), row(), row(), row()
    layers: Layers = []
    for k in range(int(n_layers)):
        w = np.stack([row() for _ in range(sizes[k + 1])])
        b = np.concatenate([row() for _ in range(sizes[k + 1])])
        layers.append((w, b))
    if sizes[0] != n_in or sizes[-1] != n_out:
        raise InvalidModelError(f"'{path}': the sizes line disagrees with the first line")
    return Nnet(layers, mins, maxs, means, ranges, header)


def evaluate_layers(layers: Layers, x: np.ndarray) -> np.ndarray:
    """``A_L(relu(… relu(A_1 x)))`` on rows of ``x`` ``[n, in]``, in float64."""
    v = np.asarray(x, np.float64)
    for k, (w, b) in enumerate(layers):
        v = v @ np.asarray(w, np.float64).T + np.asarray(b, np.float64)
        if k < len(layers) - 1:
            v = np.maximum(v, 0.0)
    return v


def save_chain(model: onnx.ModelProto, path: str | os.PathLike, **kwargs) -> NnetInfo:
    """:func:`write_nnet` of :func:`chain_layers` of ``model``."""
    return write_nnet(chain_layers(model), path, **kwargs)
