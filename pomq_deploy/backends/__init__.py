"""Backends: build an ONNX model into something that runs, run it, and time it.

One small protocol; each backend lives in its own module and is imported only when asked for by name, so
a CPU-only install never imports TensorRT or CUDA.
"""

import argparse
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..errors import PomqError
from .args import OrtCpuArgs, TensorRTArgs, given


class BackendError(PomqError):
    """A backend is not installed here, or cannot build or load a model."""


@dataclass(frozen=True)
class BackendEntry:
    """What is known of a backend without importing it: where it lives, the export target it runs best, and
    its command-line options (``args``: ``add_arguments(group)``, ``from_args(args, batch, out_root)``)."""

    name: str
    path: str  # "module:class"
    default_target: str
    args: Any


BACKENDS: dict[str, BackendEntry] = {e.name: e for e in (
    BackendEntry("ort-cpu", "pomq_deploy.backends.ort_cpu:OrtCpuBackend", "ort", OrtCpuArgs()),
    BackendEntry("tensorrt", "pomq_deploy.backends.tensorrt:TensorRTBackend", "tensorrt", TensorRTArgs()),
)}


def add_backend_arguments(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """``--backend`` and every backend's own option group; returns the general group (for ``--batch`` ...)."""
    g = p.add_argument_group("backend")
    g.add_argument("--backend", choices=list(BACKENDS), default="ort-cpu", help="default: ort-cpu")
    for entry in BACKENDS.values():
        entry.args.add_arguments(p.add_argument_group(entry.args.title))
    return g


def backend_from_args(args: argparse.Namespace, batch: int, out_root: Path) -> "Backend":
    """The chosen backend with its options from the command line; another backend's option is a usage error."""
    for entry in BACKENDS.values():
        wrong = given(entry.args, args) if entry.name != args.backend else []
        if wrong:
            raise PomqError(f"{', '.join(wrong)} {'applies' if len(wrong) == 1 else 'apply'} to --backend {entry.name} only (this run uses --backend {args.backend})")
    entry = BACKENDS[args.backend]
    return get_backend(entry.name, **entry.args.from_args(args, batch, out_root))


@dataclass(frozen=True)
class Artifact:
    """What a backend built: one file (an ORT-optimised ONNX, a TensorRT engine) and the options it needs."""

    path: Path
    backend: str
    options: dict[str, Any] = field(default_factory=dict)
    size_bytes: int = 0  # what deploys: the engine (TensorRT), the ONNX file (ONNX Runtime optimises at load)


@dataclass(frozen=True)
class LatencyStats:
    batch: int
    runs: int
    median_ms: float
    p90_ms: float

    @classmethod
    def from_times(cls, batch: int, seconds: list[float]) -> "LatencyStats":
        ms = np.asarray(seconds) * 1e3
        return cls(batch, len(ms), float(np.median(ms)), float(np.percentile(ms, 90)))


class Backend(Protocol):
    """A backend may also define ``manifest_extra(artifact, plan) -> dict``: entries that ``build`` adds to the
    artifact's manifest (the tensorrt backend's engine layer summary and trtexec line); and
    ``artifact_note(artifact) -> str | None``: raises BackendError for an artifact that cannot run correctly on
    this machine, or returns a note on how this machine differs from the one it was built on (ort-cpu: the CPU)."""

    name: str

    def build(self, onnx_path: Path, out_dir: Path) -> Artifact: ...

    def run(self, artifact: Artifact, images: np.ndarray) -> np.ndarray: ...

    def latency(self, artifact: Artifact, batch: int, runs: int = 50, warmup: int = ...) -> LatencyStats:
        """``warmup`` untimed runs, then ``runs`` timed ones (each backend has its own default warm-up)."""

    def options(self) -> dict[str, Any]: ...


def get_backend(name: str, **options: Any) -> Backend:
    """The backend called ``name``, imported now; a missing library is a BackendError naming the fix."""
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; allowed: {', '.join(BACKENDS)}")
    module, cls = BACKENDS[name].path.split(":")
    return getattr(importlib.import_module(module), cls)(**options)
