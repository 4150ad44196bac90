"""pomq-deploy eval: top-1/top-5 accuracy of the model a recipe names."""

import argparse
import json

from ._common import add_eval_arguments, add_recipe_arguments, recipe_from_args

HELP = "measure top-1/top-5 accuracy of the FP32 model"
DESCRIPTION = """\
Evaluate the recipe's model on its evaluation split and print top-1, top-5, the number of images
and the throughput. With --json, print one JSON object with keys top1, top5 (fractions), images and
seconds, and nothing else on stdout.

examples:
  pomq-deploy eval                                  # the embedded reference model, full Fashion-MNIST test set
  pomq-deploy eval --limit 1000 --json
  pomq-deploy eval --recipe deit_tiny --checkpoint deit_tiny.safetensors --data /data/imagenet/val
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_recipe_arguments(p)
    add_eval_arguments(p)
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..data import eval_dataset, eval_loader
    from ..evaluate import evaluate
    from ..models.loading import create_model
    from ._console import progress_iter, stdout

    recipe = recipe_from_args(args)
    model = create_model(recipe.model.arch, recipe.model.checkpoint)
    dataset = eval_dataset(recipe.data, model)
    loader = eval_loader(dataset, recipe.eval.batch_size, recipe.eval.limit, recipe.data.workers)
    with torch.inference_mode():
        result = evaluate(model, progress_iter(loader, total=len(loader), description=f"eval {recipe.name}"))
    if args.json:
        print(json.dumps({"recipe": recipe.name, "top1": result.top1, "top5": result.top5, "images": result.images,
                          "seconds": round(result.seconds, 3)}))
    else:
        stdout.print(f"{recipe.name} (FP32) on {result.images} images: top-1 {result.top1:.4f}  top-5 {result.top5:.4f}  "
                     f"{result.images_per_s:.0f} images/s ({result.seconds:.1f} s)")
    return 0
