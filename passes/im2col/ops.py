"""The op sets of the im2col form: what it emits, keeps, removes and refuses.

After ``lower-im2col`` no Conv, ConvTranspose, MaxPool, AveragePool, GlobalAveragePool,
GlobalMaxPool or BatchNormalization is left (:data:`LOWERED_OPS`); every contraction is a MatMul,
and the only other ops are :data:`ALLOWED_OPS` plus the elementwise ops the model already had
(:data:`ELEMENTWISE_UNARY`, :data:`ELEMENTWISE_BINARY`), which run unchanged on channels-last
tensors.
"""

from __future__ import annotations

__all__ = ["FORM", "ALLOWED_OPS", "ELEMENTWISE_UNARY", "ELEMENTWISE_BINARY", "LOWERED_OPS",
           "REFUSED", "SINKABLE"]

FORM = "im2col"

#: Ops the im2col form emits (besides the elementwise ops it keeps from the input model).
ALLOWED_OPS = frozenset(
    {"MatMul", "Add", "Sub", "Mul", "Relu", "Gather", "Reshape", "Transpose", "Concat", "Slice",
     "Pad", "ReduceSum", "Flatten", "Split"}
)
#: Layout-agnostic unary ops: they run unchanged on channels-last tensors.
ELEMENTWISE_UNARY = frozenset(
    {"Relu", "Clip", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Elu", "Selu",
     "Celu", "Softplus", "Softsign", "Abs", "Neg", "Exp", "Log", "Sqrt", "Reciprocal", "Erf",
     "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "Gelu", "Mish", "ThresholdedRelu", "Cast",
     "Identity", "Dropout", "IsNaN", "IsInf", "Not"}
)
#: Elementwise binary (and variadic) ops with numpy broadcasting.
ELEMENTWISE_BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Max", "Min", "Pow", "PRelu", "Sum"})
#: Ops this pass removes.
LOWERED_OPS = frozenset(
    {"Conv", "ConvTranspose", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool",
     "BatchNormalization"}
)
REFUSED = frozenset({"LpPool", "GlobalLpPool", "MaxRoiPool", "MaxUnpool", "ConvInteger",
                      "QLinearConv", "DeformConv"})
#: Unary ops a chunked conv applies per chunk when they are its only consumer.
SINKABLE = frozenset({"Relu", "Clip", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid",
                       "HardSwish", "Elu", "Selu", "Celu", "Softplus", "Softsign"})
