"""Fashion-MNIST from its IDX files (Debian's ``dataset-fashion-mnist``, or any folder holding them)."""

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import DataError
from .idx import read_idx

DEBIAN_ROOT = Path("/usr/share/datasets/fashion-mnist")
SPLITS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
NUM_CLASSES = 10


def _find(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    raise DataError(f"{root}: missing {stem}(.gz); a Fashion-MNIST folder holds {', '.join(s for p in SPLITS.values() for s in p)}"
                    " (on Debian: apt-get install dataset-fashion-mnist)")


def load_fashion_mnist(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) int64 of one split, checked for shape and label range."""
    root = Path(root)
    if split not in SPLITS:
        raise DataError(f"Fashion-MNIST split {split!r} does not exist; allowed: {', '.join(SPLITS)}")
    if not root.is_dir():
        raise DataError(f"{root}: no such data folder")
    images_path, labels_path = (_find(root, stem) for stem in SPLITS[split])
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1:
        raise DataError(f"{images_path}: expected images (N, H, W) and labels (N,), got {images.shape} and {labels.shape}")
    if len(images) != len(labels):
        raise DataError(f"{root}: {len(images)} images but {len(labels)} labels in split {split!r}")
    if len(labels) and labels.max() >= NUM_CLASSES:
        raise DataError(f"{labels_path}: label {labels.max()} outside 0..{NUM_CLASSES - 1}")
    return images, labels.astype(np.int64)


class ArrayImageDataset(Dataset):
    """Grey images held in memory as uint8, served normalised as (1, H, W) float tensors."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, mean: float, std: float):
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.labels = torch.from_numpy(np.ascontiguousarray(labels))
        self.mean, self.std = mean, std

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.normalize(self.images[i : i + 1]), int(self.labels[i])

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() / 255.0 - self.mean) / self.std
