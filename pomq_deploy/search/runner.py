"""One ``pomq-deploy search`` run: open the study, measure baselines, run trials, verify the front, report."""

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from ..backends import Backend
from ..plan import Plan
from ..progress import Phases
from ..recipe import Recipe
from .evaluator import PlanEvaluator
from .guided import check_builds, run_guided
from .report import Row, closest_text, hypervolume, mark_front, rows_of, select, write_outputs
from .space import PAPER, Space
from .study import SearchConfig, baselines, open_study, run_trials, study_rounding, study_space, warm_ratio_cache


@dataclass(frozen=True)
class SearchOptions:
    recipe: Recipe
    scheme: str
    rounding: str
    algorithm: str
    population: int
    trials: int
    seed: int
    storage: str
    study: str
    out: Path
    backend: Backend
    target: str
    eval_images: int
    batch: int
    runs: int
    select: str
    mode: str = "model"  # model: guided by the latency/accuracy models; measured: every trial built
    builds: int = 20  # model mode: real builds of this process, the baselines' included
    sensitivity_images: int = 32  # model mode: images of the per-gene sensitivity runs
    full_front: bool = False  # top-1 on the full split for every front plan and FP32, not only what the selection needs
    space: Space = PAPER  # what a block may take: PoMQ-ViT's widths, or the target's engine formats
    max_drop: float | None = None  # accuracy budget: top-1 below FP32's, a fraction (0.003 = 0.3 point)
    device: Any = None  # torch.device where the PyTorch side runs (None: the CPU)


@dataclass(frozen=True)
class SearchResult:
    first_line: str
    best: Row | None
    rows: list[Row]
    hypervolume: float
    builds: int  # real builds this process made
    seconds: float
    closest: Row | None = None  # with --max-drop and no plan within it: the measured plan nearest the budget


def _choose(study: optuna.Study, evaluator: PlanEvaluator, pool: list[Row], base: dict, rule: str, full_front: bool,
            phases: Phases, max_drop: float | None = None) -> Row | None:
    """``select`` from ``pool`` (``candidates``) with top-1 on the whole evaluation split, scored only for the plans
    the rule needs and the chosen one (each a pass over the split: for the whole front and FP32 the search's
    costliest phase, 144 of 305 s on the reference model, docs/search.md), kept in the study. ``full_front``: every
    plan of the pool and FP32 too, in one pass."""
    full = dict(study.user_attrs.get("top1_full", {}))
    u8 = evaluator.uniform8()

    def score(plans: list[Plan | None]) -> None:
        todo = [p for p in plans if ("fp32" if p is None else p.plan_id) not in full]
        if todo:
            for p, top1 in zip(todo, evaluator.full_top1(todo, phases), strict=True):
                full["fp32" if p is None else p.plan_id] = top1
            study.set_user_attr("top1_full", full)

    if full_front:
        score([None, u8, *[r.plan for r in pool]])

    def top1(r: Row | None) -> float:
        plan = u8 if r is None else r.plan
        score([plan])
        return full[plan.plan_id]

    def fp32() -> float:
        score([None])
        return full["fp32"]

    best = select(pool, base, rule, top1, max_drop, fp32)
    if best is not None:
        top1(best)  # best.yaml always carries the chosen plan's full-split top-1
    for r in pool:
        r.top1_full = full.get(r.plan.plan_id)
    for name, key in (("fp32", "fp32"), ("uniform8", u8.plan_id)):
        if key in full and base[name].get("top1_full") != full[key]:
            base[name]["top1_full"] = full[key]
            study.set_user_attr("baselines", base)
    return best


def _paper_rows(storage: str, recipe: str, scheme: str, rounding: str, n_blocks: int, rule: str, base: dict,
                space: Space = PAPER, max_drop: float | None = None) -> list[dict]:
    """The chosen plan of every study of this recipe, scheme, rounding, space and budget in the storage (e.g.
    NSGA-II and random)."""
    out = []
    for summary in optuna.get_all_study_summaries(storage):
        attrs = summary.user_attrs
        if attrs.get("recipe") != recipe or attrs.get("scheme") != scheme or study_rounding(attrs) != rounding \
                or study_space(attrs).settings != space.settings or attrs.get("max_drop") != max_drop:
            continue
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        rows = rows_of(study, n_blocks, recipe, scheme, rounding, space)
        front = mark_front(rows, study)
        full = study.user_attrs.get("top1_full", {})
        for r in rows:
            r.top1_full = full.get(r.plan.plan_id)
        best = select(candidates(rows, front, max_drop), base, rule, max_drop=max_drop)
        if best is not None:
            name = {"nsga2": "NSGA-II", "random": "random (stochastic)", "model": "model-guided NSGA-II"}[attrs["algorithm"]]
            out.append({"method": f"{name}, {len(rows)} plans ({summary.study_name})", "top1": best.top1_full or best.top1,
                        "latency_ms": best.latency_ms, "size_bytes": best.size_bytes})
    return out


def run_search(opts: SearchOptions, console) -> SearchResult:
    from ..timing import MAX_ROUNDS
    from ._progress import trial_step

    cfg = SearchConfig(opts.recipe.name, opts.scheme, opts.algorithm, opts.population, opts.trials, opts.seed,
                       opts.storage, opts.study, opts.rounding, opts.space, opts.target, opts.max_drop)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(cfg)  # fails fast (bad URL, another recipe's study) before any calibration
    phases = Phases(console)
    kept = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
    if kept:
        phases.note(f"resuming study {opts.study} in {opts.storage}: {kept} measured plan(s) kept, none measured again")
    if opts.mode == "model":
        check_builds(study, opts.recipe.model, cfg, opts.builds)
    start, guided = time.perf_counter(), None
    evaluator = PlanEvaluator(opts.recipe, opts.scheme, opts.rounding, opts.backend, opts.target, opts.eval_images, opts.batch, opts.runs,
                              ratio_cache=warm_ratio_cache(study), track=phases.track, say=phases.note, device=opts.device)
    try:
        base = baselines(study, evaluator, cfg, phases)
        if opts.mode == "model":
            guided = run_guided(study, evaluator, cfg, base, opts.builds, opts.sensitivity_images, phases)
        else:
            with phases(f"measured search: {opts.trials} plans built and measured", total=opts.trials,
                        completed=min(kept, opts.trials)) as step:
                run_trials(study, evaluator, cfg, base, trial_step(step))
        rows = rows_of(study, evaluator.num_blocks, opts.recipe.name, opts.scheme, opts.rounding, opts.space)
        front = mark_front(rows, study)
        best = _choose(study, evaluator, candidates(rows, front, opts.max_drop), base, opts.select, opts.full_front, phases,
                       opts.max_drop)
        if best is not None:
            with phases(f"timing the chosen plan {best.plan.plan_id} against FP32 again, in fresh rounds",
                        total=MAX_ROUNDS) as step:
                best.ratio_confirmed = evaluator.confirm(best.plan, on_round=step).as_dict()
    finally:
        evaluator.close()
    hv = hypervolume(rows, base, opts.space.size_reference)
    seconds = time.perf_counter() - start
    meta = {"recipe": opts.recipe.name, "scheme": opts.scheme, "rounding": opts.rounding, "algorithm": opts.algorithm, "mode": opts.mode,
            "study": opts.study, "storage": opts.storage, "backend": opts.backend.name, "batch": opts.batch,
            "eval_images": opts.eval_images, "trials": len(rows), "select": opts.select, "hypervolume": hv, "seed": opts.seed,
            "population": opts.population, "builds": evaluator.builds, "seconds": round(seconds, 1),
            "phases": dict(phases.table()), "space": opts.space.name, "target": opts.target, "max_drop": opts.max_drop}
    closest = None if best is not None or opts.max_drop is None else _closest(rows, base)
    paper = _paper_rows(opts.storage, opts.recipe.name, opts.scheme, opts.rounding, evaluator.num_blocks, opts.select, base,
                        opts.space, opts.max_drop)
    write_outputs(opts.out, rows, base, best, meta, paper, guided, closest)
    size_ref = "uniform 8-bit" if opts.space.size_reference == "uniform8" else "FP32"
    if best is not None:
        first = f"{sum(r.feasible for r in rows)} of {len(rows)} plans feasible, {len(front)} on the front, hypervolume {hv:.4f}"
    elif opts.max_drop is not None:
        first = f"NO PLAN WITHIN --max-drop {100 * opts.max_drop:g} point(s) of FP32 among {len(rows)} measured"
        if closest is not None:
            first += f"; the closest: trial {closest.number} (plan {closest.plan.plan_id}), {closest_text(closest, base, opts.eval_images)}"
    else:
        first = f"NO FEASIBLE PLAN among {len(rows)}: none beats FP32 latency and {size_ref} size on {opts.backend.name}"
    first += f"; {evaluator.builds} real builds in {seconds:.0f} s"
    return SearchResult(first, best, rows, hv, evaluator.builds, seconds, closest)


def candidates(rows: list[Row], front: list[Row], max_drop: float | None) -> list[Row]:
    """The plans the selection picks from: the measured front, or with an accuracy budget every feasible measured
    plan. The front is Pareto-optimal in the search's top-1, measured on its subset of images; a budget near FP32's
    top-1 lies within that subset's noise (on an outlier twin, plans tied with FP32 on 1,000 images were 0.4 point
    below it on 10,000), and the fastest plan within the budget on the whole split need not be on that front."""
    return front if max_drop is None else [r for r in rows if r.feasible]


def _closest(rows: list[Row], base: dict) -> Row | None:
    """The measured plan nearest an accuracy budget none met: of those that meet the other constraints (faster than
    FP32, within the size reference; else of all), the most accurate on the whole split among those scored on it,
    else on the search's images."""
    others = [r for r in rows if all(c <= 0 for c in r.constraints[:3])] or rows
    scored = [r for r in others if r.top1_full is not None]
    if scored:
        return max(scored, key=lambda r: (r.top1_full, -r.latency_ms))
    return max(others, key=lambda r: (r.top1, -r.latency_ms), default=None)
