"""Model-guided vs fully measured search on the reference model, at equal wall-clock time; writes docs/search.md
and docs/search.png.

For each seed: (1) ``--mode model`` within --builds real builds; then (2) ``--mode measured`` NSGA-II and (3)
random sampling, each given the model-guided run's wall-clock time. Every run has its own evaluator (no latency
cache or build shared) and its own baselines. The hypervolume of the measured feasible front is tracked after
each measured plan, against wall-clock time and against real builds. The first seed's models are then checked
against --holdout random mixed plans measured for real (latency MAPE and Spearman, top-1 MAE and Spearman):
top-1 on the whole test split, and the plans' latency ratios timed together, in the same interleaved rounds.

    python tools/search_study.py                  # 3 seeds: ~25 min on 2 quiet cores
    python tools/search_study.py --seeds 0 --holdout 8 --eval-images 200 --out /tmp/s.md
"""

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import optuna
from optuna.trial import TrialState
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pomq_deploy.atomic import replace_atomically, write_generated
from pomq_deploy.backends.cpu import detect
from pomq_deploy.backends.ort_cpu import OrtCpuBackend
from pomq_deploy.progress import Phases
from pomq_deploy.recipe import load_recipe
from pomq_deploy.search.guided import run_guided
from pomq_deploy.search.models import AdditiveModel, design_plans, errors, plan_of
from pomq_deploy.search.report import hypervolume, rows_of
from pomq_deploy.search.study import SearchConfig, baselines, open_study, run_trials

METHODS = {"model": "model-guided (NSGA-II on models, front measured)", "nsga2": "measured, NSGA-II",
           "random": "measured, random"}


def run(args, recipe, storage: str, method: str, seed: int, seconds: float | None, holdout: int) -> dict:
    from pomq_deploy.search.evaluator import PlanEvaluator

    phases = Phases(Console(stderr=True))  # each phase shown on the terminal, its seconds in the log
    evaluator = PlanEvaluator(recipe, args.scheme, args.rounding, OrtCpuBackend(threads=2), "ort", args.eval_images, args.batch,
                              args.latency_runs, track=phases.track)
    cfg = SearchConfig(recipe.name, args.scheme, method, args.population, 10**6, seed, storage, f"{method}-s{seed}",
                       args.rounding)
    study = open_study(cfg)
    start = time.time()
    base = baselines(study, evaluator, cfg, phases)
    out = {"method": method, "seed": seed}
    if method == "model":
        guided = run_guided(study, evaluator, cfg, base, args.builds, recipe.search.sensitivity_images, phases)
        out["errors_front"] = guided.errors
    else:
        with phases(f"{METHODS[method]} for {seconds:.0f} s") as step:
            run_trials(study, evaluator, cfg, base, on_trial=lambda t: step(), seconds=max(1.0, seconds - (time.time() - start)))
    out["seconds"] = time.time() - start
    trials = sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.datetime_complete)
    rows = {r.number: r for r in rows_of(study, evaluator.num_blocks, recipe.name, args.scheme, args.rounding)}
    curve = [(t.datetime_complete.timestamp() - start, 2 + k, hypervolume([rows[x.number] for x in trials[:k]], base))
             for k, t in enumerate(trials, 1)]
    out |= {"curve": curve, "builds": evaluator.builds, "hypervolume": curve[-1][2] if curve else 0.0, "plans": len(trials)}
    if holdout and method == "model":  # the models against random mixed plans measured for real
        rng = random.Random(seed)
        plans = [plan_of([tuple(rng.choice((4, 8)) for _ in range(3)) for _ in range(evaluator.num_blocks)], recipe.name,
                         args.scheme, args.rounding) for _ in range(holdout)]
        top1 = evaluator.full_top1(plans, evaluator.full_loader())  # top-1 on the whole test split, builds untimed
        # the design set (and uniform 8-bit) in the same rounds too, up to 20: a latency model refitted on those
        # ratios has no drift between its fit and its check, so its error is the additive model's own
        groups = guided.models.latency.groups
        design = [*design_plans(groups, recipe.name, args.scheme, args.rounding), evaluator.uniform8()]
        together = evaluator.time_together(design + plans)
        ratios = [r.ratio for r in together[len(design):]]
        refit = AdditiveModel.fit(design, [r.ratio for r in together[:len(design)]], groups)
        preds = [guided.models.predict(p, base) for p in plans]
        out["errors_holdout"] = {
            "latency": errors([p["latency_ms"] / base["fp32"]["latency_ms"] for p in preds], ratios, True),
            "top1": errors([p["top1"] for p in preds], top1, False),
            "latency_refit": errors([refit.predict(p) for p in plans], ratios, True)}
        out["holdout_spread"] = statistics.median(r.spread for r in together)
    evaluator.close()
    print(f"{method} seed {seed}: {out['plans']} plans, {out['builds']} builds, {out['seconds']:.0f} s, "
          f"hypervolume {out['hypervolume']:.4f}", file=sys.stderr, flush=True)
    return out


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colors = {"model": "tab:red", "nsga2": "tab:blue", "random": "tab:gray"}
    for r in runs:
        label = METHODS[r["method"]] if r["seed"] == runs[0]["seed"] else None
        if r["curve"]:
            s, b, hv = zip(*r["curve"], strict=True)
            axes[0].step(s, hv, where="post", color=colors[r["method"]], alpha=0.8, label=label)
            axes[1].step(b, hv, where="post", color=colors[r["method"]], alpha=0.8, label=label)
    axes[0].set_xlabel("wall-clock seconds (baselines included)")
    axes[1].set_xlabel("real builds (the two baselines included)")
    for ax in axes:
        ax.set_ylabel("hypervolume of the measured feasible front")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    replace_atomically(path, lambda p: fig.savefig(p, format="png", dpi=110))
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="deit_fmnist")
    p.add_argument("--scheme", default="fqvit")
    p.add_argument("--rounding", default="nearest")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--builds", type=int, default=20, help="the model-guided search's real builds")
    p.add_argument("--population", type=int, default=12, help="measured NSGA-II's population")
    p.add_argument("--eval-images", type=int, default=1000)
    p.add_argument("--latency-runs", type=int, default=5, help="timed runs per artifact per interleaved round")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--holdout", type=int, default=20, help="random mixed plans the first seed's models are checked on")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "search.md")
    args = p.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    recipe = load_recipe(args.recipe)
    storage = f"sqlite:///{tempfile.mkdtemp(prefix='pomq-study-')}/study.db"
    start, runs = time.time(), []
    for seed in args.seeds:
        guided = run(args, recipe, storage, "model", seed, None, args.holdout if seed == args.seeds[0] else 0)
        runs.append(guided)
        for method in ("nsga2", "random"):
            runs.append(run(args, recipe, storage, method, seed, guided["seconds"], 0))
    plot(runs, args.out.with_suffix(".png"))
    cpu = detect().describe()
    lines = ["# Model-guided vs fully measured search", "",
             f"Reference model (`{recipe.name}`, scheme `{args.scheme}`), ort-cpu, 2 threads, batch {args.batch}, top-1 on "
             f"the first {args.eval_images} test images. CPU: {cpu}. For each seed, `--mode model` ran within "
             f"{args.builds} real builds; the fully measured NSGA-II (population {args.population}) and random searches "
             "then got the same wall-clock time. Hypervolume: measured feasible front in (1 - top-1, latency / FP32's, "
             "size / uniform 8-bit's) against (1, 1, 1); larger is better. Latencies are ratios to FP32 timed "
             "interleaved with it.", "", f"![hypervolume vs time and builds]({args.out.with_suffix('.png').name})", "",
             "Regenerate with:", "", "```bash", ".venv/bin/python tools/search_study.py", "```", "",
             "| method | seed | plans measured | real builds | seconds | hypervolume |", "| --- | --- | --- | --- | --- | --- |"]
    for r in runs:
        lines.append(f"| {METHODS[r['method']]} | {r['seed']} | {r['plans']} | {r['builds']} | {r['seconds']:.0f} | "
                     f"{r['hypervolume']:.4f} |")
    mean = {m: np.mean([r["hypervolume"] for r in runs if r["method"] == m]) for m in METHODS}
    lines += ["", "Mean hypervolume over seeds: " + ", ".join(f"{METHODS[m]} {v:.4f}" for m, v in mean.items()) + ".",
              f"Goal (model-guided >= fully measured NSGA-II at equal wall-clock time): "
              f"{'met' if mean['model'] >= mean['nsga2'] else 'not met'}; vs random: "
              f"{'met' if mean['model'] >= mean['random'] else 'not met'}.", ""]
    first = runs[0]
    if "errors_holdout" in first:
        h, f = first["errors_holdout"], first["errors_front"]
        lines += [f"## The models against plans they were not fitted on (seed {first['seed']})", "",
                  "| plans | n | latency MAPE | latency Spearman | top-1 MAE (points) | top-1 Spearman |",
                  "| --- | --- | --- | --- | --- | --- |",
                  f"| random mixed plans | {h['latency']['n']} | {h['latency']['mape_pct']:.1f}% | {h['latency']['spearman']:.3f} | "
                  f"{100 * h['top1']['mae']:.2f} | {h['top1']['spearman']:.3f} |",
                  f"| the measured predicted front | {f['latency']['n']} | {f['latency']['mape_pct']:.1f}% | "
                  f"{f['latency']['spearman']:.3f} | {100 * f['top1']['mae']:.2f} | {f['top1']['spearman']:.3f} |",
                  f"| random mixed plans, latency model refitted on the design set timed with them | {h['latency_refit']['n']} | "
                  f"{h['latency_refit']['mape_pct']:.1f}% | {h['latency_refit']['spearman']:.3f} | - | - |", "",
                  f"Random mixed plans: top-1 on the whole test split (the accuracy model was fitted on the first "
                  f"{args.eval_images} images); latency ratios timed together, all {h['latency']['n']} plans and the design "
                  f"set with FP32 in the same interleaved rounds (median 90% interval +-{100 * first['holdout_spread']:.1f}%). "
                  "The first two rows are the models as the search fitted them, on the design set timed one plan at a "
                  "time during the search; the third row's latency model is fitted on the design set's ratios from the "
                  "held-out plans' rounds, so its error is the additive model's own, without the host's drift between "
                  "fit and check. The front's plans were each timed alone, during the search.", "",
                  "Goals: latency MAPE <= 5% and Spearman >= 0.9 for both.", ""]
    lines.append(f"Total wall time {time.time() - start:.0f} s.")
    write_generated(args.out, "\n".join(lines) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
