"""``--target NAME``: keep what a verifier reads, rewrite the rest (issue 15).

One pass per profile of :data:`onnx_lower.targets.PROFILES` (``target-marabou``,
``target-nnenum``, ...). Each round it checks every node against the profile's table; a node
that breaks its rule is handed to the rewrites of its op (:data:`REWRITES`, tried in order, each
exact and structure-keeping), and the rounds repeat until nothing changes (a rewrite may make
nodes that need another, e.g. Div → Mul → per-channel BatchNormalization). Every rewrite is
noted for the report (``target``: node, the rule it broke, what it became). A node no rewrite
brings inside the profile is handed back (:class:`~onnx_lower.errors.TargetUnsupportedError`
carries the rewritten model): :func:`onnx_lower.api.lower` lowers the smallest region holding it,
the node alone, to the mlp form and stitches it back (:mod:`onnx_lower.regions`); a node the mlp
form cannot express either is refused by name with its rule.

=============  ===============================================================================
pads           Pad folded into the next Conv / AveragePool, else an identity 1×1 Conv with pads;
               padded / ceil_mode MaxPool over a nonnegative input as an unpadded MaxPool of a
               zero-padded input
maxpool        MaxPool as depthwise Conv + Relu tournament levels (readers without MaxPool)
pools          AveragePool / GlobalAveragePool as Conv with fixed weights
batch          a static batch > 1 split into per-sample nodes (readers of sample 0 only)
conv           1-D Conv as 2-D; grouped Conv ungrouped; dilated kernel zero-filled
elementwise    Div/Sub by constants as Mul/Add; per-channel Mul as BatchNormalization;
               Squeeze/Unsqueeze as Reshape; BatchNormalization's epsilon written out, or it
               folded or per-channel Mul + Add
=============  ===============================================================================
"""

from __future__ import annotations

from typing import ClassVar

from onnx_lower import graph as g
from onnx_lower.errors import TargetUnsupportedError
from onnx_lower.pass_manager import LoweringModel, Pass, PassResult, register_pass
from onnx_lower.targets import PROFILES, get_profile, violations

from . import batch, conv, elementwise, maxpool, pads, pools
from .common import Context, Rewrite

__all__ = ["REWRITES", "TargetRewritePass", "rewrite_for"]

REWRITES: dict[str, tuple[Rewrite, ...]] = {
    "Pad": (pads.fold_pad, pads.pad_as_conv),
    "MaxPool": (pads.maxpool_zero_pad, maxpool.maxpool_as_relu_layers, batch.split_batch),
    "AveragePool": (pools.avgpool_as_conv,),
    "GlobalAveragePool": (pools.avgpool_as_conv,),
    "Conv": (conv.conv_as_2d, conv.conv_ungroup, conv.conv_undilate, batch.split_batch),
    "Div": (elementwise.div_as_mul,),
    "Sub": (elementwise.sub_as_add,),
    "Mul": (elementwise.mul_as_batchnorm,),
    "Squeeze": (elementwise.shape_as_reshape,),
    "Unsqueeze": (elementwise.shape_as_reshape,),
    "Reshape": (elementwise.shape_as_reshape,),
    "BatchNormalization": (elementwise.batchnorm_epsilon, batch.split_batch,
                           elementwise.batchnorm_as_affine),
}
MAX_ROUNDS = 10


class TargetRewritePass(Pass):
    """Rewrite every node the target profile does not read into one it reads."""

    profile: ClassVar[str] = ""

    def run(self, model: LoweringModel) -> PassResult:
        profile = get_profile(self.profile)
        graph = model.graph
        ctx = Context(profile, g.Namer(graph), model.opset)
        modified = False
        for _ in range(MAX_ROUNDS):
            changed = False
            for node in list(graph.nodes):
                if not node.outputs:
                    continue  # replaced earlier in this round
                reason = profile.check(node)
                if reason is None:
                    continue
                name, op = node.name, node.op
                for rewrite in REWRITES.get(op, ()):
                    became = rewrite(node, graph, ctx)
                    if became:
                        model.note("target", {"node": name, "op": op, "rule": reason,
                                              "became": became})
                        changed = True
                        break
            if not changed:
                break
            graph.cleanup().toposort()
            modified = True
        left = violations(graph, profile)
        if left:
            error = TargetUnsupportedError(profile.name, [(v.node, v.op, v.reason) for v in left])
            error.partial = model.to_proto()  # for the mlp fallback of onnx_lower.api
            error.notes = list(model.notes.get("target", []))
            raise error
        return PassResult(modified)


def rewrite_for(name: str) -> str:
    """The registered pass name of profile ``name``."""
    return f"target-{name}"


for _name, _profile in PROFILES.items():
    if _profile.form is None:
        register_pass(rewrite_for(_name))(
            type(f"Target{_name.title()}Pass", (TargetRewritePass,), {
                "profile": _name,
                "__doc__": f"Rewrite what {_profile.reader} does not read (--target {_name}).",
            })
        )
