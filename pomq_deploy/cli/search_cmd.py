"""pomq-deploy search: PoMQ-ViT's Pareto search over per-block 4/8-bit plans (optuna NSGA-II or random)."""

import argparse
import json
from pathlib import Path

from ._common import add_recipe_arguments, add_scheme_argument, positive_int

HELP = "search per-block 4/8-bit plans for the Pareto front of top-1, latency and size"
DESCRIPTION = """\
Every candidate plan is exported, built on the backend and measured: top-1 on the first eval_images of
the evaluation split (through the backend), latency median at the search batch, artifact bytes. A plan
is feasible when it mixes widths, beats the FP32 model's latency and is smaller than uniform 8-bit;
infeasible plans stay in the study, marked. Each evaluated plan is an optuna trial in --storage (default:
SQLite in the output directory): stop the search at any moment and start it again with the same --study
to continue, or start several processes on one storage to share the work (PostgreSQL for many machines).
At the end the Pareto front is re-measured on the full evaluation split and DIR gets pareto.json,
pareto.png, report.md and best.yaml (for pomq-deploy build --plan). Defaults come from the recipe's
'search' section. Exits 1 when no plan is feasible, unless --allow-infeasible.

examples:
  pomq-deploy search                                   # the embedded model, recipe defaults (72 plans: about 12 min here)
  pomq-deploy search --algorithm random --trials 128 --study fmnist-random
  pomq-deploy search --population 8 --generations 4 --out /tmp/quick
  pomq-deploy search --storage postgresql://user@db/pomq --study shared   # one of several workers
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..backends import add_backend_arguments
    from ..search import SELECT_RULES

    add_recipe_arguments(p)
    g = p.add_argument_group("search (defaults: the recipe's 'search' section)")
    g.add_argument("--algorithm", choices=("nsga2", "random"), help="NSGA-II, or random sampling ('stochastic' in the paper)")
    g.add_argument("--population", type=positive_int, help="NSGA-II population size")
    g.add_argument("--generations", type=positive_int, help="NSGA-II generations (trials = population x generations)")
    g.add_argument("--trials", type=positive_int, help="plans to evaluate (overrides population x generations)")
    g.add_argument("--seed", type=int, help="sampler seed")
    add_scheme_argument(g, "the recipe's search.scheme")
    g.add_argument("--eval-images", type=positive_int, help="top-1 objective on the first N evaluation images")
    g.add_argument("--select", choices=list(SELECT_RULES), default="top1-within-1pt",
                   help="rule that picks best.yaml from the front (default: top1-within-1pt = "
                   + SELECT_RULES["top1-within-1pt"] + ")")
    g.add_argument("--allow-infeasible", action="store_true", help="exit 0 even when no plan meets the constraints")
    b = add_backend_arguments(p)
    b.add_argument("--batch", type=positive_int, help="latency batch size (and the tensorrt engine's batch)")
    b = p.add_argument_group("storage")
    b.add_argument("--storage", metavar="URL", help="optuna storage URL (default: sqlite:///DIR/study.db)")
    b.add_argument("--study", metavar="NAME", help="study name (default: <recipe>-<scheme>-<algorithm>-s<seed>)")
    p.add_argument("--out", metavar="DIR", type=Path, help="output directory (default: searches/<study>)")
    p.add_argument("--json", action="store_true", help="print the chosen plan and its measurements as JSON")


def run(args: argparse.Namespace) -> int:
    from ..backends import BACKENDS, backend_from_args
    from ..search.runner import SearchOptions, run_search
    from ._common import recipe_from_args
    from ._console import stderr, stdout

    recipe = recipe_from_args(args)
    spec = recipe.search
    algorithm = args.algorithm or spec.algorithm
    population = args.population or spec.population
    trials = args.trials or spec.trials if algorithm == "random" else args.trials
    trials = trials or population * (args.generations or spec.generations)
    seed = spec.seed if args.seed is None else args.seed
    scheme = args.scheme or spec.scheme
    study = args.study or f"{recipe.name}-{scheme}-{algorithm}-s{seed}"
    out = args.out or Path("searches") / study
    storage = args.storage or f"sqlite:///{(out / 'study.db').resolve()}"
    if args.storage is None:
        out.mkdir(parents=True, exist_ok=True)
    batch = args.batch or spec.batch
    backend = backend_from_args(args, batch, out)
    opts = SearchOptions(recipe=recipe, scheme=scheme, algorithm=algorithm, population=population, trials=trials, seed=seed,
                         storage=storage, study=study, out=out, backend=backend, target=BACKENDS[args.backend].default_target,
                         eval_images=args.eval_images or spec.eval_images, batch=batch,
                         runs=spec.latency_runs, select=args.select)
    result = run_search(opts, stderr)
    say = stderr if args.json else stdout  # with --json, stdout holds the JSON object alone
    say.print(result.first_line)
    if result.best is not None:
        b = result.best
        say.print(f"best.yaml: trial {b.number}, plan {b.plan.plan_id}: top-1 {b.top1_full:.4f} (full), "
                  f"latency {b.latency_ms:.2f} ms, size {b.size_bytes / 1e6:.2f} MB -> {out / 'best.yaml'}")
    say.print(f"report: {out / 'report.md'}  plot: {out / 'pareto.png'}  all trials: {out / 'pareto.json'}")
    if args.json:
        print(json.dumps(result.best.as_dict() if result.best else None))
    return 0 if result.best is not None or args.allow_infeasible else 1
