"""ONNX export with Q/DQ: integer weights, activation formats per target, parity with the fake-quant model."""

import copy

import ml_dtypes
import numpy as np
import onnx
import pytest
import timm
import torch
from conftest import images, run_ort, tiny_vit
from cpu_kinds import KINDS
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

from pomq_deploy.backends.cpu import detect
from pomq_deploy.backends.ort_cpu import OrtCpuBackend
from pomq_deploy.export import export_fp32, export_quantized
from pomq_deploy.export.graph import block_int4_scales, fold_weight_transposes, qdq_to_attention_matmuls, store_integer_weights
from pomq_deploy.plan import BlockBits, Plan, uniform_plan
from pomq_deploy.quant.model import QuantModel


@pytest.fixture(scope="module", params=["fqvit", "tsptq", "repq"])
def calibrated(request):
    qm = QuantModel(tiny_vit(), request.param)
    qm.calibrate(images())
    return qm


def mixed(n: int, scheme: str, four: set[int]) -> Plan:
    return Plan(recipe="t", scheme=scheme, blocks=tuple(BlockBits(w=4 if i in four else 8, a=4 if i in four else 8,
                                                                 attn=4 if i in four else 8) for i in range(n)))


def test_integer_weights_by_hand():
    """One Linear: the stored INT8/INT4 codes are round(w / (amax_c / qmax)), transposed for MatMul, axis 1."""
    w = torch.tensor([[0.7, -0.32, 0.1], [-2.0, 1.1, 0.5]])

    class Lin(torch.nn.Module):
        def forward(self, x):
            scale = torch.tensor([0.7 / 7, 2.0 / 7])
            q = torch.fake_quantize_per_channel_affine(w_param, scale, torch.zeros(2, dtype=torch.int32), 0, -128, 127)
            return x @ q.t()

    w_param = torch.nn.Parameter(w)
    m = Lin()
    m.register_parameter("w", w_param)
    import io

    buf = io.BytesIO()
    torch.onnx.export(m, (torch.randn(1, 4, 3),), buf, dynamo=False, opset_version=21, input_names=["x"])
    model = onnx.load_from_string(buf.getvalue())
    assert store_integer_weights(model, {"w": 4}) == 1
    assert fold_weight_transposes(model) == 1
    init = next(t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT4)
    codes = numpy_helper.to_array(init).astype(np.int8)
    assert codes.tolist() == [[7, -7], [-3, 4], [1, 2]]  # (in, out): -0.32 / 0.1 -> -3, 1.1 / (2/7) -> 4
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear")
    assert next(a.i for a in dq.attribute if a.name == "axis") == 1
    assert not any(n.op_type in ("QuantizeLinear", "Transpose") for n in model.graph.node)


def test_int4_scales_as_blocks_by_hand():
    """INT4 (K=192, N=3) per-column scales become [K/64, N] blocks (192 is not a multiple of 128) with the
    same dequantized weight; an INT8 weight and a K no block size divides keep their per-channel scales."""
    h, t = onnx.helper, numpy_helper.from_array
    rng = np.random.default_rng(0)
    inits = [t(rng.integers(-8, 8, (192, 3)).astype(ml_dtypes.int4), "w4"), t(np.float32([0.1, 0.2, 0.3]), "s"),
             t(rng.integers(-8, 8, (96, 3)).astype(ml_dtypes.int4), "w4_odd"),
             t(rng.integers(-128, 128, (192, 3)).astype(np.int8), "w8")]
    nodes = [h.make_node("DequantizeLinear", [w, "s"], [f"{w}_dq"], axis=1) for w in ("w4", "w4_odd", "w8")]
    graph = h.make_graph(nodes, "g", [], [h.make_tensor_value_info(f"{w}_dq", onnx.TensorProto.FLOAT, [k, 3])
                                          for w, k in (("w4", 192), ("w4_odd", 96), ("w8", 192))], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 21)])
    before = ReferenceEvaluator(model).run(None, {})
    assert block_int4_scales(model) == 1
    onnx.checker.check_model(model, full_check=True)
    dq = model.graph.node[0]
    assert {a.name: h.get_attribute_value(a) for a in dq.attribute} == {"axis": 0, "block_size": 64}
    assert numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == dq.input[1])).shape == (3, 3)
    assert [n.input[1] for n in model.graph.node[1:]] == ["s", "s"]
    for a, b in zip(ReferenceEvaluator(model).run(None, {}), before, strict=True):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("quantize_first", [False, True])
def test_qdq_moves_past_the_qkv_split_by_hand(quantize_first):
    """Q/DQ(s, z) -> Reshape -> Split -> Squeeze -> (q * 1/8) @ k: after the pass each MatMul input is a
    DequantizeLinear (q's with scale s/8, the Mul gone), the QuantizeLinear work is unchanged (one Q before
    the shape ops, or one per MatMul input after them) and the output is bit-identical."""
    h = onnx.helper
    t = numpy_helper.from_array
    nodes = [
        h.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]), h.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
        h.make_node("Reshape", ["xd", "shape"], ["r"]), h.make_node("Split", ["r"], ["a", "b"], axis=0, num_outputs=2),
        h.make_node("Squeeze", ["a", "ax"], ["q"]), h.make_node("Squeeze", ["b", "ax"], ["k"]),
        h.make_node("Mul", ["q", "c"], ["qs"]), h.make_node("MatMul", ["qs", "k"], ["y"])]
    inits = [t(np.float32(0.05), "s"), t(np.uint8(100), "z"), t(np.array([2, 1, 4, 4]), "shape"),
             t(np.array([0]), "ax"), t(np.float32(0.125), "c")]
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 16])],
                         [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4, 4])], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 21)])
    x = np.random.default_rng(0).standard_normal((2, 16)).astype(np.float32)
    before = ReferenceEvaluator(model).run(None, {"x": x})[0]
    assert qdq_to_attention_matmuls(model, quantize_first) == 1
    onnx.checker.check_model(model, full_check=True)
    quantizers = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert [q.input[0] for q in quantizers] == (["x"] if quantize_first else ["q", "k"])
    made_by = {o: n for n in model.graph.node for o in n.output}
    mm = next(n for n in model.graph.node if n.op_type == "MatMul")
    assert [made_by[i].op_type for i in mm.input] == ["DequantizeLinear", "DequantizeLinear"]
    scales = {float(numpy_helper.to_array(i)) for i in model.graph.initializer if i.name.endswith("dqscale")}
    assert scales == {float(np.float32(0.05) * np.float32(0.125)), float(np.float32(0.05))} and not any(n.op_type == "Mul" for n in model.graph.node)
    assert np.array_equal(ReferenceEvaluator(model).run(None, {"x": x})[0], before)


def _activation_zero_point_types(model: onnx.ModelProto) -> set[int]:
    consts = {n.output[0]: n.attribute[0].t for n in model.graph.node if n.op_type == "Constant"}
    consts |= {t.name: t for t in model.graph.initializer}
    return {consts[n.input[2]].data_type for n in model.graph.node if n.op_type == "QuantizeLinear"}


@pytest.mark.parametrize("kind", [k for k, facts in KINDS.items() if facts.weight_format == "u8" or detect().exact_u8s8])
@pytest.mark.parametrize("target", ["ort", "tensorrt"])
def test_export_matches_fake_quant(tmp_path, calibrated, target, kind):
    """The deployed graph on ONNX Runtime against the fake-quant reference, in each CPU kind's integer formats that
    are exact on this CPU (both on a VNNI/AMX CPU, Zen 3's u8 weights on an AVX2-only one): every GEMM, the
    patch embedding's included, sums integer codes exactly on both sides, so only float ops (LayerNorm, GELU,
    Softmax, the head) differ in the last bits."""
    qm = calibrated
    plan = mixed(qm.num_blocks, qm.scheme, {0, 5})
    info = export_quantized(qm, plan, target, tmp_path / "m.onnx")
    model = onnx.load(str(info.path))
    onnx.checker.check_model(model, full_check=True)
    assert (info.weights_int8, info.weights_int4) == (4 * 4 + 2, 2 * 4)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    zp_types = _activation_zero_point_types(model)
    assert zp_types == ({onnx.TensorProto.UINT8} if target == "ort" else {onnx.TensorProto.INT8})
    if target == "tensorrt":  # symmetric: every activation zero point is 0
        consts = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node if n.op_type == "Constant"}
        consts |= {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        assert all(int(consts[n.input[2]]) == 0 for n in model.graph.node if n.op_type == "QuantizeLinear")
    # every MatMul, the attention's q @ k^T and attn @ v included, reads DequantizeLinear outputs (what
    # integer kernels fuse), except for float inputs of two kinds: log-domain probabilities (LIS in fqvit,
    # log-sqrt(2) in repq: 4-bit attention in blocks 0 and 5) and V-2SF's Where of two grids (tsptq: attn @ v
    # and fc2, every block). RepQ-ViT's folded LayerNorm outputs are per-tensor Q/DQ like any other.
    # the reference's GELU runs in float64 (PreciseGELU); the graph keeps the deployed kernel's float32 GELU
    casts_to = {a.i for n in model.graph.node if n.op_type == "Cast" for a in n.attribute if a.name == "to"}
    assert onnx.TensorProto.DOUBLE not in casts_to and {"Gelu", "Erf"} & {n.op_type for n in model.graph.node}
    made_by = {o: n.op_type for n in model.graph.node for o in n.output}
    float_inputs = [n.name for n in model.graph.node if n.op_type == "MatMul"
                    for i in n.input if made_by.get(i) != "DequantizeLinear"]
    assert len(float_inputs) == {"fqvit": 2, "repq": 2, "tsptq": 2 * qm.num_blocks}[qm.scheme], float_inputs
    x = torch.cat(images(2, seed=11))
    qm.apply(plan, "asym" if target == "ort" else "sym")
    with torch.no_grad():
        ref = qm(x)
    out = torch.from_numpy(run_ort(tmp_path, info.path, x, KINDS[kind]))
    cos = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0)
    assert cos > 0.999 and (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.9


@pytest.mark.parametrize("target", ["ort", "tensorrt"])
def test_the_patch_embedding_runs_as_an_integer_gemm(tmp_path, calibrated, target):
    """ort-cpu cuts the image into patches before the input's Q/DQ (a per-tensor Q commutes with moving values)
    and runs the patch embedding as MatMulIntegerToFloat: no Conv is left, and the rewritten graph computes what
    the exported one does (ONNX's reference evaluator, float64-free: within float32 rounding)."""
    qm = calibrated
    info = export_quantized(qm, uniform_plan("8/8/8", qm.num_blocks, "t", qm.scheme), target, tmp_path / "m.onnx")
    exported = onnx.load(str(info.path))
    assert [n.op_type for n in exported.graph.node].count("Conv") == 1
    rewritten = onnx.load(str(info.path))
    options = OrtCpuBackend(threads=1).prepare(rewritten)
    assert options["patchify_integer_gemms"] == 1 and "Conv" not in {n.op_type for n in rewritten.graph.node}
    x = torch.cat(images(1, seed=5)).numpy()
    stem = next(n.output[0] for n in exported.graph.node if n.op_type == "Conv")
    for m in (exported, rewritten):
        m.graph.output.append(onnx.helper.make_empty_tensor_value_info(stem))
    a, b = (ReferenceEvaluator(m).run([stem], {"images": x})[0] for m in (exported, rewritten))
    assert a.shape == b.shape and np.allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(a).max())


def test_four_bit_weights_shrink_the_file(tmp_path, calibrated):
    qm = calibrated
    n = qm.num_blocks
    base = export_quantized(qm, uniform_plan("8/8/8", n, "t", qm.scheme), "ort", tmp_path / "a.onnx")
    k = 3
    plan = Plan(recipe="t", scheme=qm.scheme, blocks=tuple(BlockBits(w=4 if i < k else 8, a=8, attn=8) for i in range(n)))
    small = export_quantized(qm, plan, "ort", tmp_path / "b.onnx")
    block_weights = sum(qm.weighted[f"blocks.0.{name}"].layer.weight.numel() for name in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"))
    expected = k * block_weights // 2  # INT4 packs two codes a byte
    assert base.initializer_bytes["INT8"] - small.initializer_bytes["INT8"] == 2 * expected
    assert small.initializer_bytes["INT4"] == expected
    assert abs((base.weight_bytes - small.weight_bytes) - expected) <= 0.1 * expected
    assert base.path.stat().st_size - small.path.stat().st_size >= 0.9 * expected


def test_fp32_export_matches_pytorch(tmp_path):
    fp = tiny_vit()
    info = export_fp32(fp, tmp_path / "fp.onnx")
    x = torch.cat(images(1, seed=3))
    with torch.no_grad():
        ref = fp(x)
    assert np.allclose(run_ort(tmp_path, info.path, x), ref.numpy(), atol=1e-4)
    assert info.weights_int8 == info.weights_int4 == 0


@pytest.mark.parametrize("target", ["ort", "tensorrt"])
def test_swin_exports_and_agrees(tmp_path, target):
    torch.manual_seed(0)
    swin = timm.create_model("swin_tiny_patch4_window7_224", img_size=64, window_size=4, embed_dim=32, depths=(2, 2),
                             num_heads=(2, 4), num_classes=10).eval()
    qm = QuantModel(copy.deepcopy(swin), "fqvit")
    qm.calibrate([torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(2)])
    plan = mixed(qm.num_blocks, "fqvit", {0, 3})
    info = export_quantized(qm, plan, target, tmp_path / "swin.onnx")
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(9))
    qm.apply(plan, "asym" if target == "ort" else "sym")
    with torch.no_grad():
        ref = qm(x)
    out = torch.from_numpy(run_ort(tmp_path, info.path, x))
    assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.999
    assert info.weights_int4 == 2 * 4


def test_int4_codes_are_really_int4(tmp_path, calibrated):
    qm = calibrated
    info = export_quantized(qm, uniform_plan("4/8/8", qm.num_blocks, "t", qm.scheme), "ort", tmp_path / "m.onnx")
    model = onnx.load(str(info.path))
    int4 = [numpy_helper.to_array(t) for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT4]
    assert len(int4) == 4 * qm.num_blocks
    assert all(a.dtype == ml_dtypes.int4 and -8 <= a.astype(np.int8).min() and a.astype(np.int8).max() <= 7 for a in int4)


@pytest.mark.parametrize("attr", ["value", "value_float", "value_floats", "value_int", "value_ints"])
def test_every_pass_reads_a_constant_in_any_of_its_forms(tmp_path, attr):
    """Graph.value, the TensorRT rule checker's index and the search's graph signature read a Constant node
    through one reader, whichever attribute holds its value (a Constant is not always a ``value`` tensor)."""
    from pomq_deploy.measure import graph_signature
    from pomq_deploy.onnx_graph import Graph, constant_value

    given = {"value": numpy_helper.from_array(np.float32([2.5]), "c"), "value_float": 2.5, "value_floats": [2.5],
             "value_int": 3, "value_ints": [3]}[attr]
    const = onnx.helper.make_node("Constant", [], ["c"], **{attr: given})
    graph = onnx.helper.make_graph([const, onnx.helper.make_node("Mul", ["x", "c"], ["y"])], "g",
                                   [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 21)])
    want = 2.5 if "float" in attr or attr == "value" else 3
    assert numpy_helper.to_array(constant_value(const)).reshape(-1).tolist() == [want]
    assert Graph(model).value("c").reshape(-1).tolist() == [want]
    onnx.save(model, str(tmp_path / "m.onnx"))
    assert len(graph_signature(tmp_path / "m.onnx")) == 16


ENGINE_FORMATS = ("fp8/fp8/fp8", "float/float/float", "4/float/float", "8/8/fp8", "8/8/float", "8/8/8")


@pytest.mark.parametrize("target", ["ort", "tensorrt"])
def test_fp8_float_and_weight_only_blocks_export_and_agree(tmp_path, calibrated, target):
    """A plan mixing an FP8 block, a float block, an INT4 weight-only block, FP8 and float attention and an INT8
    block: FP8 weights stored as FLOAT8E4M3FN codes, no Q/DQ in the float block, the weight-only block's GEMMs on
    float activations, and ONNX Runtime (its CPU kernels run FP8 Q/DQ) agreeing with the fake-quant reference."""
    from pomq_deploy.plan import parse_uniform

    qm = calibrated
    plan = Plan(recipe="t", scheme=qm.scheme, blocks=tuple(parse_uniform(t) for t in ENGINE_FORMATS))
    info = export_quantized(qm, plan, target, tmp_path / "m.onnx")
    model = onnx.load(str(info.path))
    assert (info.weights_fp8, info.weights_int4, info.weights_int8) == (4, 4, 3 * 4 + 2)
    fp8_weights = [t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT8E4M3FN and t.dims]
    assert len(fp8_weights) == 4 and all(n.startswith("model.blocks.0.") for n in fp8_weights)
    qdq_blocks = {n.name.split("/")[3] for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                  and n.name.startswith("/model/blocks/")}
    assert qdq_blocks == {"blocks.0", "blocks.2", "blocks.3", "blocks.4", "blocks.5"}  # none in the float block
    made_by = {o: n.op_type for n in model.graph.node for o in n.output}
    gemm_inputs = {n.name.split("/")[-2]: made_by.get(n.input[0]) for n in model.graph.node
                   if n.op_type in ("MatMul", "Gemm") and n.name.startswith("/model/blocks/blocks.2/mlp/")}
    assert set(gemm_inputs) == {"fc1", "fc2"} and "DequantizeLinear" not in gemm_inputs.values()  # weight-only
    x = torch.cat(images(2, seed=11))
    qm.apply(plan, "asym" if target == "ort" else "sym")
    with torch.no_grad():
        ref = qm(x)
    out = torch.from_numpy(run_ort(tmp_path, info.path, x))
    cos = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0)
    assert cos > 0.999 and (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.9

