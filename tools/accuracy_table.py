"""Regenerate docs/accuracy.md: top-1 of the reference model, FP32 and quantized, on the full test set.

For each scheme it calibrates from scratch (timed), then materialises the cached calibration again
(timed: a plan must need no new calibration pass), and evaluates the uniform and mixed plans.

    python tools/accuracy_table.py                      # full 10,000-image test set, writes docs/accuracy.md
    python tools/accuracy_table.py --limit 1000 --out /tmp/acc.md
"""

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pomq_deploy.data import eval_dataset, eval_loader  # noqa: E402
from pomq_deploy.evaluate import evaluate  # noqa: E402
from pomq_deploy.models.loading import create_model  # noqa: E402
from pomq_deploy.plan import BlockBits, Plan, uniform_plan  # noqa: E402
from pomq_deploy.quant.calibration import calibrated_model  # noqa: E402
from pomq_deploy.recipe import load_recipe  # noqa: E402

PAPER = [4, 4, 8, 8, 8, 8, 8, 8, 8, 8, 4, 4]  # PoMQ-ViT's plan: blocks 1-2 and 11-12 at 4 bits


def mixed_plans(recipe: str, scheme: str, n: int) -> dict[str, Plan]:
    def plan(rows):
        return Plan(model=recipe, scheme=scheme, blocks=tuple(BlockBits(w=w, a=a, attn=t) for w, a, t in rows))

    return {
        "paper: blocks 1-2, 11-12 all 4-bit": plan([(b, b, b) for b in PAPER]),
        "4-bit weights in blocks 3-10, 8/8/8 elsewhere": plan([(4 if 2 <= i < 10 else 8, 8, 8) for i in range(n)]),
        "4-bit weights and attention, 8-bit activations": plan([(4, 8, 4)] * n),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="deit_fmnist")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N test images")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "accuracy.md")
    args = p.parse_args()
    recipe = load_recipe(args.recipe)
    rows: list[tuple[str, str, str, float, float]] = []

    def run(model, label, scheme, plan_text):
        loader = eval_loader(eval_dataset(recipe.data, model), recipe.eval.batch_size, args.limit)
        res = evaluate(model, loader)
        rows.append((scheme, plan_text, label, res.top1, res.top5))
        print(f"{scheme:7s} {plan_text:9s} {label:48s} top-1 {res.top1:.4f}  ({res.seconds:.0f} s)", file=sys.stderr, flush=True)
        return res

    fp = create_model(recipe.model.arch, recipe.model.checkpoint)
    fp_res = run(fp, "FP32", "-", "-")
    timings = []
    for scheme in ("minmax", "fqvit", "tsptq"):
        model, info = calibrated_model(recipe, scheme, force=True)
        t0 = time.perf_counter()
        model, cached = calibrated_model(recipe, scheme)
        model.apply(uniform_plan("8/8/8", model.num_blocks, recipe.name, scheme))
        materialise = time.perf_counter() - t0
        assert cached.cached
        timings.append((scheme, info.seconds, materialise))
        uniforms = {"minmax": ["8/8/8", "4/4/4"], "fqvit": ["8/8/8", "8/8/4", "4/4/4"], "tsptq": ["8/8/8", "8/8/4", "4/4/4"]}
        for u in uniforms[scheme]:
            model.apply(uniform_plan(u, model.num_blocks, recipe.name, scheme))
            run(model, f"uniform {u}", scheme, u)
        if scheme != "minmax":
            for label, plan in mixed_plans(recipe.name, scheme, model.num_blocks).items():
                model.apply(plan)
                run(model, label, scheme, plan.plan_id)

    n = args.limit or len(eval_dataset(recipe.data, fp))
    lines = [
        "# Accuracy of the reference model under quantization",
        "",
        f"Recipe `{recipe.name}` (`{recipe.model.arch}`), Fashion-MNIST test set, first {n} images; "
        f"calibration: {recipe.data.calib_images} training images in batches of {recipe.data.calib_batch}, seed "
        f"{recipe.data.seed}, min/max observer; PyTorch fake-quant model (`--target ort`: uint8 asymmetric activations, "
        "int8/int4 symmetric per-channel weights).",
        "",
        "Regenerate with:",
        "",
        "```bash",
        "python tools/accuracy_table.py" + (f" --recipe {args.recipe}" if args.recipe != "deit_fmnist" else "")
        + (f" --limit {args.limit}" if args.limit else ""),
        "```",
        "",
        "| scheme | plan | what | top-1 | top-5 | Δ top-1 vs FP32 (points) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for scheme, plan_text, label, top1, top5 in rows:
        delta = "" if scheme == "-" else f"{100 * (top1 - fp_res.top1):+.2f}"
        lines.append(f"| {scheme} | {plan_text} | {label} | {top1:.4f} | {top5:.4f} | {delta} |")
    lines += ["", "Mixed plans are named by plan-id; their widths are in the 'what' column.", "",
              "## Calibration time (this machine, one process)", "",
              "| scheme | full calibration (s) | plan from the cache (s) |", "| --- | --- | --- |"]
    lines += [f"| {s} | {c:.1f} | {m:.2f} |" for s, c, m in timings]
    lines += ["", f"Measured with torch {torch.__version__}, {torch.get_num_threads()} threads, "
              f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs.", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text("\n".join(lines))
    os.replace(tmp, args.out)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
