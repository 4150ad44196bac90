"""The fake-quant reference's two paths against FP32 PyTorch: time on the first images, top-1 on the whole split.

The *fast* path (the default of ``eval``, sensitivities and fitting) runs every GEMM in float on the dequantized
values; the *exact* path (the build's self-check, ``compare``, ``eval --exact``) runs them on integer codes and
the GELU correctly rounded. Timing: FP32 (the timm model itself), fast and exact take turns on the same batches of the first
``--time-images`` test images, ``--rounds`` rounds, median per variant: a slow spell of the host falls on all of
them alike, and the ratios are taken within the run. Top-1: each path once over the first ``--limit`` images,
with the number of images whose top-1 class the two paths give differently. The CPU heads the output.

    python tools/bench_paths.py                                   # fqvit, repq, tsptq at 8/8/8 and 4/4/4
    python tools/bench_paths.py --schemes fqvit --plans 8/8/8 --limit 1000
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pomq_deploy.backends.cpu import detect
from pomq_deploy.data import eval_dataset, eval_loader
from pomq_deploy.models.loading import load_model
from pomq_deploy.plan import uniform_plan
from pomq_deploy.quant.calibration import calibrated_model
from pomq_deploy.quant.schemes import SCHEMES
from pomq_deploy.recipe import load_recipe


def timed(run, batches) -> float:
    start = time.perf_counter()
    for x in batches:
        run(x)
    return time.perf_counter() - start


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="deit_fmnist")
    p.add_argument("--schemes", nargs="+", default=["fqvit", "repq", "tsptq"], choices=SCHEMES)
    p.add_argument("--plans", nargs="+", default=["8/8/8", "4/4/4"])
    p.add_argument("--limit", type=int, default=10000, help="images the top-1 columns cover (default 10000)")
    p.add_argument("--time-images", type=int, default=1000, help="images each timed pass covers (default 1000)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (default 3)")
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    recipe = load_recipe(args.recipe)
    fp = load_model(recipe.model)  # FP32 as `eval` runs it: the timm model itself
    print(f"CPU: {detect().describe()}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"time on the first {args.time_images} test images ({args.rounds} interleaved rounds, median), top-1 on the "
          f"first {args.limit}\n")
    print("| scheme | plan | FP32 s | fast s | exact s | fast / FP32 | exact / FP32 | top-1 fast | top-1 exact | classes differing |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for scheme in args.schemes:
        qm, _ = calibrated_model(recipe, scheme)
        loader = eval_loader(eval_dataset(recipe.data, qm), recipe.eval.batch_size, args.limit)
        for plan in args.plans:
            qm.apply(uniform_plan(plan, qm.num_blocks, recipe.name, scheme))
            times = {"fp32": [], "fast": [], "exact": []}
            with torch.inference_mode():
                few = [x for x, _ in eval_loader(eval_dataset(recipe.data, qm), recipe.eval.batch_size, args.time_images)]
                qm(few[0])  # warm-up: weight codes and caches
                fp(few[0])
                for _ in range(args.rounds):
                    times["fp32"].append(timed(fp, few))
                    times["fast"].append(timed(qm, few))
                    with qm.exact_path():
                        times["exact"].append(timed(qm, few))
                hits = {"fast": 0, "exact": 0}
                differ = n = 0
                for x, labels in loader:
                    fast = qm(x).argmax(1)
                    with qm.exact_path():
                        exact = qm(x).argmax(1)
                    hits["fast"] += int((fast == labels).sum())
                    hits["exact"] += int((exact == labels).sum())
                    differ += int((fast != exact).sum())
                    n += len(labels)
            med = {k: statistics.median(v) for k, v in times.items()}
            print(f"| {scheme} | {plan} | {med['fp32']:.2f} | {med['fast']:.2f} | {med['exact']:.2f} | "
                  f"{med['fast'] / med['fp32']:.2f}x | {med['exact'] / med['fp32']:.2f}x | {hits['fast'] / n:.4f} | "
                  f"{hits['exact'] / n:.4f} | {differ} of {n} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
