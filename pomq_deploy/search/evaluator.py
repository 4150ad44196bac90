"""Measure one plan the way the search sees it: build it, run it, time it.

Every candidate is exported, built by the backend and measured for real: top-1 on the evaluation subset
through the backend, latency median at the search batch size, artifact size. Two caches keep it cheap:
calibration comes from the on-disk cache (one pass per recipe/scheme), and latency is cached by the
exported graph's *structure* (op types, wiring, initializer types and shapes, constants left out): two
plans whose artifacts differ only in constant values (e.g. a 4- vs 8-bit scale on an INT8 Q/DQ that stays
INT8) run the same kernels, so the second one reuses the first one's measurement.
"""

import dataclasses
import hashlib
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx

from ..backends import Backend
from ..build import evaluate_artifact
from ..export.graph import constant_value
from ..plan import Plan
from ..recipe import Recipe


@dataclass(frozen=True)
class Measurement:
    top1: float
    images: int
    latency_ms: float
    p90_ms: float
    size_bytes: int  # the backend's artifact
    latency_key: str
    latency_cached: bool


def graph_signature(path: Path) -> str:
    """A hash of what decides the kernels ONNX Runtime or TensorRT pick: ops, wiring, initializer types/shapes."""
    model = onnx.load(str(path))
    h = hashlib.sha256()
    for n in model.graph.node:
        if n.op_type == "Constant":
            t = constant_value(n)
            h.update((f"C{n.output[0]}:{t.data_type}:{list(t.dims)};" if t is not None else f"C{n.output[0]}:?;").encode())
            continue
        attrs = sorted((a.name, str(onnx.helper.get_attribute_value(a))) for a in n.attribute)
        h.update(f"{n.op_type}{list(n.input)}{list(n.output)}{attrs};".encode())
    for t in model.graph.initializer:
        h.update(f"I{t.name}:{t.data_type}:{list(t.dims)};".encode())
    return h.hexdigest()[:16]


class PlanEvaluator:
    """Holds the calibrated model and the backend; ``measure(plan)`` returns its objectives."""

    def __init__(self, recipe: Recipe, scheme: str, backend: Backend, target: str, eval_images: int, batch: int,
                 runs: int, observer: str = "minmax", latency_cache: dict | None = None, track=None):
        from ..quant.calibration import calibrated_model

        self.recipe = dataclasses.replace(recipe, eval=dataclasses.replace(recipe.eval, limit=eval_images))
        self.full_recipe = dataclasses.replace(recipe, eval=dataclasses.replace(recipe.eval, limit=None))
        self.qmodel, _ = calibrated_model(recipe, scheme, observer, track=track)
        self.backend, self.target, self.batch, self.runs = backend, target, batch, runs
        self.latency_cache: dict[str, tuple[float, float]] = dict(latency_cache or {})
        self.work = Path(tempfile.mkdtemp(prefix="pomq-search-"))

    @property
    def num_blocks(self) -> int:
        return self.qmodel.num_blocks

    def measure(self, plan: Plan | None, full_test: bool = False) -> Measurement:
        """Build ``plan`` (None: the FP32 model) in a scratch directory, measure it, delete the build."""
        from ..export import export_fp32, export_quantized
        from ..models.loading import create_model

        out = Path(tempfile.mkdtemp(dir=self.work))
        try:
            if plan is None:
                fp = create_model(self.recipe.model.arch, self.recipe.model.checkpoint)
                info = export_fp32(fp, out / "model.onnx")
            else:
                info = export_quantized(self.qmodel, plan, self.target, out / "model.onnx")
            key = graph_signature(info.path)
            artifact = self.backend.build(info.path, out)
            acc = evaluate_artifact(self.backend, artifact, self.full_recipe if full_test else self.recipe)
            cached = key in self.latency_cache
            if not cached:
                lat = self.backend.latency(artifact, self.batch, self.runs)
                self.latency_cache[key] = (lat.median_ms, lat.p90_ms)
            median, p90 = self.latency_cache[key]
            return Measurement(acc.top1, acc.images, median, p90, artifact.size_bytes, key, cached)
        finally:
            shutil.rmtree(out, ignore_errors=True)

    def close(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)
