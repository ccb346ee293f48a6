"""Named pipelines: ordered lists of registered pass names.

=========  ==================================================================================
mlp        canonicalise, lower every op to Affine/Relu, fold, emit MatMul/Add, flatten regions
layered    the mlp lowering up to fold-linear, then ``layer-chain``: a strict
           (MatMul, Add, Relu)* chain with carries, no skips (:mod:`onnx_lower.passes.layered`)
im2col     canonicalise, rewrite conv/pool as Gather + MatMul on channels-last activations
fold-only  canonicalise, turn the dense linear ops (Gemm, MatMul, BN, ...) into Affine, fold,
           emit; Conv and pools stay as they are
target     ``--target NAME``: canonicalise, then ``target-NAME`` rewrites only the nodes that
           verifier's reader cannot read (:mod:`onnx_lower.targets`); ``nnet`` = the layered form
auto       per region (:mod:`onnx_lower.regions`): mlp when its emitted weights fit what is
           left of ``--max-weight-mb``, else im2col (see :func:`onnx_lower.api.lower`)
=========  ==================================================================================

This module names passes only; the ``passes`` package registers them and is imported here
lazily, at the entry point, so the dependency runs one way (passes → onnx_lower).
"""

from __future__ import annotations

from .errors import LoweringError
from .pass_manager import PassManager

__all__ = [
    "PIPELINES", "FORMS", "CANONICALIZE", "build_pipeline", "load_passes", "target_pipeline"
]

CANONICALIZE = (
    "resolve-shapes",
    "fold-constants",
    "remove-identity",
    "explicit-pads",
    "dce",
    "toposort",
    "name-nodes",
)
_FINISH = ("dce", "toposort", "name-nodes")

#: The mlp lowering up to the folded Affine/Relu graph: the mlp form emits it, the layered form
#: chains it.
_AFFINE = (
    *CANONICALIZE,
    "sink-activation-below-maxpool",
    "lower-conv",
    "lower-pool",
    "lower-linear",
    "lower-activations",
    "check-mlp",
    "fold-linear",
)

PIPELINES: dict[str, tuple[str, ...]] = {
    "mlp": (
        *_AFFINE,
        "emit-affine",
        "flatten-regions",
        *_FINISH,
    ),
    "layered": (
        *_AFFINE,
        "layer-chain",
        *_FINISH,
    ),
    "im2col": (*CANONICALIZE, "lower-im2col", *_FINISH),
    "fold-only": (
        *CANONICALIZE,
        "lower-linear",
        "fold-linear",
        "emit-affine",
        "flatten-regions",
        *_FINISH,
    ),
}
FORMS = ("auto", "mlp", "layered", "im2col", "fold-only")


def load_passes() -> None:
    """Import the ``passes`` package so every pass is registered."""
    import onnx_lower.passes  # noqa: F401


def build_pipeline(form: str | None = None, passes: list[str] | None = None) -> PassManager:
    """The PassManager of a named preset, or of a custom list of pass names."""
    load_passes()
    if passes:
        return PassManager(list(passes), name="custom")
    if form not in PIPELINES:
        raise LoweringError(f"unknown form '{form}'; choose one of {', '.join(FORMS)}")
    return PassManager(list(PIPELINES[form]), name=form)


def target_pipeline(target: str) -> tuple[str | None, list[str] | None]:
    """``(form, passes)`` for ``--target``: a profile that is a form maps to that form."""
    from .targets import get_profile

    profile = get_profile(target)
    if profile.form is not None:
        return profile.form, None
    return None, [*CANONICALIZE, f"target-{target}", *_FINISH]
