"""The model-guided search (``--mode model``): measure a small design set for real, fit the latency, size and
accuracy models on it (:mod:`.models`), run NSGA-II on the models for thousands of plans (seconds), then build
and measure the predicted front for real. Real measurements are trials of the study, so a resumed or shared
study reuses them; best.yaml comes only from measured plans."""

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import optuna
import torch
from optuna.trial import Trial, TrialState

from ..plan import Plan
from ..progress import Phases
from ..recipe import ModelSpec
from ._progress import trial_step
from .evaluator import PlanEvaluator
from .models import AccuracyModel, AdditiveModel, block_groups, design_plans, errors, kl_sensitivities
from .space import Space, sensitivity_settings, text
from .study import CONSTRAINTS, DIRECTIONS, SearchConfig, SearchError, _suggest, constraints, measure_plans, plan_from_params, study_rounding, study_space

MODEL_TRIALS, MODEL_POPULATION = 3000, 60  # NSGA-II on the models: thousands of plans in seconds


@dataclass
class Models:
    latency: AdditiveModel  # ratio to FP32
    size: AdditiveModel  # bytes
    accuracy: AccuracyModel
    measured_on: dict  # backend, machine, batch: the models hold only there

    def predict(self, plan: Plan, base: dict) -> dict:
        return {"top1": self.accuracy.predict(plan), "latency_ms": self.latency.predict(plan) * base["fp32"]["latency_ms"],
                "size_bytes": self.size.predict(plan)}

    def as_dict(self) -> dict:
        reference = "top1_uniform8" if self.accuracy.space == "paper" else "top1_fp32"
        return {"measured_on": self.measured_on, "groups": self.latency.groups, "settings": [text(s) for s in self.latency.settings],
                "latency_ratio_coef": self.latency.coef, "size_coef": self.size.coef,
                "accuracy": {reference: self.accuracy.reference_top1, "kl": self.accuracy.kl, "kl_to_top1_drop": self.accuracy.coef}}


@dataclass
class GuidedResult:
    models: Models
    predicted: list[dict]  # the predicted front: plan, predicted objectives, the trial that measured it (or None)
    errors: dict  # the models against the measured front plans (not used to fit them)


def measured_on(evaluator: PlanEvaluator) -> dict:
    """What the latency model depends on: the backend, its machine and the batch."""
    if evaluator.backend.name == "ort-cpu":
        from ..backends.cpu import detect

        machine = detect().describe()
    else:
        machine = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "unknown GPU"
    return {"backend": evaluator.backend.name, "machine": machine, "batch": evaluator.batch}


class _Images:
    """The images of a loader's (images, labels) batches, read anew on each pass: one batch in memory at a time."""

    def __init__(self, loader: Iterable):
        self.loader = loader

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (x for x, _ in self.loader)


def _sensitivities(study: optuna.Study, evaluator: PlanEvaluator, images: int, phases: Phases, space: Space) -> list[dict]:
    """Per-gene (paper space) or per-format (engine space) KL sensitivities, measured once per study (kept in it)."""
    key = f"kl_sensitivity_{images}"
    if key not in study.user_attrs:
        from ..data import eval_dataset, eval_loader
        from ..models.loading import data_model

        r = evaluator.recipe
        loader = eval_loader(eval_dataset(r.data, data_model(r.model)), r.eval.batch_size, images, r.data.workers)
        batches = _Images(loader)
        cfg = study.user_attrs
        if space.name == "paper":
            steps, what = 3 * evaluator.num_blocks, "one-gene-4-bit"
        else:
            steps, what = len(sensitivity_settings(space)) * evaluator.num_blocks, "one-block-one-format"
        with phases(f"per-block sensitivities: {steps} {what} runs of the PyTorch model on {len(loader.dataset)} images",
                    total=steps) as step:
            study.set_user_attr(key, kl_sensitivities(evaluator.qmodel, batches, cfg["recipe"], cfg["scheme"], on_step=step,
                                                      space=space))
    return study.user_attrs[key]


def fit(study: optuna.Study, evaluator: PlanEvaluator, base: dict, sensitivity_images: int, phases: Phases) -> Models:
    """Fit the models on the study's design trials and the uniform 8-bit baseline."""
    n, recipe, scheme = evaluator.num_blocks, study.user_attrs["recipe"], study.user_attrs["scheme"]
    rounding, space = study_rounding(study.user_attrs), study_space(study.user_attrs)
    here = measured_on(evaluator)
    stored = study.user_attrs.get("models_measured_on")
    if stored is not None and stored != here:
        raise SearchError(f"--study {study.study_name}: its latency model was measured on {stored['backend']} / "
                          f"{stored['machine']} at batch {stored['batch']}, not here ({here['backend']} / {here['machine']} "
                          f"at batch {here['batch']}); pick another --study or --mode measured")
    study.set_user_attr("models_measured_on", here)
    design = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.user_attrs.get("source") == "design"]
    plans = [plan_from_params(t.params, n, recipe, scheme, rounding, space) for t in design] + [evaluator.uniform8()]
    ratios = [t.user_attrs["ratio"]["ratio"] for t in design] + [base["uniform8"]["ratio"]["ratio"]]
    sizes = [t.user_attrs["size_bytes"] for t in design] + [base["uniform8"]["size_bytes"]]
    top1 = [t.user_attrs["top1"] for t in design] + [base["uniform8"]["top1"]]
    groups = block_groups(evaluator.qmodel.blocks)
    kl = _sensitivities(study, evaluator, sensitivity_images, phases, space)
    if space.name == "paper":  # the drop below uniform 8-bit, whose perturbation is 0 by construction
        accuracy = AccuracyModel(base["uniform8"]["top1"], kl).fit(plans[:-1], top1[:-1])
    else:  # the drop below FP32: uniform 8-bit is a measured point like any other
        accuracy = AccuracyModel(base["fp32"]["top1"], kl, space="engine").fit(plans, top1)
    return Models(AdditiveModel.fit(plans, ratios, groups, space.settings), AdditiveModel.fit(plans, sizes, groups, space.settings),
                  accuracy, here)


def predicted_front(models: Models, cfg: SearchConfig, n_blocks: int, base: dict,
                    on_trial: Callable[[], None] | None = None) -> list[dict]:
    """NSGA-II on the models alone (an in-memory study): the feasible plans no other predicted plan dominates."""
    study = optuna.create_study(directions=list(DIRECTIONS),
                                sampler=optuna.samplers.NSGAIISampler(population_size=MODEL_POPULATION, seed=cfg.seed))

    def objective(trial: Trial):
        plan = _suggest(trial, n_blocks, cfg.recipe, cfg.scheme, cfg.rounding, cfg.space)
        p = models.predict(plan, base)
        for name, value in zip(CONSTRAINTS, constraints(plan, cfg.space, p["top1"], p["latency_ms"], p["size_bytes"], base,
                                                        cfg.max_drop), strict=False):
            trial.set_constraint(name, value)
        return p["top1"], p["latency_ms"], p["size_bytes"]

    study.optimize(objective, n_trials=MODEL_TRIALS, callbacks=[lambda *_: on_trial()] if on_trial else None)
    front = {}
    for t in study.best_trials:
        plan = plan_from_params(t.params, n_blocks, cfg.recipe, cfg.scheme, cfg.rounding, cfg.space)
        front[plan.plan_id] = {"plan": plan, "predicted": dict(zip(("top1", "latency_ms", "size_bytes"), t.values, strict=True))}
    return sorted(front.values(), key=lambda p: p["predicted"]["latency_ms"])


def pick(front: list[dict], k: int, base: dict, measured: set[str], max_drop: float | None = None) -> list[dict]:
    """Up to ``k`` plans of the predicted front not measured yet: first the one the selection would choose (the
    fastest within 1 point of uniform 8-bit's top-1, or within ``max_drop`` of FP32's), then plans spread evenly
    along predicted latency."""
    todo = [p for p in front if p["plan"].plan_id not in measured]
    if k <= 0 or not todo:
        return []
    floor = base["uniform8"]["top1"] - 0.01 if max_drop is None else base["fp32"]["top1"] - max_drop
    close = [p for p in todo if p["predicted"]["top1"] >= floor]
    chosen = [min(close, key=lambda p: p["predicted"]["latency_ms"])] if close else []
    rest = [p for p in todo if p not in chosen]
    want = k - len(chosen)
    if want >= len(rest):
        return chosen + rest
    step = (len(rest) - 1) / max(want - 1, 1)
    return chosen + [rest[round(i * step)] for i in range(want)]


def check_builds(study: optuna.Study, model: ModelSpec, cfg: SearchConfig, builds: int) -> None:
    """Refuse ``--builds`` below what the search builds before it can predict anything: the two baselines and
    the design set's plans that the study has not measured yet. Before calibrating: the blocks are read off the
    model's shape alone."""
    from ..models.loading import data_model
    from ..quant.model import find_blocks

    done = {t.user_attrs.get("plan_id") for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}
    design = design_plans(block_groups(find_blocks(data_model(model))), cfg.recipe, cfg.scheme, cfg.rounding, cfg.space)
    need = 2 + sum(p.plan_id not in done for p in design)
    if builds < need:
        raise SearchError(f"--builds {builds}: the model-guided search builds the two baselines and the {need - 2} "
                          f"design plans this study has not measured ({len(design)} for this model and space) before "
                          f"it predicts a front; give --builds {need} or more (the recipe's search.builds), or --mode measured")


def run_guided(study: optuna.Study, evaluator: PlanEvaluator, cfg: SearchConfig, base: dict, builds: int,
               sensitivity_images: int, phases: Phases) -> GuidedResult:
    """Design set -> models -> NSGA-II on the models -> the predicted front measured, within ``builds`` real builds
    of this process (the baselines' two included); each a phase of ``phases``."""
    groups = block_groups(evaluator.qmodel.blocks)
    design = design_plans(groups, cfg.recipe, cfg.scheme, cfg.rounding, cfg.space)
    with phases(f"design set: {len(design)} plans built and measured ({len(set(groups))} group(s) of same-shaped blocks)",
                total=len(design)) as step:
        measure_plans(study, evaluator, base, design, "design", on_trial=trial_step(step))
    models = fit(study, evaluator, base, sensitivity_images, phases)
    with phases(f"NSGA-II on the models: {MODEL_TRIALS} predicted plans", total=MODEL_TRIALS) as step:
        front = predicted_front(models, cfg, evaluator.num_blocks, base, on_trial=step)
    done = {t.user_attrs.get("plan_id") for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}
    picks = pick(front, builds - evaluator.builds, base, done, cfg.max_drop)
    with phases(f"predicted front: {len(front)} plans, {len(picks)} of them built and measured", total=len(picks)) as step:
        measure_plans(study, evaluator, base, [p["plan"] for p in picks], "front",
                      predicted=[p["predicted"] for p in picks], on_trial=trial_step(step))
    trials = {t.user_attrs.get("plan_id"): t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}
    for p in front:
        t = trials.get(p["plan"].plan_id)
        p["trial"] = None if t is None else t.number
    held_out = [t for t in trials.values() if t.user_attrs.get("source") != "design"]
    n, recipe, scheme = evaluator.num_blocks, cfg.recipe, cfg.scheme
    preds = [models.predict(plan_from_params(t.params, n, recipe, scheme, cfg.rounding, cfg.space), base) for t in held_out]
    errs = {"latency": errors([p["latency_ms"] for p in preds], [t.user_attrs["latency_ms"] for t in held_out], relative=True),
            "top1": errors([p["top1"] for p in preds], [t.user_attrs["top1"] for t in held_out], relative=False),
            "size": errors([p["size_bytes"] for p in preds], [t.user_attrs["size_bytes"] for t in held_out], relative=True)}
    return GuidedResult(models, front, errs)
