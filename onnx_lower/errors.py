"""Errors a user of onnx_lower can meet.

Every failure a user can cause is a :class:`LoweringError` subclass with an actionable message.
The CLI prints ``error: <message>`` and exits with :attr:`LoweringError.exit_code` (2 for bad
input or unsupported models); only ``-v`` shows a traceback.
"""

from __future__ import annotations

__all__ = [
    "LoweringError",
    "InvalidModelError",
    "OutputPathError",
    "UnsupportedOpError",
    "BudgetExceededError",
    "DynamicShapeError",
    "PassVerificationError",
    "InvalidAttributeError",
    "OutputGateError",
    "LoweredRunError",
    "TargetUnsupportedError",
]


class LoweringError(Exception):
    """Base class of every error onnx_lower raises on purpose."""

    exit_code: int = 2
    _fact: str | None = None

    @property
    def fact(self) -> str:
        """What went wrong, without the advice on what to do: for reports of a choice already
        made (``--form auto`` naming why a region did not get the mlp form)."""
        return self._fact or str(self)


class InvalidModelError(LoweringError):
    """The input is missing, unreadable, not ONNX, or fails the ONNX checker."""


class OutputPathError(LoweringError):
    """The output path cannot be written (same as the input, missing folder, ...)."""


class UnsupportedOpError(LoweringError):
    """A node cannot be expressed in the requested form."""

    def __init__(self, node_name: str, op_type: str, form: str, reason: str = "", hint: str = ""):
        self.node_name, self.op_type, self.form = node_name, op_type, form
        msg = f"node '{node_name}' ({op_type}) cannot be lowered to the {form} form"
        if reason:
            msg += f": {reason}"
        self._fact = msg
        if hint:
            msg += f". {hint}"
        super().__init__(msg)


class BudgetExceededError(LoweringError):
    """The emitted weights would exceed ``--max-weight-mb``."""

    def __init__(
        self, layer: str, needed_bytes: int, budget_bytes: int, total_bytes: int | None = None
    ):
        self.layer, self.needed_bytes, self.budget_bytes = layer, needed_bytes, budget_bytes
        self.total_bytes = total_bytes
        total = f"; all layers together need {_mb(total_bytes)}" if total_bytes else ""
        self._fact = (
            f"layer '{layer}' needs {_mb(needed_bytes)} of dense weights{total}, over the "
            f"budget of {_mb(budget_bytes)}"
        )
        super().__init__(
            f"{self._fact}. Raise --max-weight-mb, or use --form im2col (or --form auto) to keep "
            f"large layers as Gather+MatMul"
        )


def _mb(n: int) -> str:
    """Bytes as MB, legible for small budgets too: 1,024.0 MB, 0.01 MB."""
    mb = n / (1024 * 1024)
    return f"{mb:,.1f} MB" if mb >= 1 else f"{mb:.3g} MB"


class DynamicShapeError(LoweringError):
    """A non-batch dimension is not static."""

    def __init__(self, tensor: str, axis: int, dim: object, form: str = "mlp"):
        self.tensor, self.axis, self.dim = tensor, axis, dim
        super().__init__(
            f"tensor '{tensor}' has a dynamic dimension {axis} ({dim!r}); the {form} form needs "
            f"every dimension but the batch (axis 0) to be static. Fix it with `python -m "
            f"onnxruntime.tools.make_dynamic_shape_fixed --dim_param {dim} --dim_value N` or "
            f"re-export the model with a static shape"
        )


class PassVerificationError(LoweringError):
    """``verify_each`` found the model broken after a pass: a bug in that pass."""

    exit_code = 3

    def __init__(self, pass_name: str, detail: str):
        self.pass_name = pass_name
        super().__init__(f"the model is invalid after pass '{pass_name}': {detail}")


class InvalidAttributeError(InvalidModelError):
    """A node's attribute lies outside what the ONNX spec allows for it."""

    def __init__(self, node_name: str, op_type: str, attribute: str, problem: str):
        self.node_name, self.op_type, self.attribute = node_name, op_type, attribute
        super().__init__(
            f"node '{node_name}' ({op_type}): attribute '{attribute}' {problem}. The model is "
            f"invalid; fix the attribute at its source (see "
            f"https://onnx.ai/onnx/operators/onnx__{op_type}.html)"
        )


class OutputGateError(LoweringError):
    """The lowered model fails the checker or onnxruntime's load: a bug in onnx_lower."""

    exit_code = 3

    def __init__(self, detail: str):
        super().__init__(
            f"the lowered model fails the output gate ({detail}); nothing was written. This is "
            f"a bug in onnx_lower: rerun with -v and report it"
        )


class LoweredRunError(LoweringError):
    """The lowered model loads but onnxruntime fails to run it where the original runs: a bug."""

    exit_code = 3

    def __init__(self, detail: str):
        super().__init__(f"{detail}. This is a bug in onnx_lower: rerun with -v and report it")


class TargetUnsupportedError(LoweringError):
    """Nodes that no rewrite brings inside a ``--target`` profile, each with the rule it breaks."""

    def __init__(self, target: str, nodes: list[tuple[str, str, str]]):
        self.target, self.nodes = target, nodes
        listed = "; ".join(f"'{n}' ({op}): {why}" for n, op, why in nodes[:5])
        more = f" (and {len(nodes) - 5} more)" if len(nodes) > 5 else ""
        self._fact = f"{len(nodes)} node(s) cannot be brought inside the {target} profile"
        super().__init__(
            f"{self._fact}: {listed}{more}. No exact rewrite exists for them; lower the model "
            f"with --form mlp, or check --list-targets for what {target} reads"
        )
