"""Export targets: what each deployment runtime accepts and runs, one record per target (no heavy imports
here: the command line reads it for ``--help``).

The targets differ in the activation format and in two layout choices that keep the same numbers:
``tensorrt`` writes INT4 weight scales as blocks (TensorRT's INT4 is block-quantized only) and a Q/DQ pair
at each attention MatMul input (its fusion pattern); ``ort`` quantizes the qkv output before splitting it
(1-byte codes through the shape ops).

Each target also says what its engine runs for each of a block's genes (``gemm``, ``attention``): a plan is
written in the fake-quant model's terms, and an engine may run a gene otherwise (TensorRT has no 4-bit
activation math; its INT4 is weight-only, so a ``w=4`` GEMM takes float activations whatever ``a`` says).
``formats`` are the per-block formats its engine really runs, the space ``search --space engine`` draws from.
"""

import importlib
from collections.abc import Callable
from dataclasses import dataclass

FLOAT, FP8 = "float", "fp8"
A4 = "runs as 8-bit Q/DQ clipped to 16 levels (no 4-bit activation math)"


@dataclass(frozen=True)
class BlockFormat:
    """One way the engine runs a block: its GEMMs' genes (``w``, ``a``) and the attention genes that go with
    them (quantized attention only where ``v`` is quantized alike: a MatMul of two quantized types runs in float)."""

    name: str
    w: int | str
    a: int | str
    attn: tuple[int | str, ...]


@dataclass(frozen=True)
class Target:
    name: str
    summary: str  # one line for --help
    act_format: str  # "asym": uint8 with a zero point; "sym": int8, zero point 0
    quantize_first: bool  # the qkv output's QuantizeLinear before the split (codes through the shape ops)
    int4_blocks: bool  # INT4 weight scales as [K / block, N] blocks instead of per output channel
    rules: str | None = None  # "module:function" checking an ONNX file against the runtime's rules
    formats: tuple[BlockFormat, ...] = ()  # per block, what its engine runs (search --space engine)
    gemms: dict[tuple, str] | None = None  # (w, a) -> what its engine runs for a block's GEMMs
    float_kind: str = "FP32"  # what "float" runs as

    def rule_checker(self) -> Callable | None:
        if self.rules is None:
            return None
        module, fn = self.rules.split(":")
        return getattr(importlib.import_module(module), fn)

    def gemm(self, w, a) -> tuple[str, list[str]]:
        """What the engine runs for GEMMs with weights ``w`` and input activations ``a``, and where that departs
        from the plan as written: 4-bit activations, and a (w, a) none of its formats has."""
        text = self.gemms[w, a].format(float=self.float_kind)
        as8 = 8 if a == 4 else a
        notes = [] if (w, as8) in {(f.w, f.a) for f in self.formats} else [f"w={w}, a={a} GEMMs: {text}"]
        if a == 4:
            notes.insert(0, f"a=4: {A4}")
            text += f"; a=4 {A4}"
        return text, notes

    def attention(self, a, attn, log_domain: bool) -> tuple[str, list[str]]:
        """What the engine runs for ``probs @ v`` with post-Softmax gene ``attn`` and ``v`` quantized at ``a``
        (``log_domain``: the scheme's attention quantizer at ``attn`` is LIS-like), and where that departs."""
        if attn == FLOAT:
            return f"{self.float_kind} MatMul", []
        if log_domain:
            return f"float log-domain ops (log-domain {attn}-bit codes have no Q/DQ form)", []
        kind = "FP8" if attn == FP8 else "INT8"
        if (attn == FP8) != (a == FP8) or a == FLOAT:
            text = f"{self.float_kind} MatMul: {kind} probabilities against v at a={a} are two types, which no kernel multiplies"
        elif attn == FP8 and FP8 not in {f.a for f in self.formats}:
            text = f"FP8 Q/DQ computed in float (no FP8 kernels): FP8's accuracy, {self.float_kind} speed at best"
        elif attn == 4:
            return f"INT8 MatMul; attn=4 {A4}", [f"attn=4: {A4}"]
        else:
            return f"{kind} MatMul", []
        return text, [f"attn={attn}: {text}"]

    def space(self) -> list[tuple]:
        """Every (w, a, attn) of the engine space, in format order."""
        return [(f.w, f.a, t) for f in self.formats for t in f.attn]


_INT8 = {(8, 8): "INT8 GEMM", (8, 4): "INT8 GEMM"}
ORT_GEMMS = _INT8 | {
    (4, 8): "INT4 weights run on the INT8 kernels (it has no int4 x uint8 GEMM on the CPU): w=8's speed, a smaller file",
    (4, 4): "INT4 weights run on the INT8 kernels (it has no int4 x uint8 GEMM on the CPU): w=8's speed, a smaller file",
    (4, FLOAT): "{float} GEMM on INT4 weights dequantized by a DequantizeLinear: a smaller file, float speed at best",
    (8, FLOAT): "{float} GEMM on INT8 weights dequantized by a DequantizeLinear: a smaller file, float speed at best",
    (FP8, FP8): "FP8 Q/DQ computed in float (no FP8 kernels on the CPU): FP8's accuracy, float speed at best",
    (FLOAT, FLOAT): "{float} GEMM",
}
TRT_GEMMS = _INT8 | {
    (4, 8): "INT4 weight-only GEMM (W4A16; TensorRT's INT4 is weight-only): the a=8 Q/DQ before it runs as its own "
            "kernels and the GEMM takes {float} activations",
    (4, 4): "INT4 weight-only GEMM (W4A16; TensorRT's INT4 is weight-only): the a=4 Q/DQ before it runs as its own "
            "kernels and the GEMM takes {float} activations",
    (4, FLOAT): "INT4 weight-only GEMM (W4A16), {float} activations",
    (8, FLOAT): "{float} GEMM on INT8 weights dequantized at build (TensorRT's weight-only quantization is INT4 only)",
    (FP8, FP8): "FP8 E4M3 GEMM (Ada, Hopper and later GPUs)",
    (FLOAT, FLOAT): "{float} GEMM (the float block)",
}

TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("ort", "uint8 asymmetric activations (FQ-ViT's; what ONNX Runtime's x86 integer kernels fuse)", "asym",
           quantize_first=True, int4_blocks=False, gemms=ORT_GEMMS,
           formats=(BlockFormat("float", FLOAT, FLOAT, (FLOAT,)), BlockFormat("int8", 8, 8, (8, FLOAT)),
                    BlockFormat("int4-weights", 4, 8, (8, FLOAT)))),
    Target("tensorrt", "int8 symmetric activations, zero point 0 (the only form TensorRT accepts), INT4 as blocks", "sym",
           quantize_first=False, int4_blocks=True, rules="pomq_deploy.export.trt_rules:check_tensorrt", gemms=TRT_GEMMS,
           float_kind="FP16", formats=(BlockFormat("float", FLOAT, FLOAT, (FLOAT,)), BlockFormat("int8", 8, 8, (8, FLOAT)),
                                       BlockFormat("fp8", FP8, FP8, (FP8, FLOAT)),
                                       BlockFormat("int4-weight-only", 4, FLOAT, (FLOAT,)))),
)}


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise ValueError(f"target {name!r}; allowed: {', '.join(TARGETS)}")
    return TARGETS[name]
