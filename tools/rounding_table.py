"""Write docs/roundings.md: top-1 of the reference model under each scheme and rounding, and each rounding's
fitting time (every block setting of the model, the `ort` target's activation format), on this machine.

Each (scheme, rounding) is fitted from scratch (the fit cache is bypassed with a fresh cache folder, the
calibration too), then every plan is evaluated as the PyTorch fake-quant model on the test split.

    python tools/rounding_table.py                                   # repq and fqvit, every rounding, full test set
    python tools/rounding_table.py --schemes repq --roundings nearest gptq --limit 1000 --out /tmp/r.md
"""

import argparse
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pomq_deploy.atomic import write_generated
from pomq_deploy.backends.cpu import detect
from pomq_deploy.data import eval_dataset, eval_loader
from pomq_deploy.evaluate import evaluate
from pomq_deploy.models.loading import load_model
from pomq_deploy.plan import paper_plan, uniform_plan
from pomq_deploy.progress import Phases
from pomq_deploy.quant.calibration import CACHE_ENV, calibrated_model
from pomq_deploy.quant.roundings import ROUNDINGS
from pomq_deploy.quant.schemes import SCHEMES
from pomq_deploy.recipe import load_recipe

PLANS = ["4/4/4", "4/8/8", "8/8/8", "paper"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="deit_fmnist")
    p.add_argument("--schemes", nargs="+", default=["repq", "fqvit"], choices=SCHEMES)
    p.add_argument("--roundings", nargs="+", default=list(ROUNDINGS), choices=ROUNDINGS)
    p.add_argument("--skip", nargs="*", default=[], metavar="SCHEME/ROUNDING", help="pairs left out, e.g. fqvit/qdrop")
    p.add_argument("--limit", type=int, help="evaluate only the first N test images")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "roundings.md")
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    recipe = load_recipe(args.recipe)
    phases = Phases(Console(stderr=True))
    os.environ[CACHE_ENV] = tempfile.mkdtemp(prefix="pomq-rounding-table-")  # every fit from scratch, timed
    rows, times = [], []
    for scheme in args.schemes:
        for rounding in args.roundings:
            if f"{scheme}/{rounding}" in args.skip:
                continue
            qmodel, _ = calibrated_model(recipe, scheme, rounding=rounding, track=phases.track)
            start = time.perf_counter()
            with phases(f"{scheme}/{rounding}: fitting every block setting"):
                qmodel.fits(rounding, "asym")
            fit_s = time.perf_counter() - start if ROUNDINGS[rounding].fitted else None
            times.append((scheme, rounding, fit_s))
            data = eval_dataset(recipe.data, qmodel)
            for name in PLANS:
                plan = paper_plan(qmodel.num_blocks, recipe.name, scheme, rounding) if name == "paper" else \
                    uniform_plan(name, qmodel.num_blocks, recipe.name, scheme, rounding)
                qmodel.apply(plan)
                with phases(f"{scheme}/{rounding} {name}: top-1"):
                    r = evaluate(qmodel, eval_loader(data, recipe.eval.batch_size, args.limit))
                rows.append((scheme, rounding, name, r.top1, r.images))
    fp32 = evaluate(load_model(recipe.model), eval_loader(data, recipe.eval.batch_size, args.limit))
    cpu = detect()
    lines = ["# Roundings: weights fitted to the calibration data", "",
             f"Recipe `{recipe.name}`, PyTorch fake-quant model in the `ort` target's format, first {rows[0][4]} test images; "
             f"FP32 top-1 {fp32.top1:.4f}. Fit settings: the recipe's `fit` section ({recipe.fit}). "
             f"CPU: {cpu.model} ({platform.machine()}: {', '.join(cpu.flags)}), {os.cpu_count()} threads.", "",
             f"Regenerate with `.venv/bin/python {shlex.join(sys.argv)}`.", "",
             "| scheme | rounding | " + " | ".join(PLANS) + " |", "| --- | --- | " + " | ".join("---" for _ in PLANS) + " |"]
    for scheme in args.schemes:
        for rounding in args.roundings:
            got = {r[2]: r[3] for r in rows if r[0] == scheme and r[1] == rounding}
            if got:
                lines.append(f"| {scheme} | {rounding} | " + " | ".join(f"{got[n]:.4f}" for n in PLANS) + " |")
    lines += ["", "'paper': blocks 1-2 and 11-12 at 4/4/4, the others at 8/8/8.", "",
              "## Fitting time (every block setting, one activation format)", "", "| scheme | rounding | seconds |",
              "| --- | --- | --- |"]
    lines += [f"| {s} | {r} | {t:.0f} |" for s, r, t in times if t is not None]
    write_generated(args.out, "\n".join(lines) + "\n")
    print(args.out.read_text())


if __name__ == "__main__":
    main()
