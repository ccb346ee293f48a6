"""Sliding windows over N-d grids: the index arithmetic shared by every conv and pool.

For one spatial axis of extent ``n`` with kernel ``k``, stride ``s``, dilation ``d`` and pads
``(b, e)`` the dilated kernel spans ``dk = (k - 1)·d + 1`` positions and

    out = floor((n + b + e - dk) / s) + 1                          (ceil_mode = 0)
    out = ceil((n + b + e - dk) / s) + 1, minus one if the last
          window would start past the padded input, i.e. if
          (out - 1)·s >= n + b                                      (ceil_mode = 1)

Window ``o``, tap ``t`` reads input position ``p = o·s - b + t·d``. Positions outside ``[0, n)``
are padding. For several axes the windows are the Cartesian product of the per-axis ones, and the
flat (C-order) input index of a tap is ``Σ_i p_i · stride_i``.

``auto_pad`` follows the ONNX spec (https://onnx.ai/onnx/operators/onnx__Conv.html#attributes):
SAME_UPPER/SAME_LOWER pad so that ``out = ceil(n / s)``; the odd pad goes at the end for
SAME_UPPER and at the beginning for SAME_LOWER. VALID means no padding.

Everything here is vectorised numpy; no Python loop runs over output positions or taps.

:func:`window_attributes` is the one validated reader of a conv/pool node's window attributes
(kernel_shape, strides, dilations, pads, auto_pad, group, ceil_mode, count_include_pad), with
the spec's defaults. It refuses, naming the node and the attribute, what the spec does not
allow: a list of the wrong length, a kernel, stride or dilation below 1, a negative pad, an
unknown auto_pad, a flag outside {0, 1}, a group below 1 or not dividing the channels, a
(dilated) kernel longer than the padded input, and windows × taps beyond
:data:`MAX_WINDOW_TAPS` (pads of 10⁶ are legal ONNX, but their index tables are not
computable). Every lowering reads the attributes through it (``explicit-pads`` in the
canonical pipeline of every form, and ``lower-conv``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from .errors import InvalidAttributeError, InvalidModelError

__all__ = [
    "Windows",
    "WindowAttributes",
    "window_attributes",
    "sliding_windows",
    "resolve_pads",
    "output_extent",
    "MAX_WINDOW_TAPS",
]

#: Most (output position, tap) pairs one conv/pool may have per channel: its index tables are
#: int64 arrays of that many entries (2³¹ of them are 16 GB).
MAX_WINDOW_TAPS = 2**31
_AUTO_PADS = ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID")


def output_extent(n: int, k: int, s: int, d: int, b: int, e: int, ceil_mode: bool = False) -> int:
    """Number of windows along one axis (see the module docstring)."""
    dk = (k - 1) * d + 1
    span = n + b + e - dk
    if span < 0:
        return 0
    if not ceil_mode:
        return span // s + 1
    out = -(-span // s) + 1
    if (out - 1) * s >= n + b:
        out -= 1
    return out


def resolve_pads(
    in_shape: Sequence[int],
    kernel: Sequence[int],
    strides: Sequence[int] | None = None,
    dilations: Sequence[int] | None = None,
    pads: Sequence[int] | None = None,
    auto_pad: str | bytes = "NOTSET",
    *,
    negative_same: bool = False,
) -> tuple[int, ...]:
    """Explicit ``pads`` (all begins, then all ends) for an ONNX conv/pool node.

    ``auto_pad`` of SAME_UPPER / SAME_LOWER / VALID overrides ``pads`` as the ONNX spec says.
    Missing ``pads`` default to zeros, missing strides and dilations to ones.

    When the kernel is shorter than the stride, the SAME total pad
    ``(ceil(n/s) - 1)·s + dk - n`` can be negative. onnxruntime's Conv clamps it at 0 (the
    default here); its AveragePool takes the spec formula literally (``negative_same=True``):
    negative pads, i.e. windows shifted into the input, split by truncation toward zero
    (begin ``trunc(total/2)`` for SAME_UPPER, ``trunc((total+1)/2)`` for SAME_LOWER).
    """
    r = len(kernel)
    strides = tuple(strides or (1,) * r)
    dilations = tuple(dilations or (1,) * r)
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    auto_pad = auto_pad or "NOTSET"
    if auto_pad == "VALID":
        return (0,) * (2 * r)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begins, ends = [], []
        for n, k, s, d in zip(in_shape, kernel, strides, dilations):
            out = -(-n // s)
            total = (out - 1) * s + (k - 1) * d + 1 - n
            if not negative_same:
                total = max(0, total)
            b = int((total if auto_pad == "SAME_UPPER" else total + 1) / 2)  # toward zero
            begins.append(b)
            ends.append(total - b)
        return tuple(begins + ends)
    if auto_pad != "NOTSET":
        raise ValueError(f"unknown auto_pad {auto_pad!r}")
    return tuple(pads) if pads is not None and len(pads) else (0,) * (2 * r)


@dataclasses.dataclass(frozen=True)
class Windows:
    """The windows of one conv/pool over a spatial grid.

    Attributes:
        in_shape: spatial input extent.
        out_shape: spatial output extent (number of windows per axis).
        kernel: taps per axis.
        positions: per axis, an int array ``(out_i, k_i)`` of the (unpadded) input coordinate each
            tap reads; it may lie outside ``[0, in_i)`` where the tap is padding.
        taps: int64 array ``(S_out, K)``: the flat input index of each tap, ``-1`` for padding.
            Rows follow C-order over ``out_shape``, columns C-order over ``kernel``.
    """

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    kernel: tuple[int, ...]
    positions: tuple[np.ndarray, ...]
    taps: np.ndarray

    @property
    def valid(self) -> np.ndarray:
        """Boolean ``(S_out, K)``: the tap reads a real input element."""
        return self.taps >= 0

    @property
    def in_size(self) -> int:
        return math.prod(self.in_shape)

    @property
    def out_size(self) -> int:
        return math.prod(self.out_shape)

    def axis_product(self, per_axis: Sequence[np.ndarray]) -> np.ndarray:
        """Combine per-axis ``(out_i, k_i)`` arrays into ``(S_out, K)`` by multiplication.

        Useful for masks (``&`` on booleans) and separable divisors.
        """
        return _outer(per_axis, np.multiply).reshape(self.out_size, -1)


def _outer(per_axis: Sequence[np.ndarray], op) -> np.ndarray:
    """Broadcast per-axis ``(out_i, k_i)`` arrays to ``(out_1..out_r, k_1..k_r)`` and reduce."""
    r = len(per_axis)
    result = None
    for i, a in enumerate(per_axis):
        shape = [1] * (2 * r)
        shape[i], shape[r + i] = a.shape
        a = a.reshape(shape)
        result = a if result is None else op(result, a)
    return result


def sliding_windows(
    in_shape: Sequence[int],
    kernel: Sequence[int],
    strides: Sequence[int] | None = None,
    pads: Sequence[int] | None = None,
    dilations: Sequence[int] | None = None,
    ceil_mode: bool = False,
) -> Windows:
    """All windows of a conv/pool over ``in_shape`` (spatial dims only), for any rank."""
    in_shape, kernel = tuple(int(v) for v in in_shape), tuple(int(v) for v in kernel)
    r = len(kernel)
    if len(in_shape) != r:
        raise ValueError(f"kernel rank {r} does not match spatial rank {len(in_shape)}")
    strides = tuple(strides or (1,) * r)
    dilations = tuple(dilations or (1,) * r)
    pads = tuple(pads) if pads is not None and len(pads) else (0,) * (2 * r)
    out_shape, positions, valid_axes = [], [], []
    for i in range(r):
        n, k, s, d, b, e = in_shape[i], kernel[i], strides[i], dilations[i], pads[i], pads[r + i]
        out = output_extent(n, k, s, d, b, e, ceil_mode)
        pos = np.arange(out, dtype=np.int64)[:, None] * s - b + np.arange(k, dtype=np.int64) * d
        out_shape.append(out)
        positions.append(pos)
        valid_axes.append((pos >= 0) & (pos < n))
    in_strides = np.cumprod((1,) + in_shape[::-1][:-1])[::-1]
    flat = _outer([p * st for p, st in zip(positions, in_strides)], np.add)
    valid = _outer(valid_axes, np.logical_and)
    s_out, k_total = math.prod(out_shape), math.prod(kernel)
    taps = np.where(valid, flat, -1).reshape(s_out, k_total).astype(np.int64, copy=False)
    return Windows(in_shape, tuple(out_shape), kernel, tuple(positions), taps)


@dataclasses.dataclass(frozen=True)
class WindowAttributes:
    """The validated window attributes of one conv/pool node, spec defaults filled in.

    ``pads`` are the node's own (explicit, or zeros); with ``auto_pad`` other than NOTSET the
    caller resolves them with :func:`resolve_pads`.
    """

    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...]
    auto_pad: str
    group: int
    ceil_mode: bool
    count_include_pad: bool


def window_attributes(
    node,
    kernel: Sequence[int] | None = None,
    *,
    spatial: Sequence[int] | None = None,
    channels: int | None = None,
    weight_shape: Sequence[int] | None = None,
    bias_shape: Sequence[int] | None = None,
) -> WindowAttributes:
    """Read and validate ``node``'s window attributes (an onnx-graphsurgeon node).

    ``kernel`` is the kernel shape when the node has no ``kernel_shape`` (a Conv reads it from
    its weight). ``spatial`` (the static spatial input extent), ``channels`` (input channels)
    and ``weight_shape`` enable the checks against the input, ``bias_shape`` the check that a
    Conv/ConvTranspose bias is 1-D of the output channels. Defaults per the spec
    (https://onnx.ai/onnx/operators/onnx__Conv.html,
    https://onnx.ai/onnx/operators/onnx__MaxPool.html): strides and dilations 1, pads 0,
    auto_pad NOTSET, group 1, ceil_mode 0, count_include_pad 0.
    """
    attrs = node.attrs

    def refuse(name: str, problem: str):
        raise InvalidAttributeError(node.name, node.op, name, problem)

    def ints(name: str, length: int | None, default: int | None, low: int):
        value = attrs.get(name)
        if value is None or (isinstance(value, (list, tuple)) and not len(value)):
            if default is None:
                return None
            return (default,) * length
        if not isinstance(value, (list, tuple)):
            refuse(name, f"must be a list of ints, not {value!r}")
        values = tuple(int(v) for v in value)
        if length is not None and len(values) != length:
            refuse(name, f"has {len(values)} values {list(values)}; it needs {length}")
        if values and min(values) < low:
            refuse(name, f"is {list(values)}; every value must be >= {low}")
        return values

    given = ints("kernel_shape", None, None, 1)
    if given is not None and kernel is not None and tuple(int(k) for k in kernel) != given:
        refuse("kernel_shape", f"is {list(given)} but the weight's kernel is {list(kernel)}")
    kernel = given if given is not None else tuple(int(k) for k in kernel or ())
    if not kernel:
        refuse("kernel_shape", "is missing; the spec requires it for this op")
    if min(kernel) < 1:
        refuse("kernel_shape", f"is {list(kernel)}; every value must be >= 1")
    r = len(kernel)
    if spatial is not None and len(spatial) != r:
        refuse("kernel_shape", f"has {r} axes, the input has {len(spatial)} spatial axes")
    strides = ints("strides", r, 1, 1)
    dilations = ints("dilations", r, 1, 1)
    pads = ints("pads", 2 * r, 0, 0)
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode(errors="replace")
    auto_pad = auto_pad or "NOTSET"
    if auto_pad not in _AUTO_PADS:
        refuse("auto_pad", f"is {auto_pad!r}; the spec allows {', '.join(_AUTO_PADS)}")
    flags = {}
    for name in ("ceil_mode", "count_include_pad"):
        value = int(attrs.get(name, 0))
        if value not in (0, 1):
            refuse(name, f"is {value}; the spec allows 0 or 1")
        flags[name] = bool(value)
    group = int(attrs.get("group", 1))
    if group < 1:
        refuse("group", f"is {group}; it must be >= 1")
    if channels is not None and weight_shape is not None and node.op == "Conv":
        m, cg = int(weight_shape[0]), int(weight_shape[1])
        if channels % group or cg * group != channels or m % group:
            refuse(
                "group",
                f"is {group}: the input's {channels} channels must equal the weight's "
                f"{cg} channels per group × group, and the {m} output channels must divide by it",
            )
    if bias_shape is not None and weight_shape is not None:
        m = int(weight_shape[0]) if node.op == "Conv" else int(weight_shape[1]) * group
        if tuple(int(d) for d in bias_shape) != (m,):
            raise InvalidModelError(
                f"node '{node.name}' ({node.op}): its bias B has shape {list(bias_shape)}; the "
                f"spec wants one value per output channel, shape [{m}]. Fix the model at its "
                f"source"
            )
    if spatial is not None and node.op != "ConvTranspose":
        spatial = tuple(int(n) for n in spatial)
        full = resolve_pads(spatial, kernel, strides, dilations, pads, auto_pad)
        taps = math.prod(kernel)
        windows = 1
        for i, n in enumerate(spatial):
            span = n + full[i] + full[r + i]
            dk = (kernel[i] - 1) * dilations[i] + 1
            if dk > span:
                refuse(
                    "kernel_shape",
                    f"spans {dk} positions on spatial axis {i} (kernel {kernel[i]}, dilation "
                    f"{dilations[i]}), more than the padded input's {span}",
                )
            windows *= (span - dk) // strides[i] + 2
        if windows * taps > MAX_WINDOW_TAPS:
            refuse(
                "pads",
                f"{list(full)} with strides {list(strides)} give about {windows:,} windows of "
                f"{taps} taps, over the {MAX_WINDOW_TAPS:,} onnx_lower can index",
            )
    return WindowAttributes(
        kernel, strides, dilations, pads, auto_pad, group,
        flags["ceil_mode"], flags["count_include_pad"],
    )
