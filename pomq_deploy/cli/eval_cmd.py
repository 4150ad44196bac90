"""pomq-deploy eval: top-1/top-5 accuracy of the FP32 model, or of its fake-quantized form under a plan."""

import argparse
from pathlib import Path

from ._common import add_device_argument, add_eval_arguments, add_quant_arguments, add_recipe_arguments, calibrated_from_args, device_of, recipe_from_args

HELP = "measure top-1/top-5 accuracy (FP32, or fake-quantized under a plan)"
DESCRIPTION = """\
Evaluate the recipe's model on its evaluation split and print top-1, top-5, the number of images and
the throughput. With --plan or --uniform, the model is first quantized (calibration is cached, so only
the first run of a recipe/scheme/observer calibrates) and evaluated as the PyTorch fake-quant reference,
on its fast path (float GEMMs on the quantized values) or with --exact on the exact one (integer GEMMs on
the codes, as the deployed kernels and the build's self-check compute; about twice the time). --device
runs it on a CUDA GPU (auto: when PyTorch sees one).
With --json, print one JSON object with keys top1, top5 (fractions), images and seconds (plus scheme,
plan and plan_id when quantized), and nothing else on stdout.

examples:
  pomq-deploy eval                                  # FP32 reference model, full Fashion-MNIST test set
  pomq-deploy eval --uniform 8/8/4 --scheme fqvit   # FQ-ViT: PTF + LIS at 4-bit attention
  pomq-deploy eval --plan best.yaml --limit 1000 --json
  pomq-deploy eval --recipe deit_tiny --checkpoint deit_tiny.safetensors --data /data/imagenet/val
  pomq-deploy eval --artifact engines/deit_fmnist/<plan-id>   # through the built ONNX Runtime model
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_recipe_arguments(p)
    add_quant_arguments(p)
    add_eval_arguments(p)
    add_device_argument(p)
    p.add_argument("--exact", action="store_true",
                   help="run the fake-quant model on its exact path (integer GEMMs on the codes, a correctly rounded GELU: "
                   "what the build's self-check and compare hold a deployed model to; slower) instead of the fast one "
                   "(float GEMMs on the same quantized values; the same top-1 within float noise, docs/benchmarks.md)")
    p.add_argument("--artifact", metavar="DIR", type=Path,
                   help="evaluate a built artifact (engines/<recipe>/<plan-id>) through its backend instead")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")


def run(args: argparse.Namespace) -> int:
    import torch

    from .._schema import to_plain
    from ..data import eval_dataset, eval_loader
    from ..evaluate import evaluate
    from ..models.loading import load_model
    from ..targets import get_target
    from ._console import emit, progress_iter

    if args.artifact is not None:
        return _eval_artifact(args)
    quantized = args.plan is not None or args.uniform is not None
    if quantized:
        target = args.target or "ort"
        recipe, plan, model = calibrated_from_args(args)
        model.apply(plan, get_target(target).act_format)
        model.set_exact(args.exact)
        label = f"{plan.scheme}/{plan.rounding} {args.uniform or plan.plan_id}{' exact' if args.exact else ''}"
    else:
        recipe = recipe_from_args(args)
        model, label = load_model(recipe.model).to(device_of(args)), "FP32"
    dataset = eval_dataset(recipe.data, model)
    loader = eval_loader(dataset, recipe.eval.batch_size, recipe.eval.limit, recipe.data.workers)
    with torch.inference_mode():
        result = evaluate(_on_device(model), progress_iter(loader, total=len(loader), description=f"eval {recipe.name} {label}"))
    out = {"recipe": recipe.name, "top1": result.top1, "top5": result.top5, "images": result.images,
           "seconds": round(result.seconds, 3)}
    if quantized:
        out |= {"scheme": plan.scheme, "rounding": plan.rounding, "observer": args.observer, "target": target, "plan_id": plan.plan_id,
                "plan": to_plain(plan.blocks), "path": "exact" if args.exact else "fast"}
    out["device"] = str(next(model.parameters()).device)
    emit(args.json, out, f"{recipe.name} ({label}) on {result.images} images: top-1 {result.top1:.4f}  "
                         f"top-5 {result.top5:.4f}  {result.images_per_s:.0f} images/s ({result.seconds:.1f} s)")
    return 0


def _on_device(model):
    """``model`` fed each batch on its own device (a timm model has no input hook; a QuantModel moves them itself)."""
    device = next(model.parameters()).device
    return lambda x: model(x.to(device))


def _eval_artifact(args: argparse.Namespace) -> int:
    """Accuracy of a built artifact through its own backend, on its recipe's evaluation split."""
    from ..errors import PomqError
    from ..measure import evaluate_artifact
    from ._common import calib_track, open_artifact
    from ._console import emit

    if args.plan is not None or args.uniform is not None:
        raise PomqError("--artifact evaluates what was built; it takes no --plan or --uniform")
    built, backend = open_artifact(args.artifact)
    m = built.manifest
    recipe = recipe_from_args(args, m.recipe_spec)  # the recipe it was built with, unless --recipe names another
    art = built.runnable
    result = evaluate_artifact(backend, art, recipe, calib_track)  # options travel in the artifact
    emit(args.json, {"recipe": recipe.name, "top1": result.top1, "top5": result.top5, "images": result.images,
                     "seconds": round(result.seconds, 3), "artifact": str(built.directory), "plan_id": m.plan_id,
                     "backend": art.backend},
         f"{built.directory} ({art.backend}) on {result.images} images: top-1 {result.top1:.4f}  "
         f"top-5 {result.top5:.4f}  {result.images_per_s:.0f} images/s ({result.seconds:.1f} s)")
    return 0
