"""Apply channel permutations to a network's state dict, following a :class:`PermutationSpec`."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ..backend import rng_from
from .errors import SpecError
from .spec import PermutationSpec

__all__ = ["identity_permutations", "permute", "random_permutations"]


def _state_dict_of(model_or_state_dict: Any, caller: str) -> Mapping[str, torch.Tensor]:
    if isinstance(model_or_state_dict, torch.nn.Module):
        return model_or_state_dict.state_dict()
    if isinstance(model_or_state_dict, Mapping):
        return model_or_state_dict
    raise TypeError(
        f"The 'model_or_state_dict' parameter of {caller} must be a torch.nn.Module or a state "
        f"dict. Got {type(model_or_state_dict).__name__} instead."
    )


def _check_perms(perms: Any, spec: PermutationSpec, caller: str) -> dict[str, torch.Tensor]:
    if not isinstance(perms, Mapping):
        raise TypeError(
            f"The 'perms' parameter of {caller} must be a mapping from group names to "
            f"permutations. Got {type(perms).__name__} instead."
        )
    sizes = spec.sizes
    out = {}
    for group, p in perms.items():
        if group not in sizes:
            raise ValueError(
                f"The 'perms' parameter of {caller} names the group {group!r}, which the spec "
                f"does not have. Groups: {list(spec.free_groups)}."
            )
        if isinstance(p, torch.Tensor):
            t = p.detach().to("cpu")
        else:
            t = torch.as_tensor(np.asarray(p))
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"perms[{group!r}] must hold integers; got dtype {t.dtype}.")
        t = t.to(torch.int64)
        n = sizes[group]
        if t.shape != (n,) or not torch.equal(torch.sort(t).values, torch.arange(n)):
            raise ValueError(
                f"perms[{group!r}] must be a permutation of range({n}) (group {group!r} has {n} "
                f"channels). Got shape {tuple(t.shape)}"
                + (" that is not a permutation." if t.shape == (n,) else ".")
            )
        if group in spec.fixed and not torch.equal(t, torch.arange(n)):
            raise ValueError(
                f"perms[{group!r}] permutes the fixed group {group!r} (the network's input or "
                "output channels); fixed groups only take the identity."
            )
        out[group] = t
    return out


def permute(
    model_or_state_dict: torch.nn.Module | Mapping[str, torch.Tensor],
    spec: PermutationSpec,
    perms: Mapping[str, Any],
) -> OrderedDict[str, torch.Tensor]:
    """Permute the channels of a network: channel ``i`` of group ``g`` becomes old ``perms[g][i]``.

    Every axis the spec assigns to ``g`` is reindexed with ``perms[g]`` (expanded to blocks
    where a flatten spreads a channel over ``H*W`` entries), so a spec-consistent permutation
    leaves the network's function unchanged.

    Parameters
    ----------
    model_or_state_dict : torch.nn.Module or mapping of str to Tensor
        The network, or its ``state_dict()``.
    spec : PermutationSpec
        From :func:`trace` or written by hand (sizes are inferred if missing).
    perms : mapping of str to array of shape (n_g,)
        A permutation of ``range(n_g)`` per group (numpy or torch integers). Groups left out
        keep their order; fixed groups accept only the identity.

    Returns
    -------
    OrderedDict of str to Tensor
        A new state dict (same keys, shapes, dtypes and devices); inputs are not modified.

    Raises
    ------
    SpecError
        If the state dict does not match the spec (the message names the key).
    ValueError, TypeError
        If a permutation is malformed or names an unknown group.

    Examples
    --------
    >>> import torch
    >>> from qapfuse.fusion import trace, random_permutations
    >>> from qapfuse.fusion.models import MLP
    >>> model = MLP(4, (3,), 2)
    >>> spec = trace(model, torch.zeros(1, 4))
    >>> sd = permute(model, spec, {"layers.0": [2, 0, 1]})
    >>> torch.equal(sd["layers.0.bias"], model.layers[0].bias.detach()[[2, 0, 1]])
    True
    """
    if not isinstance(spec, PermutationSpec):
        raise TypeError(
            f"The 'spec' parameter of permute must be a PermutationSpec. "
            f"Got {type(spec).__name__} instead."
        )
    sd = _state_dict_of(model_or_state_dict, "permute")
    spec = spec.resolve(sd)
    p = _check_perms(perms, spec, "permute")
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, tensor in sd.items():
        t = tensor.detach()
        changed = False
        for axis, entry in enumerate(spec.axes[key]):
            idx = spec.axis_index(entry, p)
            if idx is not None:
                t = torch.index_select(t, axis, idx.to(t.device))
                changed = True
        out[key] = t if changed else t.clone()
    return out


def random_permutations(
    spec: PermutationSpec, rng: int | np.random.Generator | torch.Generator | None = None
) -> dict[str, np.ndarray]:
    """A uniformly random permutation of every free group of `spec`.

    Parameters
    ----------
    spec : PermutationSpec
        Must have group sizes (traced specs do; else call ``spec.resolve(state_dict)``).
    rng : None, int, numpy.random.Generator or torch.Generator
        Seed or generator; the same seed (or generator state) gives the same permutations. A
        torch Generator is drawn from once, to seed the numpy generator that draws them.

    Returns
    -------
    dict of str to ndarray of shape (n_g,), dtype int64
        One permutation per free group (fixed groups are left out).

    Examples
    --------
    >>> import torch
    >>> from qapfuse.fusion import trace
    >>> from qapfuse.fusion.models import MLP
    >>> spec = trace(MLP(4, (3,), 2), torch.zeros(1, 4))
    >>> perms = random_permutations(spec, rng=torch.Generator().manual_seed(0))
    >>> sorted(perms["layers.0"].tolist())
    [0, 1, 2]
    """
    if not isinstance(spec, PermutationSpec):
        raise TypeError(
            f"The 'spec' parameter of random_permutations must be a PermutationSpec. "
            f"Got {type(spec).__name__} instead."
        )
    if spec.sizes is None:
        raise SpecError(
            "random_permutations needs the group sizes; call spec.resolve(state_dict) first."
        )
    gen = rng_from(rng, name="rng", caller="random_permutations")
    return {g: gen.permutation(spec.sizes[g]).astype(np.int64) for g in spec.free_groups}


def identity_permutations(spec: PermutationSpec) -> dict[str, np.ndarray]:
    """The identity permutation ``arange(n_g)`` of every free group (needs sizes)."""
    if not isinstance(spec, PermutationSpec):
        raise TypeError(
            f"The 'spec' parameter of identity_permutations must be a PermutationSpec. "
            f"Got {type(spec).__name__} instead."
        )
    if spec.sizes is None:
        raise SpecError(
            "identity_permutations needs the group sizes; call spec.resolve(state_dict) first."
        )
    return {g: np.arange(spec.sizes[g], dtype=np.int64) for g in spec.free_groups}
