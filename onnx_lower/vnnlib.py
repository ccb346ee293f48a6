"""An input box from a VNN-LIB property file (VNN-COMP convention).

Math. ``X_i`` is element ``i`` of the network input in C (row-major) order, batch 1; ``Y_j``
likewise for the output (VNN-COMP ``SCORING/vnnlib.py``; nnenum and alpha-beta-CROWN read it
the same way). The property's input constraints are the conjunction of its ``assert``s. Each
formula is brought to a union of boxes over the ``X_i`` only:

- ``(<= X_i c)``, ``(>= X_i c)``, ``(<= c X_i)``, ``(>= c X_i)``, ``(< …)``, ``(> …)`` and
  ``(= X_i c)`` bound one element (a strict bound is taken as its closure: the box is a hull);
- ``(and f…)`` intersects the boxes of its parts, ``(or f…)`` unites them;
- a comparison that names no ``X_i`` (the output constraints) leaves the box whole; one
  between two input variables, or between an input and an output, is refused (not a box).

Several disjuncts (VNN-COMP's ``(assert (or (and …) (and …)))`` input splits) give their
hull, :attr:`InputBox.disjuncts` says how many, and :attr:`InputBox.note` says that the hull is
wider than the property. Every ``X_i`` must end with both bounds: a missing one is an error
naming the elements.

Why not the PyPI package ``vnnlib`` (1.0.2, evaluated for this module): it parses the VNN-LIB
2.0 grammar only, and rejects the VNN-LIB 1.0 files VNN-COMP ships (``(declare-const X_0 Real)``
is "syntax error at line 2"); it is a compiled extension with a runtime dependency on pybind11.
A small s-expression reader (below, about forty lines) covers the 1.0 input grammar.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from pathlib import Path

import numpy as np

from .errors import LoweringError

__all__ = ["VnnlibError", "InputBox", "read_input_box", "parse_input_box"]

_TOKEN = re.compile(r"\(|\)|[^\s()]+")
_VAR = re.compile(r"^([XY])_(\d+)$")
_FLIP = {"<=": ">=", ">=": "<=", "<": ">", ">": "<", "=": "="}


class VnnlibError(LoweringError):
    """The VNN-LIB file cannot be read or does not give an input box."""


@dataclasses.dataclass
class InputBox:
    """``lo[i] <= X_i <= hi[i]``, C order; ``disjuncts`` boxes were united into this hull."""

    lo: np.ndarray
    hi: np.ndarray
    disjuncts: int = 1
    source: str | None = None

    @property
    def note(self) -> str | None:
        if self.disjuncts == 1:
            return None
        return (f"the property's input is a union of {self.disjuncts} boxes; their hull is used, "
                f"which is wider than the property")

    def as_tuple(self) -> tuple[np.ndarray, np.ndarray]:
        return self.lo, self.hi


def read_input_box(path: str | os.PathLike, size: int | None = None) -> InputBox:
    """The input box of the VNN-LIB file at ``path`` (``size`` elements, if given)."""
    p = Path(path)
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise VnnlibError(f"cannot read the VNN-LIB file '{p}': {exc}") from None
    box = parse_input_box(text, size, where=f"'{p}'")
    box.source = str(p)
    return box


def parse_input_box(text: str, size: int | None = None, *, where: str = "the property") -> InputBox:
    """The input box of VNN-LIB ``text``; ``size`` is the network's input element count."""
    forms = _parse(text, where)
    declared = []
    asserts = []
    for form in forms:
        if isinstance(form, list) and form and form[0] == "declare-const" and len(form) >= 2:
            m = _VAR.match(str(form[1]))
            if m and m.group(1) == "X":
                declared.append(int(m.group(2)))
        elif isinstance(form, list) and form and form[0] == "assert" and len(form) == 2:
            asserts.append(form[1])
    n = size if size is not None else (max(declared) + 1 if declared else 0)
    if declared and size is not None and max(declared) + 1 != size:
        raise VnnlibError(
            f"{where} declares {max(declared) + 1} inputs X_0…, but the network takes {size}; "
            f"is it the property of this model?"
        )
    if n == 0:
        raise VnnlibError(f"{where} declares no input X_0, X_1, …: it gives no input box")
    boxes = [_full(n)]
    for formula in asserts:
        parts = _boxes(formula, n, where)
        boxes = _unique([_meet(a, b) for a in boxes for b in parts])
        if not boxes:
            raise VnnlibError(f"{where}: the input constraints are unsatisfiable (empty box)")
    lo = np.min([b[0] for b in boxes], axis=0)
    hi = np.max([b[1] for b in boxes], axis=0)
    missing = np.flatnonzero(~(np.isfinite(lo) & np.isfinite(hi)))
    if missing.size:
        names = ", ".join(f"X_{i}" for i in missing[:5]) + (" …" if missing.size > 5 else "")
        raise VnnlibError(
            f"{where} leaves {missing.size} input(s) without a lower and an upper bound ({names}); "
            f"a box needs both bounds on every X_i"
        )
    return InputBox(lo, hi, len(boxes))


def _parse(text: str, where: str) -> list:
    """S-expressions of ``text`` (``;`` comments dropped) as nested lists of strings."""
    text = "\n".join(line.split(";", 1)[0] for line in text.splitlines())
    stack: list[list] = [[]]
    for tok in _TOKEN.findall(text):
        if tok == "(":
            stack.append([])
        elif tok == ")":
            if len(stack) == 1:
                raise VnnlibError(f"{where} has an unmatched ')'")
            done = stack.pop()
            stack[-1].append(done)
        else:
            stack[-1].append(tok)
    if len(stack) != 1:
        raise VnnlibError(f"{where} has {len(stack) - 1} unclosed '('")
    return stack[0]


_Box = tuple[np.ndarray, np.ndarray]


def _full(n: int) -> _Box:
    return np.full(n, -math.inf), np.full(n, math.inf)


def _meet(a: _Box, b: _Box) -> _Box:
    return np.maximum(a[0], b[0]), np.minimum(a[1], b[1])


def _unique(boxes: list[_Box]) -> list[_Box]:
    """Distinct non-empty boxes; a whole box absorbs the rest (the output constraints)."""
    seen: dict[bytes, _Box] = {}
    for lo, hi in boxes:
        if np.all(lo <= hi):
            seen.setdefault(lo.tobytes() + hi.tobytes(), (lo, hi))
    out = list(seen.values())
    whole = [b for b in out if np.all(np.isinf(b[0])) and np.all(np.isinf(b[1]))]
    return whole[:1] if whole else out


def _boxes(f, n: int, where: str) -> list[_Box]:
    """``f`` as a union of boxes over the inputs."""
    if not isinstance(f, list) or not f:
        raise VnnlibError(f"{where}: '{f}' is not a formula")
    head = f[0]
    if head == "and":
        out = [_full(n)]
        for part in f[1:]:
            out = _unique([_meet(a, b) for a in out for b in _boxes(part, n, where)])
        return out
    if head == "or":
        return _unique([b for part in f[1:] for b in _boxes(part, n, where)])
    if head in _FLIP and len(f) == 3:
        return [_compare(head, f[1], f[2], n, where)]
    raise VnnlibError(f"{where}: {_show(f)[:80]} is not a comparison, and, or or; an input box "
                      f"needs (<= X_i c) / (>= X_i c) bounds")


def _compare(op: str, a, b, n: int, where: str) -> _Box:
    va, vb = _var(a), _var(b)
    inputs = [v for v in (va, vb) if v and v[0] == "X"]
    if not inputs:
        return _full(n)  # an output constraint: no bound on the inputs
    if va and vb:
        raise VnnlibError(
            f"{where}: ({op} {_show(a)} {_show(b)}) relates two variables; an input box needs "
            f"constant bounds"
        )
    if vb:  # c op X  ->  X flip(op) c
        op, a, b, va = _FLIP[op], b, a, vb
    i = va[1]
    if i >= n:
        raise VnnlibError(f"{where}: X_{i} is out of range; the network takes {n} inputs")
    c = _number(b, where)
    lo, hi = _full(n)
    if op in ("<=", "<", "="):
        hi[i] = c
    if op in (">=", ">", "="):
        lo[i] = c
    return lo, hi


def _var(e) -> tuple[str, int] | None:
    m = _VAR.match(e) if isinstance(e, str) else None
    return (m.group(1), int(m.group(2))) if m else None


def _number(e, where: str) -> float:
    if isinstance(e, list) and len(e) == 2 and e[0] == "-":
        return -_number(e[1], where)
    try:
        return float(e)
    except (TypeError, ValueError):
        raise VnnlibError(f"{where}: '{_show(e)}' is not a number") from None


def _show(e) -> str:
    return f"({' '.join(map(_show, e))})" if isinstance(e, list) else str(e)
