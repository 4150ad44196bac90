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


def test_a_corrupt_image_stops_with_its_name_instead_of_being_replaced(tmp_path, model):
    """timm would log a warning and return the next image in its place (top-1 over the wrong images, exit 0)."""
    root = make_folder(tmp_path / "val")
    broken = root / "dog" / "1.JPEG"
    broken.write_bytes(broken.read_bytes()[:200])  # a truncated JPEG: its header reads, its pixels do not
    (root / "cat" / "9.JPEG").write_bytes(b"not an image at all")
    ds = eval_dataset(DataSpec(kind="image_folder", root=str(root)), model)
    assert ds[0][0].shape == (3, 160, 160)
    for name in ("cat/9.JPEG", "dog/1.JPEG"):
        index = [str(p) for p in ds.filenames(absolute=True)].index(str(root / name))
        with pytest.raises(DataError, match=rf"^{root / name}: not a readable image \(") as e:
            ds[index]
        assert "\n" not in str(e.value)


def test_grey_images_for_a_grey_model_and_rgb_for_rgb(tmp_path):
    """The images' channels follow the model's data config (timm's conversion): a 1-channel model reads grey
    images from RGB files, and a 3-channel one RGB from grey files."""
    from PIL import Image

    import pomq_deploy.models  # noqa: F401  (registers deit_fmnist)

    grey_root = tmp_path / "grey"
    for c in ("a", "b"):
        (grey_root / c).mkdir(parents=True)
        Image.new("L", (40, 30), 200).save(grey_root / c / "0.png")
    grey_model = timm.create_model("deit_fmnist").eval()  # 1 x 28 x 28
    x, _ = eval_dataset(DataSpec(kind="image_folder", root=str(make_folder(tmp_path / "rgb"))), grey_model)[0]
    assert x.shape == (1, 28, 28)
    x, _ = eval_dataset(DataSpec(kind="image_folder", root=str(grey_root)), timm.create_model("test_vit").eval())[0]
    assert x.shape == (3, 160, 160) and torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])  # grey copied to R, G, B
