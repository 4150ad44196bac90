"""pomq-deploy profile: where an artifact's inference time goes, per operator and node or per CUDA kernel."""

import argparse
import sys
from pathlib import Path

from ._common import positive_int

WARMUP = 10  # warm-up runs before the timed ones, as ort-cpu's bench does
SUMMARY = "summary.json"
ORT_TRACE = "ort_profile.json"
NSYS_BASE = "trt"  # nsys writes trt.nsys-rep (and trt.sqlite when summarised)
NSYS_CSV = "nsys_kern_sum.csv"

HELP = "profile a built artifact: time per operator and node (ort-cpu), per CUDA kernel (tensorrt, --nsys)"
DESCRIPTION = f"""\
ort-cpu artifacts: run {WARMUP} warm-up and --runs timed inferences at --batch in one session with ONNX
Runtime's profiler on, then print the kernel time per operator type (total, share of all node time,
calls, ms per run) and the --top slowest nodes. Only the timed runs count: the warm-up runs are in the
trace (the profiler starts with its session) and are dropped by run index. Times are measured under the
profiler, which adds its own overhead per node; bench gives the latency.

tensorrt artifacts need --nsys and NVIDIA Nsight Systems' nsys on PATH: the bench loop (warm-up and
timed runs) runs in a child process under `nsys profile --trace=cuda,nvtx`, and
`nsys stats --report cuda_gpu_kern_sum` gives the --top kernels by total GPU time over that whole process
(engine loading and warm-up included; the tensorrt backend's NVTX ranges, named by plan-id, separate them
in the timeline). Without --nsys a tensorrt artifact is refused: use bench for its latency.

Raw output and a summary go to <artifact>/profile/ (or --out DIR): ort_profile.json (Chrome trace, opens
in chrome://tracing or Perfetto) or trt.nsys-rep and nsys_kern_sum.csv, and summary.json. The artifact's
own files are not touched, so it still loads and verifies. --json prints the summary instead of tables.

examples:
  pomq-deploy profile --artifact engines/deit_fmnist/<plan-id>
  pomq-deploy profile --artifact engines/deit_fmnist/<plan-id> --batch 1 --runs 100 --top 20 --json
  pomq-deploy profile --artifact engines/deit_fmnist/<plan-id> --nsys     # a tensorrt build
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--artifact", metavar="DIR", type=Path, required=True, help="a build directory (engines/<recipe>/<plan-id>)")
    p.add_argument("--nsys", action="store_true", help="profile a tensorrt artifact under Nsight Systems (nsys on PATH)")
    p.add_argument("--out", metavar="DIR", type=Path, help="where the trace and summary go (default: <artifact>/profile)")
    p.add_argument("--batch", type=positive_int, default=8, help="batch size (default 8)")
    p.add_argument("--runs", type=positive_int, default=50, help="timed runs after warm-up (default 50)")
    p.add_argument("--top", metavar="K", type=positive_int, default=15, help="nodes or kernels listed (default 15)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")


def bench_child_command(directory: Path, batch: int, runs: int) -> list[str]:
    """The timed loop nsys profiles: this package's own bench, in this interpreter."""
    return [sys.executable, "-m", "pomq_deploy", "bench", "--artifact", str(directory), "--batch", str(batch), "--runs", str(runs)]


def find_nsys() -> str:
    import shutil

    from ..profiling import ProfileError

    nsys = shutil.which("nsys")
    if nsys is None:
        raise ProfileError("nsys is not on PATH: install NVIDIA Nsight Systems (it ships with the CUDA toolkit, or from "
                           "https://developer.nvidia.com/nsight-systems) and put the directory holding nsys on PATH")
    return nsys


def run(args: argparse.Namespace) -> int:
    from ..artifact import load_artifact
    from ..errors import PomqError
    from ._common import artifact_backend

    built = load_artifact(args.artifact)
    backend = built.manifest.backend.name
    out_dir = args.out if args.out is not None else built.directory / "profile"
    if backend == "ort-cpu":
        if args.nsys:
            raise PomqError("--nsys profiles tensorrt artifacts; this one is ort-cpu, profiled by ONNX Runtime itself: drop --nsys")
        return _profile_ort(built, artifact_backend(built), out_dir, args)
    if backend == "tensorrt":
        if not args.nsys:
            raise PomqError("profiling a tensorrt artifact needs --nsys (NVIDIA Nsight Systems); for its latency, use pomq-deploy bench")
        return _profile_nsys(built, out_dir, find_nsys(), args)
    raise PomqError(f"{built.directory}: no profiler for backend {backend!r}")


def _head(built, backend: str, args: argparse.Namespace, out_dir: Path) -> dict:
    return {"artifact": str(built.directory), "plan_id": built.manifest.plan_id, "backend": backend,
            "batch": args.batch, "out": str(out_dir)}


def _profile_ort(built, backend, out_dir: Path, args: argparse.Namespace) -> int:
    import json
    import os

    from ..artifact import write_json_atomic
    from ..profiling.ort_trace import summarize

    out_dir.mkdir(parents=True, exist_ok=True)
    # ORT writes <prefix>_<time>.json itself, whole, at end_profiling; renaming it gives the stable name atomically
    raw = backend.profile(built.runnable, args.batch, args.runs, out_dir / f".{Path(ORT_TRACE).stem}", WARMUP)
    trace = out_dir / ORT_TRACE
    os.replace(raw, trace)
    profile = summarize(json.loads(trace.read_text()), WARMUP)
    summary = {**_head(built, "ort-cpu", args, out_dir), "trace": str(trace), **profile.to_json(args.top)}
    write_json_atomic(summary, out_dir / SUMMARY)
    if args.json:
        print(json.dumps(summary))
    else:
        _print_ort(profile, summary, args.top)
    return 0


def _print_ort(profile, summary: dict, top: int) -> None:
    from rich.table import Table

    from ._console import stdout

    ops = Table(title=f"time per operator type: {profile.runs} timed runs at batch {summary['batch']} "
                      f"({profile.warmup} warm-up runs dropped)")
    for col in ("op type", "total ms", "% node time", "calls", "ms per run"):
        ops.add_column(col, justify="left" if col == "op type" else "right")
    for t in profile.ops:
        ops.add_row(t.name, f"{t.total_us / 1e3:.2f}", f"{100 * profile.share(t):.1f}", str(t.calls), f"{profile.ms_per_run(t):.3f}")
    ops.add_section()
    ops.add_row("all nodes", f"{profile.node_us / 1e3:.2f}", "100.0", str(sum(t.calls for t in profile.ops)),
                f"{summary['node_ms_per_run']:.3f}")
    nodes = Table(title=f"top {min(top, len(profile.nodes))} nodes (median us: per call, untouched by a rare preempted call)")
    nodes.add_column("node", overflow="fold")  # node and kernel names are never cut short, even in a narrow pipe
    for col in ("op type", "total ms", "% node time", "ms per run", "median us"):
        nodes.add_column(col, justify="left" if col == "op type" else "right")
    for t in profile.nodes[:top]:
        nodes.add_row(t.name, t.op_type, f"{t.total_us / 1e3:.2f}", f"{100 * profile.share(t):.1f}", f"{profile.ms_per_run(t):.3f}",
                      f"{t.median_us:.0f}")
    stdout.print(ops)
    stdout.print(nodes)
    stdout.print(f"model_run {summary['run_ms_per_run']:.3f} ms per run under the profiler, of which node kernels "
                 f"{summary['node_ms_per_run']:.3f} ms; trace {summary['trace']}")


def _run_tool(command: list[str], what: str):
    import subprocess

    from ..profiling import ProfileError

    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        raise ProfileError(f"{what} failed (exit {done.returncode}): {lines[-1] if lines else 'no output'}")
    return done


def _profile_nsys(built, out_dir: Path, nsys: str, args: argparse.Namespace) -> int:
    import json

    from ..artifact import write_json_atomic
    from ..atomic import write_text
    from ..profiling.nsys import parse_kern_sum, profile_command, report_path, stats_command

    out_dir.mkdir(parents=True, exist_ok=True)
    base = out_dir / NSYS_BASE
    _run_tool(profile_command(nsys, base, bench_child_command(built.directory, args.batch, args.runs)), "nsys profile")
    csv_text = _run_tool(stats_command(nsys, report_path(base)), "nsys stats").stdout
    write_text(out_dir / NSYS_CSV, csv_text)
    kernels = parse_kern_sum(csv_text)
    summary = {**_head(built, "tensorrt", args, out_dir), "runs": args.runs,
               "report": str(report_path(base)), "kernels_csv": str(out_dir / NSYS_CSV),
               "total_kernel_ms": round(sum(k.total_ns for k in kernels) / 1e6, 3),
               "top_kernels": [{"name": k.name, "percent": k.percent, "total_ms": round(k.total_ns / 1e6, 4),
                                "instances": k.instances, "avg_us": round(k.avg_ns / 1e3, 3)} for k in kernels[: args.top]]}
    write_json_atomic(summary, out_dir / SUMMARY)
    if args.json:
        print(json.dumps(summary))
    else:
        _print_kernels(summary)
    return 0


def _print_kernels(summary: dict) -> None:
    from rich.table import Table

    from ._console import stdout

    table = Table(title=f"top {len(summary['top_kernels'])} CUDA kernels over the whole bench process "
                        f"(engine load, warm-up and {summary['runs']} timed runs at batch {summary['batch']})")
    table.add_column("kernel", overflow="fold")
    for col in ("% kernel time", "total ms", "instances", "avg us"):
        table.add_column(col, justify="right")
    for k in summary["top_kernels"]:
        table.add_row(k["name"], f"{k['percent']:.1f}", f"{k['total_ms']:.3f}", str(k["instances"]), f"{k['avg_us']:.1f}")
    stdout.print(table)
    stdout.print(f"all kernels {summary['total_kernel_ms']:.3f} ms; report {summary['report']}")
