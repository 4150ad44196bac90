"""TensorRT through NVIDIA's Polygraphy: its loaders parse the Q/DQ ONNX into a strongly typed network, build
the engine with a shared, file-locked timing cache, and its ``TrtRunner`` binds and runs the engine. What
stays ours: the checks before TensorRT sees the model (quantization rules, the input's shape), the build
settings and the trtexec line (:mod:`.trt_settings`), the engine's layer report (:mod:`.trt_inspect`) and
latency by CUDA events around the runner's own enqueue (Polygraphy times on the host, with its Python
overhead inside every run: tens of microseconds, the size of a small engine's whole run).

No TensorRT builder installs where this was written, so none of the calls into ``tensorrt`` has run yet;
everything up to the import of ``tensorrt`` has (docs/tensorrt.md says what is tested where). ``tensorrt``
and CUDA are touched only when the backend is constructed, which fails at once, in one sentence, where
either is missing. NVTX ranges name the build, warm-up and timed runs after the artifact directory (the
plan-id), so that Nsight Systems shows them by name.
"""

import logging
import re
import tempfile
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import replace_atomically, write_text
from ..errors import first_line
from ..plan import Plan
from . import Artifact, BackendError, LatencyStats
from .trt_inspect import read_layer_info, summarise
from .trt_settings import DEFAULT_TIMING_CACHE, TrtBuildSettings, build_settings, compatibility_problems, trtexec_command

log = logging.getLogger(__name__)

ENGINE_NAME, LAYERS_NAME, FP16_ONNX_NAME = "model.engine", "layers.json", "model.fp16.onnx"
MIN_TIMED_RUNS = 200  # GPU latencies are tens of microseconds: fewer runs make a noisy p90
WARMUP_RUNS = 20
ENGINES_KEPT = 4
INSTALL = "pip install -e '.[gpu]' --extra-index-url https://pypi.nvidia.com"


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
    from polygraphy.logger import G_LOGGER

    G_LOGGER.use_python_logging_system = True  # Polygraphy's and TensorRT's messages on stderr, at -v's level, not on stdout


@dataclass(frozen=True)
class OnnxInput:
    """The model's one input, as the optimisation profile needs it."""

    name: str
    shape: tuple[int, ...]  # one sample


def read_onnx_input(model, path: Path) -> OnnxInput:
    """``model``'s input (the ONNX loaded from ``path``, which error messages name)."""
    weights = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in weights]
    if len(inputs) != 1:
        raise BackendError(f"{path}: the tensorrt backend builds models with one input; this one has {len(inputs)}")
    dims = inputs[0].type.tensor_type.shape.dim
    if len(dims) < 2 or any(d.dim_value <= 0 for d in dims[1:]):
        raise BackendError(f"{path}: input {inputs[0].name!r} must have a fixed shape after its batch dimension")
    return OnnxInput(inputs[0].name, tuple(d.dim_value for d in dims[1:]))


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


def engine_loader(onnx: Path | bytes, s: TrtBuildSettings, shapes: dict[str, tuple] | None = None):
    """Polygraphy's loader chain for one build; calling it builds: the ONNX (a file, or a model's bytes) parsed
    into a strongly typed network, the builder config from ``s`` (its profile over the batch, or ``shapes``:
    each input's min/opt/max), serialized with the timing cache loaded before and merged after, under
    Polygraphy's file lock. Constructing it imports no ``tensorrt`` unless ``s`` asks for detailed profiling
    or a workspace limit (their values are TensorRT enums)."""
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxBytes, NetworkFromOnnxPath, Profile

    shapes = shapes or {s.input_name: (s.shape(s.min_batch), s.shape(s.opt_batch), s.shape(s.max_batch))}
    optimization_profile = Profile()
    for name, (lo, opt, hi) in shapes.items():
        optimization_profile.add(name, min=lo, opt=opt, max=hi)
    verbosity = pools = None
    if s.detailed_profiling or s.workspace_mib is not None:
        import tensorrt as trt

        verbosity = trt.ProfilingVerbosity.DETAILED if s.detailed_profiling else None
        pools = None if s.workspace_mib is None else {trt.MemoryPoolType.WORKSPACE: s.workspace_mib << 20}
    network = (NetworkFromOnnxBytes(onnx, strongly_typed=True) if isinstance(onnx, bytes)
               else NetworkFromOnnxPath(str(onnx), strongly_typed=True))
    config = CreateConfig(profiles=[optimization_profile], builder_optimization_level=s.optimization_level,
                          profiling_verbosity=verbosity, memory_pool_limits=pools, load_timing_cache=s.timing_cache)
    return EngineBytesFromNetwork(network, config, save_timing_cache=s.timing_cache)


def artifact_label(directory: Path) -> str:
    """The plan-id an artifact directory stands for, also while it is still the build's staging directory
    (``.<plan-id>.<random>.tmp``, see :func:`pomq_deploy.artifact.staging_dir`)."""
    m = re.fullmatch(r"\.(.+)\.[^.]+\.tmp", Path(directory).name)
    return m.group(1) if m else Path(directory).name


def manifest_section(artifact: Artifact, plan: Plan | None) -> dict[str, Any]:
    """The manifest's ``tensorrt`` entry: the trtexec line that builds the same engine and the engine's layer
    summary against the plan. Version, GPU, CUDA and the settings are in ``backend.options``."""
    settings = TrtBuildSettings.from_dict(artifact.options["settings"])
    section: dict[str, Any] = {"trtexec": trtexec_command(settings, onnx=artifact.options["parsed_onnx"],
                                                          engine=artifact.path.name, layers=LAYERS_NAME)}
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


def autocast_fp16(onnx_path: Path, out: Path) -> None:
    """FP16 for what the ONNX keeps in float, the strongly typed way: ModelOpt AutoCast rewrites the ONNX
    (inputs and outputs stay FP32; nodes it judges sensitive stay FP32 too). It runs on the CPU."""
    try:
        from modelopt.onnx.autocast import convert_to_mixed_precision
    except ImportError as e:
        raise BackendError(f"fp16 with a strongly typed network converts the ONNX with NVIDIA ModelOpt AutoCast, which does "
                           f"not import here ({e}): pip install -e '.[autocast]', or build with --no-fp16") from None
    import onnx

    model = convert_to_mixed_precision(onnx_path=str(onnx_path), low_precision_type="fp16", keep_io_types=True)
    replace_atomically(Path(out), lambda tmp: onnx.save(model, str(tmp)))


@contextmanager
def _polygraphy_errors(what: str) -> Iterator[None]:
    """Polygraphy reports a failed parse, build or load by raising PolygraphyException after logging
    TensorRT's errors: one BackendError line naming ``what`` instead."""
    from polygraphy.exception import PolygraphyException

    try:
        yield
    except PolygraphyException as e:
        first = first_line(e)
        raise BackendError(f"{what}: {first} (TensorRT's messages are in the log above; -v shows more)") from None


class TensorRTBackend:
    name = "tensorrt"

    def __init__(self, batch: int = 8, max_batch: int | None = None, fp16: bool = True, optimization_level: int = 3,
                 workspace_mib: int | None = None, timing_cache: Path | None = DEFAULT_TIMING_CACHE):
        require_gpu_stack()
        self.batch, self.max_batch, self.fp16 = batch, max_batch, fp16
        self.optimization_level, self.workspace_mib, self.timing_cache = optimization_level, workspace_mib, timing_cache
        self._runners: OrderedDict = OrderedDict()

    def options(self) -> dict[str, Any]:
        return {"batch": self.batch, "max_batch": self.max_batch, "fp16": self.fp16,
                "optimization_level": self.optimization_level, "workspace_mib": self.workspace_mib,
                "timing_cache": None if self.timing_cache is None else str(self.timing_cache)}

    def _settings(self, input_: OnnxInput) -> TrtBuildSettings:
        return build_settings(input_.name, input_.shape, self.batch, max_batch=self.max_batch, fp16=self.fp16,
                              optimization_level=self.optimization_level, workspace_mib=self.workspace_mib,
                              timing_cache=self.timing_cache)

    def build(self, onnx_path: Path, out_dir: Path) -> Artifact:
        from torch.cuda import nvtx

        from ..export.trt_rules import check_tensorrt, load_model

        onnx_path, out_dir = Path(onnx_path), Path(out_dir)
        model = load_model(onnx_path)  # read once: the rules check and the build settings both need it
        rules_gate(check_tensorrt(model), onnx_path)
        settings = self._settings(read_onnx_input(model, onnx_path))
        parsed = onnx_path
        if settings.fp16:
            parsed = out_dir / FP16_ONNX_NAME
            autocast_fp16(onnx_path, parsed)
        with nvtx.range(f"build {artifact_label(out_dir)}"), _polygraphy_errors(f"{parsed.name}: TensorRT could not build an engine"):
            serialized = engine_loader(parsed, settings)()
        engine_path = out_dir / ENGINE_NAME
        replace_atomically(engine_path, lambda tmp: tmp.write_bytes(serialized))
        options = {"settings": settings.to_dict(), "parsed_onnx": parsed.name, "built_with": machine()}
        artifact = Artifact(engine_path, self.name, options, engine_path.stat().st_size)
        if settings.detailed_profiling:
            write_text(out_dir / LAYERS_NAME, _layer_information(self._runner(artifact), settings))
        return artifact

    @staticmethod
    def manifest_extra(artifact: Artifact, plan: Plan | None) -> dict[str, Any]:
        return manifest_section(artifact, plan)

    def run(self, artifact: Artifact, images: np.ndarray) -> np.ndarray:
        """Logits for ``images``, in slices of at most the profile's largest batch."""
        import torch
        from torch.cuda import nvtx

        runner = self._runner(artifact)
        s = TrtBuildSettings.from_dict(artifact.options["settings"])
        outs = []
        with nvtx.range(f"run {artifact_label(artifact.path.parent)}"):
            for i in range(0, len(images), s.max_batch):
                x = torch.from_numpy(np.ascontiguousarray(images[i:i + s.max_batch], dtype=np.float32)).cuda()
                (out,) = runner.infer({s.input_name: x}).values()  # torch in, torch out (on the host)
                outs.append(out.float().numpy())
        return np.concatenate(outs)

    def run_onnx(self, model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run an in-memory ONNX model (e.g. one block cut out, or with block outputs marked) as ``build``'s
        engines run: AutoCast when fp16, strongly typed, one profile fixed to the feeds' shapes, the shared
        timing cache; the model's outputs in its order (see pomq_deploy.verify and pomq_deploy.compare)."""
        import onnx
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        name, first = next(iter(feeds.items()))
        s = replace(self._settings(OnnxInput(name, first.shape[1:])), detailed_profiling=False)
        with tempfile.TemporaryDirectory(prefix="pomq-trt-") as tmp:
            path = Path(tmp) / "part.onnx"
            onnx.save(model, str(path))
            if s.fp16:
                autocast_fp16(path, path)
            shapes = {k: (x.shape, x.shape, x.shape) for k, x in feeds.items()}
            with _polygraphy_errors("TensorRT could not build the model part"):
                engine = EngineFromBytes(engine_loader(path.read_bytes(), s, shapes)())
                with TrtRunner(engine) as runner:
                    out = runner.infer({k: np.ascontiguousarray(v) for k, v in feeds.items()})
        return [np.asarray(out[o.name], dtype=np.float32) for o in model.graph.output]

    def latency(self, artifact: Artifact, batch: int, runs: int = 50, warmup: int = WARMUP_RUNS) -> LatencyStats:
        """Median and p90 of at least MIN_TIMED_RUNS runs, each timed by CUDA events around the engine's enqueue
        on the runner's stream (the runner has bound the input, its shape and the outputs once before)."""
        import torch
        from torch.cuda import nvtx

        runner = self._runner(artifact)
        s = TrtBuildSettings.from_dict(artifact.options["settings"])
        if not s.min_batch <= batch <= s.max_batch:
            raise BackendError(f"{artifact.path.parent}: batch {batch} is outside the engine's profile ({s.min_batch} to "
                               f"{s.max_batch}); rebuild it with pomq-deploy build --backend tensorrt --batch {batch}")
        runs, label = max(runs, MIN_TIMED_RUNS), f"{artifact_label(artifact.path.parent)} b{batch}"
        x = torch.randn(s.shape(batch), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
        with nvtx.range(f"warm-up {label}"):
            for _ in range(max(warmup, 1)):
                runner.infer({s.input_name: x}, copy_outputs_to_host=False)
        stream = torch.cuda.ExternalStream(runner.stream.ptr)
        starts, ends = ([torch.cuda.Event(enable_timing=True) for _ in range(runs)] for _ in range(2))
        with nvtx.range(f"timed {label} x{runs}"):
            for start, end in zip(starts, ends, strict=True):
                start.record(stream)
                if not runner.context.execute_async_v3(runner.stream.ptr):
                    raise BackendError(f"{artifact.path}: TensorRT failed to enqueue the engine (see its log above)")
                end.record(stream)
            stream.synchronize()
        return LatencyStats.from_times(batch, [start.elapsed_time(end) / 1e3 for start, end in zip(starts, ends, strict=True)])

    def _runner(self, artifact: Artifact):
        """One activated TrtRunner per artifact file, reused; the few most recent are kept."""
        key = (str(artifact.path), artifact.path.stat().st_mtime_ns)
        if key not in self._runners:
            problems = compatibility_problems(artifact.options.get("built_with", {}), machine())
            if problems:
                raise BackendError(f"{artifact.path.parent}: this engine cannot run here: {'; '.join(problems)}; "
                                   "rebuild it on this machine with pomq-deploy build --backend tensorrt")
            from polygraphy.backend.trt import EngineFromBytes, TrtRunner

            with _polygraphy_errors(f"{artifact.path}: TensorRT could not load this engine; rebuild it"):
                runner = TrtRunner(EngineFromBytes(artifact.path.read_bytes()))
                runner.activate()
            self._runners[key] = runner
            while len(self._runners) > ENGINES_KEPT:
                self._runners.popitem(last=False)[1].deactivate()
        self._runners.move_to_end(key)
        return self._runners[key]


def _layer_information(runner, s: TrtBuildSettings) -> str:
    """IEngineInspector's JSON with the context bound at the opt batch: without concrete shapes the
    inspector leaves dynamic dimensions at -1 and prints no formats (its documented behaviour)."""
    import tensorrt as trt
    import torch

    runner.infer({s.input_name: torch.zeros(s.shape(s.opt_batch), device="cuda")}, copy_outputs_to_host=False)
    inspector = runner.engine.create_engine_inspector()
    inspector.execution_context = runner.context
    return inspector.get_engine_information(trt.LayerInformationFormat.JSON)
