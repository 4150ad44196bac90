"""pomq-deploy check: an ONNX file against a deployment target's quantization rules, on any CPU."""

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.table import Table

    from ..export.trt_rules import Finding

HELP = "check an ONNX file against TensorRT's explicit-quantization rules (no GPU needed)"
DESCRIPTION = """\
Read an ONNX file and check it against what the target accepts, before a GPU build is spent on it. For
tensorrt: the parser's opset range and operators, symmetric int8/int4/fp8 Q/DQ (zero point 0, no uint8),
positive constant scales, per-tensor activations, per-channel weights along the consumer's output
channel, INT4 only as block-quantized MatMul/Gemm weights; and, as warnings, Q/DQ placements that keep
TensorRT from fusing a MatMul/Gemm/Conv (an op between a DequantizeLinear and it, an input without Q/DQ,
a residual Add without Q/DQ). Exit status: 0 without errors (warnings allowed), 1 with errors, 2 when the
file cannot be read as ONNX.

examples:
  pomq-deploy export --uniform 8/8/8 --target tensorrt --out model.onnx && pomq-deploy check model.onnx
  pomq-deploy check --target tensorrt model.onnx --json
"""

STYLE = {"error": "bold red", "warning": "yellow"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..targets import TARGETS

    p.add_argument("onnx", metavar="FILE", type=Path, help="the ONNX file to check")
    p.add_argument("--target", choices=[t.name for t in TARGETS.values() if t.rules], default="tensorrt", help="rules to check against (default: tensorrt)")
    p.add_argument("--json", action="store_true", help="print one JSON object with every finding")


def _table(findings: "list[Finding]") -> "Table":
    from rich.markup import escape
    from rich.table import Table

    table = Table()
    table.add_column("severity", no_wrap=True)
    table.add_column("rule", no_wrap=True)
    table.add_column("node", overflow="fold")  # the full name: it is what a reader searches the graph for
    table.add_column("message", overflow="fold")
    for f in findings:
        table.add_row(f"[{STYLE[f.severity]}]{f.severity}[/]", f.rule, escape(f.node), escape(f.message))
    return table


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from ..export.trt_rules import ERROR
    from ..targets import get_target
    from ._console import emit, stdout

    findings = sorted(get_target(args.target).rule_checker()(args.onnx), key=lambda f: f.severity != ERROR)  # errors first, else in order
    errors = sum(f.severity == ERROR for f in findings)
    warnings = len(findings) - errors
    out = {"onnx": str(args.onnx), "target": args.target, "errors": errors, "warnings": warnings,
           "findings": [dataclasses.asdict(f) for f in findings]}
    if findings and not args.json:
        stdout.print(_table(findings))
    verdict = "fix the errors before a TensorRT build" if errors else "no errors"
    emit(args.json, out, f"{args.onnx}: {errors} error(s), {warnings} warning(s) under {args.target}'s "
                         f"quantization rules; {verdict}")
    return 1 if errors else 0
