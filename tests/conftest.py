import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

import pomq_deploy.models  # noqa: F401  (registers deit_fmnist with timm)
from pomq_deploy.cli.main import main
from pomq_deploy.data.fashion_mnist import DEBIAN_ROOT
from pomq_deploy.data.idx import write_idx

REPO = Path(__file__).resolve().parents[1]


def _have_gpu_stack() -> bool:
    if importlib.util.find_spec("tensorrt") is None:
        return False
    import torch

    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    import torch

    skips = {"gpu": None if _have_gpu_stack() else pytest.mark.skip(reason="needs an NVIDIA GPU with CUDA and TensorRT"),
             "cuda": None if torch.cuda.is_available() else pytest.mark.skip(reason="needs a CUDA GPU PyTorch sees")}
    for item in items:
        for marker, skip in skips.items():
            if skip is not None and marker in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def fmnist_root() -> Path:
    """Debian's Fashion-MNIST; tools/bootstrap.sh installs it, so its absence is a failure, not a skip."""
    if not (DEBIAN_ROOT / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.fail(f"{DEBIAN_ROOT} is missing: run tools/bootstrap.sh (apt-get install dataset-fashion-mnist)")
    return DEBIAN_ROOT


def make_fmnist(root: Path, n_train: int = 40, n_test: int = 20, seed: int = 0, gz: bool = True) -> Path:
    """A tiny Fashion-MNIST folder of random images, labels cycling through the 10 classes."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(root / f"{prefix}-images-idx3-ubyte{ext}", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(root / f"{prefix}-labels-idx1-ubyte{ext}", (np.arange(n) % 10).astype(np.uint8))
    return root


@pytest.fixture
def tiny_fmnist(tmp_path) -> Path:
    return make_fmnist(tmp_path / "fmnist")


@pytest.fixture(autouse=True, scope="session")
def _calibration_cache(tmp_path_factory):
    """Keep calibration caches out of the user's home directory during tests."""
    from pomq_deploy.quant.calibration import CACHE_ENV

    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("pomq-cache"))


@pytest.fixture(scope="session")
def random_deit_fmnist(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "deit_fmnist_random.safetensors"
    save_file(timm.create_model("deit_fmnist").state_dict(), str(path))
    return path


def tiny_recipe_file(folder: Path, checkpoint: Path, calib_images: int = 20, num_classes: int | None = None) -> Path:
    """Recipe 'tiny': the reference architecture with ``checkpoint`` on a generated data set (``calib_images``
    training images, at least 30, calibrated in two batches; 16 test images)."""
    data = make_fmnist(folder / "fm", n_train=max(30, calib_images), n_test=16)
    kwargs = f", kwargs: {{num_classes: {num_classes}}}" if num_classes else ""
    path = folder / "tiny.yaml"
    path.write_text(f"name: tiny\nmodel: {{arch: deit_fmnist, checkpoint: {checkpoint}{kwargs}}}\n"
                    f"data: {{kind: fashion_mnist, root: {data}, calib_images: {calib_images}, calib_batch: {calib_images // 2}}}\n")
    return path


@pytest.fixture
def tiny_recipe(tmp_path, random_deit_fmnist):
    return tiny_recipe_file(tmp_path, random_deit_fmnist)


# Helpers the test modules share: they import them from here, never from each other

def make_folder(root, classes=("cat", "dog"), per_class=3, seed=0):
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            h, w = rng.integers(60, 200, 2)
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / c / f"{i}.JPEG")
    return root


def user_error(argv, capsys) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err




def tiny_vit(**kwargs):
    torch.manual_seed(0)
    return timm.create_model("test_vit", img_size=32, patch_size=8, num_classes=10, **kwargs).eval()  # 6 blocks, 64-d


def run_ort(tmp_path, onnx_path, x, cpu=None):
    """``x`` through ``onnx_path`` built by ort-cpu (as on ``cpu``: a CPU kind's formats, by default this one's)."""
    from pomq_deploy.backends.ort_cpu import OrtCpuBackend

    backend = OrtCpuBackend(threads=1, cpu=cpu)
    art = backend.build(onnx_path, tmp_path)
    return backend.run(art, x.numpy())


def images(n_batches=3, batch=8, size=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, size, size, generator=g) for _ in range(n_batches)]
