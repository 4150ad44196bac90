"""Regenerate docs/accuracy.md: top-1 of the reference model, FP32 and quantized, and ONNX Runtime parity.

For each scheme it calibrates from scratch (timed), materialises the cached calibration again (timed: a
plan must need no new calibration pass), and evaluates the uniform and mixed plans twice on the same
images: as the PyTorch fake-quant model, and as the exported Q/DQ ONNX (target ort) run by the ort-cpu
backend. Parity columns: the fraction of images whose top-1 prediction agrees, the cosine of the logits
(all images' logits as one vector), the top-1 difference, and the same agreement on 500 seeded noise images
(uniform pixels, which drive activations to the ends of their ranges, where a saturating integer GEMM shows).

    python tools/accuracy_table.py                      # full 10,000-image test set, writes docs/accuracy.md
    python tools/accuracy_table.py --limit 1000 --out /tmp/acc.md
"""

import argparse
import copy
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from timm.data import resolve_data_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pomq_deploy.atomic import write_generated
from pomq_deploy.backends.cpu import detect
from pomq_deploy.backends.ort_cpu import OrtCpuBackend
from pomq_deploy.data import eval_dataset, eval_loader
from pomq_deploy.evaluate import topk_correct
from pomq_deploy.measure import measure
from pomq_deploy.models.loading import load_model
from pomq_deploy.plan import BlockBits, Plan, paper_plan, uniform_plan
from pomq_deploy.progress import Phases
from pomq_deploy.quant.calibration import calibrated_model
from pomq_deploy.quant.model import exactly
from pomq_deploy.quant.schemes import SCHEMES
from pomq_deploy.recipe import load_recipe
from pomq_deploy.verify import agreement, noise_images

UNIFORM = {"minmax": ["8/8/8", "4/4/4"]}  # the uniform plans of a scheme, default DEFAULT_UNIFORM
DEFAULT_UNIFORM = ["8/8/8", "8/8/4", "4/4/4", "fp8/fp8/fp8"]
MIXED = {"minmax": 0, "fqvit": 3}  # how many of the mixed plans a scheme is evaluated on, default 1 (the paper's)
PARITY_NOTE = ("Every GEMM of a plan runs on integer codes in both (PyTorch: `integer_linear`, `integer_product` and the "
               "attention's two MatMuls; ORT: its integer kernels, and two MatMulIntegers for a V-2SF input), except "
               "`probs @ v` on log-domain codes (LIS's log2 in FQ-ViT, log-sqrt(2) in RepQ-ViT, at 4-bit attention). What "
               "remains are float GELU (the reference's correctly rounded, ORT's float32 kernel), LayerNorm, Softmax and the "
               "log-domain ops: with 4-bit activations a last-bit difference there that lands on a "
               "rounding boundary moves a code by a whole step and spreads through the following blocks. 'FP64 agree' "
               "shows that PyTorch's own float64 run of such a plan departs from its float32 run more often than ONNX "
               "Runtime does; see docs/quantization.md, 'In the exported ONNX'.")


def _without_out(argv: list[str]) -> list[str]:
    """The command line as run, less ``--out``: the regeneration command the document shows."""
    out = []
    skip = False
    for a in argv:
        if skip:
            skip = False
        elif a == "--out":
            skip = True
        elif not a.startswith("--out="):
            out.append(a)
    return out


def mixed_plans(recipe: str, scheme: str, n: int) -> dict[str, Plan]:
    def plan(rows):
        return Plan(recipe=recipe, scheme=scheme, blocks=tuple(BlockBits(w=w, a=a, attn=t) for w, a, t in rows))

    return {
        "paper: blocks 1-2, 11-12 all 4-bit": paper_plan(n, recipe, scheme),
        "4-bit weights in blocks 3-10, 8/8/8 elsewhere": plan([(4 if 2 <= i < 10 else 8, 8, 8) for i in range(n)]),
        "4-bit weights and attention, 8-bit activations": plan([(4, 8, 4)] * n),
    }


def fp8_plan(recipe: str, scheme: str, n: int) -> tuple[str, Plan]:
    """FP8 per block: the paper's 4-bit blocks (1-2, 11-12) in FP8 instead, 8/8/8 elsewhere."""
    rows = [("fp8",) * 3 if i < 2 or i >= n - 2 else (8, 8, 8) for i in range(n)]
    return "FP8 in blocks 1-2, 11-12, 8/8/8 elsewhere", Plan(recipe=recipe, scheme=scheme, blocks=tuple(
        BlockBits(w=w, a=a, attn=t) for w, a, t in rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="deit_fmnist")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N test images")
    p.add_argument("--floor-images", type=int, default=2000,
                   help="images the float64 run (the 'FP64 agree' column) covers, from the first (default 2000: it is 3x slower)")
    p.add_argument("--schemes", nargs="+", default=["minmax", *(s for s in SCHEMES if s != "minmax")], choices=SCHEMES)
    p.add_argument("--only", nargs="+", metavar="ROW", help="only the rows whose plan or label starts with one of these "
                   "(e.g. 8/8/8 paper '4-bit weights in'); the FP32 row always runs")
    p.add_argument("--noise-images", type=int, default=500, help="seeded uniform-noise images for the 'noise' columns (default 500)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "accuracy.md")
    args = p.parse_args()
    recipe = load_recipe(args.recipe)
    backend = OrtCpuBackend()
    cpu = detect()
    print(f"CPU: {cpu.describe()}; ort-cpu integer weights as {cpu.weight_format}", file=sys.stderr)
    work = Path(tempfile.mkdtemp(prefix="pomq-acc-"))
    rows: list[tuple] = []
    phases = Phases(Console(stderr=True), quiet=not sys.stderr.isatty())  # a bar per plan on a terminal; the log has the rows

    def run(model, label, scheme, plan_text, plan=None):
        """Fake-quant (or FP32 PyTorch) and ONNX Runtime on the same batches."""
        out = work / f"{len(rows)}"
        m = measure(backend, out, model=model, plan=plan, target="ort")  # export and build; the parity loop below runs it
        info, art = m.onnx, m.artifact
        loader = eval_loader(eval_dataset(recipe.data, model), recipe.eval.batch_size, args.limit)
        model64 = copy.deepcopy(model).double()  # the same fake-quant model with float64 arithmetic
        n = t1 = t5 = o1 = n64 = 0
        ref_all, ort_all, ref64, out64 = [], [], [], []
        start = time.perf_counter()
        with torch.inference_mode(), exactly(model), exactly(model64):  # the reference ORT is judged against
            for images, labels in phases.track(loader, len(loader), f"{scheme} {plan_text} {label}: fake-quant and ORT"):
                logits = model(images)
                ort_logits = torch.from_numpy(backend.run(art, images.numpy()))
                ref_all.append(logits.numpy())
                ort_all.append(ort_logits.numpy())
                t1 += topk_correct(logits, labels, 1)
                t5 += topk_correct(logits, labels, 5)
                o1 += topk_correct(ort_logits, labels, 1)
                if n64 < args.floor_images:
                    k = min(len(labels), args.floor_images - n64)
                    ref64.append(logits[:k].numpy())
                    out64.append(model64(images[:k].double()).numpy())
                    n64 += k
                n += len(labels)
            noise_ref, noise_ort = model(noise).numpy(), backend.run(art, noise.numpy())
            noise64 = model64(noise.double()).numpy()
        test, rand = agreement(np.concatenate(ref_all), np.concatenate(ort_all)), agreement(noise_ref, noise_ort)
        floor, rand_floor = agreement(np.concatenate(ref64), np.concatenate(out64)), agreement(noise_ref, noise64)
        rows.append((scheme, plan_text, label, t1 / n, t5 / n, o1 / n, test, floor, rand, rand_floor, info.weight_bytes))
        print(f"{scheme:7s} {plan_text:12s} {label:48s} top-1 {t1 / n:.4f}  ORT {o1 / n:.4f}  agree {test.top1:.4f} "
              f"cos {test.cosine:.5f}  noise agree {rand.top1:.4f} cos {rand.cosine:.5f}  float64 agree {floor.top1:.4f} cos {floor.cosine:.5f}  "
              f"float64 noise agree {rand_floor.top1:.4f} cos {rand_floor.cosine:.5f} "
              f"({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
        return n

    def wanted(name: str) -> bool:
        return args.only is None or name.startswith(tuple(args.only))

    fp = load_model(recipe.model)
    cfg = resolve_data_config({}, model=fp)
    noise = noise_images(args.noise_images, tuple(cfg["input_size"]), cfg["mean"], cfg["std"], seed=1)
    n = run(fp, "FP32", "-", "-")
    fp_top1 = rows[0][3]
    timings = []
    for scheme in args.schemes:
        model, info = calibrated_model(recipe, scheme, force=True, track=phases.track)
        t0 = time.perf_counter()
        model, cached = calibrated_model(recipe, scheme)
        model.apply(uniform_plan("8/8/8", model.num_blocks, recipe.name, scheme))
        materialise = time.perf_counter() - t0
        assert cached.cached
        timings.append((scheme, info.seconds, materialise))
        for u in UNIFORM.get(scheme, DEFAULT_UNIFORM):
            if wanted(u):
                run(model, f"uniform {u}", scheme, u, uniform_plan(u, model.num_blocks, recipe.name, scheme))
        for label, plan in list(mixed_plans(recipe.name, scheme, model.num_blocks).items())[: MIXED.get(scheme, 1)]:
            if wanted(label):
                run(model, label, scheme, plan.plan_id, plan)
        label, plan = fp8_plan(recipe.name, scheme, model.num_blocks)
        if scheme != "minmax" and wanted(label):
            run(model, label, scheme, plan.plan_id, plan)

    lines = [
        "# Accuracy of the reference model under quantization",
        "",
        f"Recipe `{recipe.name}` (`{recipe.model.arch}`), Fashion-MNIST test set, first {n} images; "
        f"calibration: {recipe.data.calib_images} training images in batches of {recipe.data.calib_batch}, seed "
        f"{recipe.data.seed}, min/max observer. 'top-1' is the PyTorch fake-quant model (its exact path) in the `ort` target's "
        "format (uint8 asymmetric activations, int8/int4 symmetric per-channel weights); 'ORT top-1' is the "
        "exported Q/DQ ONNX run by ONNX Runtime (ort-cpu backend, all graph optimisations) on the same images, "
        "and 'agree' the fraction of images where both predict the same class, 'cosine' the cosine of their logits "
        f"(all images' as one vector); 'noise agree' and 'noise cosine' the same on {args.noise_images} seeded "
        "uniform-noise images, which drive activations to the ends of their ranges. 'FP64 agree' and 'FP64 cosine' are the float noise "
        f"floor of the plan: the same PyTorch fake-quant model run in float64 against float32, on the first "
        f"{min(args.floor_images, n)} of those images ('FP64 noise': on the noise images).",
        "",
        f"CPU: {cpu.describe()}; ort-cpu runs the integer weights as {cpu.weight_format} "
        f"({'u8 x s8 kernels, exact with VNNI/AMX' if cpu.exact_u8s8 else 'u8 x u8 kernels: u8 x s8 saturates on this CPU'}).",
        "",
        "Regenerate with:",
        "",
        "```bash",
        " ".join([".venv/bin/python tools/accuracy_table.py", *map(shlex.quote, _without_out(sys.argv[1:]))]),
        "```",
        "",
        "| scheme | plan | what | top-1 | top-5 | Δ top-1 vs FP32 (points) | ORT top-1 | agree | cosine | FP64 agree | "
        "FP64 cosine | ORT − PyTorch (points) | noise agree | noise cosine | FP64 noise agree | FP64 noise cosine | ONNX weight bytes |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for scheme, plan_text, label, top1, top5, ort1, test, floor, rand, rand_floor, wbytes in rows:
        delta = "" if scheme == "-" else f"{100 * (top1 - fp_top1):+.2f}"
        lines.append(f"| {scheme} | {plan_text} | {label} | {top1:.4f} | {top5:.4f} | {delta} | {ort1:.4f} | {test.top1:.4f} | "
                     f"{test.cosine:.5f} | {floor.top1:.4f} | {floor.cosine:.5f} | {100 * (ort1 - top1):+.2f} | {rand.top1:.4f} | {rand.cosine:.5f} | "
                     f"{rand_floor.top1:.4f} | {rand_floor.cosine:.5f} | {wbytes:,} |")
    lines += ["", "Mixed plans are named by plan-id; their widths are in the 'what' column. " + PARITY_NOTE, "",
              "## Calibration time (this machine, one process)", "",
              "| scheme | full calibration (s) | plan from the cache (s) |", "| --- | --- | --- |"]
    lines += [f"| {s} | {c:.1f} | {m:.2f} |" for s, c, m in timings]
    lines += ["", f"Measured with torch {torch.__version__}, {torch.get_num_threads()} threads, "
              f"{cpu.model} ({platform.machine()}), {os.cpu_count()} CPUs.", ""]
    write_generated(args.out, "\n".join(lines))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
