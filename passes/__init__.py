"""The rewrites of onnx_lower, one module per family; importing the package registers them.

=============  ==========================================================================
canonicalize   shapes, constants, Identity/Dropout, explicit pads, DCE, toposort, names
conv           Conv / ConvTranspose → Affine
pool           MaxPool → ReLU levels (plans in pool_max); AveragePool, global pools → Affine
linear         BatchNorm, Gemm, MatMul, elementwise-with-constant, data movement → Affine
activations    LeakyRelu, PRelu, Clip, Abs, Max/Min → Relu + Affine; the mlp form check
fold           cost-aware folding of Affine chains
emit           Affine → MatMul/Add on flat vectors; Reshape/Flatten round trips removed
im2col/        conv/pool → Gather + MatMul on channels-last activations (a package: layout,
               conv, grouped, pools, elementwise, cost, fold, lowering)
layered        the folded Affine/Relu DAG → a strict (MatMul, Add, Relu)* chain
targets/       --target VERIFIER: rewrite only what that verifier's reader cannot read
=============  ==========================================================================
"""

from . import activations, canonicalize, conv, emit, fold, im2col, layered, linear, pool, targets

__all__ = [
    "activations", "canonicalize", "conv", "emit", "fold", "im2col", "layered", "linear", "pool",
    "targets",
]
