"""pomq-deploy compare: where the deployed model loses accuracy, block by block."""

import argparse
import json
import tempfile
from pathlib import Path

from ._common import add_device_argument, add_quant_arguments, add_recipe_arguments, device_of, positive_int

HELP = "compare the deployed model with the fake-quant and FP32 models block by block (which block loses accuracy)"
DESCRIPTION = """\
Run the plan's exported ONNX through the backend with every encoder block's output marked as a graph output
(ONNX Runtime on the CPU; on TensorRT an engine of the same ONNX with those outputs), and compare each block's
output with the PyTorch fake-quant model of the same plan and with the FP32 model, on the same images:

  chained     the whole deployed model, run once: errors accumulate as in deployment
  isolated    the block alone, fed the fake-quant model's input to it: its own error only
  vs FP32     how far deployment (and fake-quant) are from the float model after each block

It names the block across which the deployed model's cosine to FP32 falls furthest: the block to give more
bits, or to look at first. --tensors adds every quantized activation (deployed vs fake-quant). Marking
outputs in a TensorRT engine can stop fusions across them; the isolated view is unaffected by that.

examples:
  pomq-deploy compare --uniform 8/8/8
  pomq-deploy compare --plan best.yaml --tensors --json
  pomq-deploy compare --artifact engines/deit_fmnist/<plan-id>
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..backends import add_backend_arguments

    add_recipe_arguments(p)
    add_quant_arguments(p)
    add_device_argument(p)
    p.add_argument("--artifact", metavar="DIR", type=Path,
                   help="compare a built artifact (engines/<recipe>/<plan-id>): its ONNX, plan and backend, instead of --plan/--uniform")
    g = p.add_argument_group("inputs")
    g.add_argument("--images", metavar="N", type=positive_int, default=64, help="images compared (default 64)")
    g.add_argument("--noise", action="store_true",
                   help="seeded uniform-noise images instead of the first evaluation images (reach the ends of the ranges)")
    p.add_argument("--tensors", action="store_true", help="also compare every quantized activation (deployed vs fake-quant)")
    add_backend_arguments(p)
    p.add_argument("--json", action="store_true", help="print the comparison as one JSON object")


def run(args: argparse.Namespace) -> int:
    import onnx

    from ..compare import compare
    from ..errors import PomqError
    from ..targets import get_target

    if (args.artifact is None) == (args.plan is None and args.uniform is None):
        raise PomqError("give --plan FILE, --uniform W/A/ATTN or --artifact DIR")
    with tempfile.TemporaryDirectory(prefix="pomq-compare-") as tmp:
        recipe, plan, model, target, backend, onnx_path = (_from_artifact(args) if args.artifact is not None
                                                           else _from_plan(args, Path(tmp) / "model.onnx"))
        images = _images(recipe, model, args.images, args.noise)
        deployed = onnx.load(str(onnx_path))  # read once: prepare rewrites a copy in place
        prepare = getattr(backend, "prepare", None)  # ort-cpu: the integer formats its runs use, said below
        formats = prepare(onnx.ModelProto.FromString(deployed.SerializeToString())) if prepare is not None else None
        try:
            result = compare(backend.run_onnx, deployed, model, plan, get_target(target).act_format, images,
                             backend.name, "noise" if args.noise else "eval", tensors=args.tensors)
        except ValueError as e:  # blocks the exported graph does not delimit by scope (pomq_deploy.verify.block_boundaries)
            raise PomqError(f"{recipe.name}: cannot compare block by block: {e}") from None
    if args.json:
        print(json.dumps({"recipe": recipe.name, "plan_id": plan.plan_id, "scheme": plan.scheme, "rounding": plan.rounding, "target": target,
                          "formats": formats} | result.to_json(), indent=2))
    else:
        _print(result, recipe.name, plan, target)
        if formats is not None:
            from ..backends.ort_cpu import describe_formats
            from ._console import stdout

            stdout.print(describe_formats(formats))
    return 0


def _from_plan(args, onnx_path: Path):
    from ..backends import BACKENDS, backend_from_args
    from ..export import export_quantized
    from ._common import calibrated_from_args

    backend = backend_from_args(args, args.images, Path("engines"))  # fails before calibration where it cannot run
    recipe, plan, model = calibrated_from_args(args)
    target = BACKENDS[args.backend].default_target if args.target is None else args.target
    export_quantized(model, plan, target, onnx_path)
    return recipe, plan, model, target, backend, onnx_path


def _from_artifact(args):
    from ..errors import PomqError
    from ..quant.calibration import calibrate_cached, quant_model
    from ._common import calib_track, open_artifact, recipe_from_args

    if args.plan is not None or args.uniform is not None or args.scheme is not None or args.rounding is not None:
        raise PomqError("--artifact compares what was built; it takes no --plan, --uniform, --scheme or --rounding")
    built, backend = open_artifact(args.artifact)
    m = built.manifest
    if m.plan is None:
        raise PomqError(f"{args.artifact}: an FP32 build has no quantized model to compare; give a quantized artifact")
    recipe = recipe_from_args(args, m.recipe_spec)
    model = quant_model(recipe, m.scheme, m.observer, m.plan.rounding, device_of(args))
    m.plan.check_blocks(model.num_blocks, str(args.artifact))
    calibrate_cached(model, recipe, track=calib_track)
    return recipe, m.plan, model, m.target, backend, built.directory / m.onnx.file


def _images(recipe, model, count: int, noise: bool):
    """The first ``count`` evaluation images, or as many seeded noise images normalised like them."""
    import torch
    from timm.data import resolve_data_config

    from ..data import eval_dataset, eval_loader
    from ..export.onnx_export import input_size
    from ..models.loading import data_model
    from ..verify import noise_images

    if noise:
        cfg = resolve_data_config({}, model=model.model)
        return noise_images(count, input_size(model.model), cfg["mean"], cfg["std"])
    loader = eval_loader(eval_dataset(recipe.data, data_model(recipe.model)), min(count, 64), count)
    return torch.cat([x for x, _ in loader])


def _print(result, recipe: str, plan, target: str) -> None:
    from rich.table import Table

    from ._console import stdout

    t = Table(title=f"{recipe} plan {plan.plan_id} ({plan.scheme}, {plan.rounding} rounding, target {target}) on {result.backend}: "
                    f"{result.images} {result.inputs} images, cosine of each block's output", title_justify="left")
    for col in ("block", "bits w/a/attn", "ONNX node", "deployed vs fake-quant", "max error", "isolated", "deployed vs FP32",
                "fake-quant vs FP32"):
        t.add_column(col, justify="left" if col in ("ONNX node", "bits w/a/attn") else "right")
    for i, (r, bits) in enumerate(zip(result.blocks, plan.blocks, strict=True)):
        t.add_row(str(i), f"{bits.w}/{bits.a}/{bits.attn}", r.node, f"{r.deployed_vs_fakequant:.5f}", f"{r.max_abs:.3g}",
                  f"{r.isolated:.5f}", f"{r.deployed_vs_fp32:.5f}", f"{r.fakequant_vs_fp32:.5f}")
    stdout.print(t)
    if result.tensors:
        q = Table(title="quantized activations, deployed vs fake-quant (chained)", title_justify="left")
        for col in ("module", "ONNX node", "cosine", "max error"):
            q.add_column(col, justify="left" if col in ("module", "ONNX node") else "right")
        for r in result.tensors:
            q.add_row(r.name, r.node, f"{r.deployed_vs_fakequant:.5f}", f"{r.max_abs:.3g}")
        stdout.print(q)
    for why in result.skipped:
        stdout.print(f"  not compared: {why}")
    i, before, after = result.largest_loss()
    stdout.print(f"logits: deployed vs fake-quant cosine {result.logits['cosine']:.5f}, top-1 agreement "
                 f"{result.logits['top1_agreement']:.4f}\nlargest loss: block {i} ({result.blocks[i].name}, "
                 f"{plan.blocks[i].w}/{plan.blocks[i].a}/{plan.blocks[i].attn}): the deployed model's cosine to FP32 falls "
                 f"{before:.5f} -> {after:.5f}")
