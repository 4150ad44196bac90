"""pomq-deploy build: plan -> Q/DQ ONNX -> backend artifact, measured, in engines/<recipe>/<plan-id>/."""

import argparse
import json
from pathlib import Path

from ._common import add_device_argument, add_eval_arguments, add_quant_arguments, add_recipe_arguments, output_folder, positive_int

HELP = "build a plan into a deployable artifact and measure its accuracy, latency and size"
DESCRIPTION = """\
Export the plan to Q/DQ ONNX, build it with the backend, check that it computes what the PyTorch
fake-quant reference computes (64 calibration and 64 noise images: top-1 agreement >= 0.95 on the images
whose top-1 margin is above twice the plan's float noise, and logits cosine >= 0.995, else the build fails
naming the block that differs most; --no-verify skips this),
evaluate top-1 through the backend on the recipe's evaluation split, time it (warm-up, then median and
p90), and write <out>/<recipe>/<plan-id>/ with model.onnx, the backend's artifact and manifest.json
(plan, plan-id, versions, latency, sizes, accuracy, self-check, the CPU and integer formats built for,
checksums). The directory appears only when complete. On ort-cpu, INT8 weights run as uint8 on CPUs
whose u8 x s8 GEMM saturates (no VNNI/AMX): the same values, exact. With --fp32, build the float model
instead (the baseline a plan must beat). --json prints the manifest.

examples:
  pomq-deploy build --plan best.yaml --vs-fp32    # and its latency ratio to FP32, as the search measured it
  pomq-deploy build --uniform 8/8/8 --scheme fqvit --batch 8 --json
  pomq-deploy build --fp32
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..backends import add_backend_arguments

    add_recipe_arguments(p)
    add_quant_arguments(p)
    add_device_argument(p)
    p.add_argument("--fp32", action="store_true", help="build the unquantized model (no --plan/--uniform)")
    add_eval_arguments(p)
    p.add_argument("--vs-fp32", action="store_true",
                   help="also time the latency ratio to the FP32 model on the same backend, interleaved in rounds until its "
                   "90%% interval is within +-3%% (what search measures; a plan from search is compared with its search ratio)")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip the self-check against the PyTorch reference (the manifest records that it was skipped)")
    g = add_backend_arguments(p)
    g.add_argument("--batch", type=positive_int, default=8, help="batch size the latency is measured at (default 8)")
    g.add_argument("--runs", type=positive_int, default=50, help="timed runs after warm-up (default 50; tensorrt times at least 200)")
    p.add_argument("--out", metavar="DIR", type=output_folder, default=Path("engines"), help="output root (default: engines)")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")


def run(args: argparse.Namespace) -> int:
    from .._schema import to_plain
    from ..backends import BACKENDS, backend_from_args
    from ..build import BuildOptions, build
    from ..errors import PomqError
    from ..progress import Phases
    from ._common import device_of, load_plan_arg, recipe_from_args, resolve_plan, rounding_of, scheme_of
    from ._console import stderr, stdout

    quantized = args.plan is not None or args.uniform is not None
    if quantized == args.fp32:
        raise PomqError("give one of --plan FILE, --uniform W/A/ATTN or --fp32")
    backend = backend_from_args(args, args.batch, args.out)
    plan = load_plan_arg(args)
    recipe = recipe_from_args(args)
    model = None
    if quantized:
        from ..quant.calibration import quant_model

        model = quant_model(recipe, scheme_of(args, plan), args.observer, rounding_of(args, plan),  # build() calibrates it
                            device_of(args))
        plan = resolve_plan(args, plan, recipe, model.num_blocks)  # a plan that does not fit fails here
    target = BACKENDS[args.backend].default_target if args.target is None else args.target
    opts = BuildOptions(backend, target, args.out, args.batch, args.runs, args.observer, args.verify, args.vs_fp32)
    built = build(recipe, plan, opts, Phases(stderr), model=model)
    m = built.manifest
    if args.json:
        print(json.dumps(to_plain(m), indent=2))
        return 0
    lat, acc = m.latency, m.accuracy
    stdout.print(f"built {built.directory}\n  plan {m.plan_id} ({f'{m.scheme}, {m.rounding} rounding' if m.scheme else 'fp32'}, target {m.target}) on {m.backend.name}\n"
                 f"  top-1 {acc.top1:.4f} on {acc.images} images; latency batch {lat.batch}: median "
                 f"{lat.median_ms:.2f} ms, p90 {lat.p90_ms:.2f} ms\n  ONNX weights {m.onnx.weight_bytes / 1e6:.2f} MB, "
                 f"deployable size {m.artifact.size_bytes / 1e6:.2f} MB")
    if m.latency_vs_fp32 is not None:
        r = m.latency_vs_fp32
        line = f"  latency / FP32: {r['ratio']:.3f} (90% interval {r['low']:.3f}-{r['high']:.3f}, {r['rounds']} interleaved rounds)"
        searched = (plan.measured or {}).get("latency_ratio_fp32") if plan is not None else None
        if searched:
            line += f"; the search measured {searched:.3f} ({100 * (r['ratio'] / searched - 1):+.1f}%)"
        stdout.print(line)
    options = m.backend.options
    if "cpu" in options and options.get("integer_weights"):
        from ..backends.ort_cpu import describe_formats

        stdout.print(f"  {describe_formats(options)}")
    check = m.verify
    if "skipped" in check:
        stdout.print("  self-check: skipped (--no-verify)")
    else:
        c, n = check["calibration"], check["noise"]
        stdout.print(f"  self-check vs PyTorch: calibration images top-1 agreement {c['top1']:.4f} (on {c['judged']} of "
                     f"{c['images']} above the float noise), cosine {c['cosine']:.5f}; noise images {n['top1']:.4f} (on "
                     f"{n['judged']} of {n['images']}), {n['cosine']:.5f}")
    for note in m.emulated:
        stdout.print(f"  note: {note}")
    for note in (m.tensorrt or {}).get("layers", {}).get("not_honoured", []):
        stdout.print(f"  engine: {note}")
    return 0

