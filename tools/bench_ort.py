"""Latency (batch 1 and 8) and top-1 on ONNX Runtime CPU: FP32, our plans, and ORT's own quantizer.

All variants run through the same ort-cpu backend (all graph optimisations, same threads) in one process,
so the ratios compare like with like. The peer is ``onnxruntime.quantization.quantize_static`` (QDQ,
uint8 activations, int8 per-channel weights, MinMax) fed the same calibration images as our schemes. On a
CPU whose u8 x s8 GEMM saturates (no VNNI/AMX) the backend runs every integer weight as uint8 (exact); the
peer is then also run as ONNX Runtime runs it by default (u8 x s8), with its agreement against the exact
run, and our 8/8/8 plan likewise, to show what exactness costs there. The CPU heads the table.

    python tools/bench_ort.py                          # reference model (+ top-1) and deit_small (latency)
    python tools/bench_ort.py --models reference --runs 100 --out /tmp/bench.md
"""

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from timm.data import resolve_data_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import timm

from pomq_deploy.atomic import write_generated
from pomq_deploy.backends.cpu import CpuFacts, detect
from pomq_deploy.backends.ort_cpu import OrtCpuBackend
from pomq_deploy.data import calibration_batches
from pomq_deploy.measure import measure
from pomq_deploy.models.loading import load_model
from pomq_deploy.plan import BlockBits, Plan, paper_plan, uniform_plan
from pomq_deploy.progress import Phases
from pomq_deploy.quant.calibration import calibrated_model
from pomq_deploy.quant.model import QuantModel
from pomq_deploy.recipe import load_recipe
from pomq_deploy.verify import agreement, noise_images

ROUNDS = 5  # interleaved timing rounds (see bench_model)
# what the backend builds for a CPU with VNNI: INT8 weights left as ORT's default u8 x s8 GEMM operands
DEFAULT_KERNELS = CpuFacts("-", "ONNX Runtime's default u8 x s8 kernels", "x86_64", ("avx512_vnni",))

PHASES = Phases(Console(stderr=True), quiet=not sys.stderr.isatty())  # a bar per step on a terminal; the log has the rows


def ort_quantize_static(fp_onnx: Path, out: Path, batches: list[np.ndarray]) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(batches)

        def get_next(self):
            b = next(self.it, None)
            return None if b is None else {"images": b}

    quantize_static(str(fp_onnx), str(out), Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, per_channel=True)
    return out


def plans(name: str, scheme: str, n: int) -> dict[str, Plan]:
    def plan(rows):
        return Plan(recipe=name, scheme=scheme, blocks=tuple(BlockBits(w=w, a=a, attn=t) for w, a, t in rows))

    return {
        f"ours {scheme} 8/8/8": uniform_plan("8/8/8", n, name, scheme),
        f"ours {scheme} mixed: 4-bit w in blocks 3-10": plan([(4 if 2 <= i < n - 2 else 8, 8, 8) for i in range(n)]),
        f"ours {scheme} mixed: paper (blocks 1-2, 11-12 at 4/4/4)": paper_plan(n, name, scheme),
    }


def bench_model(label: str, fp: torch.nn.Module, qmodel: QuantModel, calib: list[torch.Tensor], recipe, args, work: Path):
    backend = OrtCpuBackend(threads=args.threads)
    default = OrtCpuBackend(threads=args.threads, cpu=DEFAULT_KERNELS)  # u8 x s8: saturates where VNNI is missing
    exact_here = detect().exact_u8s8
    cfg = resolve_data_config({}, model=fp)
    noise = noise_images(500, tuple(cfg["input_size"]), cfg["mean"], cfg["std"], seed=1).numpy()
    rows, checks = [], []

    built = []  # (what, runner, Measured, top-1)

    def run(what: str, runner=backend, versus=None, **source):
        """Build and evaluate one variant: ``source`` is ``model=..., plan=...`` (exported here) or ``onnx_path=...``;
        it is timed later, interleaved with the others."""
        out = work / f"{label}_{len(built)}"
        out.mkdir()
        m = measure(runner, out, target="ort", eval_recipe=recipe, phases=PHASES, **source)
        built.append((what, runner, m, m.accuracy.top1 if m.accuracy is not None else None))
        if versus is not None:  # the same model run exactly (u8 weights): does the default run agree with it?
            a = agreement(backend.run(versus.artifact, noise), runner.run(m.artifact, noise))
            checks.append((label, what, a))
            print(f"{'':12s} vs the exact run on {a.images} noise images: {a.describe()}", file=sys.stderr, flush=True)
        return m

    fp32 = run("FP32", model=fp, plan=None)
    peer = ort_quantize_static(fp32.onnx_path, work / f"{label}_ort_qdq.onnx", [b.numpy() for b in calib])
    peer_exact = run("ORT quantize_static (QDQ u8/s8 per-channel)" + ("" if exact_here else ", run exact (u8 weights)"), onnx_path=peer)
    if not exact_here:
        run("ORT quantize_static, ORT's default u8 x s8 (saturates here)", default, peer_exact, onnx_path=peer)
    for what, plan in plans(label, qmodel.scheme, qmodel.num_blocks).items():
        ours = run(what, model=qmodel, plan=plan)
        if not exact_here and plan.blocks == uniform_plan("8/8/8", qmodel.num_blocks, label, qmodel.scheme).blocks:
            run(f"{what}, u8 x s8 weights (saturates here)", default, ours, onnx_path=ours.onnx_path)
    # Interleaved timing: every variant in turn, ROUNDS times, so that a slow spell of a shared host falls on all of
    # them alike; each latency is the median over the rounds of that round's median (p90: of the rounds' p90s).
    per_round = max(1, args.runs // ROUNDS)
    stats = {(i, b): [] for i in range(len(built)) for b in (1, 8)}
    for _ in PHASES.track(range(ROUNDS), ROUNDS, f"{label}: {len(built)} variants timed at batch 1 and 8, interleaved rounds"):
        for i, (_, runner, m, _) in enumerate(built):
            for b in (1, 8):
                stats[i, b].append(runner.latency(m.artifact, b, per_round))
    for i, (what, _, m, top1) in enumerate(built):
        med = {b: float(np.median([s.median_ms for s in stats[i, b]])) for b in (1, 8)}
        p90 = float(np.median([s.p90_ms for s in stats[i, 8]]))
        rows.append((label, what, med[1], med[8], p90, top1, m.onnx_path.stat().st_size))
        print(f"{label:12s} {what:52s} b1 {med[1]:7.2f} ms  b8 {med[8]:7.2f} ms  top-1 {'-' if top1 is None else f'{top1:.4f}'}",
              file=sys.stderr, flush=True)
    return rows, checks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["reference", "deit_small"], choices=["reference", "deit_small"])
    p.add_argument("--scheme", default="fqvit")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pomq-bench-"))
    rows, checks = [], []
    cpu = detect()
    print(f"CPU: {cpu.describe()}; integer weights as {cpu.weight_format}", file=sys.stderr)
    if "reference" in args.models:
        recipe = load_recipe("deit_fmnist")
        qmodel, _ = calibrated_model(recipe, args.scheme)
        calib = calibration_batches(recipe.data, qmodel)
        r, c = bench_model("reference", load_model(recipe.model), qmodel, calib, recipe, args, work)
        rows, checks = rows + r, checks + c
    if "deit_small" in args.models:
        torch.manual_seed(0)
        fp = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
        calib = [torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(i)) for i in range(4)]
        import copy

        qmodel = QuantModel(copy.deepcopy(fp), args.scheme)
        qmodel.calibrate(calib)
        r, c = bench_model("deit_small", fp, qmodel, calib, None, args, work)
        rows, checks = rows + r, checks + c

    base = {label: (b1, b8) for label, what, b1, b8, *_ in rows if what == "FP32"}
    lines = ["# ONNX Runtime CPU benchmarks", "",
             f"ort-cpu backend, {args.threads} threads, all graph optimisations; every variant timed in turn, {ROUNDS} rounds of "
             f"{max(1, args.runs // ROUNDS)} timed runs after 10 warm-ups each (a slow spell of the shared host falls on all of them "
             "alike); latency = the median of the rounds' medians; speed-up = FP32 median / this median, measured in the same run. `reference` is the "
             "embedded Fashion-MNIST model (top-1 on the full test set through ORT); `deit_small` is timm's "
             "deit_small_patch16_224 with random weights at 224x224 (latency only), calibrated on random images. "
             "Integer kernels differ by CPU (see 'Integer formats by CPU' below), so every table names its CPU.", "",
             "Regenerate with:", "", "```bash", ".venv/bin/python tools/bench_ort.py", "```", "",
             f"## {cpu.describe()}", "",
             f"Integer weights run as {cpu.weight_format} here "
             f"({'u8 x s8 kernels, exact with VNNI/AMX' if cpu.exact_u8s8 else 'u8 x u8 kernels; u8 x s8 saturates on this CPU'}).", "",
             "| model | variant | batch 1 (ms) | speed-up b1 | batch 8 (ms) | p90 b8 (ms) | speed-up b8 | top-1 | ONNX bytes |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for label, what, b1, b8, p90, top1, size in rows:
        lines.append(f"| {label} | {what} | {b1:.2f} | {base[label][0] / b1:.2f}x | {b8:.2f} | {p90:.2f} | "
                     f"{base[label][1] / b8:.2f}x | {'-' if top1 is None else f'{top1:.4f}'} | {size:,} |")
    if checks:
        lines += ["", "ONNX Runtime's default u8 x s8 kernels against the exact run of the same model (u8 weights), "
                  "on 500 seeded uniform-noise images:", "",
                  "| model | variant | top-1 agreement | logits cosine | lowest image cosine |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {label} | {what} | {a.top1:.4f} | {a.cosine:.5f} | {a.cosine_min:.4f} |" for label, what, a in checks]
    lines += ["", f"Measured {time.strftime('%Y-%m-%d')} with onnxruntime {__import__('onnxruntime').__version__}, "
              f"torch {torch.__version__}, {cpu.model} ({platform.machine()}), {os.cpu_count()} CPUs.", ""]
    write_generated(args.out, "\n".join(lines))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
