import pytest
import yaml
from conftest import REPO

from pomq_deploy._schema import parse, to_plain
from pomq_deploy.errors import RecipeError
from pomq_deploy.recipe import RECIPES_DIR, Recipe, find_recipe, load_recipe

ALL = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
PAPER_ARCHS = {"deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224", "vit_base_patch16_224",
               "vit_large_patch16_224", "swin_tiny_patch4_window7_224", "swin_small_patch4_window7_224",
               "swin_base_patch4_window7_224"}


@pytest.mark.parametrize("name", ALL)
def test_every_recipe_loads_and_roundtrips(name):
    recipe = load_recipe(name)
    assert recipe.name == name
    text = yaml.safe_dump(to_plain(recipe))
    assert parse(Recipe, yaml.safe_load(text), "roundtrip", RecipeError) == recipe


def test_paper_models_have_recipes():
    assert {load_recipe(n).model.arch for n in ALL} >= PAPER_ARCHS


def test_default_is_reference_with_path_relative_to_recipe():
    recipe = load_recipe(None)
    assert recipe.name == "deit_fmnist"
    assert recipe.model.checkpoint == str(REPO / "checkpoints" / "deit_fmnist.safetensors")
    assert recipe.data.calib_images == 1000 and recipe.data.calib_batch == 100


def write(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return str(path)


BASE = "name: x\nmodel: {arch: deit_fmnist}\ndata: {kind: fashion_mnist}\n"


@pytest.mark.parametrize(
    "text, message",
    [
        (BASE + "bogus: 1\n", r"unknown key 'bogus'; allowed keys here: name, model, data, eval"),
        (BASE.replace("arch: deit_fmnist", "arch: deit_fmnist, weights: a"), r"unknown key 'model.weights'; allowed keys here: arch, checkpoint"),
        (BASE.replace("fashion_mnist", "mnist"), r"'data.kind': Input should be 'fashion_mnist' or 'image_folder' \(got 'mnist'\)"),
        (BASE + "eval: {batch_size: -4}\n", r"'eval.batch_size': Input should be greater than 0 \(got -4\)"),
        ("name: x\ndata: {kind: fashion_mnist}\n", r"missing required key 'model'"),
        ("- a\n- b\n", r"expected a mapping of keys at the top level, got list"),
        ("name: [x\n", r"line 2 not valid YAML"),
        (BASE.replace("deit_fmnist", "no_such_net"), r"model.arch 'no_such_net' is not a timm model name"),
        # the name becomes the engines/ folder, the calibration cache file and the study: one path component only
        (BASE.replace("name: x", "name: ../../tmp/x/escape"), r"'name': not allowed as a name, which becomes a file name .*"
                                                               r"\(got '../../tmp/x/escape'\)"),
        (BASE.replace("name: x", "name: a/b"), r"'name': not allowed as a name"),
        (BASE.replace("name: x", "name: .hidden"), r"'name': not allowed as a name"),
        (BASE.replace("name: x", "name: a..b"), r"'name': not allowed as a name"),
    ],
)
def test_bad_recipes_name_file_and_key(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(RecipeError, match=message) as e:
        load_recipe(path)
    assert str(e.value).startswith(path) and "\n" not in str(e.value)


def test_relative_paths_resolve_against_the_recipe(tmp_path):
    path = write(tmp_path, BASE.replace("{arch: deit_fmnist}", "{arch: deit_fmnist, checkpoint: w/m.safetensors}"))
    assert load_recipe(path).model.checkpoint == str(tmp_path / "w" / "m.safetensors")


def test_unknown_recipe_lists_known_ones():
    with pytest.raises(RecipeError, match="no such recipe file or recipe name; recipes in .*deit_fmnist"):
        find_recipe("nope")
