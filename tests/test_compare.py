"""pomq-deploy compare: block-by-block deployed vs fake-quant vs FP32, on ONNX Runtime (the tiny random model)."""

import json

import numpy as np
import onnx
import pytest
import torch
from conftest import tiny_recipe_file, user_error
from onnx import numpy_helper

from pomq_deploy.backends import get_backend
from pomq_deploy.cli.main import main
from pomq_deploy.compare import compare
from pomq_deploy.plan import uniform_plan


@pytest.fixture(scope="module")
def recipe(random_deit_fmnist, tmp_path_factory):
    return tiny_recipe_file(tmp_path_factory.mktemp("compare"), random_deit_fmnist)


def test_compare_json_for_a_uniform_plan(recipe, capsys):
    assert main(["compare", "--recipe", str(recipe), "--uniform", "8/8/8", "--images", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["backend"], out["images"], out["inputs"], out["target"]) == ("ort-cpu", 8, "eval", "ort")
    assert out["formats"]["activation_format"] == "u8" and out["formats"]["patchify_integer_gemms"] == 1  # the form that ran
    blocks = out["blocks"]
    assert [b["name"] for b in blocks] == [f"model.blocks.{i}" for i in range(12)]
    assert [b["node"] for b in blocks] == [f"/model/blocks/blocks.{i}/Add_1" for i in range(12)]
    # ONNX Runtime computes what the fake-quant model computes, block by block and alone
    assert min(b["deployed_vs_fakequant"] for b in blocks) > 0.999 and min(b["isolated"] for b in blocks) > 0.999
    assert all(0 < b["deployed_vs_fp32"] <= 1 and 0 < b["fakequant_vs_fp32"] <= 1 for b in blocks)
    assert out["logits"]["cosine"] > 0.999 and out["tensors"] == []
    # the largest loss is the largest fall of the deployed model's cosine to FP32 across one block
    falls = np.diff([1.0] + [b["deployed_vs_fp32"] for b in blocks]) * -1
    assert out["largest_loss"]["block"] == int(np.argmax(falls)) and out["largest_loss"]["cosine_after"] == blocks[int(np.argmax(falls))]["deployed_vs_fp32"]


def test_compare_table_with_quantized_tensors_on_noise(recipe, capsys):
    assert main(["compare", "--recipe", str(recipe), "--uniform", "8/4/8", "--images", "4", "--noise", "--tensors"]) == 0
    out = capsys.readouterr().out
    assert "4 noise images" in out and "/model/blocks/blocks.11/Add_1" in out and "largest loss: block " in out
    assert "integer GEMMs for " in out and "patch embedding as an integer GEMM" in out
    assert "model.blocks.0.attn.qkv.in_quant" in out  # read as codes by the integer GEMM: called on its input for the hook
    assert "not compared: model.blocks.0.attn.qkv.out_quant: the graph holds its uint8 codes" in out


def test_a_broken_block_is_the_one_named(recipe):
    """A deployed graph with block 5's attention projection scaled wrong: its isolated cosine is the lowest,
    and the chained cosine to the fake-quant model drops from block 5 on (and not before)."""
    from pomq_deploy.export import export_quantized
    from pomq_deploy.quant.calibration import calibrate_cached, quant_model
    from pomq_deploy.recipe import load_recipe

    r = load_recipe(str(recipe))
    qmodel = quant_model(r, "fqvit")
    calibrate_cached(qmodel, r)
    plan = uniform_plan("8/8/8", 12, r.name, "fqvit")
    path = recipe.parent / "broken.onnx"
    export_quantized(qmodel, plan, "ort", path)
    model = onnx.load(str(path))
    consts = {n.output[0]: n for n in model.graph.node if n.op_type == "Constant"}
    (dq,) = [n for n in model.graph.node if n.name == "/model/blocks/blocks.5/attn/proj/DequantizeLinear"]
    scale = consts[dq.input[1]].attribute[0]
    scale.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale.t) * 3, scale.t.name))
    images = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    result = compare(get_backend("ort-cpu").run_onnx, model, qmodel, plan, "asym", images, "ort-cpu", "noise")
    isolated = [b.isolated for b in result.blocks]
    chained = [b.deployed_vs_fakequant for b in result.blocks]
    assert int(np.argmin(isolated)) == 5 and isolated[5] < 0.999 and min(isolated[:5] + isolated[6:]) > 0.9999
    assert min(chained[:5]) > 0.9999 and chained[5] < 0.999


@pytest.mark.parametrize("argv, message", [
    ([], "give --plan FILE, --uniform W/A/ATTN or --artifact DIR"),
    (["--uniform", "8/8/8", "--artifact", "x"], "give --plan FILE, --uniform W/A/ATTN or --artifact DIR"),
    (["--artifact", "/nonexistent/dir"], "/nonexistent/dir"),
])
def test_compare_usage_errors_are_one_line(argv, message, capsys):
    assert message in user_error(["compare", *argv], capsys)
