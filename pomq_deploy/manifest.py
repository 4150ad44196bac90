"""The manifest of a build (``manifest.json``), typed like recipes and plans and parsed with the same schema.

What a backend records about its own artifact (``backend.options``: the CPU and integer formats of ort-cpu,
TensorRT's settings and machine) stays a mapping the backend owns; everything ``build`` writes and the
commands read is a field here, so a reader fails on the key it needs with one line, not a KeyError.
"""

from typing import Any

from pydantic.dataclasses import dataclass

from ._schema import STRICT
from .plan import Plan
from .recipe import Recipe

MANIFEST_FORMAT = 1


@dataclass(frozen=True, config=STRICT)
class OnnxRecord:
    file: str
    bytes: int
    weight_bytes: int
    initializer_bytes: dict[str, int]
    weights_int8: int
    weights_int4: int
    ops: dict[str, int]
    weights_fp8: int = 0  # absent in manifests written before FP8 blocks existed


@dataclass(frozen=True, config=STRICT)
class ArtifactRecord:
    file: str
    file_bytes: int
    size_bytes: int  # what deploys: the engine (TensorRT), the ONNX file (ONNX Runtime optimises at load)


@dataclass(frozen=True, config=STRICT)
class BackendRecord:
    name: str
    options: dict[str, Any]  # the backend's own record, read back by the backend that runs the artifact


@dataclass(frozen=True, config=STRICT)
class LatencyRecord:
    batch: int
    runs: int
    median_ms: float
    p90_ms: float


@dataclass(frozen=True, config=STRICT)
class AccuracyRecord:
    top1: float
    top5: float
    images: int


@dataclass(frozen=True, config=STRICT)
class FileRecord:
    bytes: int
    sha256: str


@dataclass(frozen=True, config=STRICT)
class Manifest:
    format: int
    tool: str
    created: str
    recipe: str
    arch: str
    recipe_spec: Recipe  # paths as resolved at build time
    plan: Plan | None  # None: the FP32 model
    plan_id: str
    scheme: str | None
    observer: str | None
    target: str  # "ort", "tensorrt", or "fp32"
    onnx: OnnxRecord
    artifact: ArtifactRecord
    backend: BackendRecord
    latency: LatencyRecord
    accuracy: AccuracyRecord
    emulated: list[str]  # plan settings the backend runs without their width's speed-up
    verify: dict[str, Any]  # pomq_deploy.verify's record, or {"skipped": ...}
    versions: dict[str, str]
    files: dict[str, FileRecord]
    manifest_sha256: str
    tensorrt: dict[str, Any] | None = None  # the tensorrt backend's trtexec line and engine layer summary
    latency_vs_fp32: dict[str, Any] | None = None  # build --vs-fp32: pomq_deploy.timing.Ratio, timed interleaved
    rounding: str | None = None  # the plan's rounding (quant.roundings); None: FP32, or built before roundings existed
