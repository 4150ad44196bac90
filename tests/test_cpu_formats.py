"""Exact integer GEMMs on every x86 CPU: the CPU facts, the weight format chosen for each kind, the artifact
refusing a CPU whose integer path would compute it wrongly, and each kind's formats run on this CPU and, under
QEMU's AVX2-only CPU model, on the kernels of a CPU without VNNI."""

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from cpu_kinds import KINDS, extreme_codes, extreme_gemm
from onnx import helper as h
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

from pomq_deploy.backends import Artifact, BackendError
from pomq_deploy.backends.cpu import CpuFacts, detect, parse_proc_cpuinfo
from pomq_deploy.backends.ort_cpu import OrtCpuBackend, _weights_to_uint8, check_cpu, int8_weight_readers
from pomq_deploy.onnx_graph import Graph
from pomq_deploy.quant.functional import integer_product


def test_proc_cpuinfo_facts_and_the_format_each_kind_gets():
    spr, zen3 = KINDS["sapphire_rapids"], KINDS["zen3"]
    assert spr == CpuFacts("GenuineIntel", "Intel(R) Xeon(R) Platinum 8480+", "x86_64",
                           ("avx2", "avx512f", "avx512bw", "avx512_vnni", "amx_int8"))
    assert (spr.exact_u8s8, spr.weight_format) == (True, "s8")
    assert (zen3.exact_u8s8, zen3.weight_format, zen3.flags) == (False, "u8", ("avx2",))
    assert zen3.describe() == "AMD EPYC 7763 64-Core Processor (x86_64: AVX2, no AVX512, no VNNI, no AMX)"
    assert spr.describe().endswith("(x86_64: AVX2, AVX512-BW, AVX512-VNNI, AMX-INT8)")
    # AVX-VNNI alone (Alder Lake and later client CPUs) accumulates in int32 too; Arm is exact
    assert parse_proc_cpuinfo("flags : avx2 avx_vnni\n", "x86_64").weight_format == "s8"
    assert parse_proc_cpuinfo("Features : fp asimd asimddp\n", "aarch64").exact_u8s8
    assert CpuFacts.from_dict(spr.to_dict()) == spr


def _run_gemm(tmp_path, backend: OrtCpuBackend, target: str = "ort") -> tuple[bool, dict]:
    """Build the extreme-code GEMM of ``target``'s activation format with ``backend`` and say whether ORT's
    integer kernel summed it exactly."""
    model, w = extreme_gemm(target)
    onnx.save(model, str(tmp_path / "gemm.onnx"))
    art = backend.build(tmp_path / "gemm.onnx", tmp_path)
    ops = [n.op_type for n in onnx.load(str(art.path)).graph.node]
    assert "MatMulIntegerToFloat" in ops and "MatMul" not in ops  # ORT's integer GEMM ran, not a float fallback
    x = extreme_codes(target)
    return np.array_equal(backend.run(art, x), x.astype(np.int64) @ w.astype(np.int64)), art.options


@pytest.mark.parametrize("target", ["ort", "tensorrt"])
def test_gemm_with_extreme_codes_is_exact_in_the_format_chosen_for_this_cpu(tmp_path, target):
    exact, options = _run_gemm(tmp_path, OrtCpuBackend(threads=1), target)
    assert exact, f"ORT's integer GEMM is not exact on {detect().describe()} with weights {options['weight_format']}"
    assert options["cpu"] == detect().to_dict() and options["weight_format"] == detect().weight_format
    assert options["integer_weights"] == 1
    # the tensorrt target's int8 activations run as uint8 codes + 128: ORT fuses no int8-activation GEMM on x86
    assert (options["activation_format"], options["activations_as_uint8"]) == (("u8", 0) if target == "ort" else ("s8", 1))


@pytest.mark.parametrize("target", ["ort", "tensorrt"])
@pytest.mark.parametrize("kind", KINDS)
def test_each_kinds_formats_run_here(tmp_path, kind, target):
    """The formats each CPU kind gets, run on this machine, for both targets' activations: u8 weights (Zen 3's)
    are exact on every x86 CPU; s8 weights (Sapphire Rapids') are exact exactly where this CPU has VNNI/AMX,
    and saturate where it does not, which is why a Zen 3 is given u8."""
    facts = KINDS[kind]
    exact, options = _run_gemm(tmp_path, OrtCpuBackend(threads=1, cpu=facts), target)
    assert options["weight_format"] == facts.weight_format
    assert options["weights_as_uint8"] == (1 if facts.weight_format == "u8" else 0)
    assert exact == (facts.weight_format == "u8" or detect().exact_u8s8)


QEMU = shutil.which("qemu-x86_64")


@pytest.mark.skipif(platform.machine() != "x86_64" or QEMU is None,
                    reason="needs an x86-64 host and QEMU's user-mode emulator (Debian's qemu-user; tools/bootstrap.sh installs it)")
def test_avx2_kernels_under_emulation():
    """ONNX Runtime picks its integer kernels by CPUID at run time. QEMU's Haswell model (AVX2 and FMA, no AVX512,
    no VNNI) makes it pick those of an AVX2-only CPU such as Zen 3 on whatever CPU runs the suite: there the
    formats built for Zen 3 are exact for both targets, those built for a VNNI CPU saturate (the emulation
    really runs the int16-pair kernels), and so does ONNX Runtime's default session on either activation format
    (why the tests and the backend never compare against one)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    run = subprocess.run([QEMU, "-cpu", "Haswell-v4", sys.executable, str(Path(__file__).parent / "cpu_kinds.py")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    found = json.loads(run.stdout)
    for target in ("ort", "tensorrt"):
        assert found[target]["zen3"]["exact"] and found[target]["zen3"]["weight_format"] == "u8", found[target]
        assert "MatMulIntegerToFloat" in found[target]["zen3"]["ops"]
        assert not found[target]["sapphire_rapids"]["exact"], found[target]
        assert not found[target]["default_session"], found[target]


def test_uint8_weights_keep_the_values():
    model, _ = extreme_gemm()
    x = np.random.default_rng(0).integers(0, 256, (4, 64)).astype(np.float32)
    before = ReferenceEvaluator(model).run(None, {"x": x})[0]
    g = Graph(model)
    assert _weights_to_uint8(g, int8_weight_readers(g)) == 1
    codes = next(t for t in model.graph.initializer if t.data_type == onnx.TensorProto.UINT8 and len(t.dims) == 2)
    assert numpy_helper.to_array(codes)[0, :2].tolist() == [255, 0]  # 127 + 128, -128 + 128
    assert np.array_equal(ReferenceEvaluator(model).run(None, {"x": x})[0], before)


def _artifact(tmp_path, built_on: str, integer_weights: int = 50) -> Artifact:
    facts = KINDS[built_on]
    return Artifact(tmp_path / "model.ort.onnx", "ort-cpu", {"cpu": facts.to_dict(), "weight_format": facts.weight_format,
                                                            "integer_weights": integer_weights})


def test_an_artifact_from_a_vnni_cpu_is_refused_where_u8s8_saturates(tmp_path):
    with pytest.raises(BackendError) as e:
        check_cpu(_artifact(tmp_path, "sapphire_rapids"), KINDS["zen3"])
    msg = str(e.value)
    assert "\n" not in msg and "Intel(R) Xeon(R) Platinum 8480+" in msg and "AMD EPYC 7763" in msg and "rebuild it here" in msg


def test_other_cpu_kinds_that_stay_exact_get_a_note(tmp_path):
    note = check_cpu(_artifact(tmp_path, "zen3"), KINDS["sapphire_rapids"])
    assert "AMD EPYC 7763" in note and "exact here too" in note
    assert check_cpu(_artifact(tmp_path, "zen3"), KINDS["zen3"]) is None
    assert check_cpu(_artifact(tmp_path, "sapphire_rapids", integer_weights=0), KINDS["zen3"]) is None  # FP32: nothing to check


def test_an_artifact_that_did_not_record_its_cpu_is_refused_only_where_it_could_saturate(tmp_path):
    old = Artifact(tmp_path / "model.ort.onnx", "ort-cpu", {"threads": None})
    assert check_cpu(old, KINDS["sapphire_rapids"]) is None
    with pytest.raises(BackendError, match="did not record its CPU.*AMD EPYC 7763"):
        check_cpu(old, KINDS["zen3"])


def _two_grid_gemm(k: int = 64, n: int = 8) -> tuple[onnx.ModelProto, np.ndarray]:
    """A GEMM on a V-2SF input as our exporter writes it: ``DQ(Q(fine part)) + DQ(Q(coarse part))`` (uint8
    codes, the coarse step 8x the fine one), times INT8 per-channel weights in extreme codes."""
    w = np.full((k, n), 127, np.int8)
    w[:, 1::2] = -128
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.full(n, 0.5, np.float32), "ws"),
             numpy_helper.from_array(np.float32(0.25), "sf"), numpy_helper.from_array(np.float32(2.0), "sc"),
             numpy_helper.from_array(np.uint8(0), "z")]
    nodes = [h.make_node("QuantizeLinear", ["xf", "sf", "z"], ["qf"]), h.make_node("DequantizeLinear", ["qf", "sf", "z"], ["df"]),
             h.make_node("QuantizeLinear", ["xc", "sc", "z"], ["qc"]), h.make_node("DequantizeLinear", ["qc", "sc", "z"], ["dc"]),
             h.make_node("Add", ["df", "dc"], ["x"]), h.make_node("DequantizeLinear", ["w", "ws"], ["wd"], axis=1),
             h.make_node("MatMul", ["x", "wd"], ["y"])]
    inputs = [h.make_tensor_value_info(name, onnx.TensorProto.FLOAT, ["b", k]) for name in ("xf", "xc")]
    graph = h.make_graph(nodes, "two_grid_gemm", inputs, [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["b", n])], inits)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 21)]), w


def test_a_two_grid_sum_read_elsewhere_still_feeds_integer_gemms(tmp_path):
    """``compare --tensors`` marks the two grids' sum as a graph output: the GEMM reading it must still run on
    the codes, as in the deployed model, and the marked sum keep its values."""
    model, _ = _two_grid_gemm()
    model.graph.output.append(h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["b", 64]))
    onnx.save(model, str(tmp_path / "gemm.onnx"))
    art = OrtCpuBackend(threads=1, cpu=KINDS["zen3"]).build(tmp_path / "gemm.onnx", tmp_path)
    ops = [n.op_type for n in onnx.load(str(art.path)).graph.node]
    assert ops.count("MatMulInteger") == 2 and "MatMul" not in ops
    xf = np.array([[0.25 * (i % 7) for i in range(64)]], np.float32)
    x = ort.InferenceSession(str(art.path), providers=["CPUExecutionProvider"]).run(["x"], {"xf": xf, "xc": 8 * xf})[0]
    assert np.array_equal(x, 9 * xf)


@pytest.mark.parametrize("kind", KINDS)
def test_two_grid_gemm_runs_as_exact_integer_gemms(tmp_path, kind):
    """Both grids' codes go into integer GEMMs (int32 sums), scaled by 2^m and rescaled once: the numbers of
    ``integer_product``, bit for bit, in each CPU kind's weight format that is exact on this CPU."""
    model, w = _two_grid_gemm()
    onnx.save(model, str(tmp_path / "gemm.onnx"))
    backend = OrtCpuBackend(threads=1, cpu=KINDS[kind])
    art = backend.build(tmp_path / "gemm.onnx", tmp_path)
    ops = [n.op_type for n in onnx.load(str(art.path)).graph.node]
    assert ops.count("MatMulInteger") == 2 and "MatMul" not in ops and art.options["two_grid_integer_gemms"] == 1
    codes_f = np.array([[127] * 64, [0, 127] * 32, [3] * 64], np.float32)
    codes_c = np.array([[0] * 64, [127, 0] * 32, [127] * 64], np.float32)
    want = integer_product([(torch.from_numpy(codes_f), 0), (torch.from_numpy(codes_c), 3)], torch.from_numpy(w.astype(np.float32)))
    out = ort.InferenceSession(str(art.path), providers=["CPUExecutionProvider"]).run(None, {"xf": codes_f * 0.25, "xc": codes_c * 2.0})[0]
    # u8 weights are exact on every x86 CPU, s8 where VNNI/AMX is present; elsewhere s8 is not this test's claim
    if KINDS[kind].weight_format == "u8" or detect().exact_u8s8:
        assert np.array_equal(out, want.numpy() * np.float32(0.125))
