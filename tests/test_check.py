"""TensorRT rule checker: one small graph per rule it breaks, the CLI's exit codes, and our own tensorrt exports."""

import functools
import importlib.util
import json
import math
from pathlib import Path

import onnx
import onnx.parser
import pytest
from conftest import REPO, tiny_recipe_file

from pomq_deploy.cli.main import main
from pomq_deploy.export import export_quantized
from pomq_deploy.export.trt_rules import ERROR, MODEL, WARNING, check_tensorrt
from pomq_deploy.plan import uniform_plan
from pomq_deploy.quant.calibration import calibrated_model
from pomq_deploy.recipe import load_recipe

X_QDQ = """
  xs = Constant <value = float {0.1}> ()
  xz = Constant <value = int8 {0}> ()
  [x_q] xq = QuantizeLinear(x, xs, xz)
  [x_dq] xd = DequantizeLinear(xq, xs, xz)
"""


def tensor(dtype: str, shape: tuple[int, ...], name: str, value: float = 1) -> str:
    """A textual-ONNX initializer of ``shape`` filled with ``value``."""
    return f"{dtype}[{','.join(map(str, shape))}] {name} = {{{', '.join([str(value)] * math.prod(shape))}}}"


def model(body: str, inits: tuple[str, ...] = (), opset: int = 19, x: str = "float[2,8] x") -> onnx.ModelProto:
    """A graph from textual ONNX, checked by ONNX itself so that every rule is tested on a valid model."""
    m = onnx.parser.parse_model(f'<ir_version: 10, opset_import: ["" : {opset}]>\n'
                                f"g ({x}) => (float y)\n<{', '.join(inits)}>\n{{{body}}}")
    onnx.checker.check_model(m)
    return m


def linear(op: str = "MatMul", w: tuple[int, ...] = (8, 16), w_type: str = "int8", axis: int = 1, scale: str = "",
           attrs: str = "", opset: int = 19, x: str = "float[2,8] x", prologue: str = X_QDQ) -> onnx.ModelProto:
    """x -> Q/DQ (int8, per tensor) -> ``op`` 'fc' <- DQ 'w_dq' (per channel along ``axis``) <- W."""
    scale = scale or tensor("float", (w[axis],), "ws", 0.01)
    body = prologue + f"""
  [w_dq] wd = DequantizeLinear <axis = {axis}> (w, ws)
  [fc] y = {op} {attrs} (xd, wd)
"""
    return model(body, (tensor(w_type, w, "w"), scale), opset, x)


def found(m: "onnx.ModelProto | Path", severity: str = ERROR) -> set[tuple[str, str]]:
    return {(f.rule, f.node) for f in check_tensorrt(m) if f.severity == severity}


def test_clean_linear_has_no_findings():
    assert check_tensorrt(linear()) == []


@pytest.mark.parametrize("opset, severity", [(19, None), (20, None), (21, None), (24, None), (8, ERROR),
                                             (25, ERROR)])
def test_opset_range(opset, severity):
    m = linear()
    m.opset_import[0].version = opset  # the checker reads the number; ONNX validity is not the point here
    expected = {("opset", MODEL, severity)} if severity else set()
    assert {(f.rule, f.node, f.severity) for f in check_tensorrt(m)} == expected


@pytest.mark.parametrize("zero_point, expected", [
    ("int8 {3}", {"zero-point"}),  # asymmetric
    ("uint8 {0}", {"quant-type"}),  # TensorRT has no uint8 (but on DLA)
    ("uint8 {128}", {"quant-type", "zero-point"}),  # FQ-ViT's own activation format, our `ort` target
])
def test_activation_zero_point(zero_point, expected):
    m = linear(prologue=X_QDQ.replace("int8 {0}", zero_point))
    assert found(m) == {(rule, node) for rule in expected for node in ("x_q", "x_dq")}


def test_quantize_without_zero_point_is_uint8_in_onnx():
    m = linear(prologue=X_QDQ.replace("(x, xs, xz)", "(x, xs)").replace("(xq, xs, xz)", "(xq, xs)"))
    assert found(m) == {("quant-type", "x_q"), ("quant-type", "x_dq")}


def test_per_channel_activation():
    prologue = X_QDQ.replace("float {0.1}", "float[8] {" + ", ".join(["0.1"] * 8) + "}").replace(
        "int8 {0}", "int8[8] {" + ", ".join(["0"] * 8) + "}").replace("QuantizeLinear(", "QuantizeLinear <axis = 1> (")
    assert found(linear(prologue=prologue)) == {("activation-per-channel", "x_q")}


@pytest.mark.parametrize("op, x, w, attrs, axis, ok", [
    ("MatMul", "float[2,8] x", (8, 16), "", 1, True),  # [K, N]: N outputs
    ("MatMul", "float[2,16] x", (16, 16), "", 0, False),
    ("Gemm", "float[2,8] x", (16, 8), "<transB = 1>", 0, True),  # [N, K] transposed
    ("Gemm", "float[2,8] x", (16, 8), "<transB = 1>", 1, False),
    ("Gemm", "float[2,8] x", (8, 16), "", 1, True),
    ("Conv", "float[1,8,4,4] x", (16, 8, 1, 1), "", 0, True),  # [M, C, kH, kW]
    ("Conv", "float[1,8,4,4] x", (16, 8, 1, 1), "", 1, False),
])
def test_per_channel_weight_axis(op, x, w, attrs, axis, ok):
    assert found(linear(op, w, axis=axis, attrs=attrs, x=x)) == (set() if ok else {("per-channel-axis", "w_dq")})


def test_weight_scale_must_be_positive():
    scale = tensor("float", (16,), "ws", 0.01).replace("0.01}", "0}")
    assert found(linear(scale=scale)) == {("scale-positive", "w_dq")}


def test_activation_scale_must_be_constant():
    m = linear(prologue=X_QDQ.replace("  xs = Constant <value = float {0.1}> ()\n", ""), x="float[2,8] x, float xs")
    assert found(m) == {("scale-constant", "x_q"), ("scale-constant", "x_dq")}


def int4_linear(k: int, block: int, op: str = "MatMul") -> onnx.ModelProto:
    """An INT4 weight [k, 16] blocked along k (axis 0) in blocks of ``block`` (0: per channel along axis 1)."""
    if not block:
        return linear(op, (k, 16), "int4", axis=1, opset=21, x=f"float[2,{k}] x")
    body = X_QDQ + f"""
  [w_dq] wd = DequantizeLinear <axis = 0, block_size = {block}> (w, ws)
  [fc] y = {op} (xd, wd)
"""
    return model(body, (tensor("int4", (k, 16), "w"), tensor("float", (k // block, 16), "ws", 0.01)), 21,
                 f"float[2,{k}] x")


@pytest.mark.parametrize("k, block, errors", [
    (128, 64, set()),
    (256, 128, set()),
    (128, 32, {("int4-block", "w_dq")}),  # a block size TensorRT has no kernel for
    (128, 0, {("int4-block", "w_dq")}),  # per-channel INT4 (what the ort target writes)
])
def test_int4_weights_need_blocks_of_64_or_128(k, block, errors):
    m = int4_linear(k, block)
    assert found(m) == errors
    assert found(m, WARNING) == {("qdq-weight-only", "fc")}  # INT8 Q/DQ before an INT4 weight: still weight-only


def test_int4_is_weight_only():
    m = int4_linear(128, 64, op="Gemm")
    assert found(m) == set()
    activation = linear(opset=21, prologue=X_QDQ.replace("int8 {0}", "int4 {0}"))
    assert found(activation) == {("int4-not-weight-only", "x_q")}
    into_add = model(X_QDQ + """
  [w_dq] wd = DequantizeLinear <axis = 0, block_size = 64> (w, ws)
  [add] y = Add (xd, wd)
""", (tensor("int4", (128, 16), "w"), tensor("float", (2, 16), "ws", 0.01)), 21, "float[128,16] x")
    assert found(into_add) == {("int4-not-weight-only", "w_dq")}


def test_block_scales_are_for_int4_only():
    body = X_QDQ + """
  [w_dq] wd = DequantizeLinear <axis = 0, block_size = 64> (w, ws)
  [fc] y = MatMul (xd, wd)
"""
    m = model(body, (tensor("int8", (128, 16), "w"), tensor("float", (2, 16), "ws", 0.01)), 21, "float[2,128] x")
    assert found(m) == {("block-quantization", "w_dq")}


def test_unsupported_and_custom_ops():
    m = model(X_QDQ + "  [odd] y = Det (xd)\n")  # "N" in TensorRT's support matrix
    assert found(m) == {("op-type", "odd")}
    custom = linear()
    custom.graph.node[-1].domain = "com.microsoft"
    assert found(custom) == {("op-type", "fc")}


def test_op_between_dq_and_matmul_blocks_the_fusion():
    m = linear(prologue=X_QDQ.replace("[x_dq] xd", "[x_dq] xd0") + """
  two = Constant <value = float {2.0}> ()
  [scale_mul] xd = Mul (xd0, two)
""")
    assert found(m) == set()
    assert found(m, WARNING) == {("qdq-blocks-fusion", "scale_mul")}


def test_data_movement_between_dq_and_matmul_is_fine():
    m = linear(prologue=X_QDQ.replace("[x_dq] xd", "[x_dq] xd0") + """
  shape = Constant <value = int64[2] {8, 2}> ()
  [reshape] xd1 = Reshape (xd0, shape)
  [transpose] xd = Transpose <perm = [1, 0]> (xd1)
""")
    assert check_tensorrt(m) == []


def test_weighted_op_with_one_unquantized_input():
    m = model(X_QDQ + "  [fc] y = MatMul (xd, w)\n", (tensor("float", (8, 16), "w"),))
    assert found(m, WARNING) == {("qdq-unquantized-input", "fc")}
    assert check_tensorrt(model("  [fc] y = MatMul (x, w)\n", (tensor("float", (8, 16), "w"),))) == []  # all float


@pytest.mark.parametrize("residual, warned", [("x", True), ("xd", False)])
def test_residual_add_wants_a_quantized_skip_input(residual, warned):
    body = X_QDQ + f"""
  [w_dq] wd = DequantizeLinear <axis = 1> (w, ws)
  [fc] h = MatMul (xd, wd)
  [bias] hb = Add (b, h)
  [res] y = Add (hb, {residual})
"""
    m = model(body, (tensor("int8", (8, 8), "w"), tensor("float", (8,), "ws", 0.01), tensor("float", (8,), "b", 0)))
    assert found(m) == set()
    assert found(m, WARNING) == ({("residual-add", "res")} if warned else set())


def test_an_identity_of_a_bias_is_a_constant():
    """The exporter writes equal biases (timm initialises them to 0) as Identities of one initializer: such an Add is
    a bias Add, and the residual Add after it is judged against its MatMul."""
    body = X_QDQ + """
  [w_dq] wd = DequantizeLinear <axis = 1> (w, ws)
  [fc] h = MatMul (xd, wd)
  [same] b2 = Identity (b)
  [bias] hb = Add (b2, h)
  [res] y = Add (hb, x)
"""
    m = model(body, (tensor("int8", (8, 8), "w"), tensor("float", (8,), "ws", 0.01), tensor("float", (8,), "b", 0)))
    assert found(m, WARNING) == {("residual-add", "res")}


def test_int4_weight_only_and_two_quantized_types():
    """An INT4 weight on a float input is TensorRT's weight-only GEMM (no finding); with INT8 Q/DQ on the input it is
    still weight-only, and the input's Q/DQ runs on its own; FP8 against INT8 has no kernel at all."""
    int4 = (tensor("int4", (128, 16), "w"), tensor("float", (1, 16), "ws", 0.01))
    body = "  [w_dq] wd = DequantizeLinear <axis = 0, block_size = 128> (w, ws)\n  [fc] y = MatMul ({x}, wd)\n"
    assert check_tensorrt(model(body.format(x="x"), int4, opset=21, x="float[2,128] x")) == []
    assert found(model(X_QDQ + body.format(x="xd"), int4, opset=21, x="float[2,128] x"), WARNING) == {("qdq-weight-only", "fc")}
    fp8 = X_QDQ + """
  ys = Constant <value = float {0.1}> ()
  yz = Constant <value = float8e4m3fn {0}> ()
  [v_q] vq = QuantizeLinear(v, ys, yz)
  [v_dq] vd = DequantizeLinear(vq, ys, yz)
  [mm] y = MatMul (xd, vd)
"""
    m = onnx.parser.parse_model('<ir_version: 10, opset_import: ["" : 21]>\n'
                                f"g (float[2,8] x, float[8,4] v) => (float y)\n{{{fp8}}}")
    onnx.checker.check_model(m)
    assert found(m) == set() and found(m, WARNING) == {("qdq-mixed-types", "mm")}


# ---- what an engine runs for a plan, before any export ------------------------------------------------------

def test_check_plan_names_what_tensorrt_runs_otherwise(tmp_path, capsys):
    """PoMQ-ViT's plan on TensorRT: the 4-bit-activation blocks run INT8 Q/DQ on 16 levels, their w=4 GEMMs run
    weight-only; on ort the same GEMMs are INT8 kernels (no weight-only note), FP8 is float math."""
    from pomq_deploy.plan import paper_plan, save_plan

    path = tmp_path / "paper.yaml"
    save_plan(paper_plan(12, "deit_fmnist", "minmax"), path)
    assert main(["check", "--plan", str(path), "--target", "tensorrt", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    gone = {d["what"].split(":")[0]: d["blocks"] for d in out["departures"]}
    assert gone == {"a=4": [0, 1, 10, 11], "w=4, a=4 GEMMs": [0, 1, 10, 11], "attn=4": [0, 1, 10, 11]}
    assert "INT4 weight-only" in out["blocks"][0]["gemm"] and out["blocks"][5]["gemm"] == "INT8 GEMM"
    assert main(["check", "--plan", str(path), "--target", "ort", "--json"]) == 0
    gone = {d["what"].split(":")[0] for d in json.loads(capsys.readouterr().out)["departures"]}
    assert gone == {"a=4", "attn=4"}
    assert main(["check", "--uniform", "fp8/fp8/fp8", "--blocks", "2", "--target", "ort", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert all(d["blocks"] == [0, 1] and "FP8 Q/DQ computed in float" in d["what"] for d in out["departures"])
    assert main(["check", "--uniform", "fp8/fp8/fp8", "--blocks", "2", "--json"]) == 0  # tensorrt runs FP8
    assert json.loads(capsys.readouterr().out)["departures"] == []


def test_check_takes_a_file_or_a_plan(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    onnx.save(linear(), str(path))
    assert main(["check", str(path), "--uniform", "8/8/8"]) == 2
    assert "give an ONNX FILE" in capsys.readouterr().err
    assert main(["check", str(path), "--target", "ort"]) == 2
    assert "--target ort: no ONNX rules" in capsys.readouterr().err


# ---- the command line --------------------------------------------------------------------------------------


def test_cli_exit_codes(tmp_path, capsys):
    clean, broken = tmp_path / "clean.onnx", tmp_path / "broken.onnx"
    onnx.save(linear(), str(clean))
    onnx.save(linear(prologue=X_QDQ.replace("int8 {0}", "int8 {3}")), str(broken))
    assert main(["check", str(clean), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"onnx": str(clean), "target": "tensorrt", "errors": 0,
                                                   "warnings": 0, "findings": []}
    assert main(["check", "--target", "tensorrt", str(broken)]) == 1
    out = capsys.readouterr().out
    assert "zero-point" in out and "x_dq" in out and "2 error(s), 0 warning(s)" in out


def test_cli_json_lists_errors_first(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    m = linear(prologue=X_QDQ.replace("[x_dq] xd", "[x_dq] xd0") + """
  two = Constant <value = float {2.0}> ()
  [scale_mul] xd = Mul (xd0, two)
""")  # the warning's node comes first in the graph
    m.graph.node[-1].domain = "com.microsoft"
    onnx.save(m, str(path))
    assert main(["check", str(path), "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert (out["errors"], out["warnings"]) == (1, 1)
    assert [(f["severity"], f["rule"], f["node"]) for f in out["findings"]] == [
        (ERROR, "op-type", "fc"), (WARNING, "qdq-blocks-fusion", "scale_mul")]


@pytest.mark.parametrize("content, message", [(None, "no such ONNX file"), (b"\x08\x07garbage", "not a readable"),
                                              (b"", "not an ONNX model")])
def test_cli_unreadable_file_is_a_usage_error(tmp_path, capsys, content, message):
    path = tmp_path / "m.onnx"
    if content is not None:
        path.write_bytes(content)
    assert main(["check", str(path)]) == 2
    assert f"pomq-deploy check: error: {path}: {message}" in capsys.readouterr().err


# ---- what `export --target tensorrt` writes for the plans in docs/accuracy.md ------------------------------------

@functools.cache
def accuracy_table():
    """tools/accuracy_table.py, which defines the mixed plans (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location("accuracy_table", REPO / "tools" / "accuracy_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def accuracy_plans(recipe: str, scheme: str, n: int = 12) -> dict:
    """docs/accuracy.md's plans: uniform 8/8/8, 8/8/4 and 4/4/4, and the mixed plans, by label."""
    uniform = {f"uniform {u}": uniform_plan(u, n, recipe, scheme) for u in ("8/8/8", "8/8/4", "4/4/4")}
    return uniform | accuracy_table().mixed_plans(recipe, scheme, n)


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, random_deit_fmnist):
    return load_recipe(str(tiny_recipe_file(tmp_path_factory.mktemp("recipe"), random_deit_fmnist)))


@pytest.fixture(scope="module", params=["minmax", "fqvit", "tsptq", "repq"])
def calibrated(request, recipe):
    return calibrated_model(recipe, request.param)[0]  # once per scheme; every plan below reuses it


@pytest.mark.parametrize("label", list(accuracy_plans("tiny", "minmax")))
def test_tensorrt_exports_have_no_errors(tmp_path, recipe, calibrated, label):
    plan = accuracy_plans(recipe.name, calibrated.scheme, calibrated.num_blocks)[label]
    info = export_quantized(calibrated, plan, "tensorrt", tmp_path / "m.onnx")
    assert found(info.path) == set()  # INT4 weights included: the tensorrt export writes their scales as blocks
