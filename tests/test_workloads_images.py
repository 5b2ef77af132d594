"""Image data: the IDX reader checks headers against lengths; Fashion-MNIST splits; digits fallback; augmentation."""

from __future__ import annotations

import gzip
import shutil
import struct

import numpy as np
import pytest
import torch

from fewbit.workloads.data import images
from fewbit.workloads.data.images import DatasetError, ImageSpec

INSTALLED = images.available_source() == "fashion-mnist"
needs_fashion_mnist = pytest.mark.skipif(not INSTALLED, reason="needs `apt-get install dataset-fashion-mnist`")


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file written from the format's definition: 0, 0, type 0x08 (uint8), ndim, big-endian sizes, data."""
    return bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def fake_fashion_mnist(root, n_train=300, n_test=50, compress=True):
    """A small stand-in with the real file names: class c has pixel value 20 * c + 10 everywhere."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for part, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        pixels = np.broadcast_to((20 * labels + 10)[:, None, None], (n, 28, 28)).astype(np.uint8)
        for kind, array in (("images-idx3", pixels), ("labels-idx1", labels)):
            data, name = idx_bytes(array), f"{part}-{kind}-ubyte"
            if compress:
                (root / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (root / name).write_bytes(data)
    return root


@pytest.mark.parametrize("compress", [True, False])
def test_reader_round_trips_idx_files(tmp_path, compress):
    root = fake_fashion_mnist(tmp_path / "fm", compress=compress)
    paths = images.fashion_mnist_paths(root)
    pixels, labels = images.read_idx(paths["train_images"]), images.read_idx(paths["train_labels"])
    assert pixels.shape == (300, 28, 28) and pixels.dtype == np.uint8 and labels.shape == (300,)
    np.testing.assert_array_equal(pixels[:, 5, 7], 20 * labels + 10)


def truncate(path, keep_fraction=0.9):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep_fraction)])


@pytest.mark.parametrize("compress", [True, False])
def test_truncated_file_is_a_clear_error(tmp_path, compress):
    root = fake_fashion_mnist(tmp_path / "fm", compress=compress)
    path = images.fashion_mnist_paths(root)["train_images"]
    truncate(path)
    with pytest.raises(DatasetError, match="truncated") as error:
        images.load(ImageSpec(source="auto", root=str(root), valid_size=10))  # auto must not hide a broken file
    assert str(path) in str(error.value) and "reinstall" in str(error.value)


def test_header_and_label_mismatches_are_errors(tmp_path):
    root = fake_fashion_mnist(tmp_path / "fm", compress=False)
    paths = images.fashion_mnist_paths(root)
    paths["train_labels"].write_bytes(idx_bytes(np.zeros(299, np.uint8)))
    with pytest.raises(DatasetError, match=r"\(300, 28, 28\) images but .* \(299,\) labels"):
        images.load(ImageSpec(root=str(root), valid_size=10))
    paths["train_labels"].write_bytes(b"\x00\x00\x08\x01\x00\x00\x01\x2c" + bytes(301))  # one byte too many
    with pytest.raises(DatasetError, match="longer than its header"):
        images.read_idx(paths["train_labels"])
    paths["train_labels"].write_bytes(b"PK\x03\x04 not idx")
    with pytest.raises(DatasetError, match="not an IDX file"):
        images.read_idx(paths["train_labels"])


def test_missing_files_name_the_install_command(tmp_path):
    with pytest.raises(DatasetError, match=r"missing.*apt-get install dataset-fashion-mnist"):
        images.load(ImageSpec(source="fashion-mnist", root=str(tmp_path)))


def test_fallback_to_digits_warns_and_splits(tmp_path):
    assert images.available_source(tmp_path) == "digits"
    with pytest.warns(UserWarning, match="falling back to scikit-learn's 8x8 digits.*apt-get install"):
        data = images.load(ImageSpec(root=str(tmp_path), valid_size=200, test_size=300))
    assert data.source == "digits" and data.image_shape == (1, 8, 8) and not data.flip_ok
    sizes = {split: len(labels) for split, labels in data.labels.items()}
    assert sizes == {"train": 1797 - 500, "valid": 200, "test": 300}
    assert set(data.labels["test"].tolist()) == set(range(10))


def test_splits_are_disjoint_seeded_and_normalised(tmp_path):
    root = fake_fashion_mnist(tmp_path / "fm", n_train=300)
    spec = ImageSpec(root=str(root), valid_size=60, seed=4)
    data, again = images.load(spec), images.load(spec)
    assert {s: len(y) for s, y in data.labels.items()} == {"train": 240, "valid": 60, "test": 50}
    for split in data.labels:
        torch.testing.assert_close(data.images[split], again.images[split], rtol=0, atol=0)
    other = images.load(ImageSpec(root=str(root), valid_size=60, seed=5))
    assert not torch.equal(data.labels["valid"], other.labels["valid"])
    # normalisation: the training split has mean 0 and standard deviation 1, with the stored scalars
    assert data.images["train"].mean().item() == pytest.approx(0, abs=1e-5)
    assert data.images["train"].std(unbiased=False).item() == pytest.approx(1, abs=1e-4)
    raw = data.images["valid"] * data.std + data.mean  # back to [0, 1]
    np.testing.assert_allclose(raw[:, 0, 0, 0].numpy() * 255, 20 * data.labels["valid"].numpy() + 10, atol=1e-3)
    assert len(images.load(ImageSpec(root=str(root), valid_size=60, train_limit=100)).labels["train"]) == 100


@needs_fashion_mnist
def test_real_fashion_mnist():
    data = images.load(ImageSpec(source="fashion-mnist"))
    assert data.source == "fashion-mnist" and data.image_shape == (1, 28, 28) and data.flip_ok
    assert {s: len(y) for s, y in data.labels.items()} == {"train": 55000, "valid": 5000, "test": 10000}
    assert torch.bincount(data.labels["test"]).tolist() == [1000] * 10  # the test set is balanced
    assert data.mean == pytest.approx(0.2860, abs=1e-3) and data.std == pytest.approx(0.3530, abs=1e-3)


@needs_fashion_mnist
def test_real_file_truncated_copy(tmp_path):
    for path in images.fashion_mnist_paths().values():
        shutil.copy(path, tmp_path / path.name)
    truncate(tmp_path / "t10k-labels-idx1-ubyte.gz", 0.5)
    with pytest.raises(DatasetError, match=r"t10k-labels-idx1-ubyte\.gz is truncated.*reinstall"):
        images.load(ImageSpec(root=str(tmp_path)))


def test_augment_shifts_and_flips_deterministically():
    x = torch.zeros(64, 1, 8, 8)
    x[:, :, 3, 2] = 1.0  # one bright pixel, away from the border
    a = images.augment(x, torch.Generator().manual_seed(0), max_shift=2, flip=True)
    b = images.augment(x, torch.Generator().manual_seed(0), max_shift=2, flip=True)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.equal(a.sum(dim=(1, 2, 3)), x.sum(dim=(1, 2, 3)))  # the pixel moved, nothing was lost
    rows, cols = (a[:, 0] == 1).nonzero()[:, 1:].T
    assert set(rows.tolist()) == {1, 2, 3, 4, 5}  # row 3 +- 2, every shift drawn among 64 images
    assert (cols <= 2).any() and (cols >= 5).any()  # column 2 +- 2 unmirrored, 7 - (2 +- 2) mirrored
    shifted = images.augment(x, torch.Generator().manual_seed(1), max_shift=2)
    assert set((shifted[:, 0] == 1).nonzero()[:, 2].tolist()) == {0, 1, 2, 3, 4}
    assert torch.equal(images.augment(x, torch.Generator(), max_shift=0), x)
