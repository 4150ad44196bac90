"""Latency on TensorRT at batch 1 and 32: an FP16 engine of the float model against our plans (8/8/8 and the
mixed plans of tools/bench_ort.py, and the engine formats TensorRT runs per block: uniform FP8 and INT4
weight-only; `check --plan` says what each runs as), for the reference model and timm's deit_small_patch16_224 with random
weights at 224x224. Every number comes from this one run; speed-up = the FP16 engine's median / this median
at the same batch. Each (variant, batch) gets its own engine, tuned for that batch (opt shape), sharing one
timing cache. Needs an NVIDIA GPU with TensorRT; elsewhere it exits 2 with one line saying what is missing.

    python tools/bench_trt.py
    python tools/bench_trt.py --models reference --runs 500
"""

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import timm
from bench_ort import PHASES, plans

from pomq_deploy.backends import BackendError
from pomq_deploy.backends.tensorrt import machine, require_gpu_stack
from pomq_deploy.plan import uniform_plan

BATCHES = (1, 32)


def bench_model(label: str, fp: torch.nn.Module, qmodel, args, work: Path) -> list[tuple]:
    from pomq_deploy.backends.tensorrt import TensorRTBackend
    from pomq_deploy.measure import measure

    cache = work / ".trt_timing.cache"
    rows = []

    def run(what: str, plan, fp16: bool):
        """One row: an engine per batch (TensorRT's optimisation profile is built for one), the ONNX exported once."""
        stats, size, onnx_path = {}, 0, None
        for batch in PHASES.track(BATCHES, len(BATCHES), f"{label} {what}: an engine per batch, built and timed"):
            backend = TensorRTBackend(batch=batch, fp16=fp16, timing_cache=cache)
            out = work / f"{label}_{len(rows)}_b{batch}"
            out.mkdir()
            source = {"onnx_path": onnx_path} if onnx_path else {"model": fp if plan is None else qmodel, "plan": plan}
            m = measure(backend, out, target="tensorrt", batches=(batch,), runs=args.runs, **source)
            stats[batch], size, onnx_path = m.latency[batch], m.artifact.size_bytes, m.onnx_path
        rows.append((label, what, stats, size))
        print(f"{label:10s} {what:50s} " + "  ".join(f"b{b} {s.median_ms:.3f} ms" for b, s in stats.items()),
              file=sys.stderr, flush=True)

    run("FP16 engine of the float model", None, fp16=True)
    n = qmodel.num_blocks
    engine = {f"ours {qmodel.scheme} {text}": uniform_plan(text, n, label, qmodel.scheme)
              for text in ("fp8/fp8/fp8", "4/float/float")}  # FP8 (Ada, Hopper and later), W4A16
    for what, plan in (plans(label, qmodel.scheme, n) | engine).items():
        run(what, plan, fp16=True)
    return rows


def table(rows: list[tuple], here: dict, args) -> str:
    base = {label: stats for label, what, stats, _ in rows if what.startswith("FP16")}
    head = "| model | variant | " + " | ".join(f"b{b} median (ms) | b{b} p90 (ms) | speed-up b{b}" for b in BATCHES) + " | engine bytes |"
    lines = [f"TensorRT {here['tensorrt']} on {here['gpu']} (compute capability {here['compute_capability']}, CUDA "
             f"{here['cuda']}); median and p90 of {max(args.runs, 200)} CUDA-event-timed runs after warm-up"
             f"; speed-up = FP16 median / this median.", "",
             head, "|" + " --- |" * (3 + 3 * len(BATCHES))]
    for label, what, stats, size in rows:
        cells = [f"{stats[b].median_ms:.3f} | {stats[b].p90_ms:.3f} | {base[label][b].median_ms / stats[b].median_ms:.2f}x"
                 for b in BATCHES]
        lines.append(f"| {label} | {what} | " + " | ".join(cells) + f" | {size:,} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["reference", "deit_small"], choices=["reference", "deit_small"])
    p.add_argument("--scheme", default="fqvit")
    p.add_argument("--runs", type=int, default=200, help="timed runs per measurement (at least 200 are timed)")
    args = p.parse_args()
    try:
        require_gpu_stack()
        rows = run(args)
        here = machine()
    except BackendError as e:
        print(f"bench_trt: error: {e}", file=sys.stderr)
        return 2
    print(table(rows, here, args))
    return 0


def run(args) -> list[tuple]:
    from pomq_deploy.models.loading import load_model
    from pomq_deploy.quant.calibration import calibrated_model
    from pomq_deploy.quant.model import QuantModel
    from pomq_deploy.recipe import load_recipe

    work = Path(tempfile.mkdtemp(prefix="pomq-bench-trt-"))
    rows = []
    if "reference" in args.models:
        recipe = load_recipe("deit_fmnist")
        qmodel, _ = calibrated_model(recipe, args.scheme)
        rows += bench_model("reference", load_model(recipe.model), qmodel, args, work)
    if "deit_small" in args.models:
        torch.manual_seed(0)
        fp = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
        qmodel = QuantModel(copy.deepcopy(fp), args.scheme)
        qmodel.calibrate([torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(i)) for i in range(4)])
        rows += bench_model("deit_small", fp, qmodel, args, work)
    return rows


if __name__ == "__main__":
    sys.exit(main())
