"""Measure one plan the way the search sees it: build it, run it, time it (``pomq_deploy.measure``).

Every candidate is exported, built by the backend and measured for real: top-1 on the evaluation subset
through the backend, latency median at the search batch size, artifact size. Two caches keep it cheap:
calibration comes from the on-disk cache (one pass per recipe/scheme), and latency is cached by the
exported graph's *structure* (op types, wiring, initializer types and shapes, constants left out): two
plans whose artifacts differ only in constant values (e.g. a 4- vs 8-bit scale on an INT8 Q/DQ that stays
INT8) run the same kernels, so the second one reuses the first one's measurement.
"""

import dataclasses
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..backends import Backend
from ..measure import measure
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
        out = Path(tempfile.mkdtemp(dir=self.work))
        try:
            m = measure(self.backend, out, model=self.fp_model() if plan is None else self.qmodel, plan=plan, target=self.target,
                        eval_recipe=self.full_recipe if full_test else self.recipe, batches=(self.batch,), runs=self.runs,
                        latency_cache=self.latency_cache)
            lat = m.latency[self.batch]
            return Measurement(m.accuracy.top1, m.accuracy.images, lat.median_ms, lat.p90_ms, m.artifact.size_bytes,
                               m.latency_key, m.latency_cached)
        finally:
            shutil.rmtree(out, ignore_errors=True)

    def fp_model(self):
        from ..models.loading import load_model

        return load_model(self.recipe.model)

    def close(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)
