"""Measure one plan the way the search sees it: build it, run it, time it against the baselines.

Every candidate is exported, built by the backend and measured for real: top-1 on the evaluation subset
through the backend, artifact size, and latency as a *ratio* to the FP32 model's (and to uniform 8-bit's),
timed interleaved with both in the same rounds (:mod:`pomq_deploy.timing`), so that a busy moment of a shared host
falls on all three alike. The two baselines are built once per process and kept for the whole search.
Calibration comes from the on-disk cache (one pass per recipe/scheme), and ratios are cached by the exported
graph's *structure* (op types, wiring, initializer types and shapes, constants left out): two plans whose
artifacts differ only in constant values run the same kernels.
"""

import dataclasses
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..backends import Artifact, Backend
from ..measure import Measured, evaluate_artifact, graph_signature, measure
from ..plan import Plan, uniform_plan
from ..recipe import Recipe
from ..timing import Ratio, backend_ratios


@dataclass(frozen=True)
class Measurement:
    top1: float
    images: int
    ratio: Ratio | None  # latency / FP32's, interleaved; None when not timed (full-split re-measures)
    ratio_uniform8: float | None  # latency / uniform 8-bit's, from the same rounds
    size_bytes: int  # the backend's artifact
    latency_key: str
    latency_cached: bool  # the ratio is another plan's with the same graph structure

    def attrs(self) -> dict:
        """What a trial keeps (optuna user attributes are JSON)."""
        out = dataclasses.asdict(self)
        out["ratio"] = None if self.ratio is None else self.ratio.as_dict()
        return out


class PlanEvaluator:
    """Holds the calibrated model, the backend and the baselines' artifacts; ``measure(plan)`` returns its
    objectives."""

    def __init__(self, recipe: Recipe, scheme: str, backend: Backend, target: str, eval_images: int, batch: int,
                 runs: int = 5, observer: str = "minmax", ratio_cache: dict | None = None, track=None):
        from ..quant.calibration import calibrated_model

        self.recipe = dataclasses.replace(recipe, eval=dataclasses.replace(recipe.eval, limit=eval_images))
        self.full_recipe = dataclasses.replace(recipe, eval=dataclasses.replace(recipe.eval, limit=None))
        self.qmodel, _ = calibrated_model(recipe, scheme, observer, track=track)
        self.backend, self.target, self.batch, self.runs = backend, target, batch, runs  # runs: per artifact per round
        self.ratio_cache: dict[str, dict] = dict(ratio_cache or {})  # graph signature -> Ratio.as_dict()
        self.work = Path(tempfile.mkdtemp(prefix="pomq-search-"))
        self.refs: dict[str, Measured] = {}
        self.kept: dict[str, Measured] = {}  # plan_id -> its build, while the search runs
        self.builds = 0  # real builds this process made (baselines included)

    @property
    def num_blocks(self) -> int:
        return self.qmodel.num_blocks

    def uniform8(self) -> Plan:
        return uniform_plan("8/8/8", self.num_blocks, self.recipe.name, self.qmodel.scheme)

    def _reference(self, name: str) -> Measured:
        """The FP32 or uniform 8-bit build (top-1 on the subset measured), made once and kept for the rounds every
        candidate is timed in."""
        if name not in self.refs:
            out = self.work / name
            out.mkdir()
            plan = None if name == "fp32" else self.uniform8()
            self.refs[name] = measure(self.backend, out, model=self.fp_model() if plan is None else self.qmodel, plan=plan,
                                      target=self.target, eval_recipe=self.recipe)
            self.builds += 1
        return self.refs[name]

    def _time(self, artifacts: dict[str, Artifact], candidates: list[str], **rounds) -> dict[str, Ratio]:
        artifacts = {"fp32": self._reference("fp32").artifact, "uniform8": self._reference("uniform8").artifact} | artifacts
        return backend_ratios(self.backend, artifacts, self.batch, candidates, runs=self.runs, **rounds)

    def time_together(self, plans: list[Plan], max_rounds: int = 20, tolerance: float = 0.02) -> list[Ratio]:
        """The ratios to FP32 of ``plans`` (built by ``measure`` in this process, or uniform 8-bit) timed in the same
        interleaved rounds, longer than a search's: for checking the latency model on held-out plans, where a plan
        timed alone minutes after another carries the host's drift between them into the comparison."""
        u8 = self.uniform8().plan_id
        names = ["uniform8" if p.plan_id == u8 else f"plan-{i}" for i, p in enumerate(plans)]
        ratios = self._time({n: self.kept[p.plan_id].artifact for n, p in zip(names, plans, strict=True) if n != "uniform8"},
                            names, max_rounds=max_rounds, tolerance=tolerance)
        return [ratios[n] for n in names]

    def baselines(self) -> dict:
        """FP32 and uniform 8-bit: top-1, size, and their latencies from interleaved rounds (FP32's median in ms
        is the scale every ratio is reported in)."""
        u8 = self._time({}, ["uniform8"])["uniform8"]
        out = {}
        for name, ratio in (("fp32", None), ("uniform8", u8)):
            m = self._reference(name)
            out[name] = Measurement(m.accuracy.top1, m.accuracy.images, ratio, None if ratio is None else 1.0,
                                    m.artifact.size_bytes, graph_signature(m.onnx_path), False).attrs()
            out[name] |= {"latency_ms": u8.reference_ms * (1.0 if ratio is None else ratio.ratio)}
        return out

    def measure(self, plan: Plan | None, full_test: bool = False, time_it: bool = True) -> Measurement:
        """Build ``plan`` and measure it; the build is kept until ``close``. ``full_test``: top-1 on the whole
        evaluation split, untimed, on the plan's kept build if this process made one (None: FP32's)."""
        if full_test and (plan is None or plan.blocks == self.uniform8().blocks or plan.plan_id in self.kept):
            m = self._reference("fp32") if plan is None else self.kept.get(plan.plan_id) or self._reference("uniform8")
            top1 = evaluate_artifact(self.backend, m.artifact, self.full_recipe)
            return Measurement(top1.top1, top1.images, None, None, m.artifact.size_bytes, graph_signature(m.onnx_path), False)
        out = self.work / f"build-{self.builds}"  # unique: every build counts
        out.mkdir()
        m = measure(self.backend, out, model=self.qmodel, plan=plan, target=self.target,
                    eval_recipe=self.full_recipe if full_test else self.recipe)
        self.builds += 1
        self.kept[plan.plan_id] = m  # kept for the front's re-measure on the full split: no second build
        key = graph_signature(m.onnx_path)
        cached = time_it and key in self.ratio_cache
        ratio = u8 = None
        if cached:
            ratio, u8 = Ratio(**self.ratio_cache[key]["ratio"]), self.ratio_cache[key]["uniform8"]
        elif time_it:
            r = self._time({"candidate": m.artifact}, ["candidate"])
            ratio, u8 = r["candidate"], r["candidate"].ratio / r["uniform8"].ratio
            self.ratio_cache[key] = {"ratio": ratio.as_dict(), "uniform8": u8}
        return Measurement(m.accuracy.top1, m.accuracy.images, ratio, u8, m.artifact.size_bytes, key, cached)

    def confirm(self, plan: Plan) -> Ratio:
        """``plan``'s ratio to FP32 timed again, in fresh rounds: the plan a search selects for the lowest latency
        among close ones is, more often than not, one whose first timing came out low (the winner's curse); an
        independent timing is what a rebuild will see."""
        m = self.kept.get(plan.plan_id)
        if m is None:  # measured by another worker or an earlier run
            out = self.work / f"build-{self.builds}"
            out.mkdir()
            m = measure(self.backend, out, model=self.qmodel, plan=plan, target=self.target)
            self.builds += 1
        return self._time({"candidate": m.artifact}, ["candidate"])["candidate"]

    def fp_model(self):
        from ..models.loading import load_model

        return load_model(self.recipe.model)

    def close(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)
