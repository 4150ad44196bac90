"""pomq-deploy check: an ONNX file against a deployment target's quantization rules, or a plan against what the
target's engine runs, on any CPU."""

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.table import Table

    from ..export.trt_rules import Finding

HELP = "check an ONNX file against TensorRT's quantization rules, or say what an engine runs for a plan (no GPU needed)"
DESCRIPTION = """\
With --plan (or --uniform): say per block what the target's engine runs for the plan's genes, from the plan
alone (no model, no export): which GEMMs run INT8, FP8, INT4 weight-only or in float, what runs the
attention's probs @ v, and where the engine departs from the plan as written (4-bit activations run as
8-bit Q/DQ on 16 levels; TensorRT's INT4 is weight-only, so a w=4 GEMM takes float activations whatever a
says; a MatMul of two quantized types runs in float). Exit status 0.

With an ONNX file: check it against what the target accepts, before a GPU build is spent on it. For
tensorrt: the parser's opset range and operators, symmetric int8/int4/fp8 Q/DQ (zero point 0, no uint8),
positive constant scales, per-tensor activations, per-channel weights along the consumer's output
channel, INT4 only as block-quantized MatMul/Gemm weights; and, as warnings, Q/DQ placements that keep
TensorRT from fusing a MatMul/Gemm/Conv (an op between a DequantizeLinear and it, an input without Q/DQ,
a residual Add without Q/DQ). Exit status: 0 without errors (warnings allowed), 1 with errors, 2 when the
file cannot be read as ONNX.

examples:
  pomq-deploy check --plan best.yaml --target tensorrt
  pomq-deploy check --uniform 4/8/8 --target ort --scheme repq
  pomq-deploy export --uniform 8/8/8 --target tensorrt --out model.onnx && pomq-deploy check model.onnx
  pomq-deploy check --target tensorrt model.onnx --json
"""

STYLE = {"error": "bold red", "warning": "yellow"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..targets import TARGETS
    from ._common import add_scheme_argument, uniform_spec

    p.add_argument("onnx", metavar="FILE", type=Path, nargs="?", help="the ONNX file to check")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--plan", metavar="P", type=Path, help="a plan YAML: what the engine runs for it, per block")
    which.add_argument("--uniform", metavar="W/A/ATTN", type=uniform_spec, help="the same genes in every block (with --blocks)")
    p.add_argument("--blocks", type=int, default=12, help="blocks of a --uniform plan (default 12)")
    add_scheme_argument(p, "the plan's, else fqvit")
    p.add_argument("--target", choices=list(TARGETS), default="tensorrt",
                   help="the target whose rules or engine to check against (default: tensorrt; ONNX rules: tensorrt only)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


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
    from ..errors import PomqError

    plan_given = args.plan is not None or args.uniform is not None
    if plan_given == (args.onnx is not None):
        raise PomqError("give an ONNX FILE to check against the target's rules, or --plan/--uniform to see what its "
                        "engine runs, not both or neither")
    if plan_given:
        return _check_plan(args)
    return _check_onnx(args)


def _check_plan(args: argparse.Namespace) -> int:
    import dataclasses

    from rich.table import Table

    from ..deployment import departures, plan_deployment
    from ..plan import load_plan, uniform_plan
    from ..quant.schemes import DEFAULT_SCHEME
    from ..targets import get_target
    from ._console import emit, stdout

    if args.plan is not None:
        plan = load_plan(args.plan)
        plan = plan if args.scheme is None else dataclasses.replace(plan, scheme=args.scheme)
        source = str(args.plan)
    else:
        plan = uniform_plan(args.uniform, args.blocks, "uniform", args.scheme or DEFAULT_SCHEME)
        source = f"uniform {args.uniform} over {args.blocks} blocks"
    target = get_target(args.target)
    rows = plan_deployment(plan, target)
    gone = departures(rows)
    out = {"plan": source, "scheme": plan.scheme, "target": target.name,
           "blocks": [dataclasses.asdict(r) for r in rows], "departures": [{"blocks": b, "what": t} for t, b in gone.items()]}
    if not args.json:
        table = Table(title=f"{source} ({plan.scheme}) on {target.name}: what the engine runs")
        for col in ("block", "w/a/attn", "qkv, proj, fc1, fc2", "probs @ v"):
            table.add_column(col, overflow="fold")
        for r in rows:
            style = "yellow" if r.departs else None
            table.add_row(str(r.index), r.genes, r.gemm, r.attention, style=style)
        stdout.print(table)
        for text, blocks in gone.items():
            stdout.print(f"blocks {', '.join(map(str, blocks))}: {text}")
    emit(args.json, out, f"{len(rows) - sum(not r.departs for r in rows)} of {len(rows)} blocks run otherwise than "
                         f"the plan writes them on {target.name}" if gone else f"every block runs as the plan writes it "
                         f"on {target.name}")
    return 0


def _check_onnx(args: argparse.Namespace) -> int:
    import dataclasses

    from ..errors import PomqError
    from ..export.trt_rules import ERROR
    from ..targets import get_target
    from ._console import emit, stdout

    checker = get_target(args.target).rule_checker()
    if checker is None:
        raise PomqError(f"--target {args.target}: no ONNX rules to check a file against (tensorrt has them); "
                        "--plan says what any target's engine runs")
    findings = sorted(checker(args.onnx), key=lambda f: f.severity != ERROR)  # errors first, else in order
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
