"""pomq-deploy bench: latency of a built artifact (or of any ONNX file) on its backend."""

import argparse
from pathlib import Path

from ._common import positive_int

HELP = "time a built artifact (or an ONNX file) at a batch size"
DESCRIPTION = """\
Warm up, then time --runs inferences at --batch and print the median and p90 latency. --artifact takes a
directory written by pomq-deploy build (checked against its manifest); --onnx takes any ONNX model, e.g.
one from ONNX Runtime's own quantizer, and times it on ort-cpu with the same settings.

examples:
  pomq-deploy bench --artifact engines/deit_fmnist/<plan-id> --batch 1
  pomq-deploy bench --onnx model.onnx --batch 8 --json
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--artifact", metavar="DIR", type=Path, help="a build directory (engines/<recipe>/<plan-id>)")
    which.add_argument("--onnx", metavar="FILE", type=Path, help="an ONNX file, timed on ort-cpu")
    p.add_argument("--batch", type=positive_int, default=8, help="batch size (default 8)")
    p.add_argument("--runs", type=positive_int, default=50, help="timed runs after warm-up (default 50)")
    p.add_argument("--threads", type=positive_int, help="ort-cpu intra-op threads (with --onnx)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    import tempfile

    from ..backends import BackendError, get_backend
    from ..backends.ort_cpu import ARTIFACT_NAME
    from ..errors import PomqError
    from ..measure import measure
    from ._common import open_artifact
    from ._console import emit

    if args.artifact is not None:
        built, backend = open_artifact(args.artifact)
        stats = backend.latency(built.runnable, args.batch, args.runs)
        what = str(built.directory)
    else:
        if not args.onnx.is_file():
            raise PomqError(f"{args.onnx}: no such ONNX file")
        backend = get_backend("ort-cpu", threads=args.threads)
        with tempfile.TemporaryDirectory() as tmp:
            try:
                stats = measure(backend, Path(tmp), onnx_path=args.onnx, batches=(args.batch,), runs=args.runs).latency[args.batch]
            except BackendError as e:  # name the user's file, not the optimised copy in a folder that is gone
                raise BackendError(str(e).replace(str(Path(tmp) / ARTIFACT_NAME), f"{args.onnx} (optimised)")) from None
        what = str(args.onnx)
    out = {"what": what, "backend": backend.name, "batch": stats.batch, "runs": stats.runs,
           "median_ms": round(stats.median_ms, 4), "p90_ms": round(stats.p90_ms, 4)}
    emit(args.json, out, f"{what} on {backend.name}, batch {stats.batch}: median {stats.median_ms:.3f} ms, "
                         f"p90 {stats.p90_ms:.3f} ms ({stats.runs} runs)")
    return 0
