"""PoMQ-ViT's search as an optuna study: every evaluated plan is a trial in storage.

Genes: per encoder block, ``w``, ``a`` and ``attn`` each in {4, 8} (constraint 1 holds by construction), or
one of the target's engine formats (``--space engine``, :mod:`.space`). Objectives: top-1 (max), latency (min:
the ratio to FP32 measured interleaved with it, in the study's FP32 milliseconds), artifact bytes (min).
Constraints, recorded per trial for NSGA-II's constrained domination (<= 0 is satisfied): mixed plan (2; the
paper space only), latency below the FP32 model's on the same backend (3), size below uniform 8-bit's (4; the
engine space: below FP32's), and with ``--max-drop P`` top-1 at most P points below FP32's on the search's
evaluation images. Infeasible plans stay in the study, marked.

A plan is never evaluated twice: a trial whose plan another trial already finished (or is running) is
pruned at once, so the study ends with N completed trials holding N distinct plans, whether one process
or several share the storage; stopping a search and starting it again with the same --study continues it.
"""

import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import optuna
import sqlalchemy.exc
from optuna.trial import FrozenTrial, Trial, TrialState

from ..errors import PomqError, first_line
from ..plan import Plan
from ..progress import Phases
from ..quant.roundings import DEFAULT_ROUNDING
from ..timing import MAX_ROUNDS
from .evaluator import PlanEvaluator
from .space import PAPER, Space, get_space, plan_of

DIRECTIONS = ("maximize", "minimize", "minimize")  # top-1, latency, size
OBJECTIVES = ("top1", "latency_ms", "size_bytes")
CONSTRAINTS = ("mixed", "latency_vs_fp32", "size_vs_reference", "top1_vs_budget")  # the last with --max-drop
# a trial whose process stops beating for GRACE_S is marked failed (e.g. after SIGKILL) when any worker next starts
# a trial; whole seconds (optuna's). POMQ_HEARTBEAT_S / POMQ_GRACE_S override them: tests/test_postgres.py shortens both
HEARTBEAT_S = int(os.environ.get("POMQ_HEARTBEAT_S", "10"))
GRACE_S = int(os.environ.get("POMQ_GRACE_S", "30"))
STORAGE_ATTEMPTS = 3


class SearchError(PomqError):
    """A search cannot start: bad storage, a study of another recipe, an unknown option."""


@dataclass(frozen=True)
class SearchConfig:
    recipe: str
    scheme: str
    algorithm: str  # nsga2 | random (--mode measured) | model (--mode model: only queued plans are measured)
    population: int
    trials: int  # total completed trials the study ends with
    seed: int
    storage: str
    study_name: str
    rounding: str = DEFAULT_ROUNDING
    space: Space = PAPER
    target: str = "ort"  # whose engine formats the engine space holds
    max_drop: float | None = None  # top-1 points below FP32 a plan may lose (a constraint); None: no budget


def plan_from_params(params: dict, n_blocks: int, recipe: str, scheme: str, rounding: str = DEFAULT_ROUNDING,
                     space: Space = PAPER) -> Plan:
    return plan_of(space.settings_of(params, n_blocks), recipe, scheme, rounding)


def _suggest(trial: Trial, n_blocks: int, recipe: str, scheme: str, rounding: str, space: Space = PAPER) -> Plan:
    return plan_of(space.suggest(trial, n_blocks), recipe, scheme, rounding)


def study_rounding(attrs: dict) -> str:
    """A study's rounding (studies from before roundings existed used nearest)."""
    return attrs.get("rounding", DEFAULT_ROUNDING)


def study_space(attrs: dict) -> Space:
    """A study's search space (studies from before spaces existed searched the paper's)."""
    return get_space(attrs.get("space", "paper"), attrs.get("target", "ort"))


def constraints(plan: Plan, space: Space, top1: float, latency_ms: float, size_bytes: float, base: dict,
                max_drop: float | None) -> list[float]:
    """The plan's constraints (<= 0: met), in ``CONSTRAINTS``' order; the budget only with ``max_drop``."""
    out = [0.0 if space.feasible_mix(plan) else 1.0, latency_ms - base["fp32"]["latency_ms"],
           float(size_bytes - base[space.size_reference]["size_bytes"])]
    return out if max_drop is None else out + [base["fp32"]["top1"] - max_drop - top1]


def _budget(max_drop: float | None) -> str:
    return "no --max-drop" if max_drop is None else f"--max-drop {100 * max_drop:g}"


def make_sampler(cfg: SearchConfig) -> optuna.samplers.BaseSampler:
    if cfg.algorithm == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=cfg.population, seed=cfg.seed)
    if cfg.algorithm in ("random", "model"):
        return optuna.samplers.RandomSampler(seed=cfg.seed)
    raise SearchError(f"--algorithm {cfg.algorithm!r}; allowed: nsga2, random")


def _schema_race(e: Exception) -> bool:
    """Whether ``e`` is what a worker gets when another creates the same new database's tables at the same moment
    (SQLite: "table ... already exists", "UNIQUE constraint failed: alembic_version"; PostgreSQL: DuplicateTable,
    a ProgrammingError, or a unique violation in its catalog): the loser finds them made when it tries again."""
    if isinstance(e, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.IntegrityError)):
        return True
    return isinstance(e, sqlalchemy.exc.ProgrammingError) and "already exists" in str(e)


def open_study(cfg: SearchConfig) -> optuna.Study:
    """Create or load the study; refuse one that belongs to another recipe, scheme or rounding."""
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeat_interval
    for attempt in range(STORAGE_ATTEMPTS):
        try:
            storage = optuna.storages.RDBStorage(cfg.storage, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S)
            study = optuna.create_study(study_name=cfg.study_name, storage=storage, sampler=make_sampler(cfg),
                                        directions=list(DIRECTIONS), load_if_exists=True)
            break
        except SearchError:
            raise
        except Exception as e:  # sqlalchemy's ArgumentError/OperationalError, a missing driver, ...
            first = first_line(e)
            if _schema_race(e) and attempt + 1 < STORAGE_ATTEMPTS:
                time.sleep(1.0 + attempt)
                continue
            raise SearchError(f"--storage {cfg.storage}: cannot open the study storage ({first})") from None
    owner = study.user_attrs.get("recipe")
    if owner is None:
        study.set_user_attr("recipe", cfg.recipe)
        study.set_user_attr("scheme", cfg.scheme)
        study.set_user_attr("rounding", cfg.rounding)
        study.set_user_attr("algorithm", cfg.algorithm)
        study.set_user_attr("space", cfg.space.name)
        study.set_user_attr("target", cfg.target)
        study.set_user_attr("max_drop", cfg.max_drop)
    elif owner != cfg.recipe or study.user_attrs.get("scheme") != cfg.scheme or study_rounding(study.user_attrs) != cfg.rounding:
        raise SearchError(f"--study {cfg.study_name}: belongs to recipe {owner!r} (scheme {study.user_attrs.get('scheme')!r}, "
                          f"rounding {study_rounding(study.user_attrs)!r}), not {cfg.recipe!r} ({cfg.scheme!r}, "
                          f"{cfg.rounding!r}); pick another --study")
    else:
        a = study.user_attrs
        mine = (study_space(a).settings, a.get("max_drop"))
        if mine != (cfg.space.settings, cfg.max_drop):
            raise SearchError(f"--study {cfg.study_name}: searched the {a.get('space', 'paper')} space"
                              f"{'' if a.get('space', 'paper') == 'paper' else ' of ' + a.get('target', 'ort')} with "
                              f"{_budget(a.get('max_drop'))}, not the {cfg.space.name} space with {_budget(cfg.max_drop)}; "
                              "pick another --study")
    return study


def baselines(study: optuna.Study, evaluator: PlanEvaluator, cfg: SearchConfig, phases: Phases) -> dict:
    """FP32 and uniform 8-bit top-1, size and latency, measured once per study and kept in it."""
    if "baselines" in study.user_attrs:
        return study.user_attrs["baselines"]
    with phases("the baselines: FP32 and uniform 8/8/8 built, evaluated and timed interleaved (rounds)", total=MAX_ROUNDS) as step:
        out = evaluator.baselines(on_round=step)
    stored = study.user_attrs.get("baselines")  # read from the storage again
    if stored is not None:  # a worker started beside this one measured them first: all share one reference
        return stored
    study.set_user_attr("baselines", out)
    return out


def record(trial: Trial, plan: Plan, evaluator: PlanEvaluator, study: optuna.Study, base: dict) -> tuple[float, float, float]:
    """Measure ``plan`` for ``trial``: its objectives, with what was measured and the constraints in its user
    attributes (NSGA-II's constrained domination reads the constraints)."""
    start = time.perf_counter()
    m = evaluator.measure(plan)
    ref = study.user_attrs.get("baselines", base)  # the study's, should another worker have stored its own
    latency = m.ratio.ratio * ref["fp32"]["latency_ms"]  # the ratio, measured interleaved, in the study's FP32 ms
    attrs = study.user_attrs
    met = constraints(plan, study_space(attrs), m.top1, latency, m.size_bytes, ref, attrs.get("max_drop"))
    ratio_uniform8 = m.ratio.ratio / ref["uniform8"]["ratio"]["ratio"]  # via FP32: uniform 8-bit's from the baselines
    for k, v in (m.attrs() | {"latency_ms": latency, "ratio_uniform8": ratio_uniform8, "constraints": met}).items():
        trial.set_user_attr(k, v)
    for name, value in zip(CONSTRAINTS, met, strict=False):
        trial.set_constraint(name, value)
    trial.set_user_attr("feasible", all(c <= 0 for c in met))
    trial.set_user_attr("seconds", round(time.perf_counter() - start, 2))
    return m.top1, latency, float(m.size_bytes)


def _measure_new(trial: Trial, plan: Plan, evaluator: PlanEvaluator, study: optuna.Study, base: dict):
    """``record`` ``plan`` for ``trial``, unless another trial, finished or running, holds it: then prune this one."""
    trial.set_user_attr("plan_id", plan.plan_id)
    others = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
    twin = next((t for t in others if t.number != trial.number and t.user_attrs.get("plan_id") == plan.plan_id), None)
    if twin is not None:
        trial.set_user_attr("duplicate_of", twin.number)
        raise optuna.TrialPruned(f"plan {plan.plan_id} is trial {twin.number}'s")
    return record(trial, plan, evaluator, study, base)


def run_trials(study: optuna.Study, evaluator: PlanEvaluator, cfg: SearchConfig, base: dict,
               on_trial: Callable[[FrozenTrial], None] | None = None, seconds: float | None = None) -> None:
    """Optimise until the study holds ``cfg.trials`` completed trials (with any number of workers), or for
    ``seconds`` (a time budget: tools/search_study.py compares searches at equal wall-clock time)."""
    n = evaluator.num_blocks

    def objective(trial: Trial):
        plan = _suggest(trial, n, cfg.recipe, cfg.scheme, cfg.rounding, cfg.space)
        trial.set_user_attr("source", "search")
        if len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) >= cfg.trials:
            study.stop()
            raise optuna.TrialPruned("the study already holds enough trials")
        return _measure_new(trial, plan, evaluator, study, base)

    def stop_when_done(study: optuna.Study, trial: FrozenTrial) -> None:
        if on_trial is not None and trial.state == TrialState.COMPLETE:
            on_trial(trial)
        if len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) >= cfg.trials:
            study.stop()

    # a worker killed mid-trial left it RUNNING: optuna fails it only when a trial starts after the grace period,
    # which a study already full never does
    optuna.storages.fail_stale_trials(study)
    done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    if done >= cfg.trials:
        return
    # pruned duplicates do not count, so allow generously many attempts; stop_when_done ends the loop
    study.optimize(objective, n_trials=20 * cfg.trials, callbacks=[stop_when_done], catch=(), timeout=seconds)


def measure_plans(study: optuna.Study, evaluator: PlanEvaluator, base: dict, plans: list[Plan], source: str,
                  predicted: list[dict] | None = None, on_trial: Callable[[FrozenTrial], None] | None = None) -> None:
    """Measure the given plans as trials of the study (the model-guided search's design set and front): each is
    queued (once, whichever worker queues it), then this process takes queued trials until none is left, so that
    workers sharing the study split the list and none measures a plan another has."""
    n = evaluator.num_blocks
    optuna.storages.fail_stale_trials(study)  # see run_trials
    # queued once: not again while a trial holds the plan (finished, running or queued); a failed one (its worker
    # was killed) is queued again, which optuna's own skip_if_exists would not do
    live = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING))
    have = {tuple(sorted(t.system_attrs.get("fixed_params", t.params).items())) for t in live}
    space = study_space(study.user_attrs)
    for i, plan in enumerate(plans):
        params = space.params(plan)
        if tuple(sorted(params.items())) not in have:
            study.enqueue_trial(params, user_attrs={"source": source} | ({"predicted": predicted[i]} if predicted else {}))
            have.add(tuple(sorted(params.items())))

    def objective(trial: Trial):
        if "source" not in trial.user_attrs:  # not a queued plan: the queue is empty, other workers took the rest
            study.stop()
            raise optuna.TrialPruned("no queued plan left")
        a = study.user_attrs
        return _measure_new(trial, _suggest(trial, n, a["recipe"], a["scheme"], study_rounding(a), space), evaluator, study, base)

    def report(study: optuna.Study, trial: FrozenTrial) -> None:
        if on_trial is not None and trial.state == TrialState.COMPLETE:
            on_trial(trial)

    waiting = len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
    if waiting:  # through optimize, so that a killed worker's trial is failed by the heartbeat like any other
        study.optimize(objective, n_trials=waiting, callbacks=[report], catch=())


def warm_ratio_cache(study: optuna.Study) -> dict:
    """Latency ratios already measured in this study (by graph signature), for a resumed or second worker."""
    cache = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if t.user_attrs.get("ratio") is not None and not t.user_attrs.get("latency_cached"):
            cache[t.user_attrs["latency_key"]] = t.user_attrs["ratio"]
    return cache
