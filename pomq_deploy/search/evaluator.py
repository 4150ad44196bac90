"""Measure one plan the way the search sees it: build it, run it, time it against the baselines.

Every candidate is exported, built by the backend and measured for real: top-1 on the evaluation subset
through the backend, artifact size, and latency as a *ratio* to the FP32 model's, timed interleaved with it in
the same rounds (:mod:`pomq_deploy.timing`), so that a busy moment of a shared host falls on both alike.
Uniform 8-bit is timed against FP32 once, with the baselines: no decision reads a candidate's ratio to it, and
timing it beside every candidate cost a third of each plan's rounds. The two baselines are built once per
process and kept for the whole search.
Calibration comes from the on-disk cache (one pass per recipe/scheme), and ratios are cached by the exported
graph's *structure* (op types, wiring, initializer types and shapes, constants left out): two plans whose
artifacts differ only in constant values run the same kernels.
"""

import dataclasses
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..atomic import remove_dead_processes_folders
from ..backends import Artifact, Backend
from ..measure import Measured, graph_signature, measure
from ..plan import Plan, uniform_plan
from ..progress import Phases
from ..recipe import Recipe
from ..timing import Ratio, backend_ratios

WORK_PREFIX = "pomq-search-"  # the builds of a search live in <tmp>/pomq-search-<pid>-<random> until it ends


@dataclass(frozen=True)
class Measurement:
    top1: float
    images: int
    ratio: Ratio | None  # latency / FP32's, interleaved; None for FP32 itself
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

    def __init__(self, recipe: Recipe, scheme: str, rounding: str, backend: Backend, target: str, eval_images: int, batch: int,
                 runs: int = 5, observer: str = "minmax", ratio_cache: dict | None = None, track=None,
                 say: Callable[[str], None] = lambda _: None, device=None):
        from ..quant.calibration import calibrated_model

        self.recipe = dataclasses.replace(recipe, eval=dataclasses.replace(recipe.eval, limit=eval_images))
        self.full_recipe = dataclasses.replace(recipe, eval=dataclasses.replace(recipe.eval, limit=None))
        self.qmodel, _ = calibrated_model(recipe, scheme, observer, track=track, rounding=rounding, device=device)
        self.backend, self.target, self.batch, self.runs = backend, target, batch, runs  # runs: per artifact per round
        self.ratio_cache: dict[str, dict] = dict(ratio_cache or {})  # graph signature -> Ratio.as_dict()
        stale = remove_dead_processes_folders(Path(tempfile.gettempdir()), WORK_PREFIX)
        if stale:
            say(f"removed {len(stale)} work folder(s) of killed searches: {', '.join(str(p) for p in stale)}")
        self.work = Path(tempfile.mkdtemp(prefix=f"{WORK_PREFIX}{os.getpid()}-"))
        self.refs: dict[str, Measured] = {}
        self.kept: dict[str, Measured] = {}  # plan_id -> its build, while the search runs
        self.builds = 0  # real builds this process made (baselines included)

    @property
    def num_blocks(self) -> int:
        return self.qmodel.num_blocks

    def uniform8(self) -> Plan:
        return uniform_plan("8/8/8", self.num_blocks, self.recipe.name, self.qmodel.scheme, self.qmodel.rounding)

    def _reference(self, name: str) -> Measured:
        """The FP32 or uniform 8-bit build (top-1 on the subset measured), made once and kept for the rounds every
        candidate is timed in."""
        if name not in self.refs:
            self.refs[name] = self._build(None if name == "fp32" else self.uniform8(), evaluate=True, folder=name)
        return self.refs[name]

    def _build(self, plan: Plan | None, evaluate: bool, folder: str | None = None) -> Measured:
        """Export and build ``plan`` (None: the FP32 model) in a folder of its own under the work folder, with top-1
        on the evaluation subset if ``evaluate``; every build counts."""
        out = self.work / (folder or f"build-{self.builds}")
        out.mkdir()
        m = measure(self.backend, out, model=self.fp_model() if plan is None else self.qmodel, plan=plan, target=self.target,
                    eval_recipe=self.recipe if evaluate else None)
        self.builds += 1
        return m

    def _time(self, artifacts: dict[str, Artifact], candidates: list[str], **rounds) -> dict[str, Ratio]:
        """Ratios to FP32 of ``candidates`` (names in ``artifacts``, or "uniform8"), timed interleaved with FP32."""
        artifacts = {"fp32": self._reference("fp32").artifact} | artifacts
        if "uniform8" in candidates:
            artifacts["uniform8"] = self._reference("uniform8").artifact
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

    def baselines(self, on_round=None) -> dict:
        """FP32 and uniform 8-bit: top-1, size, and their latencies from interleaved rounds (FP32's median in ms
        is the scale every ratio is reported in)."""
        u8 = self._time({}, ["uniform8"], on_round=on_round)["uniform8"]
        out = {}
        for name, ratio in (("fp32", None), ("uniform8", u8)):
            m = self._reference(name)
            out[name] = Measurement(m.accuracy.top1, m.accuracy.images, ratio, m.artifact.size_bytes,
                                    graph_signature(m.onnx_path), False).attrs()
            out[name] |= {"latency_ms": u8.reference_ms * (1.0 if ratio is None else ratio.ratio)}
        return out

    def measure(self, plan: Plan) -> Measurement:
        """Build ``plan`` and measure it on the evaluation subset, its latency ratio timed (or taken from a plan
        with the same graph structure); the build is kept until ``close``."""
        m = self._build(plan, evaluate=True)
        self.kept[plan.plan_id] = m  # kept for the front's re-measure on the full split: no second build
        key = graph_signature(m.onnx_path)
        cached = key in self.ratio_cache
        if cached:
            ratio = Ratio(**self.ratio_cache[key])
        else:
            ratio = self._time({"candidate": m.artifact}, ["candidate"])["candidate"]
            self.ratio_cache[key] = ratio.as_dict()
        return Measurement(m.accuracy.top1, m.accuracy.images, ratio, m.artifact.size_bytes, key, cached)

    def confirm(self, plan: Plan, on_round=None) -> Ratio:
        """``plan``'s ratio to FP32 timed again, in fresh rounds: the plan a search selects for the lowest latency
        among close ones is, more often than not, one whose first timing came out low (the winner's curse); an
        independent timing is what a rebuild will see."""
        return self._time({"candidate": self._built(plan).artifact}, ["candidate"], on_round=on_round)["candidate"]

    def full_top1(self, plans: list[Plan | None], phases: Phases) -> list[float]:
        """Top-1 of each plan (None: FP32) on the whole evaluation split, in one pass over it (a phase of
        ``phases``): each batch read once and run through every plan's artifact (the build this process made,
        else one made now). Where every plan was measured on the evaluation subset in this process, its hits
        there are known and only the images after it are run."""
        from torch.utils.data import Subset

        from ..data import eval_dataset, eval_loader
        from ..evaluate import topk_correct
        from ..models.loading import data_model

        built = [self._built(p) for p in plans]
        known = {b.accuracy.images if b.accuracy is not None else None for b in built}
        start = known.pop() if len(known) == 1 and None not in known else 0
        hits = [round(b.accuracy.top1 * start) if start else 0 for b in built]
        r = self.full_recipe
        data = eval_dataset(r.data, data_model(r.model))
        n = len(data)
        loader = eval_loader(Subset(data, range(start, n)), r.eval.batch_size, None, r.data.workers)
        names = ["FP32" if p is None else "uniform 8/8/8" if p.blocks == self.uniform8().blocks else f"plan {p.plan_id}"
                 for p in plans]
        with phases(f"top-1 on the full evaluation split of {', '.join(names)} ({n} images, the first {start} known "
                    "from the search)", total=len(loader)) as step:
            for images, labels in loader:
                x = images.numpy()
                for i, b in enumerate(built):
                    hits[i] += topk_correct(torch.from_numpy(self.backend.run(b.artifact, x)), labels, 1)
                step()
        return [h / n for h in hits]

    def _built(self, plan: Plan | None) -> Measured:
        """``plan``'s build (None: FP32's), made now when this process has none (a plan another worker or an
        earlier run measured)."""
        if plan is None or plan.blocks == self.uniform8().blocks:
            return self._reference("fp32" if plan is None else "uniform8")
        if plan.plan_id not in self.kept:
            self.kept[plan.plan_id] = self._build(plan, evaluate=False)
        return self.kept[plan.plan_id]

    def fp_model(self):
        from ..models.loading import load_model

        return load_model(self.recipe.model)

    def close(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)
