"""Asking the Marabou verifier (PyPI ``maraboupy``) about an original and a lowered network.

Math. Local robustness of a classifier ``f`` at ``x0`` with label ``t = argmax f(x0)`` over the
box ``B = [lo, hi]`` is ``∀x ∈ B: f_t(x) > f_j(x) for all j ≠ t``. Its negation, a single query
with a disjunction ``∃x ∈ B: ∨_{j≠t} f_j(x) − f_t(x) ≥ 0``, is handed to Marabou: ``unsat`` means
robust, ``sat`` comes with a counterexample ``x``, anything else (``TIMEOUT``, ``ERROR``) is no
verdict. The same query on the original and on the lowered network must give the same verdict.

:func:`read` opens ``.nnet`` with ``Marabou.read_nnet`` (whose input bounds are the file's
minimums and maximums, so a ``.nnet`` written with the box needs no bounds set) and anything
else with ``Marabou.read_onnx``.

What a reader parsed is checked two ways (``evaluateWithoutMarabou`` of an ONNX network runs
onnxruntime, so it checks nothing of Marabou's):

* :func:`evaluate_equations`, no solver: the parsed constraint system itself, evaluated in
  float64 with the input fixed. Variables ``v ∈ ℝⁿ``; the linear equations (``equList``, type
  EQ) are the rows of a sparse ``A v = s`` (``Σ_k c_k v_{j_k} = scalar``, addends with a zero
  coefficient dropped); the piecewise constraints are ``f = max(b, 0)`` (``reluList``),
  ``f = b`` or ``slope·b`` (``leakyReluList``), ``f = max S`` (``maxList``), ``f = |b|``
  (``absList``), ``f = ±1`` by the sign of ``b`` (``signList``), ``f = 1 / (1 + e^{−b})``
  (``sigmoidList``), ``z = x·y`` (``bilinearList``) and ``o = softmax(i)`` per group
  (``softmaxList``). From ``v_in = x``, each wave solves every
  equation with exactly one unknown variable ``u``, ``v_u = (s − Σ_known c v) / c_u``, and fires
  every piecewise constraint whose inputs are known; waves repeat until nothing changes (a
  topological order of the variables, found a layer at a time and vectorised within it). Then
  the whole assignment is checked: every equation (relative residual ≤ 1e-9 of
  ``Σ|c v| + |s|``), every piecewise constraint, and every bound the reader set. So the result
  is the one solution of Marabou's query with that input, found deterministically in seconds;
  property constraints (``additionalEquList``, ``disjunctionList``) are not part of the
  network and are ignored.
* :func:`evaluate_with_solver`: Marabou's solver, input fixed, solves for the outputs. Its
  exit code is checked: an empty answer after a ``TIMEOUT`` is not an ``unsat``.

maraboupy is imported on first use: it is an optional dependency (wheels for CPython ≤ 3.12).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from .errors import LoweringError

__all__ = ["MarabouMissingError", "MarabouEquationError", "RobustnessResult", "read",
           "evaluate_equations", "evaluate_with_solver", "robustness"]


class MarabouMissingError(LoweringError):
    """maraboupy is not installed."""


class MarabouEquationError(LoweringError):
    """A Marabou network's parsed equations cannot be evaluated, or their solution breaks one
    of its own constraints (a reader or lowering bug: the message says which constraint)."""

    exit_code = 3


def _marabou():
    try:
        with warnings.catch_warnings():  # "Tensorflow parser is unavailable": not needed here
            warnings.simplefilter("ignore")
            from maraboupy import Marabou, MarabouCore, MarabouUtils
    except ImportError as exc:
        raise MarabouMissingError(
            f"maraboupy is not installed ({exc}); `pip install maraboupy` (CPython <= 3.12)"
        ) from None
    return Marabou, MarabouCore, MarabouUtils


def read(path: str | os.PathLike) -> Any:
    """A Marabou network from a ``.nnet`` or ``.onnx`` file."""
    marabou, _, _ = _marabou()
    if Path(path).suffix.lower() == ".nnet":
        return marabou.read_nnet(str(path))
    return marabou.read_onnx(str(path))


def _vars(net) -> tuple[np.ndarray, np.ndarray]:
    return (np.asarray(net.inputVars[0]).reshape(-1), np.asarray(net.outputVars[0]).reshape(-1))


def evaluate_with_solver(net, x: np.ndarray, timeout: int = 60,
                         tightening: str = "none") -> np.ndarray:
    """The outputs Marabou's solver computes with the input fixed to ``x`` (flat, float64).

    ``MarabouNetwork.evaluateWithMarabou`` returns ``None`` for any empty answer, so it shows a
    ``TIMEOUT`` as an ``unsat``; this calls the solver itself and names the exit code.
    ``tightening`` is Marabou's ``tighteningStrategy``: with the input a point, bound
    tightening (Marabou's default is DeepPoly) has nothing to tighten and only costs time and
    memory, so it is off unless asked for.
    """
    marabou, core, _ = _marabou()
    ipq = net.getInputQuery()
    inputs, outputs = _vars(net)
    for v, a in zip(inputs.tolist(), np.asarray(x, np.float64).reshape(-1).tolist(), strict=True):
        ipq.setLowerBound(v, a)
        ipq.setUpperBound(v, a)
    options = marabou.createOptions(timeoutInSeconds=timeout, verbosity=0,
                                    tighteningStrategy=tightening)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="onnx_lower_marabou_") as tmp:
        code, values, _ = core.solve(ipq, options, os.path.join(tmp, "log"))
    seconds = time.perf_counter() - start
    if code != "sat" or not values:
        what = {"unsat": "unsatisfiable", "TIMEOUT": f"not solved within {timeout} s"}.get(
            code, f"not solved (exit {code!r})")
        raise LoweringError(f"Marabou found the query with a fixed input {what} "
                            f"({seconds:.1f} s); evaluate_equations checks the same equations "
                            "without the solver")
    return np.array([values[v] for v in outputs.tolist()], dtype=np.float64)


def _pairs(items: list, width: int) -> np.ndarray:
    return np.asarray(items, dtype=np.float64).reshape(-1, width)


def _equations(net) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """The EQ rows of ``net.equList`` as COO arrays ``(row, var, coef)``, their scalars, and
    the number of non-EQ (inequality) equations left out. One pass over the addend lists."""
    _, core, _ = _marabou()
    eqs = [e for e in net.equList if e.EquationType == core.Equation.EQ]
    lengths = np.fromiter((len(e.addendList) for e in eqs), np.int64, count=len(eqs))
    flat = np.fromiter(itertools.chain.from_iterable(
        itertools.chain.from_iterable(e.addendList for e in eqs)), np.float64,
        count=2 * int(lengths.sum()))
    scalars = np.fromiter((e.scalar for e in eqs), np.float64, count=len(eqs))
    coef, var = flat[0::2], flat[1::2].astype(np.int64)
    row = np.repeat(np.arange(len(eqs)), lengths)
    nonzero = coef != 0
    return row[nonzero], var[nonzero], coef[nonzero], scalars, len(net.equList) - len(eqs)


def _unary(net) -> dict[str, np.ndarray]:
    """``(b, f)`` index pairs of each one-input piecewise family (``leaky``: ``(b, f, slope)``)."""
    return {"relu": _pairs(net.reluList, 2).astype(np.int64),
            "abs": _pairs(net.absList, 2).astype(np.int64),
            "sign": _pairs(net.signList, 2).astype(np.int64),
            "sigmoid": _pairs(net.sigmoidList, 2).astype(np.int64),
            "leaky": _pairs(net.leakyReluList, 3)}


def _apply(kind: str, b: np.ndarray, slope: np.ndarray | None = None) -> np.ndarray:
    if kind == "relu":
        return np.maximum(b, 0.0)
    if kind == "abs":
        return np.abs(b)
    if kind == "sign":  # Marabou's SignConstraint: f = 1 if b >= 0 else -1
        return np.where(b >= 0, 1.0, -1.0)
    if kind == "sigmoid":
        return 0.5 * (1.0 + np.tanh(0.5 * b))
    return np.where(b > 0, b, slope * b)  # leaky


def evaluate_equations(net, x: np.ndarray, *, assignment: bool = False) -> np.ndarray:
    """The outputs of Marabou's parsed equation system with the input fixed to ``x``, in float64,
    no solver (the module docstring states the math). ``assignment=True`` returns all
    ``net.numVars`` values instead of the outputs (0 where a variable stays undetermined).

    Raises :class:`MarabouEquationError` when a variable the outputs need stays undetermined,
    or when the solution breaks a parsed equation, piecewise constraint or bound.
    """
    inputs, outputs = _vars(net)
    x = np.asarray(x, np.float64).reshape(-1)
    if x.size != inputs.size:
        raise MarabouEquationError(f"x has {x.size} values, the network {inputs.size} inputs")
    n = int(net.numVars)
    val, known = np.zeros(n), np.zeros(n, bool)
    val[inputs], known[inputs] = x, True
    row, var, coef, scalars, inequalities = _equations(net)
    unary = _unary(net)
    maxes = [(np.asarray(sorted(elems), np.int64), int(f)) for elems, f in net.maxList]
    max_f = np.array([f for _, f in maxes], np.int64)
    max_len = np.array([e.size for e, _ in maxes], np.int64)
    max_elems = np.concatenate([e for e, _ in maxes]) if maxes else np.zeros(0, np.int64)
    max_start = np.concatenate([[0], np.cumsum(max_len)[:-1]]).astype(np.int64)
    bil = _pairs(net.bilinearList, 3).astype(np.int64)
    softmaxes = [(np.asarray(i, np.int64).reshape(-1), np.asarray(o, np.int64).reshape(-1))
                 for i, o in getattr(net, "softmaxList", None) or []]
    # Pending equation entries shrink as equations are used, so a wave costs what is left.
    p_row, p_var, p_coef = row, var, coef
    while True:
        progressed = False
        unknown = ~known[p_var]
        count = np.bincount(p_row, weights=unknown, minlength=scalars.size)
        ready = count == 1
        if ready.any():
            at = ready[p_row]
            r_row, r_var, r_coef, r_unknown = p_row[at], p_var[at], p_coef[at], unknown[at]
            known_sum = np.bincount(r_row, weights=np.where(r_unknown, 0.0, r_coef * val[r_var]),
                                    minlength=scalars.size)
            u_row, u_var, u_coef = r_row[r_unknown], r_var[r_unknown], r_coef[r_unknown]
            u_var, first = np.unique(u_var, return_index=True)  # one defining row per variable
            u_row, u_coef = u_row[first], u_coef[first]
            val[u_var] = (scalars[u_row] - known_sum[u_row]) / u_coef
            known[u_var] = True
            progressed = True
        done = count[p_row] <= 1  # used, or with nothing left to solve for (checked below)
        p_row, p_var, p_coef = p_row[~done], p_var[~done], p_coef[~done]
        for kind, pairs in unary.items():
            if pairs.size:
                b, f = pairs[:, 0].astype(np.int64), pairs[:, 1].astype(np.int64)
                fire = known[b] & ~known[f]
                if fire.any():
                    slope = pairs[fire, 2].astype(np.float64) if kind == "leaky" else None
                    val[f[fire]] = _apply(kind, val[b[fire]], slope)
                    known[f[fire]] = True
                    progressed = True
        if maxes:
            ready_max = np.minimum.reduceat(known[max_elems], max_start).astype(bool)
            fire = ready_max & ~known[max_f]
            if fire.any():
                val[max_f[fire]] = np.maximum.reduceat(val[max_elems], max_start)[fire]
                known[max_f[fire]] = True
                progressed = True
        if bil.size:
            fire = known[bil[:, 0]] & known[bil[:, 1]] & ~known[bil[:, 2]]
            if fire.any():
                val[bil[fire, 2]] = val[bil[fire, 0]] * val[bil[fire, 1]]
                known[bil[fire, 2]] = True
                progressed = True
        for si, so in softmaxes:  # one constraint per Softmax group (a handful per network)
            if known[si].all() and not known[so].all():
                val[so], known[so] = _softmax(val[si]), True
                progressed = True
        if not progressed:
            break
    if not known[outputs].all():
        raise MarabouEquationError(
            f"{int((~known[outputs]).sum())} of {outputs.size} output variables stay "
            f"undetermined: {np.unique(p_row).size} equations keep two or more unknowns")
    _check_assignment(net, val, known, (row, var, coef, scalars), unary,
                      (max_f, max_elems, max_start), bil, inequalities)
    for si, so in softmaxes:
        want = _softmax(val[si])
        if known[si].all() and np.any(np.abs(val[so] - want) > 1e-9 * (np.abs(want) + 1e-300)):
            raise MarabouEquationError("softmax constraints do not hold")
    return val if assignment else val[outputs]


def _softmax(v: np.ndarray) -> np.ndarray:
    e = np.exp(v - v.max())
    return e / e.sum()


def _check_assignment(net, val, known, eqs, unary, maxes, bil, inequalities,
                      rtol: float = 1e-9) -> None:
    """Every parsed constraint and bound holds for ``val`` where its variables are known."""
    row, var, coef, scalars = eqs
    ok_row = np.bincount(row, weights=~known[var], minlength=scalars.size) == 0
    terms = coef * np.where(known[var], val[var], 0.0)
    res = np.abs(np.bincount(row, weights=terms, minlength=scalars.size) - scalars)
    scale = np.bincount(row, weights=np.abs(terms), minlength=scalars.size) + np.abs(scalars)
    bad = ok_row & (res > rtol * scale + 1e-300)
    if bad.any():
        i = int(np.argmax(np.where(bad, res / np.maximum(scale, 1e-300), 0)))
        raise MarabouEquationError(f"{int(bad.sum())} equations do not hold, the worst (#{i}) "
                                   f"by {res[i]:.3g} at scale {scale[i]:.3g}")
    for kind, pairs in unary.items():
        if pairs.size:
            b, f = pairs[:, 0].astype(np.int64), pairs[:, 1].astype(np.int64)
            both = known[b] & known[f]
            want = _apply(kind, val[b], pairs[:, 2] if kind == "leaky" else None)
            off = both & (np.abs(val[f] - want) > rtol * (np.abs(want) + np.abs(val[b]) + 1e-300))
            if off.any():
                raise MarabouEquationError(f"{int(off.sum())} {kind} constraints do not hold")
    max_f, max_elems, max_start = maxes
    if max_f.size:
        want = np.maximum.reduceat(val[max_elems], max_start)
        if np.any(np.abs(val[max_f] - want) > rtol * (np.abs(want) + 1e-300)):
            raise MarabouEquationError("max constraints do not hold")
    if bil.size and np.any(np.abs(val[bil[:, 2]] - val[bil[:, 0]] * val[bil[:, 1]])
                           > rtol * (np.abs(val[bil[:, 2]]) + 1e-300)):
        raise MarabouEquationError("bilinear constraints do not hold")
    for bounds, sign, what in ((net.lowerBounds, 1.0, "lower"), (net.upperBounds, -1.0, "upper")):
        if bounds:
            v = np.fromiter(bounds.keys(), np.int64, count=len(bounds))
            b = np.fromiter(bounds.values(), np.float64, count=len(bounds))
            over = known[v] & (sign * (val[v] - b) < -rtol * np.maximum(np.abs(b), 1.0))
            if over.any():
                i = int(np.argmax(over))
                raise MarabouEquationError(
                    f"{int(over.sum())} variables break their {what} bound, e.g. variable "
                    f"{v[i]} = {val[v[i]]:.9g} against {b[i]:.9g}")
    if inequalities:
        warnings.warn(f"{inequalities} inequality equations were not checked", stacklevel=3)


@dataclasses.dataclass
class RobustnessResult:
    """Marabou's verdict on one local-robustness query."""

    verdict: str  # "robust" (unsat), "not robust" (sat), or Marabou's code (TIMEOUT, ERROR)
    raw: str
    seconds: float
    counterexample: np.ndarray | None = None  # flat input, when "not robust"

    def to_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "raw": self.raw, "seconds": round(self.seconds, 3)}


def robustness(net, lo: np.ndarray, hi: np.ndarray, label: int, *, timeout: int = 60,
               set_box: bool = True) -> RobustnessResult:
    """Is ``argmax`` equal to ``label`` everywhere in ``[lo, hi]`` (flat, C order)?

    ``set_box=False`` keeps the input bounds the reader set (a ``.nnet`` file's box).
    """
    marabou, core, utils = _marabou()
    inputs, outputs = _vars(net)
    if set_box:
        lo, hi = np.asarray(lo, np.float64).reshape(-1), np.asarray(hi, np.float64).reshape(-1)
        if lo.size != inputs.size:
            raise LoweringError(f"the box has {lo.size} bounds, the network {inputs.size} inputs")
        for v, a, b in zip(inputs.tolist(), lo.tolist(), hi.tolist(), strict=True):
            net.setLowerBound(v, a)
            net.setUpperBound(v, b)
    disjuncts = []
    for j in range(outputs.size):
        if j != label:
            eq = utils.Equation(core.Equation.GE)
            eq.addAddend(1.0, int(outputs[j]))
            eq.addAddend(-1.0, int(outputs[label]))
            eq.setScalar(0.0)
            disjuncts.append([eq])
    net.addDisjunctionConstraint(disjuncts)
    options = marabou.createOptions(timeoutInSeconds=timeout, verbosity=0)
    start = time.perf_counter()
    raw, values, _ = net.solve(options=options, verbose=False)
    seconds = time.perf_counter() - start
    verdict = {"unsat": "robust", "sat": "not robust"}.get(raw, raw)
    cex = np.array([values[v] for v in inputs.tolist()]) if raw == "sat" else None
    return RobustnessResult(verdict, raw, seconds, cex)
