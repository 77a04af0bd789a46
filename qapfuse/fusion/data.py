"""Image classification data for fusion: the embedded digits, MNIST, Fashion-MNIST, CIFAR-10.

Nothing here downloads. ``digits`` is scikit-learn's ``load_digits`` (1,797 real 8x8 digits,
shipped inside scikit-learn); MNIST and Fashion-MNIST are read from IDX files and CIFAR-10 from
its python pickle batches, in a folder the user names. :func:`split_indices` /
:func:`split_dataset` deal the training set out to several models: ``same``, ``iid``,
``label-skew`` and ``dirichlet``.

Images come back as float32 tensors scaled to ``[0, 1]`` with shape ``(N, C, H, W)``; labels as
int64 tensors of shape ``(N,)``.
"""

from __future__ import annotations

import gzip
import io
import pickle
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch.utils.data import TensorDataset

from .._validation import check_choice, check_scalar

__all__ = [
    "DATASETS",
    "ImageData",
    "as_tensors",
    "load_cifar10",
    "load_dataset",
    "load_digits",
    "load_idx_dataset",
    "read_idx",
    "split_dataset",
    "split_indices",
]

DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10")
SPLITS = ("same", "iid", "label-skew", "dirichlet")

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST = "test_batch"

# IDX type codes (the third byte of the magic number) -> big-endian numpy dtypes.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclass(frozen=True, repr=False)
class ImageData:
    """A train/test pair of image tensors.

    Attributes
    ----------
    name : str
        Dataset name (``"digits"``, ``"mnist"``, ...).
    x_train, x_test : Tensor of shape (N, C, H, W), float32 in [0, 1]
    y_train, y_test : Tensor of shape (N,), int64
    num_classes : int
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def train(self) -> TensorDataset:
        """The training set as a ``TensorDataset`` of ``(image, label)``."""
        return TensorDataset(self.x_train, self.y_train)

    @property
    def test(self) -> TensorDataset:
        """The test set as a ``TensorDataset`` of ``(image, label)``."""
        return TensorDataset(self.x_test, self.y_test)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """``(C, H, W)`` of one image."""
        return tuple(self.x_train.shape[1:])

    def __repr__(self) -> str:
        return (
            f"ImageData({self.name!r}, train={len(self.y_train)}, test={len(self.y_test)}, "
            f"input_shape={self.input_shape}, num_classes={self.num_classes})"
        )


# -- readers -------------------------------------------------------------------------------------


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (gzip-compressed when its name ends in ``.gz``).

    Parameters
    ----------
    path : str or Path
        The file. IDX: two zero bytes, a type code, the number of dimensions, the dimensions as
        big-endian int32, then the data.

    Returns
    -------
    ndarray
        The array, with the file's shape and a native-endian dtype.

    Raises
    ------
    ValueError
        If the header is malformed or the data length disagrees with it.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {raw[:4]!r}).")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header.")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"{path}: the header says shape {shape} ({expected} bytes of data) but the file "
            f"holds {len(raw) - header} bytes."
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def _find(root: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    return None


def _check_root(root: Any, name: str) -> Path:
    if root is None:
        raise ValueError(
            f"Dataset {name!r} is read from files on disk; pass `root`, the folder that holds "
            "them (nothing is downloaded)."
        )
    if not isinstance(root, (str, Path)):
        raise TypeError(f"The 'root' parameter must be a str or Path. Got {type(root).__name__}.")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"Dataset {name!r}: the folder {str(path)!r} does not exist.")
    return path


def _images(x: np.ndarray) -> torch.Tensor:
    if x.ndim == 3:
        x = x[:, None]
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32) / 255.0)


def _labels(y: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(y, dtype=np.int64).reshape(-1))


def load_idx_dataset(root: str | Path, *, name: str = "mnist") -> ImageData:
    """MNIST or Fashion-MNIST from the four standard IDX files in `root` (gzip or not).

    Parameters
    ----------
    root : str or Path
        Folder holding ``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte[.gz]``,
        ``t10k-images-idx3-ubyte[.gz]`` and ``t10k-labels-idx1-ubyte[.gz]``.
    name : str
        Name recorded in the result.

    Returns
    -------
    ImageData
        Images of shape (N, 1, H, W) in [0, 1]; 10 classes.

    Raises
    ------
    FileNotFoundError
        If `root` or any of the files is missing (the message lists them).
    """
    path = _check_root(root, name)
    found = {k: _find(path, stem) for k, stem in IDX_FILES.items()}
    missing = [IDX_FILES[k] + "[.gz]" for k, f in found.items() if f is None]
    if missing:
        raise FileNotFoundError(
            f"Dataset {name!r}: {str(path)!r} lacks {', '.join(missing)} (the standard IDX "
            "file names, gzip-compressed or not)."
        )
    arrays = {k: read_idx(f) for k, f in found.items()}
    for part in ("train", "test"):
        n_img, n_lab = len(arrays[f"{part}_images"]), len(arrays[f"{part}_labels"])
        if n_img != n_lab:
            raise ValueError(f"Dataset {name!r}: {n_img} {part} images but {n_lab} labels.")
    return ImageData(
        name,
        _images(arrays["train_images"]),
        _labels(arrays["train_labels"]),
        _images(arrays["test_images"]),
        _labels(arrays["test_labels"]),
        10,
    )


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays; any other global is refused.

    CIFAR-10's batches are pickled dicts of numpy arrays and lists. Allowing only numpy's array
    reconstruction means a tampered file cannot run code on load.
    """

    _ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name}: a CIFAR-10 batch holds only numpy arrays"
        )


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        try:
            batch = _NumpyOnlyUnpickler(io.BytesIO(f.read()), encoding="bytes").load()
        except pickle.UnpicklingError as e:
            raise ValueError(f"{path} is not a CIFAR-10 batch: {e}.") from None
    if not isinstance(batch, dict):
        raise ValueError(f"{path} is not a CIFAR-10 batch (a dict); got {type(batch).__name__}.")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise ValueError(f"{path} is not a CIFAR-10 batch: it lacks 'data' or 'labels'.")
    data = np.asarray(batch["data"], dtype=np.uint8)
    labels = np.asarray(batch["labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise ValueError(
            f"{path}: expected 'data' of shape (N, 3072) and N labels; got {data.shape} and "
            f"{labels.shape}."
        )
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10(root: str | Path) -> ImageData:
    """CIFAR-10 from its python batches (``data_batch_1`` .. ``data_batch_5``, ``test_batch``).

    The files are unpickled with a loader that accepts only numpy arrays and plain containers.

    Parameters
    ----------
    root : str or Path
        Folder holding the batches (e.g. the extracted ``cifar-10-batches-py``).

    Returns
    -------
    ImageData
        Images of shape (N, 3, 32, 32) in [0, 1]; 10 classes.

    Raises
    ------
    FileNotFoundError
        If `root` or a batch is missing (the message lists them).
    """
    path = _check_root(root, "cifar10")
    missing = [n for n in (*CIFAR_TRAIN, CIFAR_TEST) if not (path / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"Dataset 'cifar10': {str(path)!r} lacks {', '.join(missing)} (the python batches "
            "of cifar-10-batches-py)."
        )
    parts = [_read_cifar_batch(path / n) for n in CIFAR_TRAIN]
    x_test, y_test = _read_cifar_batch(path / CIFAR_TEST)
    return ImageData(
        "cifar10",
        _images(np.concatenate([p[0] for p in parts])),
        _labels(np.concatenate([p[1] for p in parts])),
        _images(x_test),
        _labels(y_test),
        10,
    )


def load_digits(*, test_size: float = 0.25, seed: int = 0) -> ImageData:
    """scikit-learn's embedded 8x8 digits, split into train and test with a seeded shuffle.

    Parameters
    ----------
    test_size : float in (0, 1)
        Fraction of the 1,797 images held out.
    seed : int
        Seed of the shuffle; the same seed gives the same split.

    Returns
    -------
    ImageData
        Images of shape (N, 1, 8, 8) in [0, 1] (the raw values 0..16 divided by 16).

    Examples
    --------
    >>> data = load_digits()
    >>> data.x_train.shape, data.x_test.shape
    (torch.Size([1348, 1, 8, 8]), torch.Size([449, 1, 8, 8]))
    """
    from sklearn.datasets import load_digits as _sk_digits

    check_scalar(test_size, "test_size", "load_digits", low=0, high=1, high_inclusive=False)
    check_scalar(seed, "seed", "load_digits", integer=True, low=0, low_inclusive=True)
    bunch = _sk_digits()
    x = torch.from_numpy((bunch.images / 16.0).astype(np.float32))[:, None]
    y = torch.from_numpy(bunch.target.astype(np.int64))
    order = torch.from_numpy(np.random.default_rng(seed).permutation(len(y)))
    n_test = max(1, round(test_size * len(y)))
    test, train = order[:n_test], order[n_test:]
    return ImageData("digits", x[train], y[train], x[test], y[test], 10)


def load_dataset(name: str, root: str | Path | None = None, *, seed: int = 0) -> ImageData:
    """Load a dataset by name.

    Parameters
    ----------
    name : {"digits", "mnist", "fashion-mnist", "cifar10"}
    root : str or Path, optional
        Folder of the files (not used by ``digits``). MNIST / Fashion-MNIST: the four IDX files;
        CIFAR-10: the python batches.
    seed : int
        Train/test split seed of ``digits`` (the others have a fixed test set).

    Returns
    -------
    ImageData

    Raises
    ------
    ValueError
        Unknown name, or no `root` for a dataset read from disk.
    FileNotFoundError
        If the folder or a file is missing (the message says which and where).

    Examples
    --------
    >>> load_dataset("digits")
    ImageData('digits', train=1348, test=449, input_shape=(1, 8, 8), num_classes=10)
    """
    check_choice(name, "name", "load_dataset", DATASETS)
    if name == "digits":
        return load_digits(seed=seed)
    if name == "cifar10":
        return load_cifar10(root)
    return load_idx_dataset(root, name=name)


# -- splits --------------------------------------------------------------------------------------


def _parse_split(split: str, alpha: float | None) -> tuple[str, float | None]:
    if isinstance(split, str):
        m = re.fullmatch(r"dirichlet\(\s*([^)]*)\)", split.strip())
        if m:
            try:
                parsed = float(m.group(1))
            except ValueError:
                raise ValueError(
                    f"The 'split' parameter of split_indices: cannot read alpha from {split!r}."
                ) from None
            if alpha is not None and alpha != parsed:
                raise ValueError(f"`split`={split!r} and `alpha`={alpha!r} disagree.")
            split, alpha = "dirichlet", parsed
    check_choice(split, "split", "split_indices", SPLITS)
    if split == "dirichlet":
        if alpha is None:
            raise ValueError("split='dirichlet' needs `alpha` (or write split='dirichlet(0.5)').")
        check_scalar(alpha, "alpha", "split_indices", low=0)
    elif alpha is not None:
        raise ValueError(f"`alpha` is only used by split='dirichlet'; got split={split!r}.")
    return split, alpha


def split_indices(
    labels: Any,
    n_models: int,
    split: str = "same",
    *,
    alpha: float | None = None,
    skew: float = 0.9,
    rng: int | np.random.Generator | None = None,
) -> list[np.ndarray]:
    """Deal the indices of a labelled dataset out to `n_models` models.

    Parameters
    ----------
    labels : array of shape (N,)
        Integer class labels.
    n_models : int
        Number of models (>= 1).
    split : {"same", "iid", "label-skew", "dirichlet"} or "dirichlet(<alpha>)"
        ``same``: every model gets every index (the models then differ only by their seeds).
        ``iid``: a random partition into near-equal parts. ``label-skew``: the classes are cut
        into `n_models` contiguous blocks; model ``k`` gets a fraction `skew` of the images of
        its own block and the rest are spread evenly over the other models (two models, ten
        classes, ``skew=0.9``: digits 0-4 send 90% of their images to model 0 and 10% to
        model 1, digits 5-9 the reverse). ``dirichlet``: per class, proportions drawn from
        ``Dir(alpha, ..., alpha)`` (small `alpha`: very uneven).
    alpha : float > 0, optional
        Concentration of ``dirichlet``.
    skew : float in (0, 1]
        Own-class fraction of ``label-skew``.
    rng : None, int or numpy.random.Generator
        The same seed gives the same split.

    Returns
    -------
    list of ndarray of int64
        One sorted index array per model. Except for ``same``, they partition ``range(N)``.

    Examples
    --------
    >>> labels = np.repeat(np.arange(10), 100)
    >>> a, b = split_indices(labels, 2, "label-skew", rng=0)
    >>> int((labels[a] < 5).sum()), int((labels[b] < 5).sum())
    (450, 50)
    """
    y = np.asarray(labels)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"`labels` must be a 1-d integer array; got {y.dtype} {y.shape}.")
    check_scalar(n_models, "n_models", "split_indices", integer=True, low=1, low_inclusive=True)
    split, alpha = _parse_split(split, alpha)
    check_scalar(skew, "skew", "split_indices", low=0, high=1)
    if (rng is not None and not isinstance(rng, (int, np.random.Generator))) or rng is True:
        raise TypeError(
            f"The 'rng' parameter of split_indices must be None, an int or a numpy Generator. "
            f"Got {type(rng).__name__} instead."
        )
    gen = np.random.default_rng(rng)
    n = len(y)
    if split == "same":
        return [np.arange(n, dtype=np.int64) for _ in range(n_models)]
    if split == "iid":
        parts = np.array_split(gen.permutation(n), n_models)
        return [np.sort(p).astype(np.int64) for p in parts]
    classes = np.unique(y)
    owner = {}
    for k, block in enumerate(np.array_split(classes, n_models)):
        owner.update({int(c): k for c in block})
    out: list[list[np.ndarray]] = [[] for _ in range(n_models)]
    for c in classes:
        idx = gen.permutation(np.flatnonzero(y == c))
        if split == "dirichlet":
            p = gen.dirichlet(np.full(n_models, float(alpha)))
        else:
            p = np.full(n_models, (1 - skew) / max(n_models - 1, 1))
            p[owner[int(c)]] = skew if n_models > 1 else 1.0
        counts = _apportion(p, len(idx), gen)
        for k, part in enumerate(np.split(idx, np.cumsum(counts)[:-1])):
            out[k].append(part)
    return [np.sort(np.concatenate(parts)).astype(np.int64) for parts in out]


def _apportion(p: np.ndarray, n: int, gen: np.random.Generator) -> np.ndarray:
    """Integer counts summing to `n` closest to ``p * n`` (largest remainder, random ties)."""
    exact = p * n
    counts = np.floor(exact + 1e-9).astype(np.int64)
    left = n - int(counts.sum())
    if left > 0:
        frac = exact - counts
        order = np.lexsort((gen.random(len(p)), -np.round(frac, 9)))
        counts[order[:left]] += 1
    return counts


def split_dataset(
    data: ImageData | TensorDataset | Sequence[torch.Tensor],
    n_models: int,
    split: str = "same",
    *,
    alpha: float | None = None,
    skew: float = 0.9,
    rng: int | np.random.Generator | None = None,
) -> list[TensorDataset]:
    """The training set of `data` dealt out to `n_models` models (see :func:`split_indices`).

    Parameters
    ----------
    data : ImageData, TensorDataset of (x, y), or a pair (x, y) of tensors
        ``ImageData`` contributes its training set.
    n_models, split, alpha, skew, rng
        As in :func:`split_indices`.

    Returns
    -------
    list of TensorDataset
        One ``(x, y)`` dataset per model.

    Examples
    --------
    >>> parts = split_dataset(load_digits(), 3, "iid", rng=0)
    >>> [len(p) for p in parts]
    [450, 449, 449]
    """
    if isinstance(data, ImageData):
        x, y = data.x_train, data.y_train
    elif isinstance(data, TensorDataset) and len(data.tensors) == 2:
        x, y = data.tensors
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = data
    else:
        raise TypeError(
            "The 'data' parameter of split_dataset must be ImageData, a TensorDataset of "
            f"(x, y) or a pair of tensors. Got {type(data).__name__} instead."
        )
    parts = split_indices(y.numpy(), n_models, split, alpha=alpha, skew=skew, rng=rng)
    return [TensorDataset(x[torch.from_numpy(p)], y[torch.from_numpy(p)]) for p in parts]


def as_tensors(
    data: Any, name: str, caller: str, *, labels: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(x, y)`` tensors from a TensorDataset, a pair of tensors, or (``labels=False``) a tensor.

    ``y`` is None when `labels` is False and `data` carries inputs only. The shared input check
    of training, evaluation, repair and activation matching.
    """
    x = y = None
    if isinstance(data, TensorDataset) and len(data.tensors) in (1, 2):
        x, y = data.tensors[0], (data.tensors[1] if len(data.tensors) == 2 else None)
    elif isinstance(data, (tuple, list)) and len(data) in (1, 2):
        x, y = data[0], (data[1] if len(data) == 2 else None)
    elif isinstance(data, torch.Tensor):
        x = data
    ok = isinstance(x, torch.Tensor) and (y is None or isinstance(y, torch.Tensor))
    if not ok or (labels and y is None):
        what = "a TensorDataset of (x, y) or a pair (x, y) of tensors"
        if not labels:
            what += ", or a tensor x"
        raise TypeError(
            f"The {name!r} parameter of {caller} must be {what}. Got {type(data).__name__} instead."
        )
    if y is not None and len(y) != len(x):
        raise ValueError(
            f"The {name!r} parameter of {caller} has {len(x)} inputs but {len(y)} labels."
        )
    if len(x) == 0:
        raise ValueError(f"The {name!r} parameter of {caller} is empty.")
    return x, y
