"""What a TensorRT build is asked for, the trtexec line that asks for the same, and whether an engine can
load here: pure functions (no ``tensorrt`` import), so that all of it is tested on a CPU machine.

Networks are strongly typed, the only kind TensorRT 11 builds (10.12 deprecated weak typing and its precision
flags, 11 removed them): precision comes from the ONNX itself. The Q/DQ nodes make the INT8 and INT4 parts,
and every other tensor keeps the ONNX's float type. Our export writes FP32, so ``fp16=True`` (the default)
converts the ONNX with NVIDIA ModelOpt AutoCast before parsing, so that what the plan leaves in float
(LayerNorm, Softmax, GELU, residual adds, the scale arithmetic around Q/DQ) runs in FP16; with ``fp16=False``
those parts run in FP32.
"""

import dataclasses
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_TIMING_CACHE = Path("engines/.trt_timing.cache")
MIN_MAX_BATCH = 32  # the profile covers at least batch 1..32, so bench and eval need no rebuild for usual sizes
OPTIMIZATION_LEVELS = range(0, 6)  # TensorRT's builder optimisation levels; 3 is its default


@dataclass(frozen=True)
class TrtBuildSettings:
    """One engine build: the optimisation profile over the batch dimension and the builder's settings."""

    input_name: str
    input_shape: tuple[int, ...]  # one sample, e.g. (1, 28, 28); the batch dimension is the profile's
    min_batch: int
    opt_batch: int  # the latency batch: TensorRT tunes its kernels for this shape
    max_batch: int
    fp16: bool = True  # the float parts in FP16 (an AutoCast-converted ONNX)
    optimization_level: int = 3
    workspace_mib: int | None = None  # None: TensorRT's default (all device memory)
    timing_cache: str | None = str(DEFAULT_TIMING_CACHE)  # shared by every build; None: no cache
    detailed_profiling: bool = True  # layer parameters and precisions in layers.json and in NVTX ranges

    def __post_init__(self):
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(f"the batch profile needs 1 <= min <= opt <= max, got {self.min_batch}/{self.opt_batch}/{self.max_batch}")
        if self.optimization_level not in OPTIMIZATION_LEVELS:
            raise ValueError(f"builder optimisation level {self.optimization_level}; allowed: 0 to 5")
        if self.workspace_mib is not None and self.workspace_mib <= 0:
            raise ValueError(f"workspace limit {self.workspace_mib} MiB; give a positive number or none")

    def shape(self, batch: int) -> tuple[int, ...]:
        return (batch, *self.input_shape)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"input_shape": list(self.input_shape)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrtBuildSettings":
        return cls(**(d | {"input_shape": tuple(d["input_shape"])}))


def build_settings(input_name: str, input_shape: tuple[int, ...], batch: int, *, max_batch: int | None = None,
                   fp16: bool = True, optimization_level: int = 3,
                   workspace_mib: int | None = None, timing_cache: Path | None = DEFAULT_TIMING_CACHE) -> TrtBuildSettings:
    """Settings for an engine timed at ``batch``: profile 1 / batch / max(32, batch) unless ``max_batch`` says more."""
    return TrtBuildSettings(input_name, tuple(input_shape), 1, batch, max(max_batch or MIN_MAX_BATCH, batch),
                            fp16, optimization_level, workspace_mib,
                            None if timing_cache is None else str(timing_cache))


def trtexec_command(settings: TrtBuildSettings, onnx: str = "model.onnx", engine: str = "model.engine",
                    layers: str = "layers.json") -> str:
    """The trtexec line that builds the same engine (TensorRT 10 needs --stronglyTyped; 11 accepts it as a no-op)."""
    shape = lambda b: f"{settings.input_name}:" + "x".join(str(d) for d in settings.shape(b))  # noqa: E731
    args = ["trtexec", f"--onnx={onnx}", f"--saveEngine={engine}"]
    args += ["--stronglyTyped", f"--minShapes={shape(settings.min_batch)}", f"--optShapes={shape(settings.opt_batch)}",
             f"--maxShapes={shape(settings.max_batch)}", f"--builderOptimizationLevel={settings.optimization_level}"]
    if settings.workspace_mib is not None:
        args.append(f"--memPoolSize=workspace:{settings.workspace_mib}")
    if settings.timing_cache is not None:
        args.append(f"--timingCacheFile={settings.timing_cache}")
    if settings.detailed_profiling:
        args += ["--profilingVerbosity=detailed", f"--exportLayerInfo={layers}"]
    return shlex.join(args)


def compatibility_problems(built: dict[str, Any], here: dict[str, Any]) -> list[str]:
    """Why an engine built on ``built`` cannot load on ``here`` (TensorRT version, GPU name, compute
    capability): by default a TensorRT engine runs only on the TensorRT version and the kind of GPU that
    built it. Empty: it can."""
    labels = {"tensorrt": "TensorRT", "gpu": "GPU", "compute_capability": "compute capability"}
    problems = []
    for key, label in labels.items():
        if key not in built:
            problems.append(f"the manifest does not record the {label} that built the engine")
        elif str(built[key]) != str(here.get(key)):
            problems.append(f"built with {label} {built[key]}, this machine has {here.get(key)}")
    return problems
