"""onnx_lower: lower ONNX CNNs to networks of MatMul, Add and Relu.

Library use::

    import onnx_lower
    lowered, report = onnx_lower.lower("model.onnx", form="mlp")
    check = onnx_lower.validate("model.onnx", lowered)

Command line: ``python -m onnx_lower IN.onnx OUT.onnx --validate``.
"""

from .errors import (
    BudgetExceededError,
    DynamicShapeError,
    InvalidModelError,
    LoweringError,
    OutputPathError,
    PassVerificationError,
    UnsupportedOpError,
)
from .pass_manager import (
    GraphPass,
    LoweringModel,
    Options,
    Pass,
    PassManager,
    PassResult,
    register_pass,
)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "lower",
    "plan",
    "validate",
    "benchmark",
    "load_model",
    "save_model",
    "Pass",
    "GraphPass",
    "PassManager",
    "PassResult",
    "LoweringModel",
    "Options",
    "register_pass",
    "LoweringError",
    "InvalidModelError",
    "OutputPathError",
    "UnsupportedOpError",
    "BudgetExceededError",
    "DynamicShapeError",
    "PassVerificationError",
]

from .api import lower, plan  # noqa: E402
from .benchmark import benchmark  # noqa: E402
from .model_io import load_model, save_model  # noqa: E402
from .validate import validate  # noqa: E402
