"""Export targets: what each deployment runtime accepts, one record per target (no heavy imports here: the
command line reads it for ``--help``).

The targets differ in the activation format and in two layout choices that keep the same numbers:
``tensorrt`` writes INT4 weight scales as blocks (TensorRT's INT4 is block-quantized only) and a Q/DQ pair
at each attention MatMul input (its fusion pattern); ``ort`` quantizes the qkv output before splitting it
(1-byte codes through the shape ops).
"""

import importlib
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    name: str
    summary: str  # one line for --help
    act_format: str  # "asym": uint8 with a zero point; "sym": int8, zero point 0
    quantize_first: bool  # the qkv output's QuantizeLinear before the split (codes through the shape ops)
    int4_blocks: bool  # INT4 weight scales as [K / block, N] blocks instead of per output channel
    rules: str | None = None  # "module:function" checking an ONNX file against the runtime's rules

    def rule_checker(self) -> Callable | None:
        if self.rules is None:
            return None
        module, fn = self.rules.split(":")
        return getattr(importlib.import_module(module), fn)


TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("ort", "uint8 asymmetric activations (FQ-ViT's; what ONNX Runtime's x86 integer kernels fuse)", "asym",
           quantize_first=True, int4_blocks=False),
    Target("tensorrt", "int8 symmetric activations, zero point 0 (the only form TensorRT accepts), INT4 as blocks", "sym",
           quantize_first=False, int4_blocks=True, rules="pomq_deploy.export.trt_rules:check_tensorrt"),
)}


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise ValueError(f"target {name!r}; allowed: {', '.join(TARGETS)}")
    return TARGETS[name]
