"""The affine IR: internal ``Affine`` nodes that hold sparse matrices outside the protobuf.

An Affine node computes, per sample, on C-order flat vectors (the tensor without its batch dim):

    y = Σ_i A_i · x_i + c

where ``A_i`` is a float64 matrix of shape ``(out_size, in_size_i)`` and ``c`` a dense float64
vector (or None). ``A_i`` is a ``scipy.sparse`` CSR matrix, except where composition filled
it beyond :data:`DENSE_ABOVE` of its entries: then a dense ndarray is smaller (8 bytes per
entry against CSR's 12 per nonzero) and multiplies faster.

The output tensor keeps its logical per-sample shape ``out_shape``, so a Reshape or Flatten
between Affine nodes costs nothing.

**Whole-tensor maps.** When a graph's axis 0 is static and some op mixes it (a Transpose moving
axis 0, a Gemm with ``transA``, a Reshape of ``(1, 8, 4, 4)`` to ``(128,)``, ...), the sample is
the whole tensor: a map with ``whole=True`` reads and writes the C-order flattening of the whole
tensor, batch included, and ``out_shape`` is the full shape. A per-sample map ``A`` over a tensor
whose axis 0 has ``n`` entries is the whole-tensor map ``I_n ⊗ A`` (:func:`whole_tensor`), since
the flattening of ``(n, *sample)`` is the concatenation of the ``n`` sample vectors.

Matrices are composed in float64 and cast to the model's float type once, at emission.

Most data-movement ops are *index maps*: each output element copies one input element or a fill
value. :func:`index_map` builds their matrices by running the op's numpy equivalent on an array of
element indices, which keeps every such op a one-liner and vectorised.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np
import onnx_graphsurgeon as gs
import scipy.sparse as sp

from .graph import INTERNAL_DOMAIN, detach

__all__ = [
    "AffineMap",
    "AFFINE_OP",
    "is_affine",
    "affine_of",
    "make_affine",
    "replace_with_affine",
    "identity",
    "diag",
    "selection",
    "index_map",
    "broadcast_matrix",
    "compose",
    "pending_weight_bytes",
    "emitted_bytes",
    "layer_label",
    "is_identity",
    "as_term",
    "to_dense",
    "DENSE_ABOVE",
    "whole_tensor",
]

AFFINE_OP = "Affine"
_PAYLOAD = "affine"


@dataclasses.dataclass
class AffineMap:
    """``y = Σ_i terms[i] · x_i + bias`` on per-sample flat vectors.

    ``sources`` names the nodes of the original model this map computes (several once folded),
    so a costly matrix can be traced back to the model (budget errors, ``--dry-run``).
    """

    terms: list[sp.csr_matrix]
    bias: np.ndarray | None
    out_shape: tuple[int, ...]
    sources: tuple[str, ...] = ()
    #: True: the vectors are whole tensors (batch included), ``out_shape`` is the full shape.
    whole: bool = False

    def __post_init__(self):
        self.terms = [as_term(t) for t in self.terms]
        self.out_shape = tuple(int(d) for d in self.out_shape)
        if self.bias is not None:
            self.bias = np.asarray(self.bias, dtype=np.float64).reshape(-1)
            if not self.bias.any():
                self.bias = None
        for t in self.terms:
            if t.shape[0] != self.out_size:
                raise ValueError(f"term has {t.shape[0]} rows, output has {self.out_size}")

    @property
    def out_size(self) -> int:
        return math.prod(self.out_shape)

    @property
    def in_sizes(self) -> list[int]:
        return [t.shape[1] for t in self.terms]

    @property
    def dense_elements(self) -> int:
        """Elements of the dense weights emission would write (identity terms are free)."""
        return sum(t.shape[1] * self.out_size for t in self.terms if not is_identity(t))

    @property
    def nnz(self) -> int:
        return sum(t.size if isinstance(t, np.ndarray) else t.nnz for t in self.terms)

    def apply(self, xs: Sequence[np.ndarray]) -> np.ndarray:
        """Reference evaluation on batched inputs ``(N, in_size_i)`` (tests and debugging); a
        whole-tensor map takes each input whole and returns the full output shape."""
        rows = (lambda x: x.reshape(1, -1)) if self.whole else (lambda x: x.reshape(len(x), -1))
        y = sum(np.asarray(t @ rows(x).T).T for t, x in zip(self.terms, xs))
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(self.out_shape if self.whole else (-1, *self.out_shape))

    def summary(self) -> str:
        ins = ",".join(str(n) for n in self.in_sizes)
        kind = ", whole-tensor" if self.whole else ""
        return f"Affine(in=[{ins}], out={list(self.out_shape)}, nnz={self.nnz}{kind})"

    def label(self, name: str) -> str:
        return layer_label(name, self.sources)


def layer_label(name: str, sources: Sequence[str]) -> str:
    """``name``, followed by the original nodes it was folded from when there are several."""
    if len(sources) < 2:
        return name
    shown = sources if len(sources) <= 4 else (sources[0], "…", sources[-1])
    return f"{name} (folded from {len(sources)} nodes: {' + '.join(shown)})"


#: Fraction of nonzeros above which a composed term is kept as a dense array.
DENSE_ABOVE = 0.25

Term = sp.csr_matrix | np.ndarray


def as_term(m) -> Term:
    """A float64 term: dense ndarray if given dense or filled beyond DENSE_ABOVE, else CSR."""
    if isinstance(m, np.ndarray | np.matrix):
        return np.asarray(m, dtype=np.float64)
    m = sp.csr_matrix(m, dtype=np.float64)
    if m.nnz > DENSE_ABOVE * m.shape[0] * m.shape[1] and m.shape[0] * m.shape[1] > 4096:
        return m.toarray()
    return m


def to_dense(m: Term, dtype) -> np.ndarray:
    """``mᵀ`` as a C-contiguous ``dtype`` array, without a float64 dense temporary."""
    if isinstance(m, np.ndarray):
        return np.ascontiguousarray(m.T, dtype=dtype)
    out = np.zeros((m.shape[1], m.shape[0]), dtype=dtype)
    coo = m.tocoo()
    out[coo.col, coo.row] = coo.data
    return out


def is_identity(m: Term) -> bool:
    if isinstance(m, np.ndarray):
        return False  # dense terms come from composition; an identity stays sparse
    n, k = m.shape
    if n != k or m.nnz != n:
        return False
    m = m.tocsr()
    return bool(
        np.array_equal(m.indptr, np.arange(n + 1))
        and np.array_equal(m.indices, np.arange(n))
        and np.all(m.data == 1.0)
    )


def is_affine(node: gs.Node) -> bool:
    return node.op == AFFINE_OP and node.domain == INTERNAL_DOMAIN


def affine_of(node: gs.Node) -> AffineMap | None:
    return node.attrs.get(_PAYLOAD) if is_affine(node) else None


def make_affine(
    inputs: Sequence[gs.Tensor],
    output: gs.Variable,
    amap: AffineMap,
    name: str,
    source: str | None = None,
) -> gs.Node:
    """A new Affine node ``output = amap(inputs)``; the caller appends it to the graph.

    ``source`` is the original node it lowers (default ``name``).
    """
    if len(inputs) != len(amap.terms):
        raise ValueError(f"{len(inputs)} inputs for {len(amap.terms)} terms")
    if not amap.sources:
        amap.sources = (source or name,)
    return gs.Node(
        op=AFFINE_OP,
        name=name,
        domain=INTERNAL_DOMAIN,
        attrs={_PAYLOAD: amap},
        inputs=list(inputs),
        outputs=[output],
    )


def replace_with_affine(
    graph: gs.Graph, node: gs.Node, inputs: Sequence[gs.Tensor], amap: AffineMap
) -> gs.Node:
    """Replace single-output ``node`` by an Affine node that produces the same tensor."""
    out = node.outputs[0]
    if amap.whole:
        out.shape = list(amap.out_shape)
    elif out.shape is None or len(out.shape) != 1 + len(amap.out_shape):
        batch = inputs[0].shape[0] if inputs and inputs[0].shape else None
        out.shape = [batch, *amap.out_shape]
    if out.dtype is None:
        out.dtype = inputs[0].dtype
    index = graph.nodes.index(node)
    detach(node)
    new = make_affine(inputs, out, amap, node.name or out.name)
    graph.nodes[index] = new
    return new


def emitted_bytes(node: gs.Node) -> int:
    """Bytes of the dense weights emission will write for Affine ``node``."""
    itemsize = np.dtype(node.outputs[0].dtype or np.float32).itemsize
    return affine_of(node).dense_elements * itemsize


def pending_weight_bytes(graph: gs.Graph) -> int:
    """Dense bytes the Affine nodes of ``graph`` (and its subgraphs) will emit."""
    from .graph import all_graphs

    return sum(
        emitted_bytes(node)
        for sub in all_graphs(graph)
        for node in sub.nodes
        if affine_of(node) is not None
    )


# --- matrix builders ------------------------------------------------------------------------


def identity(n: int) -> sp.csr_matrix:
    return sp.identity(n, dtype=np.float64, format="csr")


def diag(values: np.ndarray) -> sp.csr_matrix:
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    n = v.size
    return sp.csr_matrix((v, np.arange(n), np.arange(n + 1)), shape=(n, n))


def selection(src: np.ndarray, n_in: int, weights: np.ndarray | None = None) -> sp.csr_matrix:
    """Row ``j`` picks input ``src[j]`` (times ``weights[j]``); ``src[j] < 0`` gives a zero row."""
    src = np.asarray(src, dtype=np.int64).reshape(-1)
    keep = src >= 0
    indptr = np.concatenate([[0], np.cumsum(keep)])
    data = np.ones(int(keep.sum())) if weights is None else np.asarray(weights, float)[keep]
    return sp.csr_matrix((data, src[keep], indptr), shape=(src.size, n_in))


def index_map(
    in_shapes: Sequence[Sequence[int]],
    fn: Callable[..., np.ndarray],
) -> tuple[list[sp.csr_matrix], np.ndarray, tuple[int, ...]]:
    """Matrices of a data-movement op from its numpy equivalent.

    ``fn`` receives one int64 index array per input (shaped like that input, values unique
    across inputs) and returns the output's array of indices, with ``-1`` where the output holds
    a fill value instead of an input element (e.g. constant padding).

    Returns ``(terms, fill_mask, out_shape)`` with one selection matrix per input; ``fill_mask``
    is the flat boolean mask of output elements that hold the fill value.
    """
    sizes = [math.prod(s) for s in in_shapes]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    arrays = [
        np.arange(o, o + n, dtype=np.int64).reshape(tuple(s))
        for o, n, s in zip(offsets, sizes, in_shapes)
    ]
    out = np.asarray(fn(*arrays))
    flat = out.reshape(-1)
    terms = []
    for i, n in enumerate(sizes):
        mine = (flat >= offsets[i]) & (flat < offsets[i] + n)
        terms.append(selection(np.where(mine, flat - offsets[i], -1), n))
    return terms, flat < 0, tuple(out.shape)


def broadcast_matrix(in_shape: Sequence[int], out_shape: Sequence[int]) -> sp.csr_matrix:
    """numpy broadcasting of ``in_shape`` to ``out_shape`` as a selection matrix."""
    terms, _, _ = index_map([in_shape], lambda a: np.broadcast_to(a, tuple(out_shape)))
    return terms[0]


def compose(
    outer: AffineMap,
    outer_inputs: Sequence[gs.Tensor],
    k: int,
    inner: AffineMap,
    inner_inputs: Sequence[gs.Tensor],
) -> tuple[AffineMap, list[gs.Tensor]]:
    """Substitute ``inner`` for input ``k`` of ``outer``; terms that read one tensor merge."""
    if outer.whole != inner.whole:
        raise ValueError("compose needs two per-sample or two whole-tensor maps")
    a_k = outer.terms[k]
    inputs: list[gs.Tensor] = []
    terms: list[sp.csr_matrix] = []

    def add(tensor: gs.Tensor, term: sp.csr_matrix) -> None:
        for i, t in enumerate(inputs):
            if t is tensor:
                terms[i] = as_term(terms[i] + term)
                return
        inputs.append(tensor)
        terms.append(term)

    for i, (t, m) in enumerate(zip(outer_inputs, outer.terms)):
        if i != k:
            add(t, m)
    for t, m in zip(inner_inputs, inner.terms):
        add(t, as_term(a_k @ m))
    bias = outer.bias
    if inner.bias is not None:
        extra = a_k @ inner.bias
        bias = extra if bias is None else bias + extra
    for term in terms:
        if not isinstance(term, np.ndarray):
            term.eliminate_zeros()
            term.sort_indices()
    sources = tuple(dict.fromkeys(inner.sources + outer.sources))
    return AffineMap(terms, bias, outer.out_shape, sources, outer.whole), inputs


def whole_tensor(amap: AffineMap, n: int) -> AffineMap:
    """The per-sample ``amap`` over ``n`` samples as one whole-tensor map: ``I_n ⊗ A_i``.

    The bias repeats once per sample and ``out_shape`` gains the leading ``n``.
    """
    if amap.whole:
        return amap
    eye = identity(n)
    terms = [as_term(sp.kron(eye, t, format="csr")) for t in amap.terms]
    bias = None if amap.bias is None else np.tile(amap.bias, n)
    return AffineMap(terms, bias, (n, *amap.out_shape), amap.sources, whole=True)
