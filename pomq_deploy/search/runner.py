"""One ``pomq-deploy search`` run: open the study, measure baselines, run trials, verify the front, report."""

import time
from dataclasses import dataclass
from pathlib import Path

import optuna

from ..backends import Backend
from ..recipe import Recipe
from .evaluator import PlanEvaluator
from .guided import run_guided
from .report import Row, hypervolume, mark_front, rows_of, select, write_outputs
from .study import SearchConfig, baselines, open_study, run_trials, warm_ratio_cache


@dataclass(frozen=True)
class SearchOptions:
    recipe: Recipe
    scheme: str
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


@dataclass(frozen=True)
class SearchResult:
    first_line: str
    best: Row | None
    rows: list[Row]
    hypervolume: float
    builds: int  # real builds this process made
    seconds: float


def _full_top1(study: optuna.Study, evaluator: PlanEvaluator, rows: list[Row], base: dict) -> None:
    """Re-measure the front (and the baselines) on the full evaluation split, once per plan per study."""
    full = dict(study.user_attrs.get("top1_full", {}))
    for r in rows:
        if r.plan.plan_id not in full:
            full[r.plan.plan_id] = evaluator.measure(r.plan, full_test=True).top1
        r.top1_full = full[r.plan.plan_id]
    if "top1_full" not in base["fp32"]:
        from ..plan import uniform_plan

        base["fp32"]["top1_full"] = evaluator.measure(None, full_test=True).top1
        base["uniform8"]["top1_full"] = evaluator.measure(
            uniform_plan("8/8/8", evaluator.num_blocks, evaluator.recipe.name, evaluator.qmodel.scheme), full_test=True).top1
        study.set_user_attr("baselines", base)
    study.set_user_attr("top1_full", full)


def _paper_rows(storage: str, recipe: str, scheme: str, n_blocks: int, rule: str, base: dict) -> list[dict]:
    """The chosen plan of every study of this recipe and scheme in the storage (e.g. NSGA-II and random)."""
    out = []
    for summary in optuna.get_all_study_summaries(storage):
        attrs = summary.user_attrs
        if attrs.get("recipe") != recipe or attrs.get("scheme") != scheme:
            continue
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        rows = rows_of(study, n_blocks, recipe, scheme)
        front = mark_front(rows, study)
        full = study.user_attrs.get("top1_full", {})
        for r in front:
            r.top1_full = full.get(r.plan.plan_id)
        best = select(front, base, rule)
        if best is not None:
            name = {"nsga2": "NSGA-II", "random": "random (stochastic)", "model": "model-guided NSGA-II"}[attrs["algorithm"]]
            out.append({"method": f"{name}, {len(rows)} plans ({summary.study_name})", "top1": best.top1_full or best.top1,
                        "latency_ms": best.latency_ms, "size_bytes": best.size_bytes})
    return out


def run_search(opts: SearchOptions, console) -> SearchResult:
    from ._progress import trial_progress

    cfg = SearchConfig(opts.recipe.name, opts.scheme, opts.algorithm, opts.population, opts.trials, opts.seed,
                       opts.storage, opts.study)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(cfg)  # fails fast (bad URL, another recipe's study) before any calibration
    evaluator = PlanEvaluator(opts.recipe, opts.scheme, opts.backend, opts.target, opts.eval_images, opts.batch, opts.runs,
                              ratio_cache=warm_ratio_cache(study))
    start, guided = time.perf_counter(), None
    try:
        log = lambda s: console.print(f"[dim]{s}[/dim]")  # noqa: E731
        base = baselines(study, evaluator, cfg, log)
        total = opts.trials if opts.mode == "measured" else opts.builds - 2  # model mode: at most this many plans
        with trial_progress(console, study, total) as on_trial:
            if opts.mode == "model":
                guided = run_guided(study, evaluator, cfg, base, opts.builds, opts.sensitivity_images, log, on_trial)
            else:
                run_trials(study, evaluator, cfg, base, on_trial)
        rows = rows_of(study, evaluator.num_blocks, opts.recipe.name, opts.scheme)
        front = mark_front(rows, study)
        log(f"re-measuring the {len(front)} plans of the front on the full evaluation split")
        _full_top1(study, evaluator, front, base)
        best = select(front, base, opts.select)
        if best is not None:
            log(f"timing the chosen plan {best.plan.plan_id} against FP32 again, in fresh rounds")
            best.ratio_confirmed = evaluator.confirm(best.plan).as_dict()
    finally:
        evaluator.close()
    hv = hypervolume(rows, base)
    seconds = time.perf_counter() - start
    meta = {"recipe": opts.recipe.name, "scheme": opts.scheme, "algorithm": opts.algorithm, "mode": opts.mode,
            "study": opts.study, "storage": opts.storage, "backend": opts.backend.name, "batch": opts.batch,
            "eval_images": opts.eval_images, "trials": len(rows), "select": opts.select, "hypervolume": hv, "seed": opts.seed,
            "population": opts.population, "builds": evaluator.builds, "seconds": round(seconds, 1)}
    paper = _paper_rows(opts.storage, opts.recipe.name, opts.scheme, evaluator.num_blocks, opts.select, base)
    write_outputs(opts.out, rows, base, best, meta, paper, guided)
    first = (f"NO FEASIBLE PLAN among {len(rows)}: none beats FP32 latency and uniform 8-bit size on {opts.backend.name}"
             if best is None else f"{sum(r.feasible for r in rows)} of {len(rows)} plans feasible, {len(front)} on the front, "
             f"hypervolume {hv:.4f}")
    first += f"; {evaluator.builds} real builds in {seconds:.0f} s"
    return SearchResult(first, best, rows, hv, evaluator.builds, seconds)
