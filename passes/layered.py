"""The strictly layered ReLU chain (``layer-chain``, the ``layered`` form of issue 12).

After ``fold-linear`` the graph holds Affine and Relu nodes only. Substituting every Affine node
into its readers writes each Relu input and the graph output as an affine expression over
*atoms*, the graph input ``x`` and the Relu outputs ``r_k``::

    z_k = Σ_a M_{k,a} · a + c_k,      r_k = relu(z_k),      y = Σ_a M_{y,a} · a + c_y

This pass turns that DAG into the strict chain read by every ``.nnet`` tool (Reluplex, ReluVal,
Neurify, Marabou's NNet reader, NNV), DNNV's layer matcher and nnenum::

    h_0 = x,   h_ℓ = relu(W_ℓ h_{ℓ-1} + b_ℓ)  (ℓ = 1 … L-1),   y = W_L h_{L-1} + b_L

**Placement.** Each Relu gets one layer. ASAP: ``ℓ(r_k) = 1 + max ℓ(a)`` over the atoms of
``z_k`` (``ℓ(x) = 0``); the output is layer ``L = 1 + max ℓ(a)`` over the atoms of ``y``. ALAP:
``ℓ(r_k) = min ℓ(reader) − 1``, as late as its readers allow. Both keep ``L``; the pass plans
both and keeps the one with fewer neurons (ASAP on a tie).

**Carries.** A reader at layer ``e`` reads ``h_{e-1}``; a term ``M·a`` with ``ℓ(a) < e − 1``
must ride through the layers in between. Either ``a`` itself is carried (shared by all its
readers), or the reader's *partial sum* ``S = Σ M·a`` over its late atoms is carried: formed at
the layer after its earliest atom, extended as later atoms appear, one value per row of the
reader (narrow when the reader is narrower than its constituents, as in a MaxPool tournament).
A local search over these choices (per term, per reader, per atom) minimises the neurons.

A carried value ``v`` costs, per layer:

- one neuron ``v = relu(v)`` where ``v ≥ 0`` is proven: it is a Relu output, or (per row) a
  combination with nonnegative coefficients of Relu outputs (a MaxPool's ``b + relu(a − b)``
  over Relu outputs is one);
- else, with an input box ``lo ≤ x ≤ hi``, one neuron ``v = relu(v − L) + L`` with ``L`` a
  lower bound of ``v`` by interval arithmetic in float64, widened outward by a margin. The
  output is then exact inside the box only, and the report says so. The carry rounds at the
  scale of ``|L|``, and interval bounds of deep networks are loose: a row whose ``|L|`` exceeds
  16 times its largest ``|v|`` at 8 probe points of the box takes two neurons instead;
- else two neurons, ``v = relu(v) − relu(−v)``.

**Output.** ``Flatten → (MatMul, Add, Relu) × (L − 1) → MatMul, Add → Reshape`` to the original
output shape; every layer has one dense ``(in, out)`` weight and one bias in the model's dtype,
composed in float64 (``scipy.sparse``) and cast once. Exactly one graph input and one output.
The dense bytes ``Σ w_{ℓ-1}·w_ℓ`` are checked against ``--max-weight-mb`` before any layer is
densified (:class:`~onnx_lower.errors.BudgetExceededError` names the largest layer).

Kept non-ReLU ops (Sigmoid, Tanh, Softmax, ...) have no layered form: the pass refuses the first
one by name. ``drop_final_softmax`` drops a Softmax whose output is the graph output (the argmax
is unchanged); the report says so.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx_graphsurgeon as gs
import scipy.sparse as sp

from onnx_lower import graph as g
from onnx_lower.affine import affine_of, as_term, is_affine, selection, to_dense
from onnx_lower.errors import BudgetExceededError, LoweringError, UnsupportedOpError
from onnx_lower.pass_manager import LoweringModel, Pass, PassResult, register_pass

__all__ = ["LayerChainPass", "LayerPlan", "chain_bytes", "layer_chain", "plan_layers", "PLACEMENTS"]

PLACEMENTS = ("asap", "alap")
#: Relative and absolute outward margin on an interval lower bound used by a box carry.
_MARGIN_REL, _MARGIN_ABS = 1e-5, 1e-6
#: A box carry ``relu(v − L) + L`` rounds at the scale of ``|L|``: it is used for a row only
#: where ``|L|`` is at most this many times the row's scale (its largest ``|v|`` over
#: :data:`_PROBES` points of the box, at least 1e-3 of the largest row's). Interval bounds of
#: deep networks are loose, and a loose ``L`` would cost float32 precision; such rows take two
#: neurons.
_BOX_RATIO = 16.0
_PROBES = 8

Term = sp.csr_matrix | np.ndarray


@dataclasses.dataclass
class _Atom:
    """``x`` (index 0) or a Relu output; ``lo``/``hi`` are interval bounds (box only)."""

    name: str
    width: int
    nonneg: bool
    terms: dict[int, Term] = dataclasses.field(default_factory=dict)  # its input z (Relus)
    bias: np.ndarray | None = None
    lo: np.ndarray | None = None
    hi: np.ndarray | None = None


@dataclasses.dataclass
class _Reader:
    """A Relu input (``atom`` is its Relu) or the graph output (``atom`` is None)."""

    atom: int | None
    width: int
    terms: dict[int, Term]
    bias: np.ndarray


@dataclasses.dataclass
class LayerPlan:
    """Layers of each atom and how each late term rides: by its atom (I) or a partial sum (P)."""

    placement: str
    layer: list[int]  # per atom
    reader_layer: list[int]  # per reader
    partial: set[tuple[int, int]]  # (reader, atom) pairs carried in the reader's partial sum
    neurons: int = 0


# --- expressions ---------------------------------------------------------------------------


def _add_term(terms: dict[int, Term], atom: int, m: Term) -> None:
    terms[atom] = as_term(terms[atom] + m) if atom in terms else as_term(m)


def _expressions(graph: gs.Graph, x: gs.Tensor, out: gs.Tensor, dropped: str | None = None,
                 whole: bool = False):
    """Atoms of ``graph`` (Affine/Relu only, besides the ``dropped`` node) and ``out``'s reader.

    ``whole``: the Affines read and write whole tensors, batch included (the mlp form's
    whole-tensor sample, :mod:`onnx_lower.passes.sample_axis`), so the input atom is all of ``x``.
    """
    n0 = math.prod(x.shape) if whole else math.prod(g.sample_shape(x, "layered"))
    atoms = [_Atom(x.name, n0, False)]
    expr: dict[int, tuple[dict[int, Term], np.ndarray]] = {
        id(x): ({0: sp.identity(n0, format="csr")}, np.zeros(n0))
    }
    for node in graph.nodes:
        if is_affine(node):
            amap = affine_of(node)
            terms: dict[int, Term] = {}
            bias = np.zeros(amap.out_size) if amap.bias is None else amap.bias.copy()
            for t, a in zip(node.inputs, amap.terms):
                sub_terms, sub_bias = expr[id(t)]
                for atom, m in sub_terms.items():
                    _add_term(terms, atom, a @ m)
                bias += a @ sub_bias
            expr[id(node.outputs[0])] = (terms, bias)
        elif g.is_op(node, "Relu"):
            terms, bias = expr[id(node.inputs[0])]
            k = len(atoms)
            width = bias.size
            atoms.append(_Atom(node.name, width, True, terms, bias))
            expr[id(node.outputs[0])] = ({k: sp.identity(width, format="csr")}, np.zeros(width))
        elif g.is_op(node, "Constant") or node.name == dropped:
            continue
        else:
            raise UnsupportedOpError(
                node.name, node.op, "layered",
                f"a strict ReLU chain holds MatMul, Add and Relu only, and {node.op} has no "
                "exact form in them",
                "Use --form mlp (which keeps it), or remove it from the model"
                + (" (a final Softmax: --drop-final-softmax)" if node.op == "Softmax" else ""),
            )
    terms, bias = expr[id(out)]
    return atoms, _Reader(None, bias.size, terms, bias)


def _live_readers(atoms: list[_Atom], output: _Reader) -> list[_Reader]:
    """Readers of the Relus the output depends on, in graph order, the output last."""
    live = np.zeros(len(atoms), bool)
    stack = list(output.terms)
    while stack:
        a = stack.pop()
        if not live[a]:
            live[a] = True
            stack.extend(atoms[a].terms)
    readers = [_Reader(k, atoms[k].width, atoms[k].terms, atoms[k].bias)
               for k in range(1, len(atoms)) if live[k]]
    return [*readers, output]


def _bounds(atoms: list[_Atom], readers: list[_Reader], box) -> None:
    """Interval bounds of every atom inside the box, in float64."""
    lo, hi = (np.asarray(b, np.float64).reshape(-1) for b in box)
    atoms[0].lo, atoms[0].hi = lo, hi
    for r in readers[:-1]:
        zlo, zhi = _interval(r.terms, atoms, r.width, r.bias)
        atoms[r.atom].lo, atoms[r.atom].hi = np.maximum(zlo, 0), np.maximum(zhi, 0)


def _interval(terms: dict[int, Term], atoms: list[_Atom], width: int, bias=None):
    """Bounds of ``Σ M_a·a (+ bias)`` over the atoms' bounds: ``M⁺·lo + M⁻·hi`` and back."""
    lo, hi = np.zeros(width), np.zeros(width)
    for a, m in terms.items():
        pos, neg = _split(m)
        lo = lo + pos @ atoms[a].lo + neg @ atoms[a].hi
        hi = hi + pos @ atoms[a].hi + neg @ atoms[a].lo
    if bias is not None:
        lo, hi = lo + bias, hi + bias
    return lo, hi


def _split(m: Term) -> tuple[Term, Term]:
    if isinstance(m, np.ndarray):
        return np.maximum(m, 0), np.minimum(m, 0)
    return m.maximum(0).tocsr(), m.minimum(0).tocsr()


def _bad_rows(m: Term, atom: _Atom) -> np.ndarray:
    """Rows of ``m·a`` not proven ≥ 0: a negative coefficient, or any coefficient on ``x``."""
    if isinstance(m, np.ndarray):
        return (m != 0).any(axis=1) if not atom.nonneg else (m < 0).any(axis=1)
    m = m.tocsr()
    data = (m.data != 0) if not atom.nonneg else (m.data < 0)
    rows = np.repeat(np.arange(m.shape[0]), np.diff(m.indptr))
    bad = np.zeros(m.shape[0], bool)
    bad[rows[data]] = True
    return bad


# --- placement and carry planning ----------------------------------------------------------


class _Planner:
    """Neuron cost of a placement and the local search over carry choices."""

    def __init__(self, atoms: list[_Atom], readers: list[_Reader], box: bool):
        self.atoms, self.readers, self.box = atoms, readers, box
        self.bad = {
            (c, a): _bad_rows(m, atoms[a])
            for c, r in enumerate(readers)
            for a, m in r.terms.items()
        }
        if box:
            self._probe()

    def _probe(self) -> None:
        """Per term ``M·a``: its interval lower bound, magnitude bound, and values at probes."""
        atoms, readers = self.atoms, self.readers
        x = atoms[0]
        rng = np.random.default_rng(0)
        u = np.concatenate([np.full((x.width, 1), 0.5), rng.uniform(size=(x.width, _PROBES - 1))],
                           axis=1)
        values = {0: x.lo[:, None] + (x.hi - x.lo)[:, None] * u}
        for r in readers[:-1]:
            z = sum(np.asarray(m @ values[a]) for a, m in r.terms.items()) + r.bias[:, None]
            values[r.atom] = np.maximum(z, 0)
        self.term_lo, self.term_mag, self.term_val = {}, {}, {}
        for c, r in enumerate(readers):
            for a, m in r.terms.items():
                pos, neg = _split(m)
                self.term_lo[(c, a)] = pos @ atoms[a].lo + neg @ atoms[a].hi
                self.term_mag[(c, a)] = abs(m) @ np.maximum(np.abs(atoms[a].lo),
                                                            np.abs(atoms[a].hi))
                self.term_val[(c, a)] = np.asarray(m @ values[a])
        self.x_val = values[0]

    def box_rows(self, c: int | None, members) -> tuple[np.ndarray, np.ndarray]:
        """``(usable, L)`` per row of reader ``c``'s partial sum over ``members`` (``c`` None:
        the input ``x``): where a box carry keeps precision, and its lower bound."""
        if c is None:
            lo, mag, val = self.atoms[0].lo, np.abs(self.atoms[0].lo), self.x_val
        else:
            lo = sum(self.term_lo[(c, a)] for a in members)
            mag = sum(self.term_mag[(c, a)] for a in members)
            val = sum(self.term_val[(c, a)] for a in members)
        low = lo - (_MARGIN_REL * (np.abs(lo) + mag) + _MARGIN_ABS)
        scale = np.abs(val).max(axis=1)
        scale = np.maximum(scale, 1e-3 * scale.max(initial=0.0))
        return np.abs(low) <= _BOX_RATIO * scale, low

    def place(self, placement: str, search: bool = True) -> LayerPlan:
        atoms, readers = self.atoms, self.readers
        layer = [0] * len(atoms)
        for r in readers[:-1]:
            layer[r.atom] = 1 + max((layer[a] for a in r.terms), default=0)
        depth = 1 + max((layer[a] for a in readers[-1].terms), default=0)
        if placement == "alap":
            need = [depth] * len(atoms)  # the earliest reader's layer
            for r in reversed(readers):
                e = depth if r.atom is None else need[r.atom] - 1
                if r.atom is not None:
                    layer[r.atom] = e
                for a in r.terms:
                    need[a] = min(need[a], e)
        reader_layer = [depth if r.atom is None else layer[r.atom] for r in readers]
        plan = LayerPlan(placement, layer, reader_layer, set())
        self._search(plan, rounds=8 if search else 0)
        return plan

    def late(self, plan: LayerPlan) -> list[tuple[int, int]]:
        return [(c, a) for c, r in enumerate(self.readers) for a in r.terms
                if plan.layer[a] < plan.reader_layer[c] - 1]

    def atom_neurons(self, a: int) -> int:
        """Neurons per layer of carrying atom ``a`` itself."""
        atom = self.atoms[a]
        if atom.nonneg:
            return atom.width
        if self.box:
            return atom.width + int((~self.box_rows(None, ())[0]).sum())
        return 2 * atom.width

    def atom_cost(self, plan: LayerPlan, a: int, pairs_of_atom) -> int:
        ends = [plan.reader_layer[c] for c in pairs_of_atom[a] if (c, a) not in plan.partial]
        span = max(ends, default=0) - 1 - plan.layer[a]
        return max(span, 0) * self.atom_neurons(a)

    def reader_cost(self, plan: LayerPlan, c: int, pairs_of_reader) -> int:
        mine = sorted((plan.layer[a], a) for a in pairs_of_reader[c] if (c, a) in plan.partial)
        if not mine:
            return 0
        r = self.readers[c]
        bad = np.zeros(r.width, bool)
        cost, k = 0, 0
        for ell in range(mine[0][0] + 1, plan.reader_layer[c]):
            while k < len(mine) and mine[k][0] <= ell - 1:
                bad |= self.bad[(c, mine[k][1])]
                k += 1
            two = bad
            if self.box and bad.any():
                usable, _ = self.box_rows(c, [a for _, a in mine[:k]])
                two = bad & ~usable
            cost += r.width + int(two.sum())
        return cost

    def _search(self, plan: LayerPlan, rounds: int) -> None:
        late = self.late(plan)
        by_atom: dict[int, list[int]] = {}
        by_reader: dict[int, list[int]] = {}
        for c, a in late:
            by_atom.setdefault(a, []).append(c)
            by_reader.setdefault(c, []).append(a)
        a_cost = {a: self.atom_cost(plan, a, by_atom) for a in by_atom}
        r_cost = {c: self.reader_cost(plan, c, by_reader) for c in by_reader}
        moves = [[p] for p in late]
        moves += [[(c, a) for a in by_reader[c]] for c in by_reader]
        moves += [[(c, a) for c in by_atom[a]] for a in by_atom]
        for _ in range(rounds):
            improved = False
            for move in moves:
                for target in (True, False):
                    flips = [p for p in move if (p in plan.partial) != target]
                    if not flips:
                        continue
                    before = self._local(flips, a_cost, r_cost)
                    self._apply(plan, flips, target)
                    new_a = {a: self.atom_cost(plan, a, by_atom) for _, a in flips}
                    new_r = {c: self.reader_cost(plan, c, by_reader) for c, _ in flips}
                    if sum(new_a.values()) + sum(new_r.values()) < before:
                        a_cost.update(new_a)
                        r_cost.update(new_r)
                        improved = True
                    else:
                        self._apply(plan, flips, not target)
            if not improved:
                break
        relu = sum(self.atoms[r.atom].width for r in self.readers[:-1])
        plan.neurons = relu + sum(a_cost.values()) + sum(r_cost.values())

    @staticmethod
    def _local(flips, a_cost, r_cost) -> int:
        return sum(a_cost[a] for a in {a for _, a in flips}) + sum(
            r_cost[c] for c in {c for c, _ in flips})

    @staticmethod
    def _apply(plan: LayerPlan, flips, target: bool) -> None:
        for p in flips:
            (plan.partial.add if target else plan.partial.discard)(p)


def plan_layers(atoms, readers, box: bool, search: bool = True):
    """The planner and a plan for every placement, fewest neurons first (ASAP on a tie).

    ``search=False`` carries every late atom itself (no partial sums): the baseline the
    benchmark compares against.
    """
    planner = _Planner(atoms, readers, box)
    plans = [planner.place(p, search) for p in PLACEMENTS]
    return planner, sorted(plans, key=lambda p: p.neurons)


# --- building the layers -------------------------------------------------------------------


@dataclasses.dataclass
class _Slot:
    """Where a value of ``width`` rows sits in some ``h_ℓ``: ``v = h[pos] − h[neg] + shift``."""

    pos: np.ndarray
    neg: np.ndarray  # -1 where the row has no negative neuron
    shift: np.ndarray

    def read(self, n: int) -> tuple[sp.csr_matrix, np.ndarray]:
        m = selection(self.pos, n)
        if (self.neg >= 0).any():
            m = m - selection(self.neg, n)
        return m.tocsr(), self.shift


@dataclasses.dataclass
class _Layer:
    blocks: list[sp.csr_matrix] = dataclasses.field(default_factory=list)
    biases: list[np.ndarray] = dataclasses.field(default_factory=list)
    width: int = 0
    relu: int = 0
    carry_one: int = 0
    carry_two: int = 0
    carry_box: int = 0

    def add(self, pre: sp.csr_matrix, bias: np.ndarray, kind: str | None) -> np.ndarray:
        """Neurons ``pre·h + bias`` counted as ``kind``; their indices in this layer."""
        n = pre.shape[0]
        self.blocks.append(pre)
        self.biases.append(bias)
        idx = np.arange(self.width, self.width + n)
        self.width += n
        if kind:
            setattr(self, kind, getattr(self, kind) + n)
        return idx


class _Builder:
    """The layers of one plan, block by block, in float64."""

    def __init__(self, planner: _Planner, plan: LayerPlan, dry: bool = False):
        """``dry``: skip every product (zero blocks of the right shapes), for the widths."""
        self.planner, self.plan, self.box, self.dry = planner, plan, planner.box, dry
        self.atoms, self.readers = planner.atoms, planner.readers
        self.depth = plan.reader_layer[-1]
        self.slots: dict[tuple, _Slot] = {}  # (("atom", a) | ("sum", c), ℓ) -> slot in h_ℓ
        self.layers: list[_Layer] = []
        self.box_used = False
        n0 = self.atoms[0].width
        self.slots[(("atom", 0), 0)] = _Slot(np.arange(n0), np.full(n0, -1), np.zeros(n0))
        self.widths = [n0]

    def build(self) -> list[_Layer]:
        plan = self.plan
        late = [(c, a) for c, r in enumerate(self.readers) for a in r.terms
                if plan.layer[a] < plan.reader_layer[c] - 1]
        carry_until: dict[int, int] = {}
        for c, a in late:
            if (c, a) not in plan.partial:
                carry_until[a] = max(carry_until.get(a, 0), plan.reader_layer[c] - 1)
        sums: dict[int, list[int]] = {}
        for c, a in late:
            if (c, a) in plan.partial:
                sums.setdefault(c, []).append(a)
        for ell in range(1, self.depth + 1):
            layer = _Layer()
            prev = self.widths[-1]
            for c, r in enumerate(self.readers):
                if plan.reader_layer[c] == ell:
                    pre, bias = self._reader_pre(c, ell, prev)
                    idx = layer.add(pre, bias, "relu" if r.atom is not None else None)
                    if r.atom is not None:
                        self._native(r.atom, ell, idx)
            if ell < self.depth:
                for a in sorted(carry_until):
                    if plan.layer[a] < ell <= carry_until[a]:
                        m, b = self._read(("atom", a), ell - 1, prev)
                        self._carry(layer, ("atom", a), ell, m, b, self._atom_bad(a), None, ())
                for c in sorted(sums):
                    start = min(plan.layer[a] for a in sums[c]) + 1
                    if start <= ell < plan.reader_layer[c]:
                        m, b, bad = self._sum_pre(c, sums[c], ell, prev)
                        members = [a for a in sums[c] if plan.layer[a] <= ell - 1]
                        self._carry(layer, ("sum", c), ell, m, b, bad, c, members)
            self.layers.append(layer)
            self.widths.append(layer.width)
        return self.layers

    def _native(self, a: int, ell: int, idx: np.ndarray) -> None:
        n = idx.size
        self.slots[(("atom", a), ell)] = _Slot(idx, np.full(n, -1), np.zeros(n))

    def _read(self, key, ell: int, n: int):
        return self.slots[(key, ell)].read(n)

    def _atom_bad(self, a: int) -> np.ndarray:
        return np.full(self.atoms[a].width, not self.atoms[a].nonneg)

    def _reader_pre(self, c: int, ell: int, n: int):
        r, plan = self.readers[c], self.plan
        pre = sp.csr_matrix((r.width, n))
        bias = r.bias.copy()
        partial = False
        for a, m in r.terms.items():
            if (c, a) in plan.partial and plan.layer[a] < ell - 1:
                partial = True
                continue
            if self.dry:
                continue
            sel, shift = self._read(("atom", a), ell - 1, n)
            pre = pre + sp.csr_matrix(m @ sel)
            bias += m @ shift
        if partial and not self.dry:
            sel, shift = self._read(("sum", c), ell - 1, n)
            pre, bias = pre + sel, bias + shift
        return pre.tocsr(), bias

    def _sum_pre(self, c: int, members: list[int], ell: int, n: int):
        """Partial sum of reader ``c`` in ``h_ℓ``: its late atoms of layer ≤ ℓ − 1."""
        r, plan = self.readers[c], self.plan
        pre = sp.csr_matrix((r.width, n))
        bias = np.zeros(r.width)
        bad = np.zeros(r.width, bool)
        for a in members:
            if plan.layer[a] <= ell - 1:
                bad |= _bad_rows(r.terms[a], self.atoms[a])
            if plan.layer[a] == ell - 1 and not self.dry:
                sel, shift = self._read(("atom", a), ell - 1, n)
                pre = pre + sp.csr_matrix(r.terms[a] @ sel)
                bias += r.terms[a] @ shift
        if (("sum", c), ell - 1) in self.slots and not self.dry:
            sel, shift = self._read(("sum", c), ell - 1, n)
            pre, bias = pre + sel, bias + shift
        return pre.tocsr(), bias, bad

    def _carry(self, layer: _Layer, key, ell: int, m, b, bad, reader, members):
        """Carry the value ``m·h_{ℓ-1} + b`` into ``h_ℓ``: one neuron per row proven ≥ 0 or
        bounded by the box (:meth:`_Planner.box_rows`), two per other row."""
        w = m.shape[0]
        shift = np.zeros(w)
        two = bad
        if self.box and bad.any():
            usable, low = self.planner.box_rows(reader, members)
            boxed = bad & usable
            shift[boxed] = low[boxed]
            two = bad & ~usable
            layer.carry_box += int(boxed.sum())
            self.box_used |= bool(boxed.any())
        pos = layer.add(m, b - shift, None)
        layer.carry_one += w - int(bad.sum())
        neg = np.full(w, -1)
        if two.any():
            rows = np.flatnonzero(two)
            neg[rows] = layer.add(-m[rows], -b[rows], None)
            layer.carry_two += 2 * rows.size
        self.slots[(key, ell)] = _Slot(pos, neg, shift)


# --- the pass ------------------------------------------------------------------------------


def layer_chain(
    model: LoweringModel, *, search: bool = True, budget: int | None = None
) -> tuple[list[_Layer], list[int], dict]:
    """The layers (sparse float64) of the folded graph of ``model``, their widths (input
    first) and the report's ``layered`` part; the graph is not changed. ``search``: see
    :func:`plan_layers`. With ``budget`` (bytes), the widths are checked against it before
    any product is computed (:class:`~onnx_lower.errors.BudgetExceededError`)."""
    graph = model.graph
    graph.toposort()
    if len(graph.inputs) != 1 or len(graph.outputs) != 1:
        raise LoweringError(
            f"the layered form takes a model with exactly one input and one output (a .nnet "
            f"file holds one of each); this one has {len(graph.inputs)} inputs "
            f"({', '.join(t.name for t in graph.inputs)}) and {len(graph.outputs)} outputs "
            f"({', '.join(t.name for t in graph.outputs)})"
        )
    x, y = graph.inputs[0], graph.outputs[0]
    opts = model.options
    source, dropped = _drop_final_softmax(y) if opts.drop_final_softmax else (y, None)
    atoms, output = _expressions(graph, x, source, dropped, whole=_whole(model))
    readers = _live_readers(atoms, output)
    box = opts.input_box
    if box is not None:
        box = _check_box(box, atoms[0].width)
        _bounds(atoms, readers, box)
    planner, plans = plan_layers(atoms, readers, box is not None, search)
    if budget is not None:
        dry = _Builder(planner, plans[0], dry=True)
        dry.build()
        _check_budget(dry.widths, y, budget)
    builder = _Builder(planner, plans[0])
    layers = builder.build()
    notes = {
        "placement": plans[0].placement,
        "neurons": {p.placement: p.neurons for p in plans},
        "layers": [
            {"width": la.width, "relu": la.relu, "carry_one": la.carry_one,
             "carry_two": la.carry_two, "carry_box": la.carry_box}
            for la in layers
        ],
        "relu_neurons": sum(la.relu for la in layers),
        "carry_neurons": sum(la.carry_one + la.carry_two + la.carry_box for la in layers),
        "exact": "inside the input box" if builder.box_used else "everywhere",
        "input_box": box is not None,
        "dropped_softmax": dropped,
    }
    return layers, builder.widths, notes



@register_pass("layer-chain")
class LayerChainPass(Pass):
    """Turn the folded Affine/Relu DAG into a strict (MatMul, Add, Relu)* chain."""

    def run(self, model: LoweringModel) -> PassResult:
        graph = model.graph
        budget = model.options.max_weight_bytes
        layers, widths, notes = layer_chain(model, budget=budget)  # one input and one output
        x, y = graph.inputs[0], graph.outputs[0]
        assert chain_bytes(widths, y) <= budget
        self._emit(graph, x, y, layers, widths, whole=_whole(model))
        model.notes["emitted_weight_bytes"] = chain_bytes(widths, y)
        model.notes["emitted_matmuls"] = len(layers)
        model.notes["layered"] = notes
        return PassResult(True)

    @staticmethod
    def _emit(graph: gs.Graph, x: gs.Tensor, y: gs.Tensor, layers: list[_Layer], widths,
              whole: bool = False):
        """The chain; a whole-tensor chain flattens all of ``x`` to one row ``(1, D)`` and
        reshapes back to ``y``'s full (static) shape."""
        dtype = np.dtype(y.dtype or np.float32)
        if whole:
            batch, out_shape = 1, [int(d) for d in y.shape]
        else:
            out_shape = [int(d) for d in y.shape[1:]] if y.shape else [widths[-1]]
            batch = g.batch_dim(x)
        for node in list(graph.nodes):
            g.detach(node)
        graph.nodes.clear()
        namer = g.Namer(graph)
        nodes: list[gs.Node] = []

        def node(op: str, inputs, shape, name: str, output=None, attrs=None):
            t = output or gs.Variable(namer(name), dtype=dtype, shape=shape)
            nodes.append(gs.Node(op, namer(name), attrs or {}, list(inputs), [t]))
            return t

        h = node("Flatten", [x], [batch, widths[0]], "layered/flat",
                 attrs={"axis": 0 if whole else 1})
        for ell, layer in enumerate(layers, start=1):
            w = sp.vstack(layer.blocks, format="csr") if layer.blocks else sp.csr_matrix(
                (0, widths[ell - 1]))
            bias = np.concatenate(layer.biases) if layer.biases else np.zeros(0)
            weight = gs.Constant(namer(f"layer{ell}/W"), to_dense(w, dtype))
            mm = node("MatMul", [h, weight], [batch, layer.width], f"layer{ell}/MatMul")
            b = gs.Constant(namer(f"layer{ell}/b"), bias.astype(dtype))
            h = node("Add", [mm, b], [batch, layer.width], f"layer{ell}/Add")
            if ell < len(layers):
                h = node("Relu", [h], [batch, layer.width], f"layer{ell}/Relu")
        full = out_shape if whole else [-1, *out_shape]
        shape = gs.Constant(namer("layered/shape"), np.array(full, np.int64))
        node("Reshape", [h, shape], None, "layered/Reshape", output=y)
        graph.nodes.extend(nodes)


def _whole(model: LoweringModel) -> bool:
    """Whether the mlp form took the whole tensor as the sample (axis 0 static and mixed)."""
    return bool(model.notes.get("sample_axis"))


def chain_bytes(widths: list[int], y: gs.Tensor) -> int:
    """Dense weight and bias bytes of a chain of ``widths`` (input first) in ``y``'s dtype."""
    itemsize = np.dtype(y.dtype or np.float32).itemsize
    return sum(a * b + b for a, b in zip(widths, widths[1:])) * itemsize


def _check_budget(widths: list[int], y: gs.Tensor, budget: int) -> None:
    """The dense bytes of every layer against ``budget``; the error names the largest layer."""
    total = chain_bytes(widths, y)
    if total > budget:
        per = [chain_bytes(widths[i:i + 2], y) for i in range(len(widths) - 1)]
        k = int(np.argmax(per))
        name = f"layer {k + 1} of {len(per)} ({widths[k]} -> {widths[k + 1]} neurons)"
        raise BudgetExceededError(name, per[k], budget, total)


def _drop_final_softmax(y: gs.Tensor) -> tuple[gs.Tensor, str]:
    """The input of the Softmax that computes ``y``, and that Softmax's name."""
    p = g.producer(y)
    if p is None or not g.is_op(p, "Softmax"):
        what = f"{p.op} '{p.name}'" if p is not None else "a graph input"
        raise LoweringError(
            f"--drop-final-softmax: the output '{y.name}' is computed by {what}, not by a "
            f"Softmax; leave the flag out"
        )
    return p.inputs[0], p.name


def _check_box(box, n: int) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = (np.broadcast_to(np.asarray(b, np.float64).reshape(-1), (n,)) if np.size(b) in (1, n)
              else None for b in box)
    if lo is None or hi is None:
        sizes = ", ".join(str(np.size(b)) for b in box)
        raise LoweringError(
            f"the input box has {sizes} bounds, but the input has {n} elements per sample; give "
            f"one (lo, hi) per element in C order, or one scalar pair"
        )
    if not np.all(np.isfinite(lo)) or not np.all(np.isfinite(hi)) or np.any(lo > hi):
        raise LoweringError("the input box needs finite bounds with lo <= hi for every element")
    return lo, hi
