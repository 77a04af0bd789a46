"""Model fusion: networks as permutation-symmetric weighted graphs.

Part 1 (this package so far): :func:`trace` derives a :class:`PermutationSpec` from a model,
:func:`permute` applies channel permutations, :func:`to_graph` / :func:`from_graph` turn a
state dict into a :class:`NetworkGraph` and back; :func:`align` puts 2..N models into one
common channel order (GAMF and first-order baselines). See ``docs/fusion.md``.
"""

try:
    import torch  # noqa: F401
except ModuleNotFoundError as exc:  # torch is an optional dependency of the QAP core
    if exc.name != "torch":
        raise
    raise ModuleNotFoundError(
        "qapfuse.fusion needs torch, which is not installed: "
        "pip install 'qapfuse[fusion]' (or install a torch build for your machine first).",
        name="torch",
    ) from None

from .align import Alignment, align
from .graph import Edge, NetworkGraph, NodeFeature, from_graph, to_graph
from .permute import identity_permutations, permute, random_permutations
from .spec import (
    PermutationSpec,
    Segment,
    SpecError,
    TracingError,
    UnsupportedOpError,
    check_same_shapes,
)
from .tracing import trace

__all__ = [
    "Alignment",
    "Edge",
    "NetworkGraph",
    "NodeFeature",
    "PermutationSpec",
    "Segment",
    "SpecError",
    "TracingError",
    "UnsupportedOpError",
    "align",
    "check_same_shapes",
    "from_graph",
    "identity_permutations",
    "permute",
    "random_permutations",
    "to_graph",
    "trace",
]

# data, training, fusion and repair (helper F)
from .data import ImageData, load_dataset, split_dataset, split_indices
from .fuse import fuse, fuse_aligned
from .repair import repair_statistics, reset_bn
from .training import evaluate, predict_ensemble, seeded, train

__all__ += [
    "ImageData",
    "evaluate",
    "fuse",
    "fuse_aligned",
    "load_dataset",
    "predict_ensemble",
    "repair_statistics",
    "reset_bn",
    "seeded",
    "split_dataset",
    "split_indices",
    "train",
]
