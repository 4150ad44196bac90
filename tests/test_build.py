"""build / eval --artifact / bench / export on the command line, and the artifact directory's guarantees."""

import io
import json
import shutil
from contextlib import redirect_stdout

import pytest
from conftest import tiny_recipe_file, user_error

from pomq_deploy.artifact import MANIFEST, load_artifact
from pomq_deploy.cli.main import main

BUILD = ["--limit", "16", "--runs", "5", "--batch", "2"]


@pytest.fixture(scope="module")
def built_once(random_deit_fmnist, tmp_path_factory):
    """A mixed plan built on ort-cpu: 4-bit weights in blocks 0-2 (built once; tests get a copy)."""
    tmp = tmp_path_factory.mktemp("build")
    recipe = tiny_recipe_file(tmp, random_deit_fmnist)
    plan = tmp / "plan.yaml"
    plan.write_text("model: tiny\nscheme: fqvit\nblocks:\n" + "  - {w: 4, a: 8, attn: 4}\n" * 3 + "  - {w: 8, a: 8, attn: 8}\n" * 9)
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["build", "--plan", str(plan), "--recipe", str(recipe), "--out", str(tmp / "eng"), *BUILD, "--json"]) == 0
    manifest = json.loads(out.getvalue())
    return tmp / "eng" / "tiny" / manifest["plan_id"], manifest


@pytest.fixture
def built(built_once, tmp_path):
    directory, manifest = built_once
    copy = tmp_path / "eng" / "tiny" / directory.name
    shutil.copytree(directory, copy)
    return copy, manifest


def test_build_writes_a_complete_manifest(built):
    directory, m = built
    assert sorted(p.name for p in directory.iterdir()) == ["manifest.json", "model.onnx", "model.ort.onnx"]
    assert m["plan"]["blocks"][0] == {"w": 4, "a": 8, "attn": 4} and m["scheme"] == "fqvit" and m["target"] == "ort"
    assert m["backend"]["name"] == "ort-cpu" and m["latency"]["batch"] == 2 and m["latency"]["runs"] == 5
    assert 0 < m["latency"]["median_ms"] <= m["latency"]["p90_ms"]
    assert m["accuracy"]["images"] == 16 and 0 <= m["accuracy"]["top1"] <= 1
    assert m["onnx"]["weights_int4"] == 3 * 4 and m["onnx"]["weights_int8"] == 9 * 4 + 2
    assert set(m["versions"]) >= {"pomq_deploy", "torch", "timm", "onnx", "onnxruntime"}
    assert any(note.startswith("ort-cpu: log2 attention (attn=4") for note in m["emulated"])  # LIS runs as float ops on ORT
    assert not list(directory.parent.glob(".*"))  # no temporary directory left behind


def test_ort_artifact_adds_the_bias_inside_the_integer_gemms(built):
    """Every Linear of the 12 blocks (qkv, proj, fc2; fc1's bias goes into BiasGelu) and the patch embedding (a
    GEMM per patch) carries its bias in MatMulIntegerToFloat: the only Adds left reading a GEMM's output are the
    residual ones (two per block)."""
    import onnx

    directory, m = built
    assert m["backend"]["options"]["patchify_integer_gemms"] == 1
    assert m["backend"]["options"]["gemm_bias_fused"] == 3 * 12 + 1
    model = onnx.load(str(directory / "model.ort.onnx"))
    made_by = {o: n.op_type for n in model.graph.node for o in n.output}
    constants = {t.name for t in model.graph.initializer}
    after_gemm = [n for n in model.graph.node if n.op_type == "Add" and
                  any(made_by.get(i) == "MatMulIntegerToFloat" for i in n.input)]
    assert len(after_gemm) == 2 * 12 and not any(i in constants for n in after_gemm for i in n.input)


def test_four_bit_blocks_shrink_weight_bytes_as_expected(built, tiny_recipe, tmp_path, capsys):
    _, mixed = built
    assert main(["build", "--uniform", "8/8/8", "--scheme", "fqvit", "--recipe", str(tiny_recipe), "--out", str(tmp_path / "eng"),
                 *BUILD, "--json"]) == 0
    uniform = json.loads(capsys.readouterr().out)
    per_block = 192 * 576 + 192 * 192 + 2 * 192 * 768  # qkv, proj, fc1, fc2 weights of one block
    expected = 3 * per_block // 2  # three blocks at 4 bits: half a byte saved per weight
    saved = uniform["onnx"]["weight_bytes"] - mixed["onnx"]["weight_bytes"]
    assert abs(saved - expected) <= 0.1 * expected


def test_eval_and_bench_an_artifact(built, capsys):
    directory, m = built
    assert main(["eval", "--artifact", str(directory), "--limit", "16", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["top1"] == m["accuracy"]["top1"] and out["images"] == 16 and out["plan_id"] == m["plan_id"]
    assert main(["bench", "--artifact", str(directory), "--batch", "3", "--runs", "5", "--json"]) == 0
    bench = json.loads(capsys.readouterr().out)
    assert bench["batch"] == 3 and bench["runs"] == 5 and bench["median_ms"] > 0


def test_edited_manifest_is_refused(built, capsys):
    directory, _ = built
    m = json.loads((directory / MANIFEST).read_text())
    m["accuracy"]["top1"] = 0.99
    (directory / MANIFEST).write_text(json.dumps(m))
    assert "edited after the build" in user_error(["bench", "--artifact", str(directory)], capsys)


def test_missing_manifest_is_refused(built, capsys):
    directory, _ = built
    (directory / MANIFEST).unlink()
    assert "manifest.json: missing" in user_error(["eval", "--artifact", str(directory)], capsys)


def test_changed_model_file_is_refused(built):
    directory, _ = built
    with open(directory / "model.ort.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(Exception, match="changed after the build"):
        load_artifact(directory)


def test_corrupt_onnx_file(tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a protobuf")
    assert "bad.onnx: not a readable ONNX model" in user_error(["bench", "--onnx", str(bad)], capsys)


def _onnx_with_inputs(path, *inputs) -> None:
    import onnx
    from onnx import helper as h

    ins = [h.make_tensor_value_info(name, getattr(onnx.TensorProto, kind), shape) for name, kind, shape in inputs]
    node = h.make_node("Add" if len(ins) == 2 else "Identity", [i.name for i in ins], ["y"]) if ins else h.make_node(
        "Constant", [], ["y"], value=h.make_tensor("c", onnx.TensorProto.FLOAT, [1], [1.0]))
    out = ins[0].type.tensor_type.elem_type if ins else onnx.TensorProto.FLOAT
    graph = h.make_graph([node], "g", ins, [h.make_tensor_value_info("y", out, None)])
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]), str(path))


@pytest.mark.parametrize("inputs, said", [
    ([("x", "FLOAT", ["b", "h"])], "m.onnx (optimised): input 'x' has dimension(s) [1] of no fixed size (['h'])"),
    ([("x", "FLOAT", [4, 3])], "input 'x' has a fixed batch of 4; time it with --batch 4"),
    ([("x", "FLOAT", ["b", 100_000, 100_000])], "its inputs at batch 2 take more than 2 GiB (input 'x' is [2, 100000, 100000])"),
    ([("x", "STRING", ["b"])], "input 'x' is a tensor(string); timing feeds tensors of float, float16"),
    ([("x", "FLOAT", None)], "input 'x' has no dimensions in the model"),
    ([], "the model has no inputs to feed"),
    ([("x", "FLOAT", ["b", 3]), ("z", "FLOAT", [5, 3])], "ONNX Runtime cannot run this model at the fed shapes"),
])
def test_bench_onnx_feeds_what_the_model_declares_or_says_why_not(tmp_path, capsys, inputs, said):
    _onnx_with_inputs(tmp_path / "m.onnx", *inputs)
    assert said in user_error(["bench", "--onnx", str(tmp_path / "m.onnx"), "--batch", "2", "--runs", "1"], capsys)


def test_bench_onnx_feeds_every_input_in_its_type(tmp_path, capsys):
    _onnx_with_inputs(tmp_path / "m.onnx", ("x", "FLOAT16", ["b", 3]), ("z", "FLOAT16", [2, 3]))
    assert main(["bench", "--onnx", str(tmp_path / "m.onnx"), "--batch", "2", "--runs", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["batch"] == 2


def test_plan_block_count_must_fit_the_model(tiny_recipe, tmp_path, capsys):
    plan = tmp_path / "p.yaml"
    plan.write_text("model: tiny\nscheme: fqvit\nblocks:\n" + "  - {w: 8, a: 8, attn: 8}\n" * 5)
    err = user_error(["build", "--plan", str(plan), "--recipe", str(tiny_recipe), "--out", str(tmp_path / "eng")], capsys)
    assert "'blocks' has 5 rows but recipe tiny's model has 12 encoder blocks" in err
    assert not (tmp_path / "eng").exists()


def test_tensorrt_backend_on_a_cpu_machine(tiny_recipe, tmp_path, capsys):
    err = user_error(["build", "--uniform", "8/8/8", "--recipe", str(tiny_recipe), "--backend", "tensorrt",
                      "--out", str(tmp_path / "eng")], capsys)
    assert "tensorrt" in err and "pip install -e '.[gpu]'" in err


def test_export_command_writes_checked_onnx(tiny_recipe, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    assert main(["export", "--recipe", str(tiny_recipe), "--uniform", "4/8/8", "--scheme", "tsptq", "--target", "tensorrt",
                 "--out", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert out.is_file() and info["weights_int4"] == 12 * 4 and info["target"] == "tensorrt"


def test_build_needs_exactly_one_model_choice(capsys):
    assert "give one of --plan FILE, --uniform W/A/ATTN or --fp32" in user_error(["build"], capsys)


def test_compare_an_artifact(built, capsys):
    """compare --artifact takes the plan, recipe, target and backend from the manifest and its own model.onnx."""
    directory, m = built
    assert main(["compare", "--artifact", str(directory), "--images", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["plan_id"], out["target"], out["backend"]) == (m["plan_id"], "ort", "ort-cpu")
    assert len(out["blocks"]) == 12 and min(b["isolated"] for b in out["blocks"]) > 0.999
    assert "--artifact compares what was built" in user_error(["compare", "--artifact", str(directory), "--scheme", "tsptq"], capsys)
