"""Asking the Marabou verifier (PyPI ``maraboupy``) about an original and a lowered network.

Math. Local robustness of a classifier ``f`` at ``x0`` with label ``t = argmax f(x0)`` over the
box ``B = [lo, hi]`` is ``∀x ∈ B: f_t(x) > f_j(x) for all j ≠ t``. Its negation, a single query
with a disjunction ``∃x ∈ B: ∨_{j≠t} f_j(x) − f_t(x) ≥ 0``, is handed to Marabou: ``unsat`` means
robust, ``sat`` comes with a counterexample ``x``, anything else (``TIMEOUT``, ``ERROR``) is no
verdict. The same query on the original and on the lowered network must give the same verdict.

:func:`read` opens ``.nnet`` with ``Marabou.read_nnet`` (whose input bounds are the file's
minimums and maximums, so a ``.nnet`` written with the box needs no bounds set) and anything
else with ``Marabou.read_onnx``. :func:`evaluate_with_solver` fixes the input and lets Marabou
solve for the outputs: that is Marabou's own arithmetic on the equations it parsed, where
``evaluateWithoutMarabou`` of an ONNX network runs onnxruntime.

maraboupy is imported on first use: it is an optional dependency (wheels for CPython ≤ 3.12).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from .errors import LoweringError

__all__ = ["MarabouMissingError", "RobustnessResult", "read", "evaluate_with_solver",
           "robustness"]


class MarabouMissingError(LoweringError):
    """maraboupy is not installed."""


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


def evaluate_with_solver(net, x: np.ndarray, timeout: int = 60) -> np.ndarray:
    """The outputs Marabou's solver computes with the input fixed to ``x`` (flat, float64)."""
    marabou, _, _ = _marabou()
    options = marabou.createOptions(timeoutInSeconds=timeout, verbosity=0)
    with tempfile.TemporaryDirectory(prefix="onnx_lower_marabou_") as tmp:
        out = net.evaluateWithMarabou([np.asarray(x)], filename=os.path.join(tmp, "log"),
                                      options=options)
    if out is None:
        raise LoweringError("Marabou found the query with a fixed input unsatisfiable")
    return np.asarray(out[0], dtype=np.float64).reshape(-1)


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
