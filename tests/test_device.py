"""--device: where the PyTorch side runs. The CUDA tests run wherever PyTorch sees a GPU (no TensorRT needed)."""

import json

import pytest
import torch

from pomq_deploy.cli.main import main
from pomq_deploy.device import resolve_device, to_cpu
from pomq_deploy.errors import PomqError
from pomq_deploy.plan import uniform_plan
from pomq_deploy.quant.calibration import calibrated_model
from pomq_deploy.recipe import load_recipe


def test_auto_takes_the_cpu_without_cuda_and_bad_names_are_refused():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(PomqError, match="--device gpu: allowed: auto, cpu, cuda"):
        resolve_device("gpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu_is_one_line_and_exit_2(tiny_recipe, capsys):
    assert main(["eval", "--recipe", str(tiny_recipe), "--uniform", "8/8/8", "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--device cuda: PyTorch sees no CUDA device here" in err, err


def test_cache_files_hold_cpu_tensors():
    tree = {"a": [torch.ones(2)], "b": (torch.zeros(1), 3), "c": "x"}
    moved = to_cpu(tree)
    assert moved["a"][0].device.type == "cpu" and moved["b"][1] == 3 and moved["c"] == "x" and isinstance(moved["b"], tuple)


@pytest.mark.cuda
@pytest.mark.parametrize("scheme", ["fqvit", "repq", "tsptq"])
def test_cuda_gives_the_cpus_logits_within_float_noise(tiny_recipe, scheme):
    """Calibrated and run on CUDA, the fake-quant model computes what it computes on the CPU: the exact path's
    integer GEMMs are exact on both, so only float ops' last bits differ."""
    recipe = load_recipe(tiny_recipe)
    cpu, _ = calibrated_model(recipe, scheme, force=True)
    gpu, _ = calibrated_model(recipe, scheme, force=True, device=torch.device("cuda"))
    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    for plan in ("8/8/8", "4/4/4"):
        for qm in (cpu, gpu):
            qm.apply(uniform_plan(plan, qm.num_blocks, recipe.name, scheme))
        with torch.inference_mode(), cpu.exact_path(), gpu.exact_path():
            a, b = cpu(x), gpu(x).cpu()
        assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.999, (scheme, plan)
        with torch.inference_mode():
            assert torch.nn.functional.cosine_similarity(cpu(x).flatten(), gpu(x).cpu().flatten(), dim=0) > 0.999


@pytest.mark.cuda
def test_build_on_cuda_passes_its_self_check(tiny_recipe, tmp_path, capsys):
    """Calibration and the self-check's reference on the GPU, the export traced on the CPU, ORT running it."""
    argv = ["build", "--uniform", "8/8/8", "--recipe", str(tiny_recipe), "--out", str(tmp_path), "--device", "cuda",
            "--limit", "8", "--runs", "2", "--batch", "2", "--json"]
    assert main(argv) == 0
    check = json.loads(capsys.readouterr().out)["verify"]
    assert check["passed"] and check["noise"]["cosine"] >= 0.995
