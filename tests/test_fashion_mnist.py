import numpy as np
import pytest
import torch
from conftest import make_fmnist

from pomq_deploy.data.fashion_mnist import ArrayImageDataset, load_fashion_mnist
from pomq_deploy.data.idx import write_idx
from pomq_deploy.errors import DataError


@pytest.mark.parametrize("gz", [True, False])
def test_loads_generated_split(tmp_path, gz):
    root = make_fmnist(tmp_path, n_train=30, n_test=12, gz=gz)
    images, labels = load_fashion_mnist(root, "test")
    assert images.shape == (12, 28, 28) and labels.dtype == np.int64
    assert labels.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]


def test_dataset_normalises(tmp_path):
    images = np.zeros((2, 28, 28), np.uint8)
    images[1] = 255
    ds = ArrayImageDataset(images, np.array([3, 4]), mean=0.5, std=0.25)
    x, y = ds[1]
    assert x.shape == (1, 28, 28) and y == 4
    assert torch.allclose(x, torch.full_like(x, 2.0))  # (1 - 0.5) / 0.25
    assert float(ds[0][0][0, 0, 0]) == pytest.approx(-2.0)


def test_count_mismatch(tmp_path):
    root = make_fmnist(tmp_path)
    write_idx(root / "t10k-labels-idx1-ubyte.gz", np.zeros(5, np.uint8))
    with pytest.raises(DataError, match="20 images but 5 labels"):
        load_fashion_mnist(root, "test")


def test_label_out_of_range(tmp_path):
    root = make_fmnist(tmp_path)
    write_idx(root / "t10k-labels-idx1-ubyte.gz", np.full(20, 10, np.uint8))
    with pytest.raises(DataError, match="label 10 outside"):
        load_fashion_mnist(root, "test")


def test_missing_file_names_it(tmp_path):
    root = make_fmnist(tmp_path)
    (root / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="missing train-labels-idx1-ubyte"):
        load_fashion_mnist(root, "train")


def test_debian_files_decode_to_the_known_shape(fmnist_root):
    """Debian recompressed the .gz files, so we check the decoded contents, not a hash."""
    for split, n in (("train", 60000), ("test", 10000)):
        images, labels = load_fashion_mnist(fmnist_root, split)
        assert images.shape == (n, 28, 28)
        assert np.bincount(labels, minlength=10).tolist() == [n // 10] * 10
