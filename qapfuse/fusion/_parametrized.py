"""Weights computed from stored tensors: parametrizations, weight-norm hooks and pruning masks.

A wrapped layer's ``weight`` is not in its ``state_dict``; it is computed in every forward
pass from tensors that are (``torch.nn.utils.parametrizations.weight_norm`` stores
``parametrizations.weight.original0`` and ``original1``). The tracer sees the computed weight;
:func:`computed_tensors` says, for each such weight, which stored tensors it comes from and
how their axes follow the weight's axes, so that a permutation of the stored tensors permutes
the computed weight the same way. Known rules (each keeps the function under any
spec-consistent permutation):

* weight norm, ``w = g * v / ||v||`` with the norm over every axis but `dim`
  (``torch.nn.utils.parametrizations.weight_norm``: ``original0`` = g, ``original1`` = v; the
  old ``torch.nn.utils.weight_norm``: ``weight_g``, ``weight_v``): v is laid out like w; g
  carries w's channels on axis `dim` only (``dim=None`` normalises by the whole tensor, and g
  is then a scalar);
* spectral norm, ``w = original / sigma``, ``sigma = u^T W v`` with ``W`` the weight as a matrix
  of rows along `dim` (``parametrizations.spectral_norm``: ``original``, ``<i>._u``,
  ``<i>._v``; the old ``spectral_norm``: ``weight_orig``, ``weight_u``, ``weight_v``): the
  original is laid out like w, u like w's axis `dim`, v like the other axes flattened. sigma
  and the power iteration that updates u and v in training mode are invariant to a
  permutation of rows and columns that moves u and v along;
* pruning (``torch.nn.utils.prune``): ``weight_orig`` and ``weight_mask`` are laid out like w.

Anything else (``orthogonal``, a parametrization of one's own) is refused with the name of the
parameter and the parametrization. Used by :class:`qapfuse.fusion._analyser._Analyser`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.utils import parametrizations, parametrize
from torch.nn.utils.prune import BasePruningMethod
from torch.nn.utils.spectral_norm import SpectralNorm as _OldSpectralNorm
from torch.nn.utils.weight_norm import WeightNorm as _OldWeightNorm

Entry = Any
"""One axis in the analyser's form: ``None`` or a tuple of ``(group id, block)`` pairs."""

Rule = Callable[[Sequence[Entry]], dict[str, list[Entry]]]

# torch keeps the parametrization classes private; compare types exactly, so that a subclass
# with another forward is refused rather than trusted.
_NEW_WEIGHT_NORM = getattr(parametrizations, "_WeightNorm", None)
_NEW_SPECTRAL_NORM = getattr(parametrizations, "_SpectralNorm", None)


class NoRuleError(Exception):
    """A computed tensor whose layout qapfuse cannot derive (the reason is the message)."""


@dataclass(frozen=True)
class Computed:
    """A tensor computed in forward from stored ``state_dict`` entries.

    Attributes
    ----------
    key : str
        Its qualified name as the model reads it (``"fc.weight"``); not a ``state_dict`` key.
    how : str
        The parametrization or hook that computes it, for messages.
    stored : tuple of str
        The ``state_dict`` keys it is computed from (originals, buffers).
    ndim : int or None
        Its number of axes (None where the rule is unknown).
    rule : callable or None
        Maps the computed tensor's entries (one per axis) to the entries of every stored key;
        raises :class:`NoRuleError` where they cannot be expressed. None: no rule applies.
    why : str
        Why no rule applies, where more is known than the parametrization's name.
    """

    key: str
    how: str
    stored: tuple[str, ...]
    ndim: int | None
    rule: Rule | None
    why: str = ""

    def place(self, entries: Sequence[Entry]) -> dict[str, list[Entry]]:
        """Entries of every stored tensor, given the computed tensor's; or raise NoRuleError."""
        if self.rule is None:
            raise NoRuleError(
                f"{self.key!r} is computed from {_listing(self.stored)} by {self.how}, which "
                "qapfuse has no permutation rule for"
                + (
                    f" ({self.why})"
                    if self.why
                    else " (it knows weight_norm, spectral_norm and pruning masks)"
                )
            )
        return self.rule(entries)


def _listing(keys: Sequence[str]) -> str:
    return ", ".join(repr(k) for k in keys)


def _like(*keys: str) -> Rule:
    """Every stored tensor is laid out like the computed one."""
    return lambda w: {k: list(w) for k in keys}


def _weight_norm(g_key: str, v_key: str, dim: int, shapes: Mapping[str, tuple[int, ...]]) -> Rule:
    w_shape = shapes[v_key]
    nd = len(w_shape)
    d = None if dim == -1 else dim % nd  # torch: dim=-1 (or None) normalises the whole tensor
    expected = () if d is None else tuple(s if i == d else 1 for i, s in enumerate(w_shape))
    if shapes[g_key] != expected and not (d is None and math.prod(shapes[g_key]) == 1):
        raise NoRuleError(
            f"{g_key!r} has shape {shapes[g_key]}, but weight norm over dim={dim} of a weight of "
            f"shape {w_shape} gives {expected}"
        )

    def rule(w: Sequence[Entry]) -> dict[str, list[Entry]]:
        g = [w[i] if i == d else None for i in range(len(shapes[g_key]))]
        return {g_key: g, v_key: list(w)}

    return rule


def _spectral_vectors(
    u_key: str, v_key: str, dim: int, w_shape: tuple[int, ...], what: str
) -> Rule:
    """u follows the weight's axis `dim`; v the other axes, flattened in order."""
    nd = len(w_shape)
    d = dim % nd
    rest = [i for i in range(nd) if i != d]

    def rule(w: Sequence[Entry]) -> dict[str, list[Entry]]:
        chan = [i for i in rest if w[i] is not None]
        if len(chan) > 1:
            raise NoRuleError(
                f"{v_key!r} ({what}) flattens the channel axes {chan} of a weight of shape "
                f"{w_shape} into one vector, which a permutation spec cannot express"
            )
        v: Entry = None
        if chan:
            i = chan[0]
            outer = math.prod(w_shape[j] for j in rest if j < i)
            inner = math.prod(w_shape[j] for j in rest if j > i)
            if outer != 1:
                raise NoRuleError(
                    f"{v_key!r} ({what}) repeats the channels of axis {i} of a weight of shape "
                    f"{w_shape} {outer} times, which a permutation spec cannot express"
                )
            v = tuple((g, b * inner) for g, b in w[i])
        return {u_key: [w[d]], v_key: [v]}

    return rule


def _joined(*rules: Rule) -> Rule:
    def rule(w: Sequence[Entry]) -> dict[str, list[Entry]]:
        out: dict[str, list[Entry]] = {}
        for r in rules:
            out.update(r(w))
        return out

    return rule


def _describe(p: torch.nn.Module) -> str:
    cls = type(p)
    if cls.__module__ == parametrizations.__name__ and cls.__name__.startswith("_"):
        public = re.sub(r"(?<!^)([A-Z])", r"_\1", cls.__name__[1:]).lower()  # _WeightNorm
        return f"the parametrization {cls.__name__} ({parametrizations.__name__}.{public})"
    return f"the parametrization {cls.__module__}.{cls.__qualname__}"


def _ndim_of(module: torch.nn.Module, name: str) -> int | None:
    """Axes of a computed tensor, by computing it (the model runs in eval mode here)."""
    try:
        with torch.no_grad():
            return getattr(module, name).ndim
    except Exception:  # a parametrization of one's own may fail here; the forward pass reports it
        return None


def _parametrization(
    prefix: str, name: str, module: torch.nn.Module, shapes: Mapping[str, tuple[int, ...]]
) -> Computed:
    plist = module.parametrizations[name]
    base = f"{prefix}parametrizations.{name}."
    stored = tuple(base + k for k in plist.state_dict() if base + k in shapes)
    chain = list(plist)
    how = " then ".join(_describe(p) for p in chain)
    key = prefix + name
    try:
        rules: list[Rule] = []
        covered: set[str] = set()
        first = chain[0]
        if type(first) is _NEW_WEIGHT_NORM and not plist.is_tensor:
            g_key, v_key = base + "original0", base + "original1"
            rules.append(_weight_norm(g_key, v_key, first.dim, shapes))
            covered |= {g_key, v_key}
            w_key = v_key
        elif type(first) is _NEW_SPECTRAL_NORM and plist.is_tensor:
            w_key = base + "original"
            rules.append(_like(w_key))
            covered.add(w_key)
        else:
            raise NoRuleError("")
        for i, p in enumerate(chain):
            if i > 0 and type(p) is not _NEW_SPECTRAL_NORM:
                raise NoRuleError(f"after {_describe(chain[0])}, only spectral_norm is understood")
            if type(p) is _NEW_SPECTRAL_NORM and len(shapes[w_key]) > 1:  # 1-d: no vectors
                u_key, v_key = f"{base}{i}._u", f"{base}{i}._v"
                what = f"the spectral norm's right singular vector of {key!r}"
                rules.append(_spectral_vectors(u_key, v_key, p.dim, shapes[w_key], what))
                covered |= {u_key, v_key}
        if set(stored) != covered:
            extra = sorted(set(stored) - covered)
            raise NoRuleError(f"it also stores {_listing(extra)}" if extra else "")
    except NoRuleError as e:
        return Computed(key, how, stored, _ndim_of(module, name), None, str(e))
    return Computed(key, how, stored, len(shapes[w_key]), _joined(*rules))


def _hook(prefix: str, hook: Any, shapes: Mapping[str, tuple[int, ...]]) -> Computed | None:
    if isinstance(hook, _OldWeightNorm):
        name = hook.name
        g_key, v_key = f"{prefix}{name}_g", f"{prefix}{name}_v"
        how = "the forward pre-hook torch.nn.utils.weight_norm"
        try:
            rule = _weight_norm(g_key, v_key, hook.dim, shapes)
        except NoRuleError as e:
            return Computed(prefix + name, how, (g_key, v_key), None, None, str(e))
        return Computed(prefix + name, how, (g_key, v_key), len(shapes[v_key]), rule)
    if isinstance(hook, _OldSpectralNorm):
        name = hook.name
        w_key, u_key, v_key = (f"{prefix}{name}_{s}" for s in ("orig", "u", "v"))
        what = f"the spectral norm's right singular vector of {prefix + name!r}"
        vectors = _spectral_vectors(u_key, v_key, hook.dim, shapes[w_key], what)
        return Computed(
            prefix + name,
            "the forward pre-hook torch.nn.utils.spectral_norm",
            (w_key, u_key, v_key),
            len(shapes[w_key]),
            _joined(_like(w_key), vectors),
        )
    if isinstance(hook, BasePruningMethod):
        name = hook._tensor_name
        keys = (f"{prefix}{name}_orig", f"{prefix}{name}_mask")
        how = f"the pruning hook {type(hook).__name__} (torch.nn.utils.prune)"
        return Computed(prefix + name, how, keys, len(shapes[keys[0]]), _like(*keys))
    return None


def computed_tensors(
    root: torch.nn.Module, shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, Computed]:
    """Every tensor of `root` computed from stored ones, by its qualified name.

    Parameters
    ----------
    root : torch.nn.Module
        The traced model.
    shapes : mapping of str to tuple of int
        Shapes of ``root.state_dict()``.

    Returns
    -------
    dict of str to Computed
        Keyed by the name the model reads (``"fc.weight"``).
    """
    out: dict[str, Computed] = {}
    for mod_name, module in root.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        if parametrize.is_parametrized(module):
            for name in module.parametrizations:
                out[prefix + name] = _parametrization(prefix, name, module, shapes)
        for hook in module._forward_pre_hooks.values():
            comp = _hook(prefix, hook, shapes)
            if comp is not None:
                out[comp.key] = comp
    return out
