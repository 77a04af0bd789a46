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
(group -> axes) is derived. :func:`~qapfuse.fusion.trace` builds a spec from a model with
``torch.fx``; the tracer lives in :mod:`qapfuse.fusion.tracing`, the errors in
:mod:`qapfuse.fusion.errors`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from .errors import SpecError

__all__ = [
    "AxisEntry",
    "PermutationSpec",
    "Segment",
    "check_same_shapes",
]


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
            f"The entry axes[{key!r}][{axis}] of PermutationSpec must be None, a group name, a "
            f"Segment or a non-empty tuple of those. Got {entry!r} instead."
        )
    segs = []
    for part in entry:
        if isinstance(part, str):
            part = Segment(part, 1)
        if not isinstance(part, Segment):
            raise TypeError(
                f"The entry axes[{key!r}][{axis}] of PermutationSpec must hold group names or "
                f"Segments. Got {part!r} of type {type(part).__name__} instead."
            )
        if not isinstance(part.group, str) or not part.group:
            raise TypeError(
                f"The group names in axes[{key!r}][{axis}] of PermutationSpec must be non-empty "
                f"strings. Got {part.group!r} instead."
            )
        if isinstance(part.block, bool) or not isinstance(part.block, int) or part.block < 1:
            raise ValueError(
                f"The block of Segment {part.group!r} in axes[{key!r}][{axis}] of PermutationSpec "
                f"must be an int >= 1. Got {part.block!r} instead."
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
                raise TypeError(
                    f"The keys of the 'axes' parameter of PermutationSpec must be str (state_dict "
                    f"keys). Got {key!r} of type {type(key).__name__} instead."
                )
            if isinstance(entries, (str, Segment)) or not isinstance(entries, Iterable):
                raise TypeError(
                    f"axes[{key!r}] (the 'axes' parameter of PermutationSpec) must be a tuple with "
                    f"one entry per tensor axis. Got {entries!r} instead."
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
                raise TypeError(
                    "The 'sizes' parameter of PermutationSpec must be a mapping of group names to "
                    f"ints, or None. Got {type(sizes).__name__} instead."
                )
            missing = [g for g in groups if g not in sizes]
            if missing:
                raise ValueError(
                    f"The 'sizes' parameter of PermutationSpec lacks the groups {missing}."
                )
            for g in groups:
                s = sizes[g]
                if isinstance(s, bool) or not isinstance(s, int) or s < 1:
                    raise ValueError(
                        f"sizes[{g!r}] (the 'sizes' parameter of PermutationSpec) must be an int "
                        f">= 1. Got {s!r} instead."
                    )
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
