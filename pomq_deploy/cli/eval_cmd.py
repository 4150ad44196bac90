"""pomq-deploy eval: top-1/top-5 accuracy of the FP32 model, or of its fake-quantized form under a plan."""

import argparse
import json

from ._common import (add_eval_arguments, add_quant_arguments, add_recipe_arguments, calib_track, load_plan_arg,
                      recipe_from_args, resolve_plan, scheme_of)

HELP = "measure top-1/top-5 accuracy (FP32, or fake-quantized under a plan)"
DESCRIPTION = """\
Evaluate the recipe's model on its evaluation split and print top-1, top-5, the number of images and
the throughput. With --plan or --uniform, the model is first quantized (calibration is cached, so only
the first run of a recipe/scheme/observer calibrates) and evaluated as the PyTorch fake-quant reference.
With --json, print one JSON object with keys top1, top5 (fractions), images and seconds (plus scheme,
plan and plan_id when quantized), and nothing else on stdout.

examples:
  pomq-deploy eval                                  # FP32 reference model, full Fashion-MNIST test set
  pomq-deploy eval --uniform 8/8/4 --scheme fqvit   # FQ-ViT: PTF + LIS at 4-bit attention
  pomq-deploy eval --plan best.yaml --limit 1000 --json
  pomq-deploy eval --recipe deit_tiny --checkpoint deit_tiny.safetensors --data /data/imagenet/val
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_recipe_arguments(p)
    add_quant_arguments(p)
    add_eval_arguments(p)
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")


def run(args: argparse.Namespace) -> int:
    import torch

    from .._schema import to_plain
    from ..data import eval_dataset, eval_loader
    from ..evaluate import evaluate
    from ..models.loading import create_model
    from ..quant.calibration import calibrate_cached, quant_model
    from ._console import progress_iter, stdout

    plan = load_plan_arg(args)
    recipe = recipe_from_args(args)
    quantized = plan is not None or args.uniform is not None
    if quantized:
        model = quant_model(recipe, scheme_of(args, plan), args.observer)
        plan = resolve_plan(args, plan, recipe, model.num_blocks)  # before calibrating: a bad plan fails fast
        calibrate_cached(model, recipe, track=calib_track)
        model.apply(plan, "sym" if args.target == "tensorrt" else "asym")
        label = f"{plan.scheme} {args.uniform or plan.plan_id}"
    else:
        model, label = create_model(recipe.model.arch, recipe.model.checkpoint), "FP32"
    dataset = eval_dataset(recipe.data, model)
    loader = eval_loader(dataset, recipe.eval.batch_size, recipe.eval.limit, recipe.data.workers)
    with torch.inference_mode():
        result = evaluate(model, progress_iter(loader, total=len(loader), description=f"eval {recipe.name} {label}"))
    if args.json:
        out = {"recipe": recipe.name, "top1": result.top1, "top5": result.top5, "images": result.images,
               "seconds": round(result.seconds, 3)}
        if quantized:
            out |= {"scheme": plan.scheme, "observer": args.observer, "target": args.target, "plan_id": plan.plan_id,
                    "plan": to_plain(plan.blocks)}
        print(json.dumps(out))
    else:
        stdout.print(f"{recipe.name} ({label}) on {result.images} images: top-1 {result.top1:.4f}  top-5 {result.top5:.4f}  "
                     f"{result.images_per_s:.0f} images/s ({result.seconds:.1f} s)")
    return 0
