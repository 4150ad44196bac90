import pytest
import torch
from conftest import make_fmnist

from pomq_deploy.data import calibration_batches, calibration_indices, eval_dataset
from pomq_deploy.errors import DataError
from pomq_deploy.recipe import DataSpec


def test_indices_are_seeded_distinct_and_in_range():
    a, b, c = calibration_indices(100, 30, seed=0), calibration_indices(100, 30, seed=0), calibration_indices(100, 30, seed=1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len(set(a.tolist())) == 30 and 0 <= int(a.min()) and int(a.max()) < 100


def test_more_than_available():
    with pytest.raises(DataError, match="calib_images is 11 but the calibration set holds only 10"):
        calibration_indices(10, 11, seed=0)


def test_fmnist_calibration_is_from_train_split(tmp_path):
    import timm

    root = make_fmnist(tmp_path, n_train=50, n_test=20)
    model = timm.create_model("deit_fmnist")
    spec = DataSpec(kind="fashion_mnist", root=str(root), calib_images=25, calib_batch=10, seed=3)
    batches = calibration_batches(spec, model)
    assert [b.shape[0] for b in batches] == [10, 10, 5]
    assert batches[0].shape[1:] == (1, 28, 28)
    again = calibration_batches(spec, model)
    assert all(torch.equal(x, y) for x, y in zip(batches, again, strict=True))
    assert len(eval_dataset(spec, model)) == 20


def test_fmnist_needs_a_28x28_grey_model(tmp_path):
    import timm

    spec = DataSpec(kind="fashion_mnist", root=str(make_fmnist(tmp_path)))
    with pytest.raises(DataError, match="gives 1x28x28 images, but the model takes"):
        eval_dataset(spec, timm.create_model("test_vit"))
