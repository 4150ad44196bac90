import pytest
import timm
import torch
from conftest import make_folder

from pomq_deploy.data import calibration_batches, eval_dataset, eval_loader
from pomq_deploy.errors import DataError
from pomq_deploy.recipe import DataSpec


@pytest.fixture(scope="module")
def model():
    return timm.create_model("test_vit").eval()  # 3x160x160, crop_pct 0.95, mean/std 0.5


def test_eval_folder_uses_the_models_transform(tmp_path, model):
    spec = DataSpec(kind="image_folder", root=str(make_folder(tmp_path / "val")))
    ds = eval_dataset(spec, model)
    assert len(ds) == 6
    labels = [ds[i][1] for i in range(6)]
    assert labels == [0, 0, 0, 1, 1, 1]  # classes sorted by folder name
    x, _ = ds[0]
    assert x.shape == (3, 160, 160)
    assert -1.0 <= float(x.min()) and float(x.max()) <= 1.0  # (x - 0.5) / 0.5 of values in [0, 1]
    batches = list(eval_loader(ds, batch_size=4, limit=5))
    assert [len(b[1]) for b in batches] == [4, 1]


def test_calibration_comes_from_calib_root(tmp_path, model):
    spec = DataSpec(kind="image_folder", root=str(make_folder(tmp_path / "val")),
                    calib_root=str(make_folder(tmp_path / "train", per_class=5, seed=1)), calib_images=4, calib_batch=3)
    batches = calibration_batches(spec, model)
    assert [b.shape for b in batches] == [torch.Size([3, 3, 160, 160]), torch.Size([1, 3, 160, 160])]


def test_empty_folder(tmp_path, model):
    (tmp_path / "val" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match="empty evaluation image folder"):
        eval_dataset(DataSpec(kind="image_folder", root=str(tmp_path / "val")), model)


def test_missing_folder(tmp_path, model):
    with pytest.raises(DataError, match="no such evaluation image folder"):
        eval_dataset(DataSpec(kind="image_folder", root=str(tmp_path / "nope")), model)


def test_no_folder_given(model):
    with pytest.raises(DataError, match="pass --data DIR"):
        eval_dataset(DataSpec(kind="image_folder"), model)
