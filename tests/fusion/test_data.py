"""Data readers on small files the tests write, the real MNIST copies where present, and splits."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from qapfuse.fusion.data import (
    IDX_FILES,
    ImageData,
    as_tensors,
    load_cifar10,
    load_dataset,
    load_digits,
    read_idx,
    split_dataset,
    split_indices,
)

SHARED = Path(__file__).resolve().parents[3] / "shared" / "datasets"
SHARED = SHARED if SHARED.is_dir() else Path("/work/shared/datasets")


def write_idx(path: Path, array: np.ndarray, *, compress: bool) -> None:
    codes = {np.uint8: 0x08, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D}
    header = bytes([0, 0, codes[array.dtype.type], array.ndim])
    header += struct.pack(f">{array.ndim}i", *array.shape)
    body = array.astype(array.dtype.newbyteorder(">")).tobytes()
    opener = gzip.open if compress else open
    with opener(path, "wb") as f:
        f.write(header + body)


def write_mnist_like(root: Path, *, compress: bool, n_train: int = 12, n_test: int = 5):
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 6, 7), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, n_train, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 6, 7), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for key, arr in arrays.items():
        name = IDX_FILES[key] + (".gz" if compress else "")
        write_idx(root / name, arr, compress=compress)
    return arrays


@pytest.mark.parametrize("compress", [True, False])
def test_idx_reader_round_trips_what_was_written(tmp_path, compress):
    arrays = write_mnist_like(tmp_path, compress=compress)
    data = load_dataset("mnist", tmp_path)
    assert data.x_train.shape == (12, 1, 6, 7) and data.x_train.dtype == torch.float32
    np.testing.assert_allclose(data.x_train[:, 0].numpy() * 255, arrays["train_images"], atol=1e-4)
    np.testing.assert_array_equal(data.y_test.numpy(), arrays["test_labels"])
    assert data.y_train.dtype == torch.int64


@pytest.mark.parametrize("dtype", [np.int16, np.int32, np.float32])
def test_read_idx_other_dtypes_are_big_endian(tmp_path, dtype):
    arr = (np.arange(24).reshape(2, 3, 4) - 7).astype(dtype)
    write_idx(tmp_path / "x.idx", arr, compress=False)
    out = read_idx(tmp_path / "x.idx")
    np.testing.assert_array_equal(out, arr)
    assert out.dtype.isnative


def test_read_idx_refuses_a_truncated_file(tmp_path):
    arr = np.zeros((3, 4), dtype=np.uint8)
    write_idx(tmp_path / "x.idx", arr, compress=False)
    raw = (tmp_path / "x.idx").read_bytes()
    (tmp_path / "x.idx").write_bytes(raw[:-2])
    with pytest.raises(ValueError, match=r"shape \(3, 4\)"):
        read_idx(tmp_path / "x.idx")
    (tmp_path / "y.idx").write_bytes(b"\x01\x02\x03")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "y.idx")


def test_missing_root_and_missing_files_say_where(tmp_path):
    with pytest.raises(ValueError, match="pass `root`"):
        load_dataset("fashion-mnist")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset("mnist", tmp_path / "nowhere")
    write_idx(tmp_path / (IDX_FILES["train_images"] + ".gz"), np.zeros((1, 2, 2), np.uint8),
              compress=True)  # fmt: skip
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("mnist", tmp_path)
    msg = str(err.value)
    assert str(tmp_path) in msg and "t10k-labels-idx1-ubyte" in msg
    assert "train-images-idx3-ubyte" not in msg
    with pytest.raises(FileNotFoundError, match="data_batch_1, data_batch_2"):
        load_dataset("cifar10", tmp_path)
    with pytest.raises(ValueError, match=r"'name' parameter of load_dataset.*Did you mean"):
        load_dataset("mnsit", tmp_path)


def write_cifar(root: Path) -> dict[str, tuple[np.ndarray, list[int]]]:
    rng = np.random.default_rng(1)
    out = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, 4)]
        with open(root / name, "wb") as f:
            pickle.dump({b"batch_label": b"x", b"data": data, b"labels": labels}, f)
        out[name] = (data, labels)
    return out


def test_cifar_reader_on_written_batches(tmp_path):
    batches = write_cifar(tmp_path)
    data = load_cifar10(tmp_path)
    assert data.x_train.shape == (20, 3, 32, 32) and data.x_test.shape == (4, 3, 32, 32)
    img = batches["data_batch_2"][0][1].reshape(3, 32, 32)
    np.testing.assert_allclose(data.x_train[5].numpy() * 255, img, atol=1e-4)
    assert data.y_test.tolist() == batches["test_batch"][1]


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_cifar_reader_refuses_arbitrary_objects(tmp_path, capsys):
    write_cifar(tmp_path)
    with open(tmp_path / "data_batch_3", "wb") as f:
        pickle.dump({b"data": _Evil(), b"labels": [0]}, f)
    with pytest.raises(ValueError, match=r"refusing to load builtins\.print"):
        load_cifar10(tmp_path)
    assert "pwned" not in capsys.readouterr().out


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_real_idx_copies_where_present(name):
    root = SHARED / name
    if not (root / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"no {name} copy on this machine")
    data = load_dataset(name, root)
    assert data.x_train.shape == (60000, 1, 28, 28) and data.x_test.shape == (10000, 1, 28, 28)
    assert 0.0 <= float(data.x_train.min()) and float(data.x_train.max()) == 1.0
    assert sorted(torch.unique(data.y_test).tolist()) == list(range(10))


def test_digits_split_is_seeded_and_disjoint():
    a, b, c = load_digits(seed=0), load_digits(seed=0), load_digits(seed=1)
    assert isinstance(a, ImageData) and a.input_shape == (1, 8, 8)
    assert torch.equal(a.x_test, b.x_test) and not torch.equal(a.x_test, c.x_test)
    assert len(a.y_train) + len(a.y_test) == 1797
    assert 0.0 <= float(a.x_train.min()) and float(a.x_train.max()) == 1.0
    train = {tuple(r) for r in a.x_train.flatten(1).tolist()}
    test = {tuple(r) for r in a.x_test.flatten(1).tolist()}
    assert len(train & test) < 5  # the digits set has a handful of exact duplicates


LABELS = np.repeat(np.arange(10), 50)


def test_same_gives_everything_to_everyone_and_iid_partitions():
    same = split_indices(LABELS, 3, "same")
    assert all(np.array_equal(p, np.arange(500)) for p in same)
    iid = split_indices(LABELS, 3, "iid", rng=0)
    assert sorted(np.concatenate(iid).tolist()) == list(range(500))
    assert [len(p) for p in iid] == [167, 167, 166]


def test_label_skew_two_models_sends_ninety_percent_to_the_owner():
    a, b = split_indices(LABELS, 2, "label-skew", rng=0)
    assert sorted(np.concatenate([a, b]).tolist()) == list(range(500))
    for c in range(10):
        own, other = (a, b) if c < 5 else (b, a)
        assert (LABELS[own] == c).sum() == 45 and (LABELS[other] == c).sum() == 5


def test_label_skew_generalises_to_n_models():
    parts = split_indices(LABELS, 5, "label-skew", skew=0.8, rng=0)
    assert sorted(np.concatenate(parts).tolist()) == list(range(500))
    for k, p in enumerate(parts):
        counts = np.bincount(LABELS[p], minlength=10)
        assert counts[2 * k] == counts[2 * k + 1] == 40  # own classes: 80%
        others = np.delete(counts, [2 * k, 2 * k + 1])
        assert set(others.tolist()) <= {2, 3}  # the other 20% spread evenly over 4 models


def test_dirichlet_is_reproducible_and_uneven_for_small_alpha():
    a = split_indices(LABELS, 4, "dirichlet(0.1)", rng=3)
    b = split_indices(LABELS, 4, "dirichlet", alpha=0.1, rng=3)
    c = split_indices(LABELS, 4, "dirichlet", alpha=0.1, rng=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    assert sorted(np.concatenate(a).tolist()) == list(range(500))
    shares = np.array([np.bincount(LABELS[p], minlength=10) for p in a]) / 50
    assert shares.max(0).mean() > 0.7  # alpha=0.1: most of a class lands on one model
    wide = split_indices(LABELS, 4, "dirichlet", alpha=1000.0, rng=3)
    shares = np.array([np.bincount(LABELS[p], minlength=10) for p in wide]) / 50
    assert np.abs(shares - 0.25).max() < 0.1


@pytest.mark.parametrize("alpha", [0.0, -1.0])
def test_dirichlet_alpha_must_be_positive(alpha):
    with pytest.raises(ValueError, match="'alpha' parameter of split_indices must be a float > 0"):
        split_indices(LABELS, 2, "dirichlet", alpha=alpha)


def test_split_errors_name_the_argument():
    with pytest.raises(ValueError, match="needs `alpha`"):
        split_indices(LABELS, 2, "dirichlet")
    with pytest.raises(ValueError, match="only used by split='dirichlet'"):
        split_indices(LABELS, 2, "iid", alpha=1.0)
    with pytest.raises(ValueError, match=r"'split' parameter.*Did you mean 'label-skew'"):
        split_indices(LABELS, 2, "label_skew")
    with pytest.raises(ValueError, match="'n_models' parameter"):
        split_indices(LABELS, 0)
    with pytest.raises(ValueError, match="1-d integer"):
        split_indices(LABELS.astype(float), 2)


def test_split_dataset_hands_out_the_matching_images():
    x = torch.arange(500.0)[:, None]
    y = torch.from_numpy(LABELS)
    parts = split_dataset((x, y), 2, "label-skew", rng=0)
    idx = split_indices(LABELS, 2, "label-skew", rng=0)
    for part, i in zip(parts, idx):
        assert isinstance(part, TensorDataset)
        assert part.tensors[0][:, 0].long().tolist() == i.tolist()
        assert torch.equal(part.tensors[1], y[torch.from_numpy(i)])


def test_as_tensors_accepts_the_documented_forms():
    x, y = torch.zeros(3, 2), torch.zeros(3, dtype=torch.long)
    for data in (TensorDataset(x, y), (x, y), [x, y]):
        assert as_tensors(data, "data", "f")[0] is x
    assert as_tensors(x, "data", "f", labels=False) == (x, None)
    with pytest.raises(TypeError, match="'data' parameter of f must be"):
        as_tensors(x, "data", "f")
    with pytest.raises(ValueError, match="3 inputs but 2 labels"):
        as_tensors((x, y[:2]), "data", "f")
