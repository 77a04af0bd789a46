"""Read and write model checkpoints safely: state dicts only, never unpickled code.

A checkpoint is a state dict (parameter names mapped to tensors) saved either with
``torch.save(model.state_dict(), "a.pt")`` or with safetensors (``a.safetensors``).
:func:`load_state_dict` reads ``.pt``/``.pth``/``.bin`` files with
``torch.load(weights_only=True)``, which rebuilds tensors and plain containers but refuses
any other Python object, so a tampered file cannot run code on load; safetensors files hold
no code at all. :func:`check_compatible` says, before any weights are copied, whether
checkpoints fit one model: the first key that differs (another architecture) or the first
shape that differs (another width).
"""

from __future__ import annotations

import pickle
import re
import warnings
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "CheckpointError",
    "check_compatible",
    "load_into",
    "load_state_dict",
    "save_state_dict",
]

SAFETENSORS_SUFFIX = ".safetensors"
# Keys under which training scripts commonly nest the state dict in a checkpoint dict.
_NESTED_KEYS = ("state_dict", "model_state_dict", "model")
# The global that torch's weights-only unpickler refused, as its message names it.
_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)", re.IGNORECASE)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, not a state dict, or of another model."""


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _read_safetensors(path: Path) -> Mapping[str, Any]:
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError:
        raise CheckpointError(
            f"{path} is a safetensors file, but the safetensors package is not installed "
            "(pip install safetensors)."
        ) from None
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from None


def _read_torch(path: Path) -> Any:
    try:
        with warnings.catch_warnings():
            # A pickle protocol other than torch's own draws a warning; the check below decides.
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any failure of the reader means "unreadable" or "unsafe"
        message = str(exc)
        found = _GLOBAL_RE.search(message)
        if isinstance(exc, pickle.UnpicklingError) and found:
            # weights_only refuses every global it does not know: the file would run code (or
            # build arbitrary objects) if unpickled, so it is not loaded at all.
            detail = f" (it refers to {found.group(1)})" if found else ""
            raise CheckpointError(
                f"{path} needs unpickling of Python code or objects, which safe loading "
                f"(torch.load(weights_only=True)) refuses{detail}; save only the state dict: "
                "torch.save(model.state_dict(), path), or use safetensors."
            ) from None
        lines = [line.strip() for line in message.splitlines() if line.strip()]
        marker = [i for i, line in enumerate(lines) if "WeightsUnpickler error" in line]
        # torch wraps the reader's own error in a paragraph of advice: keep the error itself.
        first = (
            lines[marker[0] + 1]
            if marker and marker[0] + 1 < len(lines)
            else lines[0]
            if lines
            else ""
        )
        raise CheckpointError(
            f"{path} is not a readable torch checkpoint (torch.load failed: "
            f"{type(exc).__name__}{': ' + first if first else ''})."
        ) from None


def load_state_dict(path: str | Path) -> OrderedDict[str, torch.Tensor]:
    """Read a state dict from a ``.safetensors`` file or a torch file, without unpickling code.

    Parameters
    ----------
    path : str or Path
        A ``.safetensors`` file, or a file written by ``torch.save`` holding a state dict (or
        a dict with the state dict under ``"state_dict"``, ``"model_state_dict"`` or
        ``"model"``, as training scripts often save it).

    Returns
    -------
    OrderedDict of str to Tensor
        The state dict, on the CPU.

    Raises
    ------
    CheckpointError
        If the file is missing or unreadable, needs unpickling of code (which
        ``torch.load(weights_only=True)`` refuses), or holds something other than a state dict.

    Examples
    --------
    >>> import tempfile, torch
    >>> path = tempfile.mkdtemp() + "/lin.pt"
    >>> torch.save(torch.nn.Linear(3, 2).state_dict(), path)
    >>> sorted(load_state_dict(path))
    ['bias', 'weight']
    """
    if not isinstance(path, (str, Path)):
        raise TypeError(
            f"The 'path' parameter of load_state_dict must be a str or Path. "
            f"Got {type(path).__name__} instead."
        )
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no such checkpoint file: {str(path)!r}")
    if path.suffix == SAFETENSORS_SUFFIX:
        obj: Any = _read_safetensors(path)
    else:
        obj = _read_torch(path)
    if isinstance(obj, Mapping) and not _is_state_dict(obj):
        nested = [obj[k] for k in _NESTED_KEYS if k in obj and _is_state_dict(obj[k])]
        if nested:
            obj = nested[0]
    if not _is_state_dict(obj):
        if isinstance(obj, Mapping):
            bad = next(((k, v) for k, v in obj.items() if not isinstance(v, torch.Tensor)), None)
            what = (
                "an empty dict"
                if not obj
                else f"a dict whose entry {bad[0]!r} is a {type(bad[1]).__name__}"
                if bad is not None
                else "a dict with non-string keys"
            )
        else:
            what = f"a {type(obj).__name__}"
        raise CheckpointError(
            f"{path} is not a state dict (a mapping of parameter names to tensors): it holds "
            f"{what}."
        )
    return OrderedDict((k, v.detach().cpu()) for k, v in obj.items())


def _first_difference(
    sd: Mapping[str, torch.Tensor], name: str, ref: Mapping[str, torch.Tensor], ref_name: str
) -> str | None:
    """Why `sd` does not fit `ref`, naming the first differing key (another architecture) or
    shape (another width); None if keys and shapes agree. Keys go in `ref`'s order."""
    for key in ref:
        if key not in sd:
            return (
                f"{name} belongs to another architecture than {ref_name}: it lacks the key {key!r}"
            )
    for key in sd:
        if key not in ref:
            return (
                f"{name} belongs to another architecture than {ref_name}: it has the key {key!r}, "
                f"which {ref_name} lacks"
            )
    for key, t in ref.items():
        if tuple(sd[key].shape) != tuple(t.shape):
            return (
                f"{name} belongs to another width than {ref_name}: {key!r} has shape "
                f"{tuple(sd[key].shape)} in {name} but {tuple(t.shape)} in {ref_name}"
            )
    return None


def check_compatible(
    state_dicts: Sequence[Mapping[str, torch.Tensor]],
    model: nn.Module,
    *,
    names: Sequence[str] | None = None,
    model_name: str | None = None,
) -> None:
    """Check that checkpoints fit each other and `model`: same keys, same shapes.

    Every checkpoint is compared with the first one (so checkpoints of different widths are
    named as such), then the first with `model`.

    Parameters
    ----------
    state_dicts : sequence of mapping of str to Tensor
        The checkpoints' state dicts.
    model : torch.nn.Module
        The architecture they must load into.
    names : sequence of str, optional
        How to call each checkpoint in messages (e.g. its path).
    model_name : str, optional
        How to call the model in messages (e.g. ``"--model mlp"``).

    Raises
    ------
    CheckpointError
        Naming the checkpoint and the first differing key (another architecture) or the first
        differing shape (another width).

    Examples
    --------
    >>> from qapfuse.fusion.models import MLP
    >>> a, b = MLP(4, (3,), 2), MLP(4, (5,), 2)
    >>> try:
    ...     check_compatible([a.state_dict(), b.state_dict()], a, names=["a", "b"])
    ... except CheckpointError as exc:
    ...     print(exc)
    b belongs to another width than a: 'layers.0.weight' has shape (5, 4) in b but (3, 4) in a.
    """
    if names is None:
        names = [f"checkpoint {k}" for k in range(len(state_dicts))]
    model_name = model_name or type(model).__name__
    if not state_dicts:
        return
    reasons = (
        *(_first_difference(sd, names[k], state_dicts[0], names[0])
          for k, sd in enumerate(state_dicts) if k > 0),
        _first_difference(state_dicts[0], names[0], model.state_dict(), model_name),
    )  # fmt: skip
    for reason in reasons:
        if reason is not None:
            raise CheckpointError(reason + ".")


def load_into(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """Copy `state_dict` into `model` (after :func:`check_compatible`); return `model`."""
    model.load_state_dict(state_dict, strict=True)
    model.eval()
    return model


def save_state_dict(model: nn.Module | Mapping[str, torch.Tensor], path: str | Path) -> Path:
    """Save a model's state dict as safetensors (``.safetensors``) or with ``torch.save``.

    Either file loads back with :func:`load_state_dict` without unpickling code.

    Parameters
    ----------
    model : torch.nn.Module or state dict
    path : str or Path
        ``*.safetensors`` for safetensors, anything else for ``torch.save``.

    Returns
    -------
    Path
        The file written.
    """
    sd = model.state_dict() if isinstance(model, nn.Module) else model
    path = Path(path)
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in sd.items()}
    if path.suffix == SAFETENSORS_SUFFIX:
        from safetensors.torch import save_file

        save_file(tensors, str(path))
    else:
        torch.save(tensors, path)
    return path
