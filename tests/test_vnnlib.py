"""VNN-LIB input boxes (onnx_lower.vnnlib) and validation samples inside a box.

A box written out in each of the forms VNN-COMP uses (one assert per bound, one ``and``, the
constant on either side, ``(- c)``, split disjuncts under ``or``, output constraints mixed in)
is read back exactly; disjuncts give their hull and say so; a missing bound, a relation between
two variables, a wrong input count and unbalanced parentheses are errors naming the problem.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from onnx_lower.validate import random_inputs
from onnx_lower.vnnlib import VnnlibError, parse_input_box, read_input_box
from tests.test_nnet import chain_model


def _declare(n: int, outputs: int = 2) -> str:
    return "".join(f"(declare-const X_{i} Real)\n" for i in range(n)) + "".join(
        f"(declare-const Y_{j} Real)\n" for j in range(outputs)
    )


def _num(v: float, style: int) -> str:
    if style == 1 and v < 0:
        return f"(- {-v!r})"
    return repr(v)


def _write(lo: np.ndarray, hi: np.ndarray, style: int) -> str:
    lines = []
    for i, (a, b) in enumerate(zip(lo.tolist(), hi.tolist(), strict=True)):
        if style == 0:
            lines += [f"(assert (>= X_{i} {_num(a, style)}))", f"(assert (<= X_{i} {b!r}))"]
        elif style == 1:
            lines += [f"(assert (<= {_num(a, style)} X_{i}))", f"(assert (>= {b!r} X_{i}))"]
        else:
            lines.append(f"(>= X_{i} {a!r}) (<= X_{i} {b!r})")
    if style == 2:
        lines = ["(assert (and " + " ".join(lines) + "))"]
    return "\n".join(lines)


@given(
    lo=st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=12),
    width=st.floats(0, 10),
    style=st.integers(0, 2),
)
def test_box_round_trip(lo, width, style):
    lo = np.array(lo)
    hi = lo + width
    text = "; a comment (with a paren\n" + _declare(lo.size) + _write(lo, hi, style)
    text += "\n(assert (or (and (>= Y_0 Y_1)) (and (<= Y_1 0.5))))\n"
    box = parse_input_box(text, lo.size)
    assert np.array_equal(box.lo, lo) and np.array_equal(box.hi, hi)
    assert box.disjuncts == 1 and box.note is None


def test_disjuncts_give_the_hull(tmp_path):
    text = _declare(2) + (
        "(assert (or (and (>= X_0 0) (<= X_0 1) (>= X_1 0) (<= X_1 1) (<= Y_0 Y_1))\n"
        "            (and (>= X_0 2) (<= X_0 3) (>= X_1 -1) (<= X_1 0.5) (<= Y_0 Y_1))))\n"
    )
    path = tmp_path / "p.vnnlib"
    path.write_text(text)
    box = read_input_box(path, 2)
    assert box.lo.tolist() == [0, -1] and box.hi.tolist() == [3, 1]
    assert box.disjuncts == 2 and "hull" in box.note and box.source == str(path)


def test_equality_and_strict_bounds():
    box = parse_input_box(_declare(2) + "(assert (= X_0 0.25))(assert (< X_1 2))(assert (> X_1 1))")
    assert box.lo.tolist() == [0.25, 1] and box.hi.tolist() == [0.25, 2]


@pytest.mark.parametrize(
    "text, size, says",
    [
        (_declare(3) + "(assert (<= X_0 1))(assert (>= X_0 0))", 3, "X_1, X_2"),
        (_declare(1) + "(assert (<= X_0 Y_0))", 1, "relates two variables"),
        (_declare(2) + "(assert (<= X_0 1))", 3, "declares 2 inputs"),
        (_declare(1) + "(assert (<= X_0 1)", 1, "unclosed"),
        (_declare(1) + "(assert (<= X_0 1)))", 1, "unmatched"),
        (_declare(1) + "(assert (<= X_0 0))(assert (>= X_0 1))", 1, "unsatisfiable"),
        (_declare(1) + "(assert (<= X_0 one))(assert (>= X_0 0))", 1, "not a number"),
        ("(declare-const Y_0 Real)(assert (<= Y_0 1))", None, "declares no input"),
    ],
    ids=["missing", "two-vars", "size", "unclosed", "unmatched", "empty", "nan", "no-input"],
)
def test_errors_name_the_problem(text, size, says):
    with pytest.raises(VnnlibError, match=says):
        parse_input_box(text, size)


def test_unreadable_file(tmp_path):
    with pytest.raises(VnnlibError, match="cannot read"):
        read_input_box(tmp_path / "missing.vnnlib")


def test_random_inputs_stay_in_the_box():
    model = chain_model([6, 4, 2], in_shape=(1, 2, 3))
    rng = np.random.default_rng(0)
    lo = rng.uniform(-5, 5, 6)
    hi = lo + rng.uniform(0, 1e-3, 6)
    hi[2] = lo[2]  # a degenerate (fixed) element
    for seed in range(5):
        x = random_inputs(model, seed=seed, input_box=(lo, hi))["x"]
        assert x.shape == (1, 2, 3) and x.dtype == np.float32
        flat = x.reshape(-1).astype(np.float64)
        tol = np.spacing(np.abs(lo).astype(np.float32)).astype(np.float64)  # float32 rounding
        assert np.all(flat >= lo - tol) and np.all(flat <= hi + tol)
    with pytest.raises(Exception, match="5 bounds"):
        random_inputs(model, input_box=(lo[:5], hi[:5]))
