"""What the tracer knows about torch ops, and the values it propagates.

Tables of ops by kind (element-wise, binary, reshape, reduce, pool, conv, norm modules), the
channel layout of a value (:class:`_Layout`), the union-find over channel groups
(:class:`_Groups`), and shape helpers. Used by :mod:`qapfuse.fusion._analyser`.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .errors import UnsupportedOpError

F = torch.nn.functional


def _fns(*candidates: Any) -> frozenset:
    return frozenset(c for c in candidates if c is not None)


def _f(name: str) -> Any:
    return getattr(F, name, None)


# Ops that act on each entry alone (or, like softmax, are permutation-equivariant on any axis).
_UNARY_FUNCS = _fns(
    *(_f(n) for n in (
        "relu", "relu_", "relu6", "gelu", "silu", "elu", "selu", "celu", "leaky_relu",
        "hardtanh", "hardswish", "hardsigmoid", "mish", "softplus", "sigmoid", "tanh",
        "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "softmax",
        "log_softmax",
    )),
    torch.relu, torch.relu_, torch.sigmoid, torch.tanh, torch.softmax, torch.log_softmax,
    torch.exp, torch.abs, torch.neg, torch.clamp, torch.clip, torch.sqrt, torch.square,
    operator.neg, operator.pos,
)  # fmt: skip
_UNARY_METHODS = frozenset(
    {
        "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "abs", "neg", "clamp",
        "clamp_", "clip", "contiguous", "clone", "detach", "float", "double", "half",
        "bfloat16", "to", "type", "softmax", "log_softmax", "sqrt", "square", "cpu", "cuda",
    }
)  # fmt: skip
_BINARY_FUNCS = _fns(
    operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
    operator.truediv, operator.itruediv, operator.pow, torch.add, torch.sub, torch.mul,
    torch.div, torch.true_divide, torch.maximum, torch.minimum, torch.pow,
)  # fmt: skip
_BINARY_METHODS = frozenset(
    {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "pow", "maximum", "minimum"}
)
_RESHAPE_FUNCS = _fns(torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze)
_RESHAPE_METHODS = frozenset(
    {"view", "reshape", "flatten", "squeeze", "unsqueeze", "view_as", "reshape_as"}
)
_REDUCE_FUNCS = _fns(torch.mean, torch.sum, torch.amax, torch.amin)
_REDUCE_METHODS = frozenset({"mean", "sum", "amax", "amin"})
_POOL_FUNCS = _fns(
    *(_f(n) for n in (
        "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
        "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
        "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d", "lp_pool1d",
        "lp_pool2d", "interpolate",
    )),
)  # fmt: skip
_CONV_FUNCS = {_f("conv1d"): 1, _f("conv2d"): 2, _f("conv3d"): 3}

nn = torch.nn
_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Softmax,
    nn.LogSoftmax,
)  # fmt: skip
_POOL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d, nn.Upsample,
)  # fmt: skip
_CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BATCH_NORM_NDIMS = {nn.BatchNorm1d: (2, 3), nn.BatchNorm2d: (4,), nn.BatchNorm3d: (5,)}
_CHANNEL_NORM_MODULES = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d, nn.InstanceNorm2d,
    nn.InstanceNorm3d, nn.SyncBatchNorm,
)  # fmt: skip


@dataclass(frozen=True)
class _Layout:
    """A tensor whose axis `dim` is made of the segments ``(group id, block)``."""

    dim: int
    segs: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class _Param:
    """A tensor read straight from the state dict (``get_attr``)."""

    key: str


_OPAQUE = "opaque"  # a tensor with no permuted axis (made from fixed inputs or constants)


class _Groups:
    """Union-find over channel groups with sizes, names and a fixed flag."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.fixed: list[bool] = []
        self.name: list[str] = []
        self.is_input: list[bool] = []

    def new(self, name: str, size: int, *, fixed: bool = False, is_input: bool = False) -> int:
        self.parent.append(len(self.parent))
        self.size.append(int(size))
        self.fixed.append(fixed)
        self.name.append(name)
        self.is_input.append(is_input)
        return len(self.parent) - 1

    def find(self, g: int) -> int:
        root = g
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[g] != root:
            self.parent[g], g = root, self.parent[g]
        return root

    def union(self, a: int, b: int, node: str, op: str) -> int:
        a, b = self.find(a), self.find(b)
        if a == b:
            return a
        if self.size[a] != self.size[b]:
            raise UnsupportedOpError(
                node,
                op,
                f"it joins a group of {self.size[a]} channels ({self.name[a]!r}) with "
                f"one of {self.size[b]} channels ({self.name[b]!r})",
            )
        lo, hi = min(a, b), max(a, b)
        self.parent[hi] = lo
        self.fixed[lo] = self.fixed[lo] or self.fixed[hi]
        self.is_input[lo] = self.is_input[lo] or self.is_input[hi]
        return lo

    def fix(self, g: int) -> None:
        self.fixed[self.find(g)] = True

    def is_fixed(self, g: int) -> bool:
        return self.fixed[self.find(g)]


def _has_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (tuple, list)):
        return any(_has_tensor(v) for v in value)
    if isinstance(value, dict):
        return any(_has_tensor(v) for v in value.values())
    return False


def _op_name(n: torch.fx.Node, module: torch.nn.Module | None = None) -> str:
    if n.op == "call_module":
        return f"call_module {n.target} ({type(module).__name__})"
    if n.op == "call_method":
        return f"call_method .{n.target}()"
    target = n.target
    name = getattr(target, "__name__", None)
    if name is not None:
        for prefix, namespace in (("torch.nn.functional.", F), ("torch.", torch),
                                  ("operator.", operator)):  # fmt: skip
            if getattr(namespace, name, None) is target:
                return f"call_function {prefix}{name}"
        mod = getattr(target, "__module__", None)
        return f"call_function {mod + '.' if mod else ''}{name}"
    return f"call_function {target!r}"


def _ntuple(value: Any, k: int) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * k


def _conv_out_shape(
    x: Any, w_shape: Sequence[int], stride: Any, padding: Any, dilation: Any, groups: int
) -> tuple[int, ...] | None:
    """Output shape of a batched zero-padded convolution, or None where unsure (run it)."""
    k = len(w_shape) - 2
    if not isinstance(x, torch.Tensor) or x.ndim != k + 2 or x.shape[1] != w_shape[1] * groups:
        return None  # unbatched input or a mismatch: let torch run it (and raise)
    if padding == "same":  # torch allows it with stride 1 only
        return None if any(s != 1 for s in stride) else (x.shape[0], w_shape[0], *x.shape[2:])
    if padding == "valid":
        padding = (0,) * k
    if isinstance(padding, str) or len(padding) != k or len(stride) != k or len(dilation) != k:
        return None
    out = []
    for size, kk, s, p, d in zip(x.shape[2:], w_shape[2:], stride, padding, dilation):
        n = (size + 2 * p - d * (kk - 1) - 1) // s + 1
        if n < 1:
            return None
        out.append(n)
    return (x.shape[0], w_shape[0], *out)
