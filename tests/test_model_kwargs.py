"""A fine-tuned model of a shape timm does not name: recipe model.kwargs and model.data, the checkpoint hints."""

import json

import pytest
import timm
import torch
from conftest import make_fmnist, user_error
from safetensors.torch import save_file

from pomq_deploy.cli.main import main
from pomq_deploy.errors import RecipeError
from pomq_deploy.models.loading import data_model, load_model
from pomq_deploy.recipe import load_recipe

# a grey-scale ViT the repo does not ship: 28x28, patch 7, 64-d, 4 heads, 2 blocks, 10 classes
SHAPE = {"img_size": 28, "patch_size": 7, "in_chans": 1, "num_classes": 10, "embed_dim": 64, "depth": 2, "num_heads": 4}
ARCH = "vit_tiny_patch16_224"


def _checkpoint(path, **changes):
    torch.manual_seed(0)
    save_file(timm.create_model(ARCH, pretrained=False, **{**SHAPE, **changes}).state_dict(), str(path))
    return path


def _recipe(tmp_path, kwargs=SHAPE, data="{mean: [0.286], std: [0.353]}", checkpoint=None):
    fm = make_fmnist(tmp_path / "fm", n_train=30, n_test=16)
    ckpt = checkpoint or _checkpoint(tmp_path / "vit.safetensors")
    path = tmp_path / "mine.yaml"
    path.write_text(f"name: mine\nmodel:\n  arch: {ARCH}\n  checkpoint: {ckpt}\n  kwargs: {json.dumps(kwargs)}\n"
                    f"  data: {data}\ndata: {{kind: fashion_mnist, root: {fm}, calib_images: 20, calib_batch: 10}}\n")
    return path


def test_kwargs_and_data_config_shape_the_model(tmp_path):
    recipe = load_recipe(str(_recipe(tmp_path)))
    model = load_model(recipe.model)
    assert model.patch_embed.proj.weight.shape == (64, 1, 7, 7) and model.head.weight.shape == (10, 64)
    cfg = data_model(recipe.model).pretrained_cfg
    assert cfg["input_size"] == (1, 28, 28) and cfg["mean"] == (0.286,) and cfg["std"] == (0.353,)


FAMILIES = {  # arch -> kwargs of a small grey 28x28 model of that family, as a recipe gives them
    ARCH: SHAPE,
    "deit3_small_patch16_224": SHAPE,
    "beit_base_patch16_224": SHAPE,
    "eva02_tiny_patch14_224": {**SHAPE, "embed_dim": 192, "num_heads": 3},
    "swin_tiny_patch4_window7_224": {"img_size": 28, "patch_size": 7, "in_chans": 1, "num_classes": 10, "embed_dim": 64,
                                     "depths": [2], "num_heads": [4], "window_size": 4},
}


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_each_family_from_a_recipe(arch, tmp_path, capsys):
    """A recipe with model.kwargs per family: eval --uniform 8/8/8 (calibrating), export for both targets, and
    check --target tensorrt without errors."""
    torch.manual_seed(0)
    ckpt = tmp_path / "m.safetensors"
    save_file(timm.create_model(arch, pretrained=False, **FAMILIES[arch]).state_dict(), str(ckpt))
    recipe = _recipe(tmp_path, kwargs=FAMILIES[arch], checkpoint=ckpt)
    recipe.write_text(recipe.read_text().replace(ARCH, arch))
    assert main(["eval", "--recipe", str(recipe), "--uniform", "8/8/8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 16
    for target in ("ort", "tensorrt"):
        out = tmp_path / f"{target}.onnx"
        assert main(["export", "--recipe", str(recipe), "--uniform", "8/8/8", "--target", target, "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["check", str(tmp_path / "tensorrt.onnx"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["errors"] == 0


def test_a_checkpoint_that_does_not_fit_names_the_kwargs(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path / "c37.safetensors", num_classes=37, patch_size=4)
    recipe = _recipe(tmp_path, checkpoint=ckpt)
    err = user_error(["eval", "--recipe", str(recipe), "--limit", "4"], capsys)
    assert "tensors do not fit vit_tiny_patch16_224" in err
    assert "set model.kwargs num_classes: 37 (head.weight has 37 rows), patch_size: 4, img_size (pos_embed has 50" in err
    # --num-classes fixes the one, the recipe's patch size still differs
    err = user_error(["eval", "--recipe", str(recipe), "--limit", "4", "--num-classes", "37"], capsys)
    assert "num_classes" not in err.split("set model.kwargs")[1] and "patch_size: 4" in err


def test_bad_kwargs_and_data_config_are_one_line(tmp_path):
    with pytest.raises(RecipeError, match=r"mine.yaml: model.kwargs: .*unexpected keyword argument 'colour'"):
        load_recipe(str(_recipe(tmp_path, kwargs={**SHAPE, "colour": 1})))
    with pytest.raises(RecipeError, match=r"mine.yaml: model.kwargs .*: timm cannot build 'vit_tiny_patch16_224' with them"):
        load_recipe(str(_recipe(tmp_path, kwargs={**SHAPE, "num_heads": 3})))  # 64-d does not split into 3 heads
    with pytest.raises(RecipeError, match=r"mine.yaml: model.data.mean: 3 value\(s\) for 1 input channel\(s\)"):
        load_recipe(str(_recipe(tmp_path, data="{mean: [0.5, 0.5, 0.5], std: [0.5]}")))
    with pytest.raises(RecipeError, match=r"'model.data.crop_pct': Input should be less than or equal to 1"):
        load_recipe(str(_recipe(tmp_path, data="{crop_pct: 1.5}")))


def test_build_and_search_carry_the_kwargs(tmp_path, capsys):
    """build records the recipe (kwargs included) in the manifest, and eval --artifact rebuilds the model from
    it; a 4-trial search runs on the same recipe."""
    recipe = _recipe(tmp_path)
    assert main(["build", "--recipe", str(recipe), "--uniform", "8/8/8", "--runs", "2", "--batch", "2",
                 "--out", str(tmp_path / "eng"), "--json"]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["recipe_spec"]["model"]["kwargs"] == SHAPE and manifest["accuracy"]["images"] == 16
    directory = tmp_path / "eng" / "mine" / manifest["plan_id"]
    assert main(["eval", "--artifact", str(directory), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["top1"] == manifest["accuracy"]["top1"]
    out = tmp_path / "s"
    assert main(["search", "--recipe", str(recipe), "--mode", "measured", "--trials", "4", "--algorithm", "random", "--eval-images", "8",
                 "--out", str(out), "--allow-infeasible", "--json"]) == 0
    capsys.readouterr()
    assert len(json.loads((out / "pareto.json").read_text())["trials"]) == 4


def test_inspect_shows_blocks_roles_and_the_data_config(tmp_path, capsys):
    assert main(["inspect", "--recipe", str(_recipe(tmp_path)), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [b["path"] for b in info["blocks"]] == ["blocks.0", "blocks.1"] and info["blocks"][0]["adapter"] == "vit"
    roles = {la["role"]: la["layer"] for la in info["blocks"][0]["layers"]}
    assert roles["qkv"] == "Linear 64 -> 192" and roles["fc2"] == "Linear 256 -> 64"
    assert [o["path"] for o in info["outside_8bit"]] == ["patch_embed.proj", "norm", "head"]
    assert info["data_config"]["input_size"] == [1, 28, 28] and info["kwargs"] == SHAPE
    assert [f["genes"] for f in info["engine_formats"]] == ["float/float/float", "8/8/8", "8/8/float", "4/8/8", "4/8/float"]
    assert main(["inspect", "--recipe", str(_recipe(tmp_path)), "--target", "tensorrt", "--json"]) == 0
    trt = {f["genes"]: f["gemm"] for f in json.loads(capsys.readouterr().out)["engine_formats"]}
    assert trt["4/float/float"].startswith("INT4 weight-only GEMM (W4A16)") and trt["fp8/fp8/fp8"].startswith("FP8 E4M3 GEMM")
    # Swin's blocks, numbered across its stages (the shipped recipe; no weights are read)
    assert main(["inspect", "--recipe", "swin_tiny", "--json"]) == 0
    swin = json.loads(capsys.readouterr().out)
    assert len(swin["blocks"]) == 12 and swin["blocks"][4]["path"] == "layers.2.blocks.0"
    assert swin["blocks"][0]["adapter"] == "swin" and "layers.1.downsample.reduction" in [o["path"] for o in swin["outside_8bit"]]


def test_inspect_names_a_block_family_without_adapter(tmp_path, capsys):
    recipe = _recipe(tmp_path)
    recipe.write_text(recipe.read_text().replace(ARCH, "cait_xxs24_224"))
    err = user_error(["inspect", "--recipe", str(recipe)], capsys)
    assert "encoder block timm.models.cait.LayerScaleBlock has no adapter" in err
