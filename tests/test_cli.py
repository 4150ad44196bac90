import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
from conftest import make_fmnist, make_folder, user_error
from safetensors.torch import save_file

from pomq_deploy.cli.main import COMMANDS, main

CLI = Path(sys.executable).parent / "pomq-deploy"


def test_console_script_help():
    out = subprocess.run([str(CLI), "--help"], capture_output=True, text=True, check=True).stdout
    assert "usage: pomq-deploy" in out and "eval" in out


def test_help_does_not_import_heavy_libraries():
    code = ("import sys; from pomq_deploy.cli.main import build_parser; build_parser().format_help(); "
            "heavy = [m for m in ('torch', 'timm', 'onnxruntime', 'tensorrt') if m in sys.modules]; "
            "sys.exit(f'imported {heavy}' if heavy else 0)")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_subcommand_explains_itself(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: pomq-deploy {command}" in out and "examples:" in out


def test_eval_json_on_generated_data(tmp_path, random_deit_fmnist, capsys):
    data = make_fmnist(tmp_path / "fm", n_test=30)
    rc = main(["eval", "--checkpoint", str(random_deit_fmnist), "--data", str(data), "--batch-size", "8", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert out["images"] == 30 and set(out) >= {"top1", "top5", "images", "seconds"}
    assert 0.0 <= out["top1"] <= out["top5"] <= 1.0


def test_unknown_recipe_key(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text("name: r\nmodel: {arch: deit_fmnist}\ndata: {kind: fashion_mnist}\nevaluation: {}\n")
    assert f"{path}: unknown key 'evaluation'" in user_error(["eval", "--recipe", str(path)], capsys)


def test_missing_checkpoint(tmp_path, capsys):
    err = user_error(["eval", "--checkpoint", str(tmp_path / "none.safetensors")], capsys)
    assert "none.safetensors: no such checkpoint file" in err


def test_checkpoint_that_does_not_fit(tmp_path, capsys):
    path = tmp_path / "small.safetensors"
    save_file(timm.create_model("deit_fmnist", embed_dim=96).state_dict(), str(path))
    assert "tensors do not fit deit_fmnist" in user_error(["eval", "--checkpoint", str(path)], capsys)


def test_data_path_that_does_not_exist(tmp_path, random_deit_fmnist, capsys):
    err = user_error(["eval", "--checkpoint", str(random_deit_fmnist), "--data", str(tmp_path / "nope")], capsys)
    assert "nope: no such data folder" in err


def test_empty_image_folder(tmp_path, capsys):
    ckpt = tmp_path / "test_vit.safetensors"
    save_file(timm.create_model("test_vit").state_dict(), str(ckpt))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nmodel: {arch: test_vit}\ndata: {kind: image_folder}\n")
    (tmp_path / "val" / "cat").mkdir(parents=True)
    err = user_error(["eval", "--recipe", str(recipe), "--checkpoint", str(ckpt), "--data", str(tmp_path / "val")], capsys)
    assert "empty evaluation image folder" in err
    make_folder(tmp_path / "val2")
    assert main(["eval", "--recipe", str(recipe), "--checkpoint", str(ckpt), "--data", str(tmp_path / "val2"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 6


def test_quantized_eval_json(tiny_recipe, capsys):
    assert main(["eval", "--recipe", str(tiny_recipe), "--uniform", "8/8/4", "--scheme", "tsptq", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["images"] == 16 and out["scheme"] == "tsptq" and len(out["plan"]) == 12
    assert out["plan"][0] == {"w": 8, "a": 8, "attn": 4} and len(out["plan_id"]) == 12


def test_calibrate_then_cached(tiny_recipe, capsys):
    assert main(["calibrate", "--recipe", str(tiny_recipe), "--scheme", "minmax", "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert main(["calibrate", "--recipe", str(tiny_recipe), "--scheme", "minmax", "--json"]) == 0
    second = json.loads(capsys.readouterr().out)
    assert not first["cached"] and second["cached"] and first["cache"] == second["cache"]
    assert second["blocks"] == 12 and second["activations"] == 12 * 8 + 3


def test_plan_with_wrong_block_count(tiny_recipe, tmp_path, capsys):
    plan = tmp_path / "p.yaml"
    plan.write_text("model: tiny\nscheme: fqvit\nblocks:\n" + "  - {w: 4, a: 8, attn: 4}\n" * 3)
    err = user_error(["eval", "--recipe", str(tiny_recipe), "--plan", str(plan)], capsys)
    assert f"{plan}: 'blocks' has 3 rows but recipe tiny's model has 12 encoder blocks" in err


def test_plan_with_bad_width(tiny_recipe, tmp_path, capsys):
    plan = tmp_path / "p.yaml"
    plan.write_text("model: tiny\nscheme: fqvit\nblocks:\n  - {w: 4, a: 8, attn: 4}\n  - {w: 2, a: 8, attn: 4}\n")
    assert "'blocks[1].w': Input should be 4, 8, 'fp8' or 'float' (got 2)" in user_error(["eval", "--plan", str(plan)], capsys)


def test_bad_uniform_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", "--uniform", "8/8/2"])
    assert e.value.code == 2 and "expected W/A/ATTN" in capsys.readouterr().err


def test_an_output_the_machine_refuses_is_one_line(tiny_recipe, tmp_path, capsys, monkeypatch):
    """--out under a file (exit 2: a wrong argument), a full disk (exit 1): one line naming the path, nothing left."""
    import errno

    a_file = tmp_path / "engines"
    a_file.write_text("not a folder")
    with pytest.raises(SystemExit) as e:  # refused by argparse, before any work
        main(["build", "--recipe", str(tiny_recipe), "--uniform", "8/8/8", "--out", str(a_file)])
    assert e.value.code == 2 and capsys.readouterr().err.splitlines()[-1].endswith(f"--out: {a_file} is a file, not a folder")
    (tmp_path / "eng").mkdir()
    (tmp_path / "eng" / "tiny").write_text("a file where the recipe's folder goes")
    assert main(["build", "--recipe", str(tiny_recipe), "--uniform", "8/8/8", "--out", str(tmp_path / "eng"), "--no-verify"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"pomq-deploy build: error: {tmp_path / 'eng' / 'tiny'}: cannot write: a file stands where a folder")
    assert sorted(p.name for p in (tmp_path / "eng").iterdir()) == ["tiny"]

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("pomq_deploy.export.export_quantized", full)
    out = tmp_path / "m.onnx"
    assert main(["export", "--recipe", str(tiny_recipe), "--uniform", "8/8/8", "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"pomq-deploy export: error: {out}: cannot write: No space left on device" and not out.exists()


def test_a_plan_naming_a_missing_recipe_names_the_plan_file(tmp_path, capsys):
    plan = tmp_path / "p.yaml"
    plan.write_text("recipe: no_such_recipe\nscheme: fqvit\nblocks:\n" + "  - {w: 8, a: 8, attn: 8}\n" * 12)
    err = user_error(["eval", "--plan", str(plan)], capsys)
    assert err.startswith(f"pomq-deploy eval: error: {plan}: its recipe no_such_recipe: no such recipe file or recipe name")
