"""Permutation specs: which axes of which tensors share one channel permutation.

A *group* is a set of hidden channels (a Linear's out-features, a Conv's out-channels, a whole
residual stream). Permuting a group reorders every tensor axis indexed by those channels: the
producing weight's axis 0 and its bias, normalisation parameters and running statistics, and
the consuming weight's axis 1. A network's function is unchanged when every group is permuted
consistently.

:class:`PermutationSpec` holds that information as one map, ``axes``: for each ``state_dict``
key, one entry per tensor axis. An entry is ``None`` (not a channel axis: a kernel axis, a
depthwise conv's size-1 axis) or a tuple of :class:`Segment` (the axis is the concatenation of
those groups' channels, each channel repeated as a contiguous block of ``block`` entries, e.g.
the ``H*W`` inputs a flattened conv channel feeds into the next Linear). The inverse map
(group -> axes) is derived. :func:`trace` builds a spec from a model with ``torch.fx``; the
tracer lives in :mod:`qapfuse.fusion._trace`.
"""

from __future__ import annotations

import logging
import math
import operator
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

__all__ = [
    "AxisEntry",
    "PermutationSpec",
    "Segment",
    "SpecError",
    "TracingError",
    "UnsupportedOpError",
    "check_same_shapes",
    "trace",
]


class SpecError(ValueError):
    """A permutation spec and a state dict (or permutations) do not agree."""


class TracingError(ValueError):
    """The model could not be traced into a permutation spec (see the message for why)."""


class UnsupportedOpError(ValueError):
    """The traced model contains a permutation-sensitive op that qapfuse does not understand.

    Attributes
    ----------
    node : str
        Name of the ``torch.fx`` node.
    op : str
        The operation (module type, function or method name).
    """

    def __init__(self, node: str, op: str, reason: str) -> None:
        self.node = node
        self.op = op
        super().__init__(
            f"Unsupported op at fx node {node!r} ({op}): {reason}. qapfuse cannot derive a "
            "correct permutation spec for it; write a PermutationSpec by hand (see docs/fusion.md)."
        )


class Segment(NamedTuple):
    """Part of a tensor axis: the channels of `group`, each repeated as `block` consecutive entries.

    An axis of length ``size(group) * block`` indexed by ``c * block + r`` (channel ``c``, offset
    ``r``) is ``Segment(group, block)``. ``block`` is 1 except where a flatten or a channel
    multiplier spreads each channel over several entries.
    """

    group: str
    block: int = 1


AxisEntry = tuple[Segment, ...] | None
"""One axis of one tensor: ``None`` (not permuted) or the segments that make it up, in order."""


def _normalise_entry(entry: Any, key: str, axis: int) -> AxisEntry:
    if entry is None:
        return None
    if isinstance(entry, (str, Segment)):
        entry = (entry,)
    if not isinstance(entry, (tuple, list)) or len(entry) == 0:
        raise TypeError(
            f"The entry for axis {axis} of {key!r} must be None, a group name, a Segment or a "
            f"non-empty tuple of those. Got {entry!r} instead."
        )
    segs = []
    for part in entry:
        if isinstance(part, str):
            part = Segment(part, 1)
        if not isinstance(part, Segment):
            raise TypeError(
                f"The entry for axis {axis} of {key!r} must hold group names or Segments. "
                f"Got {part!r} of type {type(part).__name__} instead."
            )
        if not isinstance(part.group, str) or not part.group:
            raise TypeError(
                f"Group names must be non-empty strings; got {part.group!r} in {key!r}."
            )
        if isinstance(part.block, bool) or not isinstance(part.block, int) or part.block < 1:
            raise ValueError(
                f"The block of Segment {part.group!r} on axis {axis} of {key!r} must be an int "
                f">= 1. Got {part.block!r} instead."
            )
        segs.append(Segment(part.group, int(part.block)))
    return tuple(segs)


@dataclass(frozen=True, eq=True, repr=False, init=False)
class PermutationSpec:
    """Which tensor axes share one channel permutation ("group").

    Parameters
    ----------
    axes : mapping of str to sequence
        For every ``state_dict`` key, one entry per axis of the tensor (``()`` for a 0-d buffer
        such as BatchNorm's ``num_batches_tracked``). An entry is ``None`` (axis not permuted),
        a group name (``"fc1"``), a ``Segment(group, block)``, or a tuple of those for an axis
        that concatenates several groups (after ``torch.cat``). This map is the single source of
        truth; :attr:`perm_to_axes` is derived from it.
    fixed : iterable of str, optional
        Groups that must never be permuted (the network's input and output channels).
    sizes : mapping of str to int, optional
        Number of channels of each group. Left out, it is inferred by :meth:`resolve`.

    Examples
    --------
    A two-layer MLP ``784 -> 64 -> 10``:

    >>> spec = PermutationSpec(
    ...     {"fc1.weight": ("fc1", "input"), "fc1.bias": ("fc1",),
    ...      "fc2.weight": ("output", "fc1"), "fc2.bias": ("output",)},
    ...     fixed={"input", "output"}, sizes={"input": 784, "fc1": 64, "output": 10})
    >>> spec.free_groups
    ('fc1',)
    >>> spec.perm_to_axes["fc1"]
    (('fc1.weight', 0, 1), ('fc1.bias', 0, 1), ('fc2.weight', 1, 1))

    A conv whose 16 channels, of 5x5 maps each, are flattened into a Linear uses
    ``Segment("conv2", 25)`` on that Linear's axis 1.

    Two specs are equal when `axes`, `fixed` and `sizes` agree: call :meth:`resolve` on a
    hand-written spec without sizes before comparing it with a traced one.
    """

    axes: Mapping[str, tuple[AxisEntry, ...]]
    fixed: frozenset[str]
    sizes: Mapping[str, int] | None

    def __init__(
        self,
        axes: Mapping[str, Iterable[Any]],
        *,
        fixed: Iterable[str] = (),
        sizes: Mapping[str, int] | None = None,
    ) -> None:
        if not isinstance(axes, Mapping):
            raise TypeError(
                f"The 'axes' parameter of PermutationSpec must be a mapping from state_dict keys "
                f"to per-axis entries. Got {type(axes).__name__} instead."
            )
        norm: dict[str, tuple[AxisEntry, ...]] = {}
        for key, entries in axes.items():
            if not isinstance(key, str):
                raise TypeError(f"state_dict keys in 'axes' must be str; got {key!r}.")
            if isinstance(entries, (str, Segment)) or not isinstance(entries, Iterable):
                raise TypeError(
                    f"axes[{key!r}] must be a tuple with one entry per tensor axis; "
                    f"got {entries!r}."
                )
            norm[key] = tuple(_normalise_entry(e, key, i) for i, e in enumerate(entries))
        if isinstance(fixed, str):
            fixed = (fixed,)
        fixed = frozenset(fixed)
        groups = _groups_in_order(norm)
        unknown = sorted(fixed - set(groups))
        if unknown:
            raise ValueError(
                f"The 'fixed' parameter of PermutationSpec names groups that no axis uses: "
                f"{unknown}."
            )
        if sizes is not None:
            if not isinstance(sizes, Mapping):
                raise TypeError(f"'sizes' must be a mapping or None; got {type(sizes).__name__}.")
            missing = [g for g in groups if g not in sizes]
            if missing:
                raise ValueError(f"'sizes' lacks the groups {missing}.")
            for g in groups:
                s = sizes[g]
                if isinstance(s, bool) or not isinstance(s, int) or s < 1:
                    raise ValueError(f"sizes[{g!r}] must be an int >= 1; got {s!r}.")
            sizes = {g: int(sizes[g]) for g in groups}
        object.__setattr__(self, "axes", norm)
        object.__setattr__(self, "fixed", fixed)
        object.__setattr__(self, "sizes", sizes)

    # -- derived views -------------------------------------------------------------------------

    @property
    def groups(self) -> tuple[str, ...]:
        """All groups, in order of first appearance in :attr:`axes`."""
        return _groups_in_order(self.axes)

    @property
    def free_groups(self) -> tuple[str, ...]:
        """Groups that may be permuted (all groups but the fixed ones)."""
        return tuple(g for g in self.groups if g not in self.fixed)

    @property
    def perm_to_axes(self) -> dict[str, tuple[tuple[str, int, int], ...]]:
        """For each group, the ``(key, axis, block)`` triples it permutes (derived from `axes`)."""
        out: dict[str, list[tuple[str, int, int]]] = {g: [] for g in self.groups}
        for key, entries in self.axes.items():
            for axis, entry in enumerate(entries):
                for seg in entry or ():
                    out[seg.group].append((key, axis, seg.block))
        return {g: tuple(v) for g, v in out.items()}

    def __hash__(self) -> int:
        return hash((tuple(self.axes), self.fixed))

    def __repr__(self) -> str:
        groups = self.groups
        shown = ", ".join(
            f"{g}({self.sizes[g]})" if self.sizes is not None else g for g in groups[:6]
        )
        more = ", ..." if len(groups) > 6 else ""
        return (
            f"PermutationSpec({len(self.axes)} tensors, {len(groups)} groups "
            f"({len(self.free_groups)} free): {shown}{more})"
        )

    def describe(self) -> str:
        """A readable multi-line listing: one line per tensor, its shape in groups."""
        lines = [repr(self)]
        for key, entries in self.axes.items():
            parts = []
            for e in entries:
                if e is None:
                    parts.append("-")
                else:
                    parts.append(
                        "+".join(s.group if s.block == 1 else f"{s.group}x{s.block}" for s in e)
                    )
            lines.append(f"  {key}: ({', '.join(parts)})")
        return "\n".join(lines)

    # -- checks against a state dict -----------------------------------------------------------

    def resolve(self, state_dict: Mapping[str, Any]) -> PermutationSpec:
        """Return a copy with group sizes inferred from (and checked against) `state_dict`.

        Raises
        ------
        SpecError
            If a key is not covered, a tensor has the wrong number of axes, or the sizes of
            one group disagree between tensors. The message names the key.
        """
        shapes = _shapes_of(state_dict, "state_dict")
        self._check_keys(shapes)
        sizes: dict[str, int] = dict(self.sizes) if self.sizes is not None else {}
        pending = []
        for key, entries in self.axes.items():
            for axis, entry in enumerate(entries):
                if entry is not None:
                    pending.append((key, axis, entry))
        # Solve single-unknown axes repeatedly (concatenated axes may need several passes).
        changed = True
        while pending and changed:
            changed = False
            rest = []
            for key, axis, entry in pending:
                unknown = [s for s in entry if s.group not in sizes]
                if len({s.group for s in unknown}) > 1:
                    rest.append((key, axis, entry))
                    continue
                n = shapes[key][axis]
                known = sum(sizes[s.group] * s.block for s in entry if s.group in sizes)
                if unknown:
                    per = sum(s.block for s in unknown)
                    if (n - known) <= 0 or (n - known) % per:
                        raise SpecError(
                            f"state_dict[{key!r}] has length {n} on axis {axis}, which does not "
                            f"fit the groups {[s.group for s in entry]} of the spec."
                        )
                    sizes[unknown[0].group] = (n - known) // per
                    changed = True
                elif known != n:
                    raise SpecError(
                        f"state_dict[{key!r}] has shape {tuple(shapes[key])}, but the spec expects "
                        f"length {known} on axis {axis} (groups "
                        + ", ".join(f"{s.group}={sizes[s.group]}x{s.block}" for s in entry)
                        + "). Were the two state dicts made by models of different widths?"
                    )
            pending = rest
        if pending:
            key, axis, entry = pending[0]
            raise SpecError(
                f"Cannot infer the sizes of the groups {[s.group for s in entry]} on axis {axis} "
                f"of {key!r}; give them in 'sizes'."
            )
        return PermutationSpec(self.axes, fixed=self.fixed, sizes=sizes)

    def check(self, state_dict: Mapping[str, Any]) -> PermutationSpec:
        """Check `state_dict` against this spec; an alias of :meth:`resolve`."""
        return self.resolve(state_dict)

    def _check_keys(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        missing = [k for k in shapes if k not in self.axes]
        if missing:
            raise SpecError(
                f"The spec does not cover the parameter or buffer {missing[0]!r}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                + "; every state_dict key needs an entry (use None for an axis that is not "
                "permuted, and () for a 0-d buffer)."
            )
        extra = [k for k in self.axes if k not in shapes]
        if extra:
            raise SpecError(
                f"The spec names {extra[0]!r}, which is not in the state dict"
                + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
                + "."
            )
        for key, entries in self.axes.items():
            if len(entries) != len(shapes[key]):
                raise SpecError(
                    f"state_dict[{key!r}] has {len(shapes[key])} axes (shape "
                    f"{tuple(shapes[key])}), but the spec gives {len(entries)} entries for it."
                )

    def axis_index(
        self, entry: AxisEntry, perms: Mapping[str, torch.Tensor]
    ) -> torch.Tensor | None:
        """Index (along one axis) that applies `perms` to an axis described by `entry`.

        Parameters
        ----------
        entry : AxisEntry
            One entry of :attr:`axes`.
        perms : mapping of str to int64 Tensor of shape (n_g,)
            Checked permutations; groups left out keep their order.

        Returns
        -------
        int64 Tensor of shape (axis length,) or None
            ``torch.index_select(t, axis, index)`` permutes the axis; ``None`` when the axis is
            left unchanged. Needs :attr:`sizes`.
        """
        if entry is None or not any(s.group in perms for s in entry):
            return None
        sizes = self._need_sizes("axis_index")
        parts = []
        offset = 0
        for seg in entry:
            n = sizes[seg.group]
            p = perms.get(seg.group)
            if p is None:
                p = torch.arange(n, dtype=torch.int64)
            idx = (p[:, None] * seg.block + torch.arange(seg.block, dtype=torch.int64)).reshape(-1)
            parts.append(idx + offset)
            offset += n * seg.block
        return torch.cat(parts)

    def _need_sizes(self, caller: str) -> Mapping[str, int]:
        if self.sizes is None:
            raise SpecError(
                f"{caller} needs the group sizes; call spec.resolve(state_dict) first or pass "
                "'sizes' to PermutationSpec."
            )
        return self.sizes


def _groups_in_order(axes: Mapping[str, tuple[AxisEntry, ...]]) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for entries in axes.values():
        for entry in entries:
            for seg in entry or ():
                seen.setdefault(seg.group, None)
    return tuple(seen)


def _shapes_of(state_dict: Mapping[str, Any], name: str) -> dict[str, tuple[int, ...]]:
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"The {name!r} parameter must be a state dict (a mapping of str to tensors). "
            f"Got {type(state_dict).__name__} instead."
        )
    shapes = {}
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"{name}[{key!r}] must be a torch.Tensor; got {type(value).__name__} instead."
            )
        shapes[key] = tuple(value.shape)
    return shapes


def check_same_shapes(*state_dicts: Mapping[str, Any]) -> None:
    """Check that state dicts have the same keys and shapes (i.e. come from one architecture).

    Raises
    ------
    SpecError
        Naming the first key that is missing or whose shape differs.
    """
    if len(state_dicts) < 2:
        return
    ref = _shapes_of(state_dicts[0], "state_dicts[0]")
    for i, sd in enumerate(state_dicts[1:], start=1):
        shapes = _shapes_of(sd, f"state_dicts[{i}]")
        for key in ref:
            if key not in shapes:
                raise SpecError(f"state_dicts[{i}] lacks the key {key!r} of state_dicts[0].")
            if shapes[key] != ref[key]:
                raise SpecError(
                    f"state_dicts[{i}][{key!r}] has shape {shapes[key]}, but state_dicts[0] has "
                    f"{ref[key]}: the models differ in architecture or width."
                )
        extra = [k for k in shapes if k not in ref]
        if extra:
            raise SpecError(f"state_dicts[{i}] has the key {extra[0]!r} that state_dicts[0] lacks.")


# =============================================================================================
# Tracing: torch.fx graph -> groups
# =============================================================================================

_logger = logging.getLogger(__name__)

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


class _Analyser(torch.fx.Interpreter):
    """Run the traced graph on the example input and give every value a channel layout."""

    def __init__(self, gm: torch.fx.GraphModule, shapes: Mapping[str, tuple[int, ...]]) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.extra_traceback = False
        self.shapes = shapes
        self.groups = _Groups()
        self.lay: dict[torch.fx.Node, Any] = {}
        self.axes: dict[str, list[Any]] = {}
        self.pending: list[tuple[str, str, str, list[int]]] = []
        self.outputs: list[int] = []
        self.n_inputs = sum(1 for n in gm.graph.nodes if n.op == "placeholder")
        # Storage of every parameter and buffer: a skipped module must never hand one on (a
        # later in-place op would then write into the model).
        self.storages = {t.untyped_storage().data_ptr() for t in gm.state_dict().values()}

    # -- running -----------------------------------------------------------------------------

    def run_node(self, n: torch.fx.Node) -> Any:
        if n.op == "output":
            self._output(n)
            return super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        self._node = n
        try:
            result = getattr(self, n.op)(n.target, args, kwargs)
        except Exception as e:
            module = self.module.get_submodule(n.target) if n.op == "call_module" else None
            raise TracingError(
                f"The model and `example_input` do not run together: fx node {n.name!r} "
                f"({_op_name(n, module)}) failed with {type(e).__name__}: {e}"
            ) from e
        self.lay[n] = self._analyse(n, args, kwargs, result)
        return result

    # Only shapes matter here (the graph has no data-dependent branches), so the expensive
    # parts of a forward pass are skipped: a convolution's output shape comes from the usual
    # formula (an uninitialised tensor is handed on), and shape-preserving modules (norms,
    # activations, dropout) hand on their input. Everything else runs for real (cheap).

    def placeholder(self, target: Any, args: tuple, kwargs: dict) -> Any:
        value = super().placeholder(target, args, kwargs)
        return value.clone() if isinstance(value, torch.Tensor) else value  # never alias the input

    def _can_skip(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> bool:
        """A shape-preserving module on an activation, with the input shape it expects."""
        first = self._node.args[0] if self._node.args else None
        if not (
            len(args) == 1
            and not kwargs
            and isinstance(args[0], torch.Tensor)
            and isinstance(first, torch.fx.Node)
            and first.op != "get_attr"
            and args[0].untyped_storage().data_ptr() not in self.storages
        ):
            return False
        x = args[0]
        if isinstance(module, _ELEMENTWISE_MODULES):
            return True
        if type(module) in _BATCH_NORM_NDIMS:
            ndims = _BATCH_NORM_NDIMS[type(module)]
            return x.ndim in ndims and x.shape[1] == module.num_features
        if isinstance(module, nn.GroupNorm):
            return x.ndim >= 2 and x.shape[1] == module.num_channels
        if isinstance(module, nn.LayerNorm):
            m = len(module.normalized_shape)
            return x.ndim >= m and tuple(x.shape[x.ndim - m :]) == tuple(module.normalized_shape)
        return False

    def call_module(self, target: Any, args: tuple, kwargs: dict) -> Any:
        module = self.fetch_attr(target)
        if self._can_skip(module, args, kwargs):
            return args[0]
        if type(module) in _CONV_MODULES and not kwargs and len(args) == 1:
            shape = _conv_out_shape(
                args[0], module.weight.shape, module.stride, module.padding, module.dilation,
                module.groups,
            )  # fmt: skip
            if shape is not None:
                return args[0].new_empty(shape)
        return super().call_module(target, args, kwargs)

    def call_function(self, target: Any, args: tuple, kwargs: dict) -> Any:
        if target in _CONV_FUNCS and not kwargs and len(args) >= 2:
            k = _CONV_FUNCS[target]
            stride, padding, dilation, groups = tuple(args[3:7]) + (1, 0, 1, 1)[len(args[3:7]) :]
            shape = _conv_out_shape(
                args[0], args[1].shape, _ntuple(stride, k), padding if isinstance(padding, str)
                else _ntuple(padding, k), _ntuple(dilation, k), groups,
            )  # fmt: skip
            if shape is not None:
                return args[0].new_empty(shape)
        return super().call_function(target, args, kwargs)

    def _L(self, arg: Any) -> Any:
        return self.lay.get(arg) if isinstance(arg, torch.fx.Node) else None

    # -- bookkeeping -------------------------------------------------------------------------

    def _new(self, name: str, size: int, *, fixed: bool = False) -> tuple[tuple[int, int], ...]:
        return ((self.groups.new(name, size, fixed=fixed), 1),)

    def _merge(self, n: torch.fx.Node, op: str, a: tuple, b: tuple) -> tuple:
        if len(a) != len(b) or any(x[1] != y[1] for x, y in zip(a, b)):
            raise UnsupportedOpError(
                n.name, op, "it joins channel axes made of differently concatenated groups"
            )
        return tuple((self.groups.union(x[0], y[0], n.name, op), x[1]) for x, y in zip(a, b))

    def _assign(self, n: torch.fx.Node, op: str, key: str | None, entries: list[Any]) -> None:
        if key is None or key not in self.shapes:
            return
        if len(entries) != len(self.shapes[key]):
            raise UnsupportedOpError(
                n.name, op, f"{key!r} has shape {self.shapes[key]}, which this rule does not expect"
            )
        old = self.axes.get(key)
        if old is None:
            self.axes[key] = list(entries)
            return
        for i, (a, b) in enumerate(zip(old, entries)):
            if a is None and b is None:
                continue
            if a is None or b is None:
                raise UnsupportedOpError(
                    n.name,
                    op,
                    f"{key!r} is used twice, with axis {i} a channel axis in one use only",
                )
            old[i] = self._merge(n, op, a, b)

    def _all_fixed(self, lay: _Layout) -> bool:
        return all(self.groups.is_fixed(g) for g, _ in lay.segs)

    def _unknown(self, n: torch.fx.Node, op: str, result: Any, reason: str) -> Any:
        for a in n.all_input_nodes:
            lay = self.lay.get(a)
            if isinstance(lay, _Param):
                raise UnsupportedOpError(n.name, op, f"it uses the parameter {lay.key!r} directly")
        gids = [g for a in n.all_input_nodes if isinstance(self.lay.get(a), _Layout)
                for g, _ in self.lay[a].segs]  # fmt: skip
        if gids:
            self.pending.append((n.name, op, reason, gids))
        return _OPAQUE if _has_tensor(result) else None

    # -- dispatch ----------------------------------------------------------------------------

    def _analyse(self, n: torch.fx.Node, args: tuple, kwargs: dict, result: Any) -> Any:
        if n.op == "placeholder":
            if not isinstance(result, torch.Tensor) or result.ndim == 0:
                return None
            name = "input" if self.n_inputs == 1 else f"input.{n.target}"
            dim = 1 if result.ndim >= 2 else 0
            gid = self.groups.new(name, result.shape[dim], fixed=True, is_input=True)
            self.groups.is_input[gid] = True
            return _Layout(dim, ((gid, 1),))
        if n.op == "get_attr":
            if n.target in self.shapes:
                return _Param(n.target)
            return _OPAQUE if _has_tensor(result) else None
        if n.op == "call_module":
            module = self.module.get_submodule(n.target)
            return self._module(n, module, args, kwargs, result)
        op = _op_name(n)
        if not _has_tensor(result):
            return None
        lays = [self.lay.get(a) for a in n.all_input_nodes]
        if not any(isinstance(x, (_Layout, _Param)) for x in lays):
            return _OPAQUE
        if n.op == "call_function":
            return self._function(n, op, n.target, args, kwargs, result)
        return self._method(n, op, n.target, args, kwargs, result)

    def _x(self, n: torch.fx.Node, args: tuple, kwargs: dict) -> tuple[Any, Any]:
        if n.args:
            return args[0], self._L(n.args[0])
        key = next(iter(n.kwargs))
        return kwargs[key], self._L(n.kwargs[key])

    def _module(self, n: torch.fx.Node, m: torch.nn.Module, args, kwargs, result) -> Any:
        op = _op_name(n, m)
        prefix = f"{n.target}."
        keys = [prefix + k for k in m.state_dict() if prefix + k in self.shapes]
        x, lay = self._x(n, args, kwargs) if (n.args or n.kwargs) else (None, None)
        if isinstance(lay, _Param):
            return self._unknown(n, op, result, "a module applied to a parameter")
        if isinstance(m, nn.Linear):
            bias = prefix + "bias" if m.bias is not None else None
            return self._linear(n, op, x, lay, result, prefix + "weight", bias, str(n.target))
        if isinstance(m, _CONV_MODULES):
            bias = prefix + "bias" if m.bias is not None else None
            return self._conv(
                n, op, x, lay, result, prefix + "weight", bias, m.groups, str(n.target)
            )
        if isinstance(m, _CHANNEL_NORM_MODULES):
            return self._channel_params(n, op, x, lay, keys, str(n.target))
        if isinstance(m, nn.GroupNorm):
            if m.num_groups not in (1, m.num_channels) and not (
                isinstance(lay, _Layout) and self._all_fixed(lay)
            ):
                raise UnsupportedOpError(
                    n.name,
                    op,
                    f"GroupNorm with num_groups={m.num_groups} of "
                    f"{m.num_channels} channels: a channel permutation must keep its groups, "
                    "which a permutation group cannot express",
                )
            return self._channel_params(n, op, x, lay, keys, str(n.target))
        if isinstance(m, (nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm))):
            return self._layer_norm(n, op, x, lay, keys, len(m.normalized_shape))
        if isinstance(m, nn.PReLU):
            if m.num_parameters == 1:
                self._assign(n, op, prefix + "weight", [None])
                return lay
            return self._channel_params(n, op, x, lay, keys, str(n.target))
        if isinstance(m, _ELEMENTWISE_MODULES):
            return lay if lay is not None else (_OPAQUE if _has_tensor(result) else None)
        if isinstance(m, _POOL_MODULES):
            return self._spatial(n, op, lay, result)
        if isinstance(m, (nn.Flatten, nn.Unflatten)):
            return self._reshape(n, op, x, lay, result)
        if keys:
            raise UnsupportedOpError(
                n.name, op, "a module with parameters that qapfuse has no permutation rule for"
            )
        return self._unknown(
            n, op, result, f"qapfuse has no permutation rule for {type(m).__name__}"
        )

    def _function(self, n: torch.fx.Node, op: str, fn: Any, args, kwargs, result) -> Any:
        x, lay = self._x(n, args, kwargs)
        if fn in _BINARY_FUNCS:
            return self._broadcast(n, op, args, kwargs, result)
        if fn in _UNARY_FUNCS:
            return lay if isinstance(lay, (_Layout, _Param)) else _OPAQUE
        if fn in _RESHAPE_FUNCS:
            return self._reshape(n, op, x, lay, result)
        if fn in _POOL_FUNCS:
            return self._spatial(n, op, lay, result)
        if fn in _REDUCE_FUNCS:
            return self._reduce(n, op, x, lay, result, args[1:], kwargs)
        if fn is torch.cat or fn is getattr(torch, "concat", None):
            return self._cat(n, op, args, kwargs, result)
        if fn is torch.permute:
            return self._permute(
                n, op, x, lay, result, args[1] if len(args) > 1 else kwargs["dims"]
            )
        if fn is torch.transpose:
            return self._transpose(n, op, x, lay, result, *args[1:3])
        if fn is _f("pad") and isinstance(lay, _Layout):
            pad = args[1] if len(args) > 1 else kwargs["pad"]
            if lay.dim < x.ndim - len(pad) // 2:  # only axes after the channels are padded
                return lay
            return self._unknown(n, op, result, "padding along the channel axis")
        if fn is operator.getitem and isinstance(x, torch.Tensor):
            return self._getitem(n, op, x, lay, result, args[1])
        if fn is operator.getitem:
            return self._unknown(n, op, result, "it takes an item of an unsupported op's output")
        if fn is getattr and isinstance(x, torch.Tensor):
            if args[1] in ("T", "mT") and x.ndim == 2:
                return self._transpose(n, op, x, lay, result, 0, 1)
            if args[1] == "data":
                return lay
            return self._unknown(n, op, result, f"tensor attribute {args[1]!r}")
        if fn is _f("linear"):
            w = n.args[1] if len(n.args) > 1 else n.kwargs.get("weight")
            b = n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
            wkey, bkey = self._param_key(n, op, w), self._param_key(n, op, b)
            return self._linear(n, op, x, lay, result, wkey, bkey, wkey.rsplit(".", 1)[0])
        if fn in _CONV_FUNCS:
            w = n.args[1] if len(n.args) > 1 else n.kwargs.get("weight")
            b = n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
            groups = args[6] if len(args) > 6 else kwargs.get("groups", 1)
            wkey, bkey = self._param_key(n, op, w), self._param_key(n, op, b)
            name = wkey.rsplit(".", 1)[0]
            return self._conv(n, op, x, lay, result, wkey, bkey, groups, name)
        return self._unknown(n, op, result, "qapfuse has no permutation rule for this op")

    def _method(self, n: torch.fx.Node, op: str, name: str, args, kwargs, result) -> Any:
        x, lay = args[0], self._L(n.args[0])
        if not isinstance(x, torch.Tensor):
            return self._unknown(n, op, result, "a method of a non-tensor value")
        if name in _BINARY_METHODS:
            return self._broadcast(n, op, args, kwargs, result)
        if name in _UNARY_METHODS:
            return lay if isinstance(lay, (_Layout, _Param)) else _OPAQUE
        if name in _RESHAPE_METHODS:
            return self._reshape(n, op, x, lay, result)
        if name in _REDUCE_METHODS:
            return self._reduce(n, op, x, lay, result, args[1:], kwargs)
        if name == "permute":
            dims = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:]
            return self._permute(n, op, x, lay, result, kwargs.get("dims", dims))
        if name in ("transpose", "swapaxes"):
            return self._transpose(n, op, x, lay, result, *args[1:3])
        if name == "t" and x.ndim == 2:
            return self._transpose(n, op, x, lay, result, 0, 1)
        if name in ("expand", "expand_as"):
            return self._expand(n, op, x, lay, result)
        return self._unknown(n, op, result, "qapfuse has no permutation rule for this method")

    def _param_key(self, n: torch.fx.Node, op: str, arg: Any) -> str | None:
        if arg is None:
            return None
        lay = self._L(arg)
        if isinstance(lay, _Param):
            return lay.key
        raise UnsupportedOpError(
            n.name, op, "its weight is computed in forward, not read from the state dict"
        )

    # -- rules ----------------------------------------------------------------------------

    def _in_entry(self, lay: Any, x: torch.Tensor, dim: int, name: str) -> tuple:
        if isinstance(lay, _Layout) and lay.dim == dim:
            return lay.segs
        return self._new(f"{name}.in", x.shape[dim], fixed=True)

    def _out_group(self, key: str, name: str, size: int) -> tuple:
        old = self.axes.get(key)
        if old is not None and old[0] is not None:
            return old[0]
        return self._new(name, size)

    def _linear(self, n, op, x, lay, result, wkey, bkey, name) -> Any:
        last = x.ndim - 1
        in_entry = self._in_entry(lay, x, last, name)
        out = self._out_group(wkey, name, result.shape[-1])
        self._assign(n, op, wkey, [out, in_entry])
        self._assign(n, op, bkey, [out])
        if isinstance(lay, _Layout) and lay.dim != last and not self._all_fixed(lay):
            # A Linear along a non-channel axis: the channel axis passes through unchanged and
            # the new axis is not tracked, so its group is fixed.
            self.groups.fix(out[0][0])
            return lay
        return _Layout(result.ndim - 1, out)

    def _conv(self, n, op, x, lay, result, wkey, bkey, groups, name) -> Any:
        if isinstance(lay, _Layout) and lay.dim != 1:
            if not self._all_fixed(lay):
                raise UnsupportedOpError(
                    n.name, op, f"its input's channels are on axis {lay.dim}, not on axis 1"
                )
            lay = _OPAQUE
        cin, cout = x.shape[1], result.shape[1]
        k = len(self.shapes[wkey]) - 2
        if groups == 1:
            in_entry = self._in_entry(lay, x, 1, name)
            out = self._out_group(wkey, name, cout)
            self._assign(n, op, wkey, [out, in_entry] + [None] * k)
        elif groups == cin and cout % cin == 0:
            mult = cout // cin
            if isinstance(lay, _Layout):
                out = tuple((g, b * mult) for g, b in lay.segs)
            else:
                out = self._new(name, cout, fixed=True)
            self._assign(n, op, wkey, [out, None] + [None] * k)
        else:
            raise UnsupportedOpError(
                n.name,
                op,
                f"grouped convolution with groups={groups} ({cin} in, {cout} out "
                "channels): a channel permutation must keep the conv groups, which a "
                "permutation group cannot express",
            )
        self._assign(n, op, bkey, [out])
        return _Layout(1, out)

    def _channel_params(self, n, op, x, lay, keys, name) -> Any:
        if isinstance(lay, _Layout) and lay.dim != 1:
            if not self._all_fixed(lay):
                raise UnsupportedOpError(
                    n.name, op, f"its input's channels are on axis {lay.dim}, not on axis 1"
                )
            lay = _OPAQUE
        if isinstance(lay, _Layout):
            segs = lay.segs
        else:
            segs = self._new(f"{name}.in", x.shape[1], fixed=True)
        for key in keys:
            nd = len(self.shapes[key])
            if nd > 1:
                raise UnsupportedOpError(n.name, op, f"unexpected parameter shape of {key!r}")
            self._assign(n, op, key, [segs] * nd)
        return lay if isinstance(lay, _Layout) else _OPAQUE

    def _layer_norm(self, n, op, x, lay, keys, m) -> Any:
        first = x.ndim - m
        for key in keys:
            entries: list[Any] = [None] * len(self.shapes[key])
            if isinstance(lay, _Layout) and lay.dim >= first:
                entries[lay.dim - first] = lay.segs
            self._assign(n, op, key, entries)
        return lay if isinstance(lay, _Layout) else _OPAQUE

    def _spatial(self, n, op, lay, result) -> Any:
        if isinstance(lay, _Layout) and lay.dim != 1:
            return self._unknown(n, op, result, "a spatial op over the channel axis")
        return lay if isinstance(lay, _Layout) else _OPAQUE

    def _broadcast(self, n, op, args, kwargs, result) -> Any:
        if not isinstance(result, torch.Tensor):
            return self._unknown(n, op, result, "an element-wise op without a tensor result")
        nodes = list(n.args) + list(n.kwargs.values())
        values = list(args) + list(kwargs.values())
        r = result.ndim
        claims, others = [], []
        for node, v in zip(nodes, values):
            if not isinstance(v, torch.Tensor):
                continue
            lay = self._L(node)
            if isinstance(lay, _Layout):
                rd = lay.dim + r - v.ndim
                if v.shape[lay.dim] != result.shape[rd]:
                    return self._unknown(n, op, result, "it broadcasts the channel axis")
                claims.append((rd, lay.segs))
            else:
                others.append((v, lay))
        if not claims:
            params = [lay for _, lay in others if isinstance(lay, _Param)]
            if len(others) == 1 and params:
                return params[0]
            for p in params:
                self._assign(n, op, p.key, [None] * len(self.shapes[p.key]))
            return _OPAQUE
        rd, segs = claims[0]
        for rd2, segs2 in claims[1:]:
            if rd2 != rd:
                raise UnsupportedOpError(
                    n.name, op, "its operands carry channels on different axes"
                )
            segs = self._merge(n, op, segs, segs2)
        for v, lay in others:
            pos = rd - (r - v.ndim)
            entries: list[Any] = [None] * v.ndim
            if pos >= 0 and v.shape[pos] != 1:
                if isinstance(lay, _Param):
                    entries[pos] = segs
                else:
                    _logger.warning(
                        "fx node %r (%s) combines channels with a constant tensor that is not "
                        "permuted; their groups are fixed.",
                        n.name,
                        op,
                    )
                    for g, _ in segs:
                        self.groups.fix(g)
            if isinstance(lay, _Param):
                self._assign(n, op, lay.key, entries)
        return _Layout(rd, segs)

    def _reshape(self, n, op, x, lay, result) -> Any:
        if not isinstance(lay, _Layout) or not isinstance(result, torch.Tensor):
            return self._unknown(n, op, result, "a reshape of a parameter")
        shape_in, shape_out, d = tuple(x.shape), tuple(result.shape), lay.dim
        outer, c = math.prod(shape_in[:d]), shape_in[d]
        for dp in range(len(shape_out)):
            if math.prod(shape_out[:dp]) != outer:
                continue
            if shape_out[dp] == 1 and c != 1:
                continue
            acc, e = 1, d
            while e < len(shape_in) and acc < shape_out[dp]:
                acc *= shape_in[e]
                e += 1
            if acc == shape_out[dp] and e > d and acc % c == 0:
                mul = acc // c
                return _Layout(dp, tuple((g, b * mul) for g, b in lay.segs))
            break
        return self._unknown(n, op, result, "a reshape that splits or mixes the channel axis")

    def _reduce(self, n, op, x, lay, result, rest, kwargs) -> Any:
        if not isinstance(lay, _Layout):
            return self._unknown(n, op, result, "a reduction of a parameter")
        dims = kwargs.get("dim", rest[0] if rest else None)
        keep = kwargs.get("keepdim", rest[1] if len(rest) > 1 else False)
        if dims is None:
            return _OPAQUE  # a full reduction is invariant to every permutation
        dims = [dims] if isinstance(dims, int) else list(dims)
        dims = [d % x.ndim for d in dims]
        if lay.dim in dims:
            return _OPAQUE  # reducing over the channels is invariant to their order
        new = lay.dim if keep else lay.dim - sum(d < lay.dim for d in dims)
        return _Layout(new, lay.segs)

    def _permute(self, n, op, x, lay, result, dims) -> Any:
        if not isinstance(lay, _Layout):
            return self._unknown(n, op, result, "a permute of a parameter")
        dims = [int(d) % x.ndim for d in dims]
        return _Layout(dims.index(lay.dim), lay.segs)

    def _transpose(self, n, op, x, lay, result, a, b) -> Any:
        if not isinstance(lay, _Layout):
            return self._unknown(n, op, result, "a transpose of a parameter")
        a, b = int(a) % x.ndim, int(b) % x.ndim
        dim = b if lay.dim == a else a if lay.dim == b else lay.dim
        return _Layout(dim, lay.segs)

    def _expand(self, n, op, x, lay, result) -> Any:
        if not isinstance(lay, _Layout):
            return self._unknown(n, op, result, "expanding a parameter")
        dim = lay.dim + result.ndim - x.ndim
        if result.shape[dim] != x.shape[lay.dim]:
            return self._unknown(n, op, result, "expanding the channel axis")
        return _Layout(dim, lay.segs)

    def _cat(self, n, op, args, kwargs, result) -> Any:
        tensors = args[0] if args else kwargs["tensors"]
        nodes = n.args[0] if n.args else n.kwargs["tensors"]
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        dim = int(dim) % result.ndim
        lays = [self._L(a) for a in nodes]
        if any(isinstance(x, _Param) for x in lays):
            return self._unknown(n, op, result, "it concatenates a parameter")
        chan = {x.dim for x in lays if isinstance(x, _Layout)}
        if len(chan) > 1:
            raise UnsupportedOpError(n.name, op, "its inputs carry channels on different axes")
        (cd,) = chan
        if cd == dim:
            segs: list[tuple[int, int]] = []
            for v, x in zip(tensors, lays):
                if isinstance(x, _Layout):
                    segs.extend(x.segs)
                else:
                    segs.extend(self._new(f"{n.name}.const", v.shape[dim], fixed=True))
            return _Layout(dim, tuple(segs))
        merged = None
        for x in lays:
            if isinstance(x, _Layout):
                merged = x.segs if merged is None else self._merge(n, op, merged, x.segs)
        if any(not isinstance(x, _Layout) for x in lays):
            for g, _ in merged:
                self.groups.fix(g)
        return _Layout(cd, merged)

    def _getitem(self, n, op, x, lay, result, idx) -> Any:
        if not isinstance(lay, _Layout):
            return self._unknown(n, op, result, "indexing a parameter")
        idx = idx if isinstance(idx, tuple) else (idx,)
        if any(not isinstance(i, (int, slice, type(Ellipsis), type(None))) for i in idx):
            return self._unknown(n, op, result, "indexing with tensors or lists")
        used = sum(1 for i in idx if i is not None and i is not Ellipsis)
        full: list[Any] = []
        for i in idx:
            full.extend([slice(None)] * (x.ndim - used) if i is Ellipsis else [i])
        full.extend([slice(None)] * (x.ndim - sum(1 for i in full if i is not None)))
        din = dout = 0
        chan = None
        for i in full:
            if i is None:
                dout += 1
                continue
            if din == lay.dim:
                whole = (
                    isinstance(i, slice)
                    and i.step in (None, 1)
                    and i.start in (None, 0)
                    and (i.stop is None or i.stop >= x.shape[din])
                )
                if not whole:
                    return self._unknown(n, op, result, "indexing along the channel axis")
                chan = dout
            din += 1
            if not isinstance(i, int):
                dout += 1
        return _Layout(chan, lay.segs)

    def _output(self, n: torch.fx.Node) -> None:
        def visit(arg: torch.fx.Node) -> torch.fx.Node:
            lay = self.lay.get(arg)
            if isinstance(lay, _Layout):
                for g, _ in lay.segs:
                    self.groups.fix(g)
                    self.outputs.append(g)
            elif isinstance(lay, _Param):
                self._assign(n, "output", lay.key, [None] * len(self.shapes[lay.key]))
            return arg

        torch.fx.node.map_arg(n.args, visit)

    # -- result ------------------------------------------------------------------------------

    def finish(self) -> PermutationSpec:
        groups = self.groups
        for node, op, reason, gids in self.pending:
            if any(not groups.is_fixed(g) for g in gids):
                raise UnsupportedOpError(node, op, reason)
        used = {groups.find(s[0]) for entries in self.axes.values() for e in entries
                for s in (e or ())}  # fmt: skip
        outs = list(dict.fromkeys(groups.find(g) for g in self.outputs))
        names: dict[int, str] = {}
        taken: set[str] = set()
        for g in range(len(groups.parent)):
            root = groups.find(g)
            if root in names or root not in used:
                continue
            if groups.is_input[root]:
                name = next(
                    groups.name[h] for h in range(len(groups.parent))
                    if groups.find(h) == root and groups.name[h].startswith("input")
                )  # fmt: skip
            elif root in outs:
                name = "output" if len(outs) == 1 else f"output.{outs.index(root)}"
            else:
                name = groups.name[root]
            base, k = name, 1
            while name in taken:
                k += 1
                name = f"{base}#{k}"
            taken.add(name)
            names[root] = name
        axes: dict[str, tuple[AxisEntry, ...]] = {}
        unreached = []
        for key, shape in self.shapes.items():
            entries = self.axes.get(key)
            if entries is None:
                if len(shape) > 0:
                    unreached.append(key)
                axes[key] = (None,) * len(shape)
                continue
            axes[key] = tuple(
                None if e is None else tuple(Segment(names[groups.find(g)], b) for g, b in e)
                for e in entries
            )
        if unreached:
            _logger.warning(
                "%d state_dict entries are not used by the traced forward pass and are left "
                "unpermuted: %s",
                len(unreached),
                ", ".join(unreached[:5]) + (", ..." if len(unreached) > 5 else ""),
            )
        sizes = {names[r]: groups.size[r] for r in names}
        fixed = {names[r] for r in names if groups.fixed[r]}
        return PermutationSpec(axes, fixed=fixed, sizes=sizes)


class _DataDependentError(Exception):
    def __init__(self, node: str) -> None:
        self.node = node
        super().__init__(node)


class _ConcreteTracer(torch.fx.Tracer):
    """An fx tracer that also runs every op on the example input.

    Control flow on shapes (``if x.shape[-1] > 7``) is resolved with the example's values
    (the graph is specialised to that input size); control flow on tensor *values* raises.
    """

    def __init__(self, inputs: tuple[torch.Tensor, ...]) -> None:
        super().__init__()
        self._inputs = list(inputs)
        self._n_placeholders = 0
        self._evaluating = False

    @staticmethod
    def _value(a: Any) -> Any:
        if isinstance(a, torch.fx.Proxy):
            return a.node.meta.get("concrete")
        if isinstance(a, torch.fx.Node):
            return a.meta.get("concrete")
        return a

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, *rest, **kw):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, *rest, **kw)
        vals = torch.fx.node.map_aggregate(args, self._value)
        kwvals = torch.fx.node.map_aggregate(kwargs, self._value)
        self._evaluating = True  # Module.__call__/__getattr__ are patched while tracing
        try:
            if kind == "placeholder":
                i = self._n_placeholders
                self._n_placeholders += 1
                value = self._inputs[i] if i < len(self._inputs) else (vals[0] if vals else None)
            elif kind == "get_attr":
                value = self.root
                for part in str(target).split("."):
                    value = getattr(value, part)
            elif kind == "call_module":
                value = self.root.get_submodule(target)(*vals, **kwvals)
            elif kind == "call_function":
                value = target(*vals, **kwvals)
            elif kind == "call_method":
                value = getattr(vals[0], target)(*vals[1:], **kwvals)
            else:
                value = None
        finally:
            self._evaluating = False
        proxy.node.meta["concrete"] = value
        return proxy

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict) -> Any:
        if self._evaluating:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def call_module(self, m: torch.nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        if self._evaluating:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def to_bool(self, obj: torch.fx.Proxy) -> bool:
        value = obj.node.meta.get("concrete")
        if isinstance(value, torch.Tensor):
            raise _DataDependentError(obj.node.name)
        return bool(value)

    def iter(self, obj: torch.fx.Proxy) -> Any:
        value = obj.node.meta.get("concrete")
        if isinstance(value, (tuple, list, torch.Size)):
            return iter([obj[i] for i in range(len(value))])
        return super().iter(obj)


def _fx_graph(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.fx.GraphModule:
    try:
        return torch.fx.symbolic_trace(model)
    except Exception as sym_err:  # any failure: try the concrete tracer
        _logger.info("symbolic fx trace failed (%s); retrying with a concrete trace", sym_err)
        try:
            model(*inputs)
        except Exception as e:
            raise TracingError(
                f"The model and `example_input` do not run together: {type(e).__name__}: {e}"
            ) from e
        tracer = _ConcreteTracer(inputs)
        try:
            graph = tracer.trace(model)
        except _DataDependentError as e:
            raise TracingError(
                f"The model has data-dependent control flow (fx node {e.node!r} decides a branch "
                "from tensor values), so no single traced graph describes it. Write a "
                "PermutationSpec by hand (see docs/fusion.md)."
            ) from None
        except Exception as e:
            raise TracingError(
                f"torch.fx could not trace the model ({type(sym_err).__name__}: {sym_err}); the "
                f"concrete fallback failed too ({type(e).__name__}: {e}). Write a "
                "PermutationSpec by hand (see docs/fusion.md)."
            ) from e
        for node in graph.nodes:
            node.meta.pop("concrete", None)
        return torch.fx.GraphModule(tracer.root, graph)


def trace(
    model: torch.nn.Module, example_input: torch.Tensor | tuple[torch.Tensor, ...]
) -> PermutationSpec:
    """Derive the permutation spec of `model` by tracing it with ``torch.fx``.

    The model is traced symbolically (falling back to a trace that runs every op on
    `example_input`, for shape-dependent control flow), then the graph is run on
    `example_input` to learn shapes, and channel groups are propagated through it: Linear and
    Conv layers start a group on their outputs; normalisation layers, element-wise ops,
    activations, pooling and dropout pass groups through; flatten/view turn channel ``c`` into
    the block of ``H*W`` inputs it feeds; a residual ``add`` merges the groups it joins; ``cat``
    concatenates them. Groups of the model's input and output are fixed.

    Parameters
    ----------
    model : torch.nn.Module
        The network. It is run in eval mode without gradients; its training flags are restored.
    example_input : Tensor or tuple of Tensor
        An input batch the model accepts, e.g. of shape (1, 3, 32, 32).

    Returns
    -------
    PermutationSpec
        Covers every key of ``model.state_dict()`` and has group sizes. Group names: ``"input"``,
        ``"output"``, and otherwise the qualified name of the first module producing the group.

    Raises
    ------
    TracingError
        If the model and input do not run together, or the model has data-dependent control
        flow.
    UnsupportedOpError
        If a permutation-sensitive op the tracer does not understand touches a hidden channel
        axis (attention, ``torch.roll``, indexing along channels, grouped convs, ...). The
        error names the fx node and op.

    Examples
    --------
    >>> import torch
    >>> from qapfuse.fusion.models import MLP
    >>> spec = trace(MLP(784, (32, 32), 10), torch.zeros(1, 784))
    >>> spec.free_groups
    ('layers.0', 'layers.2')
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(
            f"The 'model' parameter of trace must be a torch.nn.Module. Got "
            f"{type(model).__name__} instead."
        )
    if isinstance(example_input, torch.Tensor):
        inputs: tuple[torch.Tensor, ...] = (example_input,)
    elif isinstance(example_input, (tuple, list)) and all(
        isinstance(t, torch.Tensor) for t in example_input
    ):
        inputs = tuple(example_input)
    else:
        raise TypeError(
            "The 'example_input' parameter of trace must be a Tensor or a tuple of Tensors. "
            f"Got {type(example_input).__name__} instead."
        )
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            gm = _fx_graph(model, inputs)
            analyser = _Analyser(gm, shapes)
            analyser.run(*inputs)
            spec = analyser.finish()
    finally:
        for m, mode in modes:
            m.training = mode
    return spec.resolve(model.state_dict())
