"""Data loaders: CIFAR pickle batches and Fashion-MNIST IDX files written in their standard formats,
synthetic CIFAR-shaped data, and the errors that name the missing files; a training run's data
(its cut of the training set, the public pool) and each data set's augmentation defaults."""

import dataclasses
import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from privfast.config import TrainConfig
from privfast.data import (
    DATASET_AUGMENTATION,
    DATASETS,
    DatasetNotFoundError,
    data_shape,
    load_cifar,
    load_data,
    load_dataset,
    load_fashion_mnist,
    load_pool,
    read_idx,
    synthetic_cifar,
)


def _write_cifar(folder, files, label_key, n_per_file, num_classes, rng):
    folder.mkdir(parents=True)
    written = []
    for name in files:
        data = rng.integers(0, 256, (n_per_file, 3072), dtype=np.uint8)
        labels = rng.integers(0, num_classes, n_per_file).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, label_key: labels, b"batch_label": name.encode()}, f)
        written.append((data, labels))
    return written


@pytest.mark.parametrize("num_classes", [10, 100])
def test_cifar_batches_load_channel_major_in_unit_range(tmp_path, num_classes):
    rng = np.random.default_rng(0)
    if num_classes == 10:
        files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        folder, key = tmp_path / "cifar-10-batches-py", b"labels"
    else:
        folder, files, key = tmp_path / "cifar-100-python", ["train", "test"], b"fine_labels"
    written = _write_cifar(folder, files, key, 3, num_classes, rng)
    train, test = load_cifar(tmp_path, num_classes=num_classes)
    assert train.x.shape == (3 * (len(files) - 1), 3, 32, 32) and test.x.shape == (3, 3, 32, 32)
    assert train.y.dtype == torch.int64 and train.y.tolist() == sum((labels for _, labels in written[:-1]), [])
    data, labels = written[-1]
    # Row layout: 1024 red, then 1024 green, then 1024 blue values, each row-major.
    assert test.x[1, 2, 0, 5].item() == pytest.approx(data[1, 2048 + 5] / 255)
    assert test.x[2, 0, 31, 31].item() == pytest.approx(data[2, 1023] / 255)
    assert test.y.tolist() == labels
    again, _ = load_cifar(folder, num_classes=num_classes)  # the folder itself works too
    assert torch.equal(again.x, train.x)


def test_missing_cifar_names_every_expected_file(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="data_batch_5") as info:
        load_dataset("cifar10", root=tmp_path)
    assert "test_batch" in str(info.value) and "cifar-10-python.tar.gz" in str(info.value)
    with pytest.raises(DatasetNotFoundError, match="cifar-100-python"):
        load_dataset("cifar100", root=tmp_path)
    with pytest.raises(ValueError, match="root"):
        load_dataset("cifar10")


def _write_idx(path, array, compress):
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with (gzip.open if compress else open)(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("compress", [False, True])
def test_fashion_mnist_idx_files(tmp_path, compress):
    rng = np.random.default_rng(1)
    suffix = ".gz" if compress else ""
    arrays = {}
    for part, n in (("train", 5), ("t10k", 4)):
        arrays[part] = rng.integers(0, 256, (n, 28, 28)), rng.integers(0, 10, n)
        _write_idx(tmp_path / f"{part}-images-idx3-ubyte{suffix}", arrays[part][0], compress)
        _write_idx(tmp_path / f"{part}-labels-idx1-ubyte{suffix}", arrays[part][1], compress)
    train, test = load_fashion_mnist(tmp_path)
    assert train.x.shape == (5, 1, 28, 28) and test.x.shape == (4, 1, 28, 28)
    assert torch.allclose(test.x[:, 0], torch.as_tensor(arrays["t10k"][0] / 255, dtype=torch.float32))
    assert train.y.tolist() == arrays["train"][1].tolist()


def test_fashion_mnist_errors(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"t10k-labels-idx1-ubyte\[\.gz\]"):
        load_dataset("fashion-mnist", root=tmp_path)
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x08\x03\x00\x00" + bytes(8))
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(bad)
    short = tmp_path / "short"
    short.write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + bytes(3))
    with pytest.raises(ValueError, match="10"):
        read_idx(short)


def test_synthetic_cifar_is_seeded_shaped_and_learnable():
    train, test = synthetic_cifar(n_train=200, n_test=100, num_classes=4, seed=3)
    again, _ = synthetic_cifar(n_train=200, n_test=100, num_classes=4, seed=3)
    assert torch.equal(train.x, again.x) and torch.equal(train.y, again.y)
    assert train.x.shape == (200, 3, 32, 32) and 0 <= train.x.min() and train.x.max() <= 1

    def nearest_mean_accuracy(train, test):
        means = torch.stack([train.x[train.y == c].mean(0) for c in range(4)]).flatten(1)
        return float((torch.cdist(test.x.flatten(1), means).argmin(1) == test.y).float().mean())

    # Above chance (1/4) but not trivial by default; trivial with strongly separated classes.
    assert 0.35 < nearest_mean_accuracy(train, test) < 0.95
    assert nearest_mean_accuracy(*synthetic_cifar(n_train=200, n_test=100, num_classes=4, separation=1.0)) > 0.95
    with pytest.raises(ValueError, match="num_classes"):
        synthetic_cifar(num_classes=1)


def test_load_dataset_dispatches_and_refuses_unknown_names():
    train, test = load_dataset("digits")
    assert train.x.shape[1:] == (1, 8, 8) and len(train.y) + len(test.y) == 1797
    assert load_dataset("synthetic", n_train=3, n_test=2)[0].x.shape == (3, 3, 32, 32)
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'"):
        load_dataset("imagenet")


def test_a_runs_data_is_the_first_rows_and_its_pool_the_last():
    config = TrainConfig(train_examples=100, method="dp-mix-diff", k_base=2, k_self=1, k_diff=1, pool_examples=30)
    (train, test), pool = load_data(config), load_pool(config)
    full, full_test = load_dataset("digits")
    assert torch.equal(train.x, full.x[:100]) and torch.equal(pool.x, full.x[-30:]) and torch.equal(test.y, full_test.y)
    assert data_shape(train, test) == {"in_channels": 1, "image_size": 8, "num_classes": 10}
    assert len(load_data(dataclasses.replace(config, train_examples=None))[0].y) == len(full.y) - 30
    with pytest.raises(
        ValueError,
        match=rf"--train-examples 1600 but digits has {len(full.y)} training examples less "
        r"the 30 of the public pool \(--pool-examples\)",
    ):
        load_data(dataclasses.replace(config, train_examples=1600))


def test_augmentation_defaults_pad_crops_by_an_eighth_of_the_side_and_flip_only_symmetric_classes():
    sides = {"digits": 8, "cifar10": 32, "cifar100": 32, "fashion-mnist": 28, "synthetic": 32}
    assert set(DATASET_AUGMENTATION) == set(DATASETS) == set(sides)
    assert load_dataset("digits")[0].x.shape[-1] == 8
    assert load_dataset("synthetic", n_train=1, n_test=1)[0].x.shape[-1] == 32
    for name, side in sides.items():
        assert DATASET_AUGMENTATION[name]["crop_padding"] == side // 8
    assert [name for name in DATASETS if DATASET_AUGMENTATION[name]["flip"]] == ["cifar10", "cifar100", "fashion-mnist"]


# Real CIFAR-10 (JPEG-derived, in the standard layout): .ci/run writes it from the shared archive and sets this.
CIFAR10_ROOT = os.environ.get("PRIVFAST_CIFAR10_ROOT")
needs_cifar10 = pytest.mark.skipif(
    not CIFAR10_ROOT,
    reason="PRIVFAST_CIFAR10_ROOT is not set: real CIFAR-10 files "
    "(python ../shared/data/make_cifar10.py DIR, then PRIVFAST_CIFAR10_ROOT=DIR)",
)


@needs_cifar10
def test_real_cifar10_loads_with_its_known_statistics():
    train, test = load_cifar(CIFAR10_ROOT)
    assert train.x.shape == (50000, 3, 32, 32) and test.x.shape == (10000, 3, 32, 32)
    assert train.x.dtype == torch.float32 and 0 <= float(train.x.min()) and float(train.x.max()) <= 1
    assert torch.bincount(train.y).tolist() == [5000] * 10 and torch.bincount(test.y).tolist() == [1000] * 10
    # The published channel means of CIFAR-10's training set (the JPEG copy moves them by < 0.002).
    torch.testing.assert_close(train.x.mean((0, 2, 3)), torch.tensor([0.4914, 0.4822, 0.4465]), rtol=0, atol=2e-3)


@needs_cifar10
def test_train_command_on_real_cifar10(tmp_path):
    from privfast.cli import main

    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--dataset",
                "cifar10",
                "--data-root",
                CIFAR10_ROOT,
                "--method",
                "dp-sgd",
                "--noise-multiplier",
                "1.0",
                "--train-examples",
                "256",
                "--epochs",
                "1",
                "--model",
                "convnet",
                "--width",
                "8",
                "--attacks",
                "yeom",
                "--out",
                str(run),
                "--no-progress",
            ]
        )
        == 0
    )
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=False)
    assert checkpoint["config"]["dataset"] == "cifar10" and checkpoint["history"][-1]["epoch"] == 1
    assert 0.0 < checkpoint["history"][-1]["test_accuracy"] < 1.0
