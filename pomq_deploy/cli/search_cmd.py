"""pomq-deploy search: PoMQ-ViT's Pareto search over per-block 4/8-bit plans, or over the formats the target's engine
runs per block (optuna NSGA-II or random)."""

import argparse
import json
from pathlib import Path

from ._common import add_device_argument, add_recipe_arguments, add_rounding_argument, add_scheme_argument, device_of, output_folder, positive_int

HELP = "search per-block plans (4/8-bit, or the engine's formats) for the Pareto front of top-1, latency and size"
DESCRIPTION = """\
A measured plan is exported, built on the backend and measured: top-1 on the first eval_images of the
evaluation split (through the backend), artifact bytes, and latency as a ratio to the FP32 model's, timed
interleaved with FP32 until the ratio's 90% interval is within +-3% (shown in the study's
FP32 milliseconds). A plan is feasible when it mixes widths, beats FP32's latency and is smaller than
uniform 8-bit; infeasible plans stay in the study, marked.

--mode model (default): a design set of plans (each setting on every block, four alternating with 8/8/8) is
measured for real; additive latency and size models and a per-block accuracy model (KL sensitivities of
the PyTorch model, no build) are fitted on it; NSGA-II runs on the models for thousands of plans; then the
predicted front is built and measured, within --builds real builds. --mode measured: NSGA-II (or random)
where every trial is built and measured (PoMQ-ViT's own loop; for small budgets and comparison).

--space paper (default): PoMQ-ViT's genes, w, a and attn each 4 or 8 per block, with its constraints.
--space engine: per block one of the formats the target's engine really runs (pomq-deploy check --plan says
which): ort: float, INT8, INT4 weights on INT8 kernels; tensorrt: float (FP16), INT8, FP8, INT4 weight-only;
the attention quantized or in float where the engine has the choice. No mixing constraint; a plan must beat
FP32's latency and size. --max-drop P (points): an accuracy budget, a constraint of the search (on its
images) and the selection in place of --select: best.yaml is the fastest, then smallest, feasible measured
plan within P points of FP32's top-1 on the whole evaluation split (the search's images are too few to tell
plans near FP32 apart, so the front on them is not the pool); when none is, no best.yaml, the closest plan
named, exit 1.

Each measured plan is an optuna trial in --storage (default: SQLite in the output directory): stop the
search at any moment and start it again with the same --study to continue, or start several processes on
one storage to share the work (PostgreSQL for many machines). At the end the --select rule picks a plan
of the measured Pareto front by top-1 on the full evaluation split, scoring only the plans it needs, in the
order that settles it soonest (--full-front: all of them and FP32), and DIR gets pareto.json (measured and
predicted points, marked),
pareto.png, report.md, models.json (model mode) and best.yaml (for pomq-deploy build --plan; only ever a
measured plan). Defaults come from the recipe's 'search' section. Exits 1 when no plan is feasible,
unless --allow-infeasible.

examples:
  pomq-deploy search                                   # the embedded model: model-guided, at most 20 builds
  pomq-deploy search --space engine --max-drop 0.3     # the engine's formats, within 0.3 point of FP32
  pomq-deploy search --mode measured --algorithm random --trials 128 --study fmnist-random
  pomq-deploy search --mode measured --population 8 --generations 4 --out /tmp/quick
  pomq-deploy search --storage postgresql+psycopg://user@db/pomq --study shared   # one of several workers
"""


def study_name(text: str) -> str:
    """--study: it names the default output folder, so it is checked as a name (no separator, no '..')."""
    from .._schema import check_name

    try:
        return check_name(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r} {e}") from None


def points(text: str) -> float:
    """--max-drop: points of top-1 (0.3 = 0.3 point), in [0, 100]."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"expected points of top-1 between 0 and 100, e.g. 0.3; got {text!r}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..backends import add_backend_arguments
    from ..search import SELECT_RULES, SPACES

    add_recipe_arguments(p)
    add_device_argument(p)
    g = p.add_argument_group("search (defaults: the recipe's 'search' section)")
    g.add_argument("--mode", choices=("model", "measured"), help="model: NSGA-II on latency/accuracy models fitted to a "
                   "measured design set, then the predicted front measured; measured: every trial built and measured "
                   "(default: the recipe's search.mode)")
    g.add_argument("--builds", type=positive_int, help="--mode model: real builds at most, the two baselines included; "
                   "at least the baselines and the design set (13 for a plain ViT in the paper's space), refused "
                   "below that (default: the recipe's search.builds)")
    g.add_argument("--algorithm", choices=("nsga2", "random"), help="--mode measured: NSGA-II, or random sampling "
                   "('stochastic' in the paper)")
    g.add_argument("--population", type=positive_int, help="NSGA-II population size")
    g.add_argument("--generations", type=positive_int, help="NSGA-II generations (trials = population x generations)")
    g.add_argument("--trials", type=positive_int, help="plans to evaluate (overrides population x generations)")
    g.add_argument("--seed", type=int, help="sampler seed")
    add_scheme_argument(g, "the recipe's search.scheme")
    add_rounding_argument(g, "the recipe's search.rounding")
    g.add_argument("--eval-images", type=positive_int, help="top-1 objective on the first N evaluation images")
    g.add_argument("--select", choices=list(SELECT_RULES), default="top1-within-1pt",
                   help="rule that picks best.yaml from the front (default: top1-within-1pt = "
                   + SELECT_RULES["top1-within-1pt"] + ")")
    g.add_argument("--full-front", action="store_true",
                   help="score every plan of the measured front and FP32 on the full evaluation split (default: only the "
                   "plans the --select rule needs and the chosen one, each a pass over the split)")
    g.add_argument("--space", choices=SPACES, default="paper", help="paper: w, a, attn each 4 or 8 per block (PoMQ-ViT); "
                   "engine: per block a format the target's engine runs (default: paper)")
    g.add_argument("--max-drop", metavar="P", type=points, help="accuracy budget: top-1 at most P points below FP32's "
                   "(a constraint, and the selection in place of --select: the fastest plan within it)")
    g.add_argument("--allow-infeasible", action="store_true", help="exit 0 even when no plan meets the constraints")
    b = add_backend_arguments(p)
    b.add_argument("--batch", type=positive_int, help="latency batch size (and the tensorrt engine's batch)")
    b = p.add_argument_group("storage")
    b.add_argument("--storage", metavar="URL", help="optuna storage URL (default: sqlite:///DIR/study.db)")
    b.add_argument("--study", metavar="NAME", type=study_name,
                   help="study name (default: <recipe>-<scheme>-<algorithm>-s<seed>, then -<rounding> unless nearest); names the "
                   "default --out folder")
    p.add_argument("--out", metavar="DIR", type=output_folder, help="output directory (default: searches/<study>)")
    p.add_argument("--json", action="store_true", help="print the chosen plan and its measurements as JSON")


def run(args: argparse.Namespace) -> int:
    from ..atomic import inside
    from ..backends import BACKENDS, backend_from_args
    from ..errors import PomqError
    from ..search.runner import SearchOptions, run_search
    from ..search.space import get_space
    from ._common import recipe_from_args
    from ._console import stderr, stdout

    recipe = recipe_from_args(args)
    spec = recipe.search
    mode = args.mode or spec.mode
    if mode == "model" and (args.algorithm or args.trials or args.generations):
        raise PomqError("--algorithm, --trials and --generations apply to --mode measured; --mode model takes --builds")
    algorithm = "model" if mode == "model" else args.algorithm or spec.algorithm
    population = args.population or spec.population
    trials = args.trials or spec.trials if algorithm == "random" else args.trials  # model mode: unused
    trials = trials or population * (args.generations or spec.generations)
    seed = spec.seed if args.seed is None else args.seed
    scheme, rounding = args.scheme or spec.scheme, args.rounding or spec.rounding
    target = BACKENDS[args.backend].default_target
    space = get_space(args.space, target)
    max_drop = None if args.max_drop is None else args.max_drop / 100
    study = args.study or (f"{recipe.name}-{scheme}-{algorithm}-s{seed}" + ("" if rounding == "nearest" else f"-{rounding}")
                           + ("" if space.name == "paper" else f"-engine-{target}")
                           + ("" if max_drop is None else f"-drop{args.max_drop:g}"))
    out = args.out or inside(Path("searches"), study)
    storage = args.storage or f"sqlite:///{(out / 'study.db').resolve()}"
    if args.storage is None:
        out.mkdir(parents=True, exist_ok=True)
    batch = args.batch or spec.batch
    backend = backend_from_args(args, batch, out)
    opts = SearchOptions(recipe=recipe, scheme=scheme, rounding=rounding, algorithm=algorithm, population=population, trials=trials, seed=seed,
                         storage=storage, study=study, out=out, backend=backend, target=target, space=space, max_drop=max_drop,
                         eval_images=args.eval_images or spec.eval_images, batch=batch,
                         runs=spec.latency_runs, select=args.select, mode=mode,
                         builds=args.builds or spec.builds, sensitivity_images=spec.sensitivity_images,
                         full_front=args.full_front, device=device_of(args))
    result = run_search(opts, stderr)
    say = stderr if args.json else stdout  # with --json, stdout holds the JSON object alone
    say.print(result.first_line)
    if result.best is not None:
        b = result.best
        say.print(f"best.yaml: trial {b.number}, plan {b.plan.plan_id}: top-1 {b.top1_full:.4f} (full), "
                  f"latency {b.latency_ms:.2f} ms, size {b.size_bytes / 1e6:.2f} MB -> {out / 'best.yaml'}")
        floats = [i for i, blk in enumerate(b.plan.blocks) if blk.w == "float"]
        if floats:
            say.print(f"  blocks kept in float: {', '.join(map(str, floats))}")
    say.print(f"report: {out / 'report.md'}  plot: {out / 'pareto.png'}  all trials: {out / 'pareto.json'}")
    if args.json:
        print(json.dumps(result.best.as_dict() if result.best else None))
    return 0 if result.best is not None or args.allow_infeasible else 1
