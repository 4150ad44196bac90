"""Each backend's command-line options, declared by the backend's entry (Polygraphy's pattern of one argument
group per backend), so that ``build`` and ``search`` accept and pass the same ones. Nothing here imports a
backend's runtime: ``--help`` stays fast and works where TensorRT is not installed.
"""

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


@dataclass(frozen=True)
class OrtCpuArgs:
    title = "ort-cpu backend"
    dests = ("threads",)

    def add_arguments(self, g: argparse._ArgumentGroup) -> None:
        g.add_argument("--threads", type=positive_int, help="ort-cpu intra-op threads (default: ONNX Runtime's, all cores)")

    def from_args(self, args: argparse.Namespace, batch: int, out_root: Path) -> dict[str, Any]:
        return {"threads": args.threads}


@dataclass(frozen=True)
class TensorRTArgs:
    title = "tensorrt backend (see docs/tensorrt.md)"
    dests = ("fp16", "timing_cache")

    def add_arguments(self, g: argparse._ArgumentGroup) -> None:
        g.add_argument("--fp16", action=argparse.BooleanOptionalAction, default=None,
                       help="run what the plan leaves in float (LayerNorm, Softmax, GELU, residual adds) in FP16: the ONNX is "
                       "converted with NVIDIA ModelOpt AutoCast before TensorRT parses it (default: on; --no-fp16 keeps FP32)")
        g.add_argument("--timing-cache", metavar="FILE", type=Path,
                       help="shared TensorRT timing cache (default: <output root>/.trt_timing.cache)")

    def from_args(self, args: argparse.Namespace, batch: int, out_root: Path) -> dict[str, Any]:
        """The engine's optimisation profile is built for the latency batch (``--batch``)."""
        return {"batch": batch, "fp16": args.fp16 is not False,
                "timing_cache": args.timing_cache or Path(out_root) / ".trt_timing.cache"}


def given(spec, args: argparse.Namespace) -> list[str]:
    """The options of ``spec`` set on the command line, as the user typed them."""
    return [f"--{d.replace('_', '-')}" for d in spec.dests if getattr(args, d, None) is not None]
