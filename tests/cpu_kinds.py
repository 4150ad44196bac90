"""The CPU kinds CI has run on, and GEMMs of extreme integer codes: the cases where ONNX Runtime's integer
kernels differ by CPU. Imported by the tests, and run as a script under QEMU's AVX2-only CPU model
(``test_cpu_formats.test_avx2_kernels_under_emulation``): it imports nothing heavier than ONNX Runtime, so
that it starts in seconds there. Prints one JSON object: for each activation format and each CPU kind's
form, whether the built artifact's GEMM summed the codes exactly, and the same for ORT's default session.
"""

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import helper as h
from onnx import numpy_helper

from pomq_deploy.backends.cpu import parse_proc_cpuinfo

SAPPHIRE_RAPIDS = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse sse2 avx avx2 fma avx512f avx512dq avx512bw avx512vl avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8

processor\t: 1
vendor_id\t: GenuineIntel
"""
ZEN3 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7763 64-Core Processor
flags\t\t: fpu sse sse2 avx avx2 fma bmi2 sha_ni vaes vpclmulqdq
"""
KINDS = {"sapphire_rapids": parse_proc_cpuinfo(SAPPHIRE_RAPIDS, "x86_64"), "zen3": parse_proc_cpuinfo(ZEN3, "x86_64")}
# the activation formats of the export targets: ort's uint8 (FQ-ViT's asymmetric codes), tensorrt's int8 (zero point 0)
ACTIVATIONS = {"ort": (np.uint8, 0, 255), "tensorrt": (np.int8, -128, 127)}


def extreme_gemm(target: str = "ort", k: int = 64, n: int = 8) -> tuple[onnx.ModelProto, np.ndarray]:
    """One Linear as the exporter writes it for ``target``: activation Q/DQ in the target's format (scale 1) and
    INT8 weight codes with no zero point, in extreme values (127 and -128), the case that saturates int16 pairs."""
    dtype, _, _ = ACTIVATIONS[target]
    w = np.full((k, n), 127, np.int8)
    w[:, 1::2] = -128
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.ones(n, np.float32), "ws"),
             numpy_helper.from_array(np.float32(1), "s"), numpy_helper.from_array(dtype(0), "z")]
    nodes = [h.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]), h.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
             h.make_node("DequantizeLinear", ["w", "ws"], ["wd"], axis=1), h.make_node("MatMul", ["xd", "wd"], ["y"])]
    graph = h.make_graph(nodes, "gemm", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["b", k])],
                         [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["b", n])], inits)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 21)]), w


def extreme_codes(target: str = "ort", k: int = 64) -> np.ndarray:
    """Activation codes at the ends of the target's range (and a row of ones), as float inputs of scale 1."""
    _, lo, hi = ACTIVATIONS[target]
    return np.array([[hi] * k, [lo, hi] * (k // 2), [lo] * k, [1] * k], np.float32)


def probe(work: Path) -> dict:
    """{target: {"default_session": exact, kind: {"exact", "ops", "weight_format"}}} on this CPU."""
    import onnxruntime as ort

    from pomq_deploy.backends.ort_cpu import OrtCpuBackend

    out: dict = {}
    for target in ACTIVATIONS:
        model, w = extreme_gemm(target)
        x = extreme_codes(target)
        want = x.astype(np.int64) @ w.astype(np.int64)
        path = work / f"{target}.onnx"
        onnx.save(model, str(path))
        y = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        out[target] = {"default_session": bool(np.array_equal(y, want))}
        for kind, facts in KINDS.items():
            backend = OrtCpuBackend(threads=1, cpu=facts)
            (work / target / kind).mkdir(parents=True)
            art = backend.build(path, work / target / kind)
            out[target][kind] = {"exact": bool(np.array_equal(backend.run(art, x), want)),
                                 "ops": [n.op_type for n in onnx.load(str(art.path)).graph.node],
                                 "weight_format": art.options["weight_format"]}
    return out


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as d:
        json.dump(probe(Path(d)), sys.stdout)
