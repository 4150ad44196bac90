"""pomq-deploy export: the fake-quant model under a plan as ONNX with QuantizeLinear/DequantizeLinear nodes."""

import argparse
from pathlib import Path

from ._common import add_quant_arguments, add_recipe_arguments, calibrated_from_args

HELP = "export a plan to ONNX with Q/DQ nodes (INT8/INT4 weights)"
DESCRIPTION = """\
Write the recipe's model, quantized under a plan, as an ONNX file (opset 21, dynamic batch axis) with
QuantizeLinear/DequantizeLinear nodes: 8-bit weights as INT8 and 4-bit weights as INT4 initializers with
per-output-channel DequantizeLinear; per-channel activation scales (PTF, O-2SF) as Mul -> Q/DQ -> Mul;
4-bit activations as Q/DQ clipped to 16 levels; LIS as log-domain ops. --target picks the activation
format: ort = uint8 asymmetric (fastest in ONNX Runtime on x86), tensorrt = int8 symmetric, zero point 0.

examples:
  pomq-deploy export --uniform 8/8/8 --out model.onnx
  pomq-deploy export --plan best.yaml --target tensorrt --out model_trt.onnx
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_recipe_arguments(p)
    add_quant_arguments(p, required=True)
    p.add_argument("--out", metavar="FILE", type=Path, required=True, help="ONNX file to write")
    p.add_argument("--json", action="store_true", help="print what was written as one JSON object")


def run(args: argparse.Namespace) -> int:
    from ..export import export_quantized
    from ._console import emit

    target = args.target or "ort"
    recipe, plan, model = calibrated_from_args(args)
    info = export_quantized(model, plan, target, args.out)
    out = {"onnx": str(info.path), "recipe": recipe.name, "plan_id": plan.plan_id, "scheme": plan.scheme, "rounding": plan.rounding,
           "target": target, "bytes": info.path.stat().st_size, "weight_bytes": info.weight_bytes,
           "initializer_bytes": info.initializer_bytes, "weights_int8": info.weights_int8, "weights_int4": info.weights_int4,
           "weights_fp8": info.weights_fp8}
    emit(args.json, out, f"wrote {info.path} ({out['bytes'] / 1e6:.2f} MB; weights: {info.weights_int8} INT8, "
                         f"{info.weights_int4} INT4, {info.weights_fp8} FP8; plan {plan.plan_id}, {plan.scheme}, {plan.rounding} rounding, target {target})")
    return 0
