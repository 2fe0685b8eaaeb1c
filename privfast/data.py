"""Data sets, and the data of a training run.

The embedded default is scikit-learn's digits (1,797 8x8 grey images, 10 classes), which ships
inside scikit-learn: nothing is downloaded. :func:`load_dataset` reads the others by name;
:func:`load_data` and :func:`load_pool` cut a :class:`~privfast.config.TrainConfig`'s splits from them.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Optional

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from privfast.config import TrainConfig


class Split(NamedTuple):
    """A labelled data set: inputs ``x [N, ...]`` (images ``[N, C, H, W]`` in [0, 1] from the loaders
    here) and int64 labels ``y [N]``. The one type of labelled data across privfast: the attacks,
    the audit, the search and the federation take it, and any ``(x, y)`` pair converts with
    ``Split(*pair)``."""

    x: Tensor
    y: Tensor


def load_digits(
    *, size: int = 8, test_fraction: float = 0.3, seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[Split, Split]:
    """The digits data as a (train, test) pair of fixed, stratification-free random splits.

    Args:
        size: side of the returned images; 8 is native, larger sizes are bilinear upsamplings.
        test_fraction: fraction of the 1,797 images held out.
        seed: seed of the split.
        dtype: floating dtype of the images.

    Returns:
        ``(train, test)``, each a :class:`Split`.
    """
    from sklearn.datasets import load_digits as _sklearn_digits

    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    bunch = _sklearn_digits()
    x = torch.as_tensor(bunch.images, dtype=dtype).unsqueeze(1) / 16.0
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    if size != 8:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * len(y)))
    test, train = order[:n_test], order[n_test:]
    return Split(x[train], y[train]), Split(x[test], y[test])


# -- file-based and synthetic data sets ----------------------------------------------------------
# Nothing here downloads: each loader reads the files the data set's authors distribute, from a
# directory the user names, and says which files it expected when they are not there.

DATASETS = ("digits", "cifar10", "cifar100", "fashion-mnist", "synthetic")
"""Names :func:`load_dataset` knows."""

DATASET_AUGMENTATION = {
    # Random crops padded by an eighth of the image side: 1 pixel of the 8x8 digits (4 would move a
    # digit half out of the frame), 4 of 32x32 CIFAR (the usual CIFAR recipe, e.g. De et al., 2022,
    # "Unlocking high-accuracy differentially private image classification through scale").
    # Horizontal flips only where a mirror image keeps its label: not digits (a mirrored 2, 3 or 7
    # is no digit) and not the synthetic set (its class templates are not mirror symmetric).
    "digits": {"crop_padding": 1, "flip": False},
    "cifar10": {"crop_padding": 4, "flip": True},
    "cifar100": {"crop_padding": 4, "flip": True},
    "fashion-mnist": {"crop_padding": 3, "flip": True},
    "synthetic": {"crop_padding": 4, "flip": False},
}
"""The self-augmentations that suit each data set: ``crop_padding`` and ``flip`` of
:class:`~privfast.config.TrainConfig` when they are not given."""

_CIFAR_LAYOUT = {
    # name -> (archive, folder inside it, training files, test file, label key)
    "cifar10": (
        "cifar-10-python.tar.gz",
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        "test_batch",
        b"labels",
    ),
    "cifar100": ("cifar-100-python.tar.gz", "cifar-100-python", ["train"], "test", b"fine_labels"),
}
_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_DTYPES = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class DatasetNotFoundError(FileNotFoundError):
    """A data set's files are not where the loader looked; the message lists the files it expected."""


def _missing(name: str, where: Path, expected: list[str], hint: str) -> DatasetNotFoundError:
    listed = "\n  ".join(expected)
    return DatasetNotFoundError(
        f"{name} not found under {where}: expected the files\n  {listed}\n{hint} (privfast never downloads data)"
    )


def _images(array: np.ndarray, dtype: torch.dtype) -> Tensor:
    """uint8 images ``[N, C, H, W]`` as floats in [0, 1]."""
    return torch.tensor(array, dtype=dtype) / 255.0  # a copy: frombuffer arrays are read-only


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


def load_cifar(
    root: str | os.PathLike, *, num_classes: int = 10, dtype: torch.dtype = torch.float32
) -> tuple[Split, Split]:
    """CIFAR-10 or CIFAR-100 from the "python version" pickle batches.

    Args:
        root: the directory holding ``cifar-10-batches-py/`` (``cifar-100-python/``), or that
            directory itself.
        num_classes: 10 or 100 (CIFAR-100's fine labels).
        dtype: floating dtype of the images.

    Returns:
        ``(train, test)`` :class:`Split` s with images ``[N, 3, 32, 32]`` in [0, 1].

    Raises:
        DatasetNotFoundError: a batch file is missing (the message lists them all).
        ValueError: ``num_classes`` is not 10 or 100, or a batch is malformed.
    """
    name = {10: "cifar10", 100: "cifar100"}.get(num_classes)
    if name is None:
        raise ValueError(f"num_classes must be 10 (CIFAR-10) or 100 (CIFAR-100), got {num_classes}")
    archive, folder, train_files, test_file, label_key = _CIFAR_LAYOUT[name]
    root = Path(root)
    base = root if root.name == folder else root / folder
    files = [base / f for f in (*train_files, test_file)]
    if not all(f.is_file() for f in files):
        raise _missing(name.upper(), root, [str(f) for f in files], f"Extract {archive} there")

    def read(paths: list[Path]) -> Split:
        batches = [_unpickle(p) for p in paths]
        for p, b in zip(paths, batches):
            if b"data" not in b or label_key not in b:
                raise ValueError(
                    f"{p} is not a CIFAR python batch: expected keys b'data' and {label_key!r}, got {sorted(b)}"
                )
        data = np.concatenate([np.asarray(b[b"data"], dtype=np.uint8) for b in batches])
        labels = np.concatenate([np.asarray(b[label_key], dtype=np.int64) for b in batches])
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
            raise ValueError(
                f"CIFAR batches under {base} hold data {data.shape} and {len(labels)} labels; expected "
                "[N, 3072] uint8 rows (3 x 32 x 32, channel-major) and N labels"
            )
        return Split(_images(data.reshape(-1, 3, 32, 32), dtype), torch.from_numpy(labels))

    return read(files[:-1]), read(files[-1:])


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """One IDX file (the MNIST / Fashion-MNIST format), gzipped or not, as a numpy array.

    Raises:
        ValueError: the file does not start with a valid IDX header or its size disagrees with it.
    """
    path = Path(path)
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file: expected the magic bytes 00 00 <type> <ndim>, got {raw[:4]!r}")
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    body = raw[4 + 4 * ndim :]
    if len(body) != dtype.itemsize * int(np.prod(shape)):
        expected = dtype.itemsize * int(np.prod(shape))
        raise ValueError(
            f"{path}: the header promises shape {shape} of {dtype} ({expected} bytes) but {len(body)} bytes follow"
        )
    return np.frombuffer(body, dtype=dtype).reshape(shape)


def load_fashion_mnist(root: str | os.PathLike, *, dtype: torch.dtype = torch.float32) -> tuple[Split, Split]:
    """Fashion-MNIST (or MNIST, same layout) from its four IDX files, each plain or ``.gz``.

    Args:
        root: directory holding ``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte[.gz]``,
            ``t10k-images-idx3-ubyte[.gz]`` and ``t10k-labels-idx1-ubyte[.gz]``.
        dtype: floating dtype of the images.

    Returns:
        ``(train, test)`` :class:`Split` s with images ``[N, 1, 28, 28]`` in [0, 1].

    Raises:
        DatasetNotFoundError: a file is missing under either name.
        ValueError: a file is malformed, or images and labels disagree in number.
    """
    root = Path(root)

    def find(stem: str) -> Optional[Path]:
        return next((root / n for n in (stem, stem + ".gz") if (root / n).is_file()), None)

    splits = []
    for part, (image_stem, label_stem) in _FASHION_FILES.items():
        image_path, label_path = find(image_stem), find(label_stem)
        if image_path is None or label_path is None:
            expected = [f"{stem}[.gz]" for pair in _FASHION_FILES.values() for stem in pair]
            raise _missing("Fashion-MNIST", root, expected, "Put the four files of the Fashion-MNIST release there")
        images, labels = read_idx(image_path), read_idx(label_path)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(
                f"Fashion-MNIST {part}: expected images [N, H, W] and labels [N], got {images.shape} and {labels.shape}"
            )
        splits.append(Split(_images(images[:, None], dtype), torch.tensor(labels, dtype=torch.int64)))
    return splits[0], splits[1]


def synthetic_cifar(
    *,
    n_train: int = 2000,
    n_test: int = 1000,
    num_classes: int = 10,
    size: int = 32,
    separation: float = 0.05,
    noise: float = 0.25,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> tuple[Split, Split]:
    """CIFAR-shaped synthetic data, learnable but not trivially: faint class templates plus noise.

    Each class has a random low-frequency RGB template (a 4x4 pattern upsampled) of contrast
    ``separation`` around mid-gray; an example is its class template, randomly shifted by up to 2
    pixels, plus Gaussian pixel noise, clipped to [0, 1]. With the defaults a nearest-class-mean
    classifier is right on about 44% of 10 classes, so models have something to learn (and, trained
    long enough on few examples, to memorize). Useful to exercise the 32x32 models and the kernels
    without the real data.

    Args:
        n_train: training examples.
        n_test: test examples.
        num_classes: classes (labels are uniform).
        size: image side.
        separation: contrast of the class templates; smaller is harder.
        noise: std of the pixel noise; larger is harder.
        seed: seed of templates, labels and noise.
        dtype: floating dtype of the images.

    Returns:
        ``(train, test)`` :class:`Split` s with images ``[N, 3, size, size]`` in [0, 1].
    """
    if n_train < 1 or n_test < 1 or num_classes < 2 or size < 4 or noise < 0 or not 0 < separation <= 1:
        raise ValueError(
            f"need n_train, n_test >= 1, num_classes >= 2, size >= 4, noise >= 0, 0 < separation <= 1; "
            f"got {n_train}, {n_test}, {num_classes}, {size}, {noise}, {separation}"
        )
    g = torch.Generator().manual_seed(seed)
    templates = torch.rand(num_classes, 3, 4, 4, generator=g, dtype=torch.float64)
    patterns = torch.nn.functional.interpolate(templates, size=(size, size), mode="bicubic", align_corners=False)
    templates = 0.5 + separation * (patterns - 0.5)

    def draw(n: int) -> Split:
        y = torch.randint(0, num_classes, (n,), generator=g)
        shifts = torch.randint(-2, 3, (n, 2), generator=g)
        x = torch.stack([templates[c].roll(tuple(s.tolist()), dims=(1, 2)) for c, s in zip(y, shifts)])
        x = (x + noise * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
        return Split(x.to(dtype), y)

    return draw(n_train), draw(n_test)


def load_dataset(name: str, *, root: Optional[str | os.PathLike] = None, **kwargs) -> tuple[Split, Split]:
    """A data set by name (:data:`DATASETS`), as a ``(train, test)`` pair of :class:`Split` s.

    Args:
        name: ``"digits"`` (bundled), ``"cifar10"``, ``"cifar100"``, ``"fashion-mnist"`` (read from
            ``root``) or ``"synthetic"`` (CIFAR-shaped, generated).
        root: directory of the files, for the file-based sets.
        **kwargs: passed to the loader (e.g. ``size`` for digits, ``n_train`` for synthetic).

    Raises:
        ValueError: an unknown name, or a file-based set without ``root``.
        DatasetNotFoundError: the files are not under ``root``.
    """
    if name == "digits":
        return load_digits(**kwargs)
    if name == "synthetic":
        return synthetic_cifar(**kwargs)
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {DATASETS}")
    if root is None:
        raise ValueError(
            f"{name} is read from files: pass root=<directory holding them> (--data-root on the command line)"
        )
    if name == "fashion-mnist":
        return load_fashion_mnist(root, **kwargs)
    return load_cifar(root, num_classes=100 if name == "cifar100" else 10, **kwargs)


# -- the data of a training run -----------------------------------------------------------------
def load_data(config: TrainConfig) -> tuple[Split, Split]:
    """The ``(train, test)`` splits of ``config``: its data set, cut to ``train_examples``.

    The private training set excludes dp-mix-diff's public pool (:func:`load_pool`) and the
    canaries (:func:`privfast.canaries.make_canaries`), which the :class:`~privfast.trainer.Trainer` appends.
    """
    train, test = load_dataset(config.dataset, root=config.data_root)
    pool = config.pool_examples if config.method == "dp-mix-diff" else 0
    available = len(train.y) - pool
    wanted = available if config.train_examples is None else config.train_examples
    if wanted > available or available < 2:
        less = f" less the {pool} of the public pool (--pool-examples)" if pool else ""
        raise ValueError(f"--train-examples {wanted} but {config.dataset} has {len(train.y)} training examples{less}")
    return Split(train.x[:wanted], train.y[:wanted]), test


def load_pool(config: TrainConfig) -> Split:
    """dp-mix-diff's public pool: the last ``pool_examples`` rows of the training split.

    They are disjoint from the private training set (its first rows, :func:`load_data`) and from
    the test split (the audited non-members), so they stand for public data of the same domain.
    """
    train, _ = load_dataset(config.dataset, root=config.data_root)
    return Split(train.x[-config.pool_examples :], train.y[-config.pool_examples :])


def data_shape(*splits: Split) -> dict:
    """``in_channels``, ``image_size`` and ``num_classes`` of images ``[N, C, H, W]`` with labels ``[N]``."""
    num_classes = int(max(split.y.max() for split in splits)) + 1
    return {"in_channels": splits[0].x.shape[1], "image_size": splits[0].x.shape[-1], "num_classes": num_classes}
