"""The errors of :mod:`qapfuse.fusion`.

Every one is a ``ValueError`` (bad input: a model, a spec or a state dict), so code that
catches ``ValueError`` around a fusion call keeps working:

* :class:`SpecError`: a permutation spec and a state dict (or permutations) disagree;
* :class:`TracingError`: :func:`~qapfuse.fusion.trace` could not derive a spec from a model;
* :class:`UnsupportedOpError` (a :class:`TracingError`): the model uses a permutation-sensitive
  op, or a computed weight, that qapfuse has no rule for;
* :class:`UnplacedTensorError` (a :class:`TracingError`): parameters or buffers that the
  traced forward pass never reaches, so no channel group can be given to them.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["SpecError", "TracingError", "UnplacedTensorError", "UnsupportedOpError"]


class SpecError(ValueError):
    """A permutation spec and a state dict (or permutations) do not agree."""


class TracingError(ValueError):
    """The model could not be traced into a permutation spec (see the message for why)."""


class UnsupportedOpError(TracingError):
    """The traced model contains a permutation-sensitive op that qapfuse does not understand.

    Also raised for a weight computed from other tensors (a parametrization such as
    ``torch.nn.utils.parametrizations.orthogonal``, or a forward pre-hook) whose rule is
    unknown: the message names the parameter and the parametrization.

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


class UnplacedTensorError(TracingError):
    """Parameters or buffers that the traced forward pass does not use.

    :func:`~qapfuse.fusion.trace` cannot tell which channels such a tensor belongs to, so
    permuting the model would leave it in the old order. Pass ``allow_unplaced=True`` to
    leave them unpermuted (with a logged warning), or write the spec by hand.

    Attributes
    ----------
    keys : tuple of str
        The ``state_dict`` keys that were not placed, in ``state_dict`` order.
    """

    def __init__(self, keys: Sequence[str]) -> None:
        self.keys = tuple(keys)
        shown = ", ".join(repr(k) for k in self.keys[:5])
        more = f" (and {len(self.keys) - 5} more)" if len(self.keys) > 5 else ""
        super().__init__(
            f"The traced forward pass does not use the state_dict entries {shown}{more}, so "
            "trace cannot tell which channel groups they belong to, and permuting the model "
            "would leave them in the old order. Pass allow_unplaced=True to trace to leave them "
            "unpermuted, or write a PermutationSpec by hand (see docs/fusion.md)."
        )
