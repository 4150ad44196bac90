"""Data sets a recipe names: the evaluation split and the seeded calibration images."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..errors import DataError
from .fashion_mnist import DEBIAN_ROOT, ArrayImageDataset, load_fashion_mnist

if TYPE_CHECKING:  # the recipe schema (pydantic) is not needed to read data, e.g. in tools/train_reference.py
    from ..recipe import DataSpec


def _data_config(model: nn.Module) -> dict:
    from timm.data import resolve_data_config

    return resolve_data_config({}, model=model)


def _fashion_mnist(spec: DataSpec, model: nn.Module, split: str) -> Dataset:
    cfg = _data_config(model)
    if tuple(cfg["input_size"]) != (1, 28, 28):
        raise DataError(f"data.kind fashion_mnist gives 1x28x28 images, but the model takes {tuple(cfg['input_size'])}")
    images, labels = load_fashion_mnist(Path(spec.root or DEBIAN_ROOT), split)
    return ArrayImageDataset(images, labels, mean=cfg["mean"][0], std=cfg["std"][0])


# PIL's mode for the number of input channels a model's data config asks for (timm converts every image to it)
IMAGE_MODES = {1: "L", 3: "RGB"}


def _image_folder(root: str | None, model: nn.Module, what: str) -> Dataset:
    """An ImageNet-style folder (<class>/<image>) with the model's own timm eval transform, each image converted to
    the model's channels (grey to RGB and back, as timm does)."""
    from timm.data import create_transform

    from .image_folder import StrictImageDataset

    if root is None:
        raise DataError(f"no {what} folder: pass --data DIR or set data.root in the recipe")
    path = Path(root)
    if not path.is_dir():
        raise DataError(f"{path}: no such {what} folder")
    cfg = _data_config(model)
    channels = cfg["input_size"][0]
    if channels not in IMAGE_MODES:
        raise DataError(f"{path}: the model takes {channels}-channel images; an image folder gives 1 (grey) or 3 (RGB)")
    try:
        dataset = StrictImageDataset(str(path), transform=create_transform(**cfg), input_img_mode=IMAGE_MODES[channels])
    except RuntimeError as e:  # timm's reader raises this for a folder without images
        raise DataError(f"{path}: empty {what} folder: {e}") from None
    if len(dataset) == 0:
        raise DataError(f"{path}: empty {what} folder: an ImageNet-style folder holds <class>/<image> files")
    return dataset


def eval_dataset(spec: DataSpec, model: nn.Module) -> Dataset:
    if spec.kind == "fashion_mnist":
        return _fashion_mnist(spec, model, "test")
    return _image_folder(spec.root, model, "evaluation image")


def calib_dataset(spec: DataSpec, model: nn.Module) -> Dataset:
    if spec.kind == "fashion_mnist":
        return _fashion_mnist(spec, model, "train")
    return _image_folder(spec.calib_root or spec.root, model, "calibration image")


def eval_loader(dataset: Dataset, batch_size: int, limit: int | None = None, workers: int = 0) -> DataLoader:
    """Batches of the first ``limit`` images (all by default), in the data set's own order."""
    if limit is not None and limit < len(dataset):
        dataset = Subset(dataset, range(limit))
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)


def calibration_indices(available: int, count: int, seed: int) -> torch.Tensor:
    """``count`` distinct indices drawn by a seeded shuffle: the same seed always gives the same images."""
    if count > available:
        raise DataError(f"data.calib_images is {count} but the calibration set holds only {available} images")
    return torch.randperm(available, generator=torch.Generator().manual_seed(seed))[:count]


def calibration_batches(spec: DataSpec, model: nn.Module) -> list[torch.Tensor]:
    """The calibration images as a list of batches (FQ-ViT: 10 x 100 shuffled training images)."""
    dataset = calib_dataset(spec, model)
    subset = Subset(dataset, calibration_indices(len(dataset), spec.calib_images, spec.seed).tolist())
    loader = DataLoader(subset, batch_size=spec.calib_batch, shuffle=False, num_workers=spec.workers)
    return [images for images, _ in loader]
