"""How much each scheme's top-1 moves with the calibration sample, on the reference model or an outlier twin.

For each calibration seed (which training images form the calibration batches: the recipe's ``data.seed``), each
scheme is calibrated from scratch (cached per seed) and the given uniform plans are evaluated on the first
``--limit`` test images. Prints one row per (scheme, plan): the top-1 per seed, the mean, the spread (max - min)
and the worst point below FP32. Outliers make the calibration sample matter more (FQ-ViT's own code on a
LayerNorm twin moved a point between two samples of 1,000 images); a method should be accurate and stable.

    python tools/calib_spread.py --checkpoint /tmp/twin.safetensors                  # every scheme, seeds 0-2
    python tools/calib_spread.py --schemes fqvit repq_smooth --seeds 0 1 2 3 --plans 8/8/8
    python tools/calib_spread.py --checkpoint /tmp/twin.safetensors --schemes repq_smooth --rounding gptq
"""

import argparse
import dataclasses
import json
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pomq_deploy.backends.cpu import detect
from pomq_deploy.data import eval_dataset, eval_loader
from pomq_deploy.evaluate import evaluate
from pomq_deploy.plan import uniform_plan
from pomq_deploy.quant.calibration import calibrated_model
from pomq_deploy.quant.roundings import ROUNDINGS
from pomq_deploy.quant.schemes import SCHEMES
from pomq_deploy.recipe import load_recipe


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="deit_fmnist")
    p.add_argument("--checkpoint", type=Path, help="another checkpoint of the recipe's model (an outlier twin)")
    p.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=SCHEMES)
    p.add_argument("--plans", nargs="+", default=["8/8/8", "4/8/8"], help="uniform w/a/attn plans (default 8/8/8 4/8/8)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="calibration seeds (default 0 1 2)")
    p.add_argument("--limit", type=int, default=2000, help="first N test images (default 2000)")
    p.add_argument("--rounding", default="nearest", choices=ROUNDINGS,
                   help="weight rounding (default nearest); a fitted one is fitted per seed, on that seed's images")
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    recipe = load_recipe(args.recipe)
    if args.checkpoint:
        if not args.checkpoint.is_file():
            print(f"--checkpoint {args.checkpoint}: no such file")
            return 2
        recipe = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, checkpoint=str(args.checkpoint.resolve())))
    top1: dict[tuple, list[float]] = {}
    fp32 = None
    for scheme in args.schemes:
        for seed in args.seeds:
            r = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, seed=seed))
            qm, _ = calibrated_model(r, scheme, rounding=args.rounding)
            loader = eval_loader(eval_dataset(r.data, qm), recipe.eval.batch_size, args.limit)
            if fp32 is None:
                qm.apply(None)
                fp32 = evaluate(qm, loader).top1
            for plan in args.plans:
                qm.apply(uniform_plan(plan, qm.num_blocks, r.name, scheme, args.rounding))
                top1.setdefault((scheme, plan), []).append(evaluate(qm, loader).top1)
                print(json.dumps({"scheme": scheme, "plan": plan, "seed": seed, "top1": top1[(scheme, plan)][-1]}), flush=True)
    print(f"\n{args.checkpoint or recipe.model.checkpoint}: FP32 {fp32:.4f}, first {args.limit} test images, calibration "
          f"seeds {' '.join(map(str, args.seeds))}, {args.rounding} rounding; CPU {detect().model}\n")
    print("| scheme | plan | " + " | ".join(f"seed {s}" for s in args.seeds) + " | mean | spread | worst below FP32 |")
    print("| --- | --- | " + "--- | " * len(args.seeds) + "--- | --- | --- |")
    for (scheme, plan), values in top1.items():
        print(f"| {scheme} | {plan} | " + " | ".join(f"{v:.4f}" for v in values)
              + f" | {statistics.mean(values):.4f} | {max(values) - min(values):.4f} | {fp32 - min(values):.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
