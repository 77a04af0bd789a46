"""The tracer's shape pass: run the fx graph and propagate channel groups through every op.

:class:`_Analyser` runs the traced graph on the example input, applies each op's permutation
rule (see the table in ``docs/fusion.md``) and turns the groups it finds into a
:class:`~qapfuse.fusion.spec.PermutationSpec`. Used by :func:`qapfuse.fusion.tracing.trace`.
"""

from __future__ import annotations

import logging
import math
import operator
from collections.abc import Mapping
from typing import Any

import torch
from torch.nn.utils import parametrize

from ._ops import (
    _BATCH_NORM_NDIMS,
    _BINARY_FUNCS,
    _BINARY_METHODS,
    _CHANNEL_NORM_MODULES,
    _CONV_FUNCS,
    _CONV_MODULES,
    _ELEMENTWISE_MODULES,
    _OPAQUE,
    _POOL_FUNCS,
    _POOL_MODULES,
    _REDUCE_FUNCS,
    _REDUCE_METHODS,
    _RESHAPE_FUNCS,
    _RESHAPE_METHODS,
    _UNARY_FUNCS,
    _UNARY_METHODS,
    _conv_out_shape,
    _f,
    _Groups,
    _has_tensor,
    _Layout,
    _ntuple,
    _op_name,
    _Param,
    nn,
)
from ._parametrized import Computed, NoRuleError, computed_tensors
from .errors import TracingError, UnplacedTensorError, UnsupportedOpError
from .spec import AxisEntry, PermutationSpec, Segment

# The tracer's records keep the logger name they had before it moved out of `spec`.
_logger = logging.getLogger("qapfuse.fusion.spec")


class _Analyser(torch.fx.Interpreter):
    """Run the traced graph on the example input and give every value a channel layout."""

    def __init__(
        self,
        gm: torch.fx.GraphModule,
        shapes: Mapping[str, tuple[int, ...]],
        *,
        model: torch.nn.Module | None = None,
    ) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.extra_traceback = False
        self.shapes = shapes
        self.groups = _Groups()
        self.lay: dict[torch.fx.Node, Any] = {}
        self.axes: dict[str, list[Any]] = {}
        self.pending: list[tuple[str, str, str, list[int]]] = []
        self.outputs: list[int] = []
        self.n_inputs = sum(1 for n in gm.graph.nodes if n.op == "placeholder")
        # Weights computed from stored tensors (weight norm, ...), by the name the model reads,
        # found on the traced `model` (a GraphModule drops a parametrization of the root);
        # their first assignment (`computed_axes`) lets a shared module keep its output group.
        self.computed: dict[str, Computed] = computed_tensors(model or gm, shapes)
        self.computed_axes: dict[str, list[Any]] = {}
        self.stored_by: dict[str, str] = {
            k: c.key for c in self.computed.values() for k in c.stored
        }
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

    def _ndim(self, key: str) -> int | None:
        if key in self.shapes:
            return len(self.shapes[key])
        comp = self.computed.get(key)
        return None if comp is None else comp.ndim  # None: a parametrization that failed to run

    def _assign(self, n: torch.fx.Node, op: str, key: str | None, entries: list[Any]) -> None:
        if key is None:
            return
        if key in self.computed:
            self._assign_computed(n, op, self.computed[key], entries)
            return
        if key not in self.shapes:
            raise UnsupportedOpError(
                n.name,
                op,
                f"{key!r} is not in the state dict: it is computed (by a hook or in forward) "
                "from tensors qapfuse cannot relate to it",
            )
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

    def _assign_computed(self, n: torch.fx.Node, op: str, comp: Computed, entries: list) -> None:
        """Assign the stored tensors a computed weight comes from (its rule maps the axes)."""
        if comp.ndim is not None and len(entries) != comp.ndim:
            raise UnsupportedOpError(
                n.name, op, f"{comp.key!r} has {comp.ndim} axes, which this rule does not expect"
            )
        self.computed_axes.setdefault(comp.key, list(entries))
        try:
            placed = comp.place(entries)
        except NoRuleError as e:
            # Harmless while every group it touches ends up fixed (never permuted): decided
            # in `finish`, like an unknown op. Its stored tensors are not permuted.
            gids = [g for e_ in entries for g, _ in (e_ or ())]
            if gids:
                self.pending.append((n.name, op, str(e), gids))
            for key in comp.stored:
                self._assign(n, op, key, [None] * len(self.shapes[key]))
            return
        for key, stored_entries in placed.items():
            self._assign(n, op, key, stored_entries)

    def _logical_keys(self, prefix: str, m: torch.nn.Module) -> list[str]:
        """The tensors module `m` reads: its state_dict keys, computed weights by their name."""
        keys: dict[str, None] = {}
        for k in m.state_dict():
            key = prefix + k
            if key in self.stored_by:
                keys.setdefault(self.stored_by[key], None)
            elif key in self.shapes:
                keys.setdefault(key, None)
        return list(keys)

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
        if isinstance(m, parametrize.ParametrizationList):  # `self.w` read in forward
            owner, _, name = str(n.target).rpartition(".parametrizations.")
            key = f"{owner}.{name}" if owner else str(n.target).split(".", 1)[1]
            if key in self.computed:
                return _Param(key)
        keys = self._logical_keys(prefix, m)
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
        old = self.axes.get(key) or self.computed_axes.get(key)
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
        k = (self._ndim(wkey) or result.ndim) - 2
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
            nd = self._ndim(key)
            if nd is None or nd > 1:
                raise UnsupportedOpError(n.name, op, f"unexpected parameter shape of {key!r}")
            self._assign(n, op, key, [segs] * nd)
        return lay if isinstance(lay, _Layout) else _OPAQUE

    def _layer_norm(self, n, op, x, lay, keys, m) -> Any:
        first = x.ndim - m
        for key in keys:
            entries: list[Any] = [None] * (self._ndim(key) or 0)
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
                self._assign(n, op, p.key, [None] * (self._ndim(p.key) or 0))
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
                self._assign(n, "output", lay.key, [None] * (self._ndim(lay.key) or 0))
            return arg

        torch.fx.node.map_arg(n.args, visit)

    # -- result ------------------------------------------------------------------------------

    def finish(self, *, allow_unplaced: bool = False) -> PermutationSpec:
        """The spec; tensors the forward pass never reached raise unless `allow_unplaced`."""
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
        if unreached and not allow_unplaced:
            raise UnplacedTensorError(unreached)
        if unreached:
            _logger.warning(
                "%d state_dict entries are not used by the traced forward pass and are left "
                "unpermuted (allow_unplaced=True): %s",
                len(unreached),
                ", ".join(unreached[:5]) + (", ..." if len(unreached) > 5 else ""),
            )
        sizes = {names[r]: groups.size[r] for r in names}
        fixed = {names[r] for r in names if groups.fixed[r]}
        return PermutationSpec(axes, fixed=fixed, sizes=sizes)
