"""Reproduce PoMQ-ViT's two search experiments on the reference model; writes docs/search.md.

(a) NSGA-II after 2, 5, 10, 20 generations: top-1 of the plan the default rule picks, and the hypervolume
    of the feasible front (trials of the first g generations).
(b) NSGA-II vs random sampling at equal numbers of evaluated plans, over 3 seeds (mean hypervolume), and
    random with 2x and 4x the evaluations, to see what NSGA-II's budget is worth in random samples.

All studies share one evaluator (calibration, latency cache by graph structure) and one baseline
measurement, so they are measured under the same conditions. Objectives as in ``pomq-deploy search``.

    python tools/search_study.py                       # population 6, 200 images: ~20 min on 2 cores
    python tools/search_study.py --population 4 --generations 2 5 --eval-images 100 --out /tmp/s.md
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import optuna

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pomq_deploy.atomic import write_text
from pomq_deploy.backends.ort_cpu import OrtCpuBackend
from pomq_deploy.recipe import load_recipe
from pomq_deploy.search.evaluator import PlanEvaluator
from pomq_deploy.search.report import hypervolume, mark_front, rows_of, select
from pomq_deploy.search.study import SearchConfig, baselines, open_study, run_trials


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="deit_fmnist")
    p.add_argument("--scheme", default="fqvit")
    p.add_argument("--population", type=int, default=6)
    p.add_argument("--generations", type=int, nargs="+", default=[2, 5, 10, 20])
    p.add_argument("--compare-generations", type=int, default=3, help="NSGA-II budget in (b): population x this")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--eval-images", type=int, default=200)
    p.add_argument("--latency-runs", type=int, default=10)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "search.md")
    args = p.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    recipe = load_recipe(args.recipe)
    storage = f"sqlite:///{tempfile.mkdtemp(prefix='pomq-study-')}/study.db"
    evaluator = PlanEvaluator(recipe, args.scheme, OrtCpuBackend(threads=2), "ort", args.eval_images, args.batch, args.latency_runs)
    start = time.time()
    base = None

    def study(algorithm: str, seed: int, trials: int):
        nonlocal base
        cfg = SearchConfig(recipe.name, args.scheme, algorithm, args.population, trials, seed, storage, f"{algorithm}-s{seed}")
        s = open_study(cfg)
        if base is None:
            base = baselines(s, evaluator, cfg, print)
        s.set_user_attr("baselines", base)
        run_trials(s, evaluator, cfg, base)
        rows = sorted(rows_of(s, evaluator.num_blocks, recipe.name, args.scheme), key=lambda r: r.number)
        print(f"{cfg.study_name}: {len(rows)} trials ({time.time() - start:.0f} s so far)", file=sys.stderr, flush=True)
        return rows

    def hv_at(rows, n):
        prefix = rows[:n]
        for r in prefix:
            r.on_front = False
        return hypervolume(prefix, base), prefix

    lines = ["# Search experiments on the reference model", "",
             f"Recipe `{recipe.name}`, scheme `{args.scheme}`, ort-cpu backend (2 threads), latency batch {args.batch} "
             f"({args.latency_runs} timed runs), top-1 on the first {args.eval_images} test images; objectives and "
             "constraints as `pomq-deploy search`. Hypervolume: feasible front in (1 - top-1, latency / FP32 latency, "
             "size / uniform-8 size) against the reference point (1, 1, 1); larger is better.", "",
             "Regenerate with:", "", "```bash", ".venv/bin/python tools/search_study.py", "```", ""]
    # (a) NSGA-II over generations
    gens = sorted(args.generations)
    rows = study("nsga2", args.seeds[0], args.population * gens[-1])
    lines += [f"## (a) NSGA-II, population {args.population}, seed {args.seeds[0]}", "",
              "| generations | plans evaluated | feasible | front size | hypervolume | chosen plan top-1 (subset) | its latency (ms) | its size (MB) |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for g in gens:
        hv, prefix = hv_at(rows, args.population * g)
        front = mark_front(prefix)
        best = select(front, base, "top1-within-1pt")
        pick = f"{best.top1:.4f} | {best.latency_ms:.2f} | {best.size_bytes / 1e6:.2f}" if best else "- | - | -"
        lines.append(f"| {g} | {len(prefix)} | {sum(r.feasible for r in prefix)} | {len(front)} | {hv:.4f} | {pick} |")
    b = base
    lines += ["", f"Baselines: FP32 top-1 {b['fp32']['top1']:.4f}, {b['fp32']['latency_ms']:.2f} ms, {b['fp32']['size_bytes'] / 1e6:.2f} MB; "
              f"uniform 8/8/8 top-1 {b['uniform8']['top1']:.4f}, {b['uniform8']['latency_ms']:.2f} ms, "
              f"{b['uniform8']['size_bytes'] / 1e6:.2f} MB.", ""]
    # (b) NSGA-II vs random at equal evaluations, over seeds; random also at 2x and 4x
    n = args.population * args.compare_generations
    table = {"nsga2": [], "random": [], "random2": [], "random4": []}
    for seed in args.seeds:
        nsga = rows if seed == args.seeds[0] else study("nsga2", seed, n)
        table["nsga2"].append(hv_at(nsga, n)[0])
        rnd = study("random", seed, 4 * n)
        for key, k in (("random", 1), ("random2", 2), ("random4", 4)):
            table[key].append(hv_at(rnd, k * n)[0])
    lines += [f"## (b) NSGA-II vs random, {len(args.seeds)} seeds ({', '.join(map(str, args.seeds))})", "",
              "| method | plans evaluated | hypervolume per seed | mean |", "| --- | --- | --- | --- |"]
    for key, label, k in (("nsga2", "NSGA-II", 1), ("random", "random", 1), ("random2", "random", 2), ("random4", "random", 4)):
        lines.append(f"| {label} | {k * n} | {', '.join(f'{v:.4f}' for v in table[key])} | {np.mean(table[key]):.4f} |")
    goal = np.mean(table["nsga2"]) >= np.mean(table["random4"])
    lines += ["", f"Goal (NSGA-II reaches with {n} plans the hypervolume random reaches with {4 * n}): "
              f"{'met' if goal else 'not met'} on the mean over seeds.", "",
              f"Wall time {time.time() - start:.0f} s on {os.cpu_count()} CPUs.", ""]
    evaluator.close()
    write_text(args.out, "\n".join(lines))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
