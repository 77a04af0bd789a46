"""Tracing: derive a model's :class:`~qapfuse.fusion.spec.PermutationSpec` with ``torch.fx``.

:func:`trace` captures the fx graph (symbolically, or with a concrete tracer that runs every op
on the example input when shape-dependent control flow defeats the symbolic one) and hands it
to the shape pass in :mod:`qapfuse.fusion._analyser`.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ._analyser import _Analyser
from .errors import TracingError
from .spec import PermutationSpec

__all__ = ["trace"]

# The tracer's records keep the logger name they had before it moved out of `spec`.
_logger = logging.getLogger("qapfuse.fusion.spec")


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
    model: torch.nn.Module,
    example_input: torch.Tensor | tuple[torch.Tensor, ...],
    *,
    allow_unplaced: bool = False,
) -> PermutationSpec:
    """Derive the permutation spec of `model` by tracing it with ``torch.fx``.

    The model is traced symbolically (falling back to a trace that runs every op on
    `example_input`, for shape-dependent control flow), then the graph is run on
    `example_input` to learn shapes, and channel groups are propagated through it: Linear and
    Conv layers start a group on their outputs; normalisation layers, element-wise ops,
    activations, pooling and dropout pass groups through; flatten/view turn channel ``c`` into
    the block of ``H*W`` inputs it feeds; a residual ``add`` merges the groups it joins; ``cat``
    concatenates them. Groups of the model's input and output are fixed. A weight computed from
    stored tensors (weight norm, spectral norm, pruning) passes its layout on to them.

    Parameters
    ----------
    model : torch.nn.Module
        The network. It is run in eval mode without gradients; its training flags are restored.
    example_input : Tensor or tuple of Tensor
        An input batch the model accepts, e.g. of shape (1, 3, 32, 32).
    allow_unplaced : bool, default False
        Parameters and buffers that the traced forward pass never uses cannot be given a
        channel group. By default they raise
        :class:`~qapfuse.fusion.errors.UnplacedTensorError`; with True they get
        ``None`` on every axis (never permuted) and a warning is logged.

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
        axis (attention, ``torch.roll``, indexing along channels, grouped convs, ...), or a
        weight on such an axis is computed by a parametrization without a known rule
        (``orthogonal``, one's own). The error names the fx node and op (and the parameter and
        parametrization).
    UnplacedTensorError
        If a parameter or buffer is not used by the traced forward pass (unless
        `allow_unplaced`). The error lists the keys.

    Examples
    --------
    >>> import torch
    >>> from qapfuse.fusion.models import MLP
    >>> spec = trace(MLP(784, (32, 32), 10), torch.zeros(1, 784))
    >>> spec.free_groups
    ('layers.0', 'layers.2')
    """
    if not isinstance(allow_unplaced, bool):
        raise TypeError(
            f"The 'allow_unplaced' parameter of trace must be a bool. Got {allow_unplaced!r} of "
            f"type {type(allow_unplaced).__name__} instead."
        )
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
            analyser = _Analyser(gm, shapes, model=model)
            analyser.run(*inputs)
            spec = analyser.finish(allow_unplaced=allow_unplaced)
    finally:
        for m, mode in modes:
            m.training = mode
    return spec.resolve(model.state_dict())
