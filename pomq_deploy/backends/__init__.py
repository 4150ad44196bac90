"""Backends: build an ONNX model into something that runs, run it, and time it.

One small protocol; each backend lives in its own module and is imported only when asked for by name, so
a CPU-only install never imports TensorRT or CUDA.
"""

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..errors import PomqError

# name -> "module:class"
BACKENDS = {
    "ort-cpu": "pomq_deploy.backends.ort_cpu:OrtCpuBackend",
    "tensorrt": "pomq_deploy.backends.tensorrt:TensorRTBackend",
}
# which ONNX export target each backend runs best
DEFAULT_TARGET = {"ort-cpu": "ort", "tensorrt": "tensorrt"}


class BackendError(PomqError):
    """A backend is not installed here, or cannot build or load a model."""


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

    def latency(self, artifact: Artifact, batch: int, runs: int = 50) -> LatencyStats: ...

    def options(self) -> dict[str, Any]: ...


def get_backend(name: str, **options: Any) -> Backend:
    """The backend called ``name``, imported now; a missing library is a BackendError naming the fix."""
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; allowed: {', '.join(BACKENDS)}")
    module, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)(**options)
