"""TensorRT: build a Q/DQ ONNX into a serialized engine, run it on torch CUDA tensors, time it with CUDA events.

Written to TensorRT 10's documented Python API; no TensorRT builder has been available where this was
written, so none of the calls into ``tensorrt`` has run yet (docs/tensorrt.md says what is tested).
``tensorrt`` and CUDA are touched only when the backend is constructed, which fails at once, in one
sentence, where either is missing. What can be decided without them lives in pure functions here and in
:mod:`.trt_settings` and :mod:`.trt_inspect`.

A build checks the ONNX against TensorRT's quantization rules first, parses it into a strongly typed
network, builds with a shared timing cache, writes ``model.engine`` and (DETAILED profiling) the engine's
layer information ``layers.json`` beside it. NVTX ranges name the build, warm-up and timed runs after the
artifact directory (the plan-id), so that Nsight Systems shows them by name.
"""

import logging
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import replace_atomically, write_text
from ..plan import Plan
from . import Artifact, BackendError, LatencyStats
from .trt_inspect import read_layer_info, summarise
from .trt_settings import DEFAULT_TIMING_CACHE, TrtBuildSettings, build_settings, builder_flags, compatibility_problems, trtexec_command

log = logging.getLogger(__name__)

ENGINE_NAME, LAYERS_NAME, FP16_ONNX_NAME = "model.engine", "layers.json", "model.fp16.onnx"
MIN_TIMED_RUNS = 200  # GPU latencies are tens of microseconds: fewer runs make a noisy p90
WARMUP_RUNS = 20
ENGINES_KEPT = 4
INSTALL = "pip install 'pomq-deploy[gpu]'"


def require_gpu_stack() -> None:
    """Fail in one sentence where TensorRT or a CUDA GPU is missing (before any work is done)."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        raise BackendError("the tensorrt backend needs NVIDIA's tensorrt Python package and a CUDA GPU, and tensorrt is "
                           f"not installed here: {INSTALL} on a machine with an NVIDIA GPU, or use --backend ort-cpu") from None
    import torch

    if not torch.cuda.is_available():
        raise BackendError("the tensorrt backend needs a CUDA GPU and torch sees none on this machine: run it where "
                           f"an NVIDIA GPU and its driver are, with {INSTALL}, or use --backend ort-cpu")


@dataclass(frozen=True)
class OnnxGraph:
    """What the build needs to know about the ONNX before TensorRT sees it."""

    input_name: str
    input_shape: tuple[int, ...]  # one sample
    has_qdq: bool
    has_int4: bool


def read_onnx_graph(model, path: Path) -> OnnxGraph:
    """``model`` (the ONNX loaded from ``path``, which error messages name) as the build needs it."""
    import onnx

    weights = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in weights]
    if len(inputs) != 1:
        raise BackendError(f"{path}: the tensorrt backend builds models with one input; this one has {len(inputs)}")
    dims = inputs[0].type.tensor_type.shape.dim
    if len(dims) < 2 or any(d.dim_value <= 0 for d in dims[1:]):
        raise BackendError(f"{path}: input {inputs[0].name!r} must have a fixed shape after its batch dimension")
    return OnnxGraph(inputs[0].name, tuple(d.dim_value for d in dims[1:]),
                     any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node),
                     any(t.data_type == onnx.TensorProto.INT4 for t in model.graph.initializer))


def rules_gate(findings: Iterable[Any], onnx_path: Path) -> None:
    """Stop before TensorRT on the rules checker's errors (TensorRT would fail, or silently run the layer in
    float); its warnings go to the log. Findings have ``rule``, ``node``, ``message`` and ``severity``."""
    findings = list(findings)
    warnings: dict[str, list] = {}
    for f in findings:
        if f.severity != "error":
            warnings.setdefault(f.rule, []).append(f)
    for rule, fs in warnings.items():  # one log line per rule: a ViT repeats each finding in every block
        log.warning("%s: %d %s warning(s), first at %s: %s", Path(onnx_path).name, len(fs), rule, fs[0].node, fs[0].message)
    errors = [f for f in findings if f.severity == "error"]
    if errors:
        shown = "; ".join(" ".join(f"{f.rule} at {f.node}: {f.message.rstrip('.')}".split()) for f in errors[:2])
        more = f" (and {len(errors) - 2} more)" if len(errors) > 2 else ""
        raise BackendError(f"{Path(onnx_path).name}: TensorRT's quantization rules reject this model: {shown}{more}; "
                           "pomq-deploy check lists every finding")


def artifact_label(directory: Path) -> str:
    """The plan-id an artifact directory stands for, also while it is still the build's staging directory
    (``.<plan-id>.<random>.tmp``, see :func:`pomq_deploy.artifact.staging_dir`)."""
    m = re.fullmatch(r"\.(.+)\.[^.]+\.tmp", Path(directory).name)
    return m.group(1) if m else Path(directory).name


def manifest_section(artifact: Artifact, plan: Plan | None) -> dict[str, Any]:
    """The manifest's ``tensorrt`` entry: the trtexec line that builds the same engine and the engine's layer
    summary against the plan. Version, GPU, CUDA and the settings are in ``backend.options``."""
    settings = TrtBuildSettings.from_dict(artifact.options["settings"])
    section: dict[str, Any] = {"trtexec": trtexec_command(settings, artifact.options["builder_flags"],
                                                          onnx=artifact.options["parsed_onnx"], engine=artifact.path.name,
                                                          layers=LAYERS_NAME)}
    layers = artifact.path.parent / LAYERS_NAME
    if layers.is_file():
        import onnx

        parsed = onnx.load(str(artifact.path.parent / artifact.options["parsed_onnx"]), load_external_data=False)
        section["layers"] = summarise(read_layer_info(layers), plan, [n.name for n in parsed.graph.node]).to_dict()
    return {"tensorrt": section}


def machine() -> dict[str, str]:
    """This machine, as an engine's compatibility depends on it (CUDA: the runtime torch was built with)."""
    import tensorrt as trt
    import torch

    major, minor = torch.cuda.get_device_capability()
    return {"tensorrt": trt.__version__, "gpu": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}",
            "cuda": str(torch.version.cuda)}


class TensorRTBackend:
    name = "tensorrt"

    def __init__(self, batch: int = 8, max_batch: int | None = None, fp16: bool = True, strongly_typed: bool = True,
                 optimization_level: int = 3, workspace_mib: int | None = None,
                 timing_cache: Path | None = DEFAULT_TIMING_CACHE, cuda_graph: bool | None = None):
        require_gpu_stack()
        self.batch, self.max_batch, self.fp16, self.strongly_typed = batch, max_batch, fp16, strongly_typed
        self.optimization_level, self.workspace_mib, self.timing_cache = optimization_level, workspace_mib, timing_cache
        self.cuda_graph = cuda_graph  # None: as the artifact was timed when it was built
        self._logger = _logger()
        self._engines: OrderedDict = OrderedDict()

    def options(self) -> dict[str, Any]:
        return {"batch": self.batch, "max_batch": self.max_batch, "fp16": self.fp16, "strongly_typed": self.strongly_typed,
                "optimization_level": self.optimization_level, "workspace_mib": self.workspace_mib,
                "timing_cache": None if self.timing_cache is None else str(self.timing_cache), "cuda_graph": self.cuda_graph}

    def build(self, onnx_path: Path, out_dir: Path) -> Artifact:
        from torch.cuda import nvtx

        from ..export.trt_rules import check_tensorrt, load_model

        onnx_path, out_dir = Path(onnx_path), Path(out_dir)
        model = load_model(onnx_path)  # read once: the rules check and the build settings both need it
        rules_gate(check_tensorrt(model), onnx_path)
        graph = read_onnx_graph(model, onnx_path)
        settings = build_settings(graph.input_name, graph.input_shape, self.batch, max_batch=self.max_batch,
                                  strongly_typed=self.strongly_typed, fp16=self.fp16, optimization_level=self.optimization_level,
                                  workspace_mib=self.workspace_mib, timing_cache=self.timing_cache)
        flags = builder_flags(settings, graph.has_qdq, graph.has_int4)
        parsed = onnx_path
        if settings.fp16 and settings.strongly_typed:
            parsed = out_dir / FP16_ONNX_NAME
            _autocast_fp16(onnx_path, parsed)
        with nvtx.range(f"build {artifact_label(out_dir)}"):
            serialized = _build_engine(parsed, settings, flags, self._logger)
        engine_path = out_dir / ENGINE_NAME
        replace_atomically(engine_path, lambda tmp: tmp.write_bytes(serialized))
        options = {"settings": settings.to_dict(), "builder_flags": flags, "parsed_onnx": parsed.name,
                   "built_with": machine(), "cuda_graph": bool(self.cuda_graph)}
        artifact = Artifact(engine_path, self.name, options, engine_path.stat().st_size)
        if settings.detailed_profiling:
            write_text(out_dir / LAYERS_NAME, self._loaded(artifact).layer_information())
        return artifact

    @staticmethod
    def manifest_extra(artifact: Artifact, plan: Plan | None) -> dict[str, Any]:
        return manifest_section(artifact, plan)

    def run(self, artifact: Artifact, images: np.ndarray) -> np.ndarray:
        """Logits for ``images``, in slices of at most the profile's largest batch."""
        import torch
        from torch.cuda import nvtx

        eng = self._loaded(artifact)
        step, outs = eng.settings.max_batch, []
        with nvtx.range(f"run {artifact_label(artifact.path.parent)}"):
            for i in range(0, len(images), step):
                x = torch.from_numpy(np.ascontiguousarray(images[i:i + step])).to("cuda", eng.input_dtype)
                out = eng.bind(x)
                eng.execute()
                outs.append(out.float().cpu().numpy())  # .cpu() waits for the stream
        return np.concatenate(outs)

    def latency(self, artifact: Artifact, batch: int, runs: int = 50, warmup: int = WARMUP_RUNS) -> LatencyStats:
        """Median and p90 of at least MIN_TIMED_RUNS runs, each timed by CUDA events on the stream."""
        import torch
        from torch.cuda import nvtx

        eng = self._loaded(artifact)
        s = eng.settings
        if not s.min_batch <= batch <= s.max_batch:
            raise BackendError(f"{artifact.path.parent}: batch {batch} is outside the engine's profile ({s.min_batch} to "
                               f"{s.max_batch}); rebuild it with pomq-deploy build --backend tensorrt --batch {batch}")
        runs, label = max(runs, MIN_TIMED_RUNS), f"{artifact_label(artifact.path.parent)} b{batch}"
        x = torch.randn(s.shape(batch), device="cuda", generator=torch.Generator("cuda").manual_seed(0)).to(eng.input_dtype)
        eng.bind(x)
        with nvtx.range(f"warm-up {label}"):
            for _ in range(warmup):
                eng.execute()
            torch.cuda.current_stream().synchronize()
        graph = self.cuda_graph if self.cuda_graph is not None else artifact.options.get("cuda_graph", False)
        step = _capture(eng) if graph else eng.execute
        starts, ends = ([torch.cuda.Event(enable_timing=True) for _ in range(runs)] for _ in range(2))
        with nvtx.range(f"timed {label} x{runs}{' graph' if graph else ''}"):
            for start, end in zip(starts, ends, strict=True):
                start.record()
                step()
                end.record()
            torch.cuda.current_stream().synchronize()
        return LatencyStats.from_times(batch, [start.elapsed_time(end) / 1e3 for start, end in zip(starts, ends, strict=True)])

    def _loaded(self, artifact: Artifact) -> "_Engine":
        """One deserialized engine per artifact file, reused; the few most recent are kept."""
        key = (str(artifact.path), artifact.path.stat().st_mtime_ns)
        if key not in self._engines:
            problems = compatibility_problems(artifact.options.get("built_with", {}), machine())
            if problems:
                raise BackendError(f"{artifact.path.parent}: this engine cannot run here: {'; '.join(problems)}; "
                                   "rebuild it on this machine with pomq-deploy build --backend tensorrt")
            self._engines[key] = _Engine(artifact, self._logger)
            while len(self._engines) > ENGINES_KEPT:
                self._engines.popitem(last=False)
        self._engines.move_to_end(key)
        return self._engines[key]


class _Engine:
    """A deserialized engine, one execution context, and its single input and output."""

    def __init__(self, artifact: Artifact, logger):
        import tensorrt as trt

        self.settings = TrtBuildSettings.from_dict(artifact.options["settings"])
        logger.errors.clear()
        self.runtime = trt.Runtime(logger)
        self.engine = self.runtime.deserialize_cuda_engine(artifact.path.read_bytes())
        if self.engine is None:
            raise BackendError(f"{artifact.path}: TensorRT could not deserialize this engine ({_first(logger)}); rebuild it")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        ins = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(ins) != 1 or len(outs) != 1:
            raise BackendError(f"{artifact.path}: expected one input and one output, found {ins} and {outs}")
        self.input, self.output = ins[0], outs[0]
        self.input_dtype = _torch_dtype(self.engine.get_tensor_dtype(self.input))
        self.output_dtype = _torch_dtype(self.engine.get_tensor_dtype(self.output))

    def bind(self, x):
        """Give the context ``x``'s shape and address; return the output tensor the engine will write. Both
        stay referenced here until the next bind: the context holds their raw addresses."""
        import torch

        if not self.context.set_input_shape(self.input, tuple(x.shape)):
            raise BackendError(f"TensorRT refused input shape {tuple(x.shape)} (profile batch {self.settings.min_batch} "
                               f"to {self.settings.max_batch})")
        out = torch.empty(tuple(self.context.get_tensor_shape(self.output)), dtype=self.output_dtype, device=x.device)
        self.context.set_tensor_address(self.input, x.data_ptr())
        self.context.set_tensor_address(self.output, out.data_ptr())
        self._bound = (x, out)
        return out

    def execute(self) -> None:
        """One inference on torch's current stream (CUDA graph capture swaps that stream for its own)."""
        import torch

        if not self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise BackendError("TensorRT failed to enqueue the engine (see its log above)")

    def layer_information(self) -> str:
        """IEngineInspector's JSON with the context bound at the opt batch: without concrete shapes the
        inspector leaves dynamic dimensions at -1 and prints no formats (its documented behaviour)."""
        import tensorrt as trt
        import torch

        x = torch.zeros(self.settings.shape(self.settings.opt_batch), dtype=self.input_dtype, device="cuda")
        self.bind(x)
        inspector = self.engine.create_engine_inspector()
        inspector.execution_context = self.context
        return inspector.get_engine_information(trt.LayerInformationFormat.JSON)


def _build_engine(onnx_path: Path, s: TrtBuildSettings, flags: list[str], logger) -> bytes:
    import tensorrt as trt

    logger.errors.clear()
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if s.strongly_typed else 0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [parser.get_error(i) for i in range(parser.num_errors)]
        shown = "; ".join(" ".join(f"{e.node_name() or f'node {e.node()}'} ({e.node_operator()}): {e.desc()}".split())
                          for e in errors[:2])
        raise BackendError(f"{onnx_path.name}: TensorRT's ONNX parser failed: {shown or _first(logger)}")
    config = builder.create_builder_config()
    for flag in flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    config.builder_optimization_level = s.optimization_level
    if s.detailed_profiling:
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if s.workspace_mib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, s.workspace_mib << 20)
    profile = builder.create_optimization_profile()
    profile.set_shape(s.input_name, s.shape(s.min_batch), s.shape(s.opt_batch), s.shape(s.max_batch))
    config.add_optimization_profile(profile)
    cache_path = None if s.timing_cache is None else Path(s.timing_cache)
    if cache_path is not None:
        config.set_timing_cache(config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b""), False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BackendError(f"{onnx_path.name}: TensorRT could not build an engine: {_first(logger)}")
    if cache_path is not None:
        _save_timing_cache(config, cache_path)
    return bytes(serialized)


def _save_timing_cache(config, path: Path) -> None:
    """Merge this build's timings into the shared cache file, under a lock: another build may have saved
    since this one loaded it."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    cache = config.get_timing_cache()
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.is_file():
            cache.combine(config.create_timing_cache(path.read_bytes()), False)
        data = bytes(cache.serialize())
        replace_atomically(path, lambda tmp: tmp.write_bytes(data))


def _autocast_fp16(onnx_path: Path, out: Path) -> None:
    """FP16 for what the ONNX keeps in float, the strongly typed way: ModelOpt AutoCast rewrites the ONNX
    (inputs and outputs stay FP32; nodes it judges sensitive stay FP32 too)."""
    try:
        from modelopt.onnx.autocast import convert_to_mixed_precision
    except ImportError:
        raise BackendError("fp16 with a strongly typed network converts the ONNX with NVIDIA ModelOpt AutoCast, which is "
                           "not installed here: pip install 'pomq-deploy[gpu]' (or nvidia-modelopt[onnx]), or build with --no-fp16") from None
    import onnx

    model = convert_to_mixed_precision(onnx_path=str(onnx_path), low_precision_type="fp16", keep_io_types=True)
    replace_atomically(out, lambda tmp: onnx.save(model, str(tmp)))


def _capture(eng: _Engine) -> Callable[[], None]:
    """One inference captured in a CUDA graph; the caller has already run the engine at this shape, which
    TensorRT requires before capture after a shape change."""
    import torch

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        eng.execute()
    return graph.replay


def _torch_dtype(trt_dtype):
    import tensorrt as trt
    import torch

    return torch.from_numpy(np.zeros(0, dtype=trt.nptype(trt_dtype))).dtype


def _logger():
    """A TensorRT logger that forwards to ``logging`` and keeps the errors, so that a failure names its cause."""
    import tensorrt as trt

    levels = {trt.ILogger.Severity.INTERNAL_ERROR: logging.ERROR, trt.ILogger.Severity.ERROR: logging.ERROR,
              trt.ILogger.Severity.WARNING: logging.WARNING, trt.ILogger.Severity.INFO: logging.INFO}

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            level = levels.get(severity, logging.DEBUG)
            if level == logging.ERROR:
                self.errors.append(" ".join(str(msg).split()))
            log.log(level, "TensorRT: %s", msg)

    return Logger()


def _first(logger) -> str:
    return logger.errors[0] if logger.errors else "TensorRT logged no error; run with -vv for its log"
