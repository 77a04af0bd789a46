"""Networks as weighted graphs: channels are nodes, weights are edges.

:func:`to_graph` splits a ``state_dict`` along its :class:`PermutationSpec`:

* every group is a set of nodes (its channels); input and output groups are fixed;
* a tensor with two channel axes (a Linear or Conv weight) is an :class:`Edge` set between
  its out-group (first channel axis) and in-group (second): ``features[i, j]`` is everything
  linking channel ``i`` to channel ``j`` (a Conv edge carries its ``kh*kw`` kernel, a Linear
  after a flatten its ``H*W`` block);
* a tensor with one channel axis (bias, BatchNorm/LayerNorm parameters and running statistics)
  is a :class:`NodeFeature` of its group: ``features[i]`` belongs to channel ``i``;
* tensors without a channel axis (``num_batches_tracked``) are kept as they are.

:func:`from_graph` puts the pieces back; the round trip is exact (only reshapes and transposes).
Alignment code iterates over ``graph.edges`` and ``graph.nodes`` without knowing layer types.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch

from .errors import SpecError
from .spec import PermutationSpec

__all__ = ["Edge", "NetworkGraph", "NodeFeature", "from_graph", "to_graph"]


@dataclass(frozen=True, eq=False, repr=False)
class Edge:
    """The weights between two groups carried by one tensor (or one piece of a concatenated axis).

    Attributes
    ----------
    key : str
        The ``state_dict`` key of the tensor.
    out_group, in_group : str
        Groups on the tensor's first and second channel axis (for a Linear/Conv weight, the
        output and input channels).
    features : Tensor of shape (n_out, n_in, f)
        ``features[i, j]`` holds the ``f`` weights from channel ``j`` of `in_group` to channel
        ``i`` of `out_group`: ``f = kh*kw`` for a Conv, ``H*W`` for a Linear after a flatten, 1
        for a plain Linear. May share memory with the state dict.
    out_axis, in_axis : int
        The tensor axes of the two groups.
    out_block, in_block : int
        Entries per channel on those axes (see :class:`Segment`).
    out_offset, in_offset : int
        Where this piece starts on those axes (non-zero only after ``torch.cat``).
    """

    key: str
    out_group: str
    in_group: str
    features: torch.Tensor
    out_axis: int = 0
    in_axis: int = 1
    out_block: int = 1
    in_block: int = 1
    out_offset: int = 0
    in_offset: int = 0

    def __repr__(self) -> str:
        return (
            f"Edge({self.key!r}: {self.out_group} <- {self.in_group}, "
            f"features {tuple(self.features.shape)})"
        )


@dataclass(frozen=True, eq=False, repr=False)
class NodeFeature:
    """Per-channel values of one group carried by one tensor (bias, norm parameters, ...).

    Attributes
    ----------
    key : str
        The ``state_dict`` key.
    group : str
        The group whose channels the values belong to.
    features : Tensor of shape (n, f)
        ``features[i]`` belongs to channel ``i`` (``f = 1`` for a bias; ``H*W`` for a
        LayerNorm over (C, H, W)). May share memory with the state dict.
    axis, block, offset : int
        The tensor's channel axis, entries per channel on it, and where this piece starts.
    """

    key: str
    group: str
    features: torch.Tensor
    axis: int = 0
    block: int = 1
    offset: int = 0

    def __repr__(self) -> str:
        return f"NodeFeature({self.key!r}: {self.group}, features {tuple(self.features.shape)})"


@dataclass(frozen=True, eq=False, repr=False)
class NetworkGraph:
    """A network as a weighted graph over channel groups.

    Attributes
    ----------
    spec : PermutationSpec
        The spec used (with sizes).
    groups : dict of str to int
        Every group and its number of nodes (channels), in spec order.
    fixed : frozenset of str
        Groups whose nodes must keep their order (input and output channels).
    edges : tuple of Edge
        One entry per weight tensor with two channel axes (more after ``torch.cat``).
    nodes : tuple of NodeFeature
        One entry per tensor with one channel axis.
    constants : dict of str to Tensor
        Tensors without a channel axis, unchanged.
    shapes : dict of str to tuple of int
        Shape of every ``state_dict`` entry, in the original key order.
    """

    spec: PermutationSpec
    groups: dict[str, int]
    fixed: frozenset[str]
    edges: tuple[Edge, ...]
    nodes: tuple[NodeFeature, ...]
    constants: dict[str, torch.Tensor]
    shapes: dict[str, tuple[int, ...]]
    _meta: dict[str, tuple[torch.dtype, torch.device]] = field(default_factory=dict)

    @property
    def free_groups(self) -> tuple[str, ...]:
        """Groups whose channels may be permuted."""
        return tuple(g for g in self.groups if g not in self.fixed)

    def edges_into(self, group: str) -> Iterator[Edge]:
        """Edges whose `in_group` is `group` (the weights that consume its channels)."""
        return (e for e in self.edges if e.in_group == group)

    def edges_out_of(self, group: str) -> Iterator[Edge]:
        """Edges whose `out_group` is `group` (the weights that produce its channels)."""
        return (e for e in self.edges if e.out_group == group)

    def node_features(self, group: str) -> Iterator[NodeFeature]:
        """Node features of `group`."""
        return (n for n in self.nodes if n.group == group)

    def __repr__(self) -> str:
        return (
            f"NetworkGraph({len(self.groups)} groups ({len(self.free_groups)} free, "
            f"{sum(self.groups.values())} nodes), {len(self.edges)} edge sets, "
            f"{len(self.nodes)} node features, {len(self.constants)} constants)"
        )


def _pieces(entry, sizes: Mapping[str, int]) -> list[tuple[str, int, int, int]]:
    """(group, block, offset, length) of each segment of an axis."""
    out, offset = [], 0
    for seg in entry:
        length = sizes[seg.group] * seg.block
        out.append((seg.group, seg.block, offset, length))
        offset += length
    return out


def to_graph(
    state_dict: Mapping[str, torch.Tensor] | torch.nn.Module, spec: PermutationSpec
) -> NetworkGraph:
    """Turn a network's state dict into a :class:`NetworkGraph` (nodes: channels; edges: weights).

    Parameters
    ----------
    state_dict : mapping of str to Tensor, or torch.nn.Module
        The network's parameters and buffers.
    spec : PermutationSpec
        The network's spec (from :func:`trace`); sizes are inferred if missing.

    Returns
    -------
    NetworkGraph
        See its attributes; :func:`from_graph` inverts this exactly.

    Raises
    ------
    SpecError
        If the state dict does not match the spec (the message names the key), or a tensor has
        more than two channel axes.

    Examples
    --------
    >>> import torch
    >>> from qapfuse.fusion import trace
    >>> from qapfuse.fusion.models import MLP
    >>> model = MLP(4, (3,), 2)
    >>> g = to_graph(model.state_dict(), trace(model, torch.zeros(1, 4)))
    >>> [(e.key, e.out_group, e.in_group, tuple(e.features.shape)) for e in g.edges]
    [('layers.0.weight', 'layers.0', 'input', (3, 4, 1)), ('layers.2.weight', 'output', 'layers.0', (2, 3, 1))]
    """  # noqa: E501
    if isinstance(state_dict, torch.nn.Module):
        state_dict = state_dict.state_dict()
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"The 'state_dict' parameter of to_graph must be a state dict or a torch.nn.Module. "
            f"Got {type(state_dict).__name__} instead."
        )
    if not isinstance(spec, PermutationSpec):
        raise TypeError(
            f"The 'spec' parameter of to_graph must be a PermutationSpec. "
            f"Got {type(spec).__name__} instead."
        )
    spec = spec.resolve(state_dict)
    sizes = spec.sizes
    edges: list[Edge] = []
    nodes: list[NodeFeature] = []
    constants: dict[str, torch.Tensor] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    meta: dict[str, tuple[torch.dtype, torch.device]] = {}
    for key, tensor in state_dict.items():
        t = tensor.detach()
        shapes[key] = tuple(t.shape)
        meta[key] = (t.dtype, t.device)
        chan = [a for a, e in enumerate(spec.axes[key]) if e is not None]
        if not chan:
            constants[key] = t
        elif len(chan) == 1:
            a = chan[0]
            moved = t.movedim(a, 0)
            for group, block, offset, length in _pieces(spec.axes[key][a], sizes):
                piece = moved.narrow(0, offset, length).reshape(sizes[group], -1)
                nodes.append(NodeFeature(key, group, piece, a, block, offset))
        elif len(chan) == 2:
            a, b = chan
            moved = t.movedim((a, b), (0, 1))
            rest = moved.shape[2:]
            for go, bo, oo, lo in _pieces(spec.axes[key][a], sizes):
                for gi, bi, oi, li in _pieces(spec.axes[key][b], sizes):
                    piece = moved.narrow(0, oo, lo).narrow(1, oi, li)
                    piece = piece.reshape(sizes[go], bo, sizes[gi], bi, *rest)
                    piece = piece.transpose(1, 2).reshape(sizes[go], sizes[gi], -1)
                    edges.append(Edge(key, go, gi, piece, a, b, bo, bi, oo, oi))
        else:
            raise SpecError(
                f"state_dict[{key!r}] has {len(chan)} channel axes {chan}; a NetworkGraph "
                "supports at most two per tensor (permute() still handles it)."
            )
    return NetworkGraph(
        spec=spec,
        groups=dict(sizes),
        fixed=spec.fixed,
        edges=tuple(edges),
        nodes=tuple(nodes),
        constants=constants,
        shapes=shapes,
        _meta=meta,
    )


def from_graph(graph: NetworkGraph) -> OrderedDict[str, torch.Tensor]:
    """Rebuild the state dict of a :class:`NetworkGraph` (exact inverse of :func:`to_graph`).

    Edge and node features may have been replaced (e.g. by aligned or averaged ones) as long as
    their shapes are unchanged.

    Parameters
    ----------
    graph : NetworkGraph

    Returns
    -------
    OrderedDict of str to Tensor
        New tensors, in the original key order, shapes, dtypes and devices.
    """
    if not isinstance(graph, NetworkGraph):
        raise TypeError(
            f"The 'graph' parameter of from_graph must be a NetworkGraph. "
            f"Got {type(graph).__name__} instead."
        )
    sizes = graph.groups
    buffers: dict[str, torch.Tensor] = {}

    def buffer(key: str, axes: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        if key not in buffers:
            shape = graph.shapes[key]
            moved = [shape[a] for a in axes] + [s for i, s in enumerate(shape) if i not in axes]
            dtype, device = graph._meta.get(key, (like.dtype, like.device))
            buffers[key] = torch.empty(moved, dtype=dtype, device=device)
        return buffers[key]

    for n in graph.nodes:
        buf = buffer(n.key, (n.axis,), n.features)
        n_ch = sizes[n.group]
        if tuple(n.features.shape[:1]) != (n_ch,):
            raise SpecError(
                f"The node feature of {n.key!r} has shape {tuple(n.features.shape)}; expected "
                f"{n_ch} rows for group {n.group!r}."
            )
        target = buf.narrow(0, n.offset, n_ch * n.block)
        target.copy_(n.features.reshape(target.shape))
    for e in graph.edges:
        buf = buffer(e.key, (e.out_axis, e.in_axis), e.features)
        no, ni = sizes[e.out_group], sizes[e.in_group]
        target = buf.narrow(0, e.out_offset, no * e.out_block).narrow(
            1, e.in_offset, ni * e.in_block
        )
        rest = target.shape[2:]
        src = e.features.reshape(no, ni, e.out_block, e.in_block, *rest).transpose(1, 2)
        target.copy_(src.reshape(target.shape))
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, shape in graph.shapes.items():
        if key in graph.constants:
            out[key] = graph.constants[key].clone()
            continue
        chan = [a for a, e in enumerate(graph.spec.axes[key]) if e is not None]
        out[key] = buffers[key].movedim(tuple(range(len(chan))), tuple(chan)).contiguous()
        if tuple(out[key].shape) != shape:  # pragma: no cover - guarded by construction
            raise SpecError(f"Rebuilt {key!r} with shape {tuple(out[key].shape)}, not {shape}.")
    return out
