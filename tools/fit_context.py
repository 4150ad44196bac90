"""What fitting each block setting once, for any plan, costs against fitting the blocks in sequence under the plan.

A plan is assembled from blocks fitted once per (block, setting), so that a search composes them. Block i's
inputs while it is fitted can be the FP32 model's (``fp32 inputs``), or those of the model whose blocks before
it all run at block i's setting with their own fits (``uniform context``: the block reconstruction's default,
quant.reconstruction). Fitting in sequence (as BRECQ and QDrop do for one fixed model) feeds block i its inputs
in the model the plan itself quantizes, with the blocks before it fitted in sequence too; it is exact for that
plan only. All three are fitted against the FP32 model's block outputs. This tool fits the block settings the
given plans need each way (block reconstruction with the recipe's ``fit`` settings) and prints each plan's top-1.

    python tools/fit_context.py                                    # the paper plan and two mixed plans, 2000 images
    python tools/fit_context.py --plans paper 4/4/4 --limit 10000
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pomq_deploy.backends.cpu import detect
from pomq_deploy.data import calibration_batches, eval_dataset, eval_loader
from pomq_deploy.evaluate import evaluate
from pomq_deploy.plan import BlockBits, Plan, paper_plan, uniform_plan
from pomq_deploy.quant.calibration import calibrated_model
from pomq_deploy.quant.fitting import setting_key
from pomq_deploy.quant.reconstruction import CONTEXTS, Fp32Blocks, _inputs_in_context, fit_adaround, reconstruct_block
from pomq_deploy.recipe import load_recipe

# Two mixed plans (w, a, attn per block, 12 blocks): 4-bit activations in the first and last blocks, 4-bit weights
# through the middle; and 4-bit weights everywhere with 4-bit activations in every third block.
MIXED = {"mixed-a": ["444", "444", "488", "488", "488", "888", "888", "488", "488", "488", "444", "444"],
         "mixed-b": ["444" if i % 3 == 0 else "488" for i in range(12)]}


def plan_named(name: str, n: int, recipe: str, scheme: str) -> Plan:
    if name == "paper":
        return paper_plan(n, recipe, scheme, "adaround")
    if name in MIXED:
        return Plan(recipe=recipe, scheme=scheme, rounding="adaround",
                    blocks=tuple(BlockBits(w=int(s[0]), a=int(s[1]), attn=int(s[2])) for s in MIXED[name]))
    return uniform_plan(name, n, recipe, scheme, "adaround")


LABEL = {"fp32": "fp32 inputs", "uniform": "uniform context"}


def composable_pairs(plan: Plan, context: str) -> list[tuple]:
    """The (block, setting) pairs a composable fit of ``plan`` needs: its own, and in the uniform context every
    block before each of them at the same setting."""
    settings = [(b.w, b.a, b.attn) for b in plan.blocks]
    if context == "fp32":
        return list(enumerate(settings))
    last = {s: i for i, s in enumerate(settings)}
    return [(i, s) for i in range(len(settings)) for s in last if i <= last[s]]


def fit(qm, i, b, inputs, outputs, spec, g) -> dict:
    return reconstruct_block(qm, i, "asym", b.a, b.attn, b.w, inputs, outputs, spec.iterations, spec.batch, spec.lr,
                             spec.act_lr, spec.weight, 0.0, g)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="deit_fmnist")
    p.add_argument("--scheme", default="repq")
    p.add_argument("--plans", nargs="+", default=["paper", *MIXED], help="paper, mixed-a, mixed-b or a uniform w/a/attn")
    p.add_argument("--limit", type=int, default=2000, help="test images (default the first 2000)")
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    recipe = load_recipe(args.recipe)
    qm, _ = calibrated_model(recipe, args.scheme)
    qm.rounding = "adaround"
    batches = calibration_batches(recipe.data, qm)
    io = Fp32Blocks(qm, batches)
    outputs = [io.outputs(i) for i in range(qm.num_blocks)]  # the reference model: every block's kept
    for param in qm.parameters():
        param.requires_grad_(False)
    data = eval_dataset(recipe.data, qm)
    spec = recipe.fit
    rows = []
    for name in args.plans:
        fitted = {}
        plan = plan_named(name, qm.num_blocks, recipe.name, args.scheme)
        keys = [setting_key(i, b.w, b.a, b.attn) for i, b in enumerate(plan.blocks)]
        seconds = {}
        for context in CONTEXTS:
            start = time.perf_counter()
            fitted[context] = fit_adaround(qm, batches, "asym", iterations=spec.iterations, batch=spec.batch, lr=spec.lr,
                                           act_lr=spec.act_lr, weight=spec.weight, seed=spec.seed, context=context,
                                           pairs=composable_pairs(plan, context))
            seconds[LABEL[context]] = time.perf_counter() - start
        start = time.perf_counter()
        sequential = {}  # block i fitted on its inputs under the plan, behind the fits of the blocks before it
        settings = [(b.w, b.a, b.attn) for b in plan.blocks]
        for i, (b, key) in enumerate(zip(plan.blocks, keys, strict=True)):
            sequential[key] = fit(qm, i, b, _inputs_in_context(qm, i, "asym", settings, sequential, batches), outputs[i],
                                  spec, torch.Generator().manual_seed(spec.seed + i))
        seconds["in sequence"] = time.perf_counter() - start
        top1 = {}
        for how, fits in ((LABEL["fp32"], fitted["fp32"]), (LABEL["uniform"], fitted["uniform"]), ("in sequence", sequential)):
            qm.weight_fits = {"asym": fits}
            qm.apply(plan)
            top1[how] = evaluate(qm, eval_loader(data, recipe.eval.batch_size, args.limit)).top1
        rows.append({"plan": name, **top1, **{f"{k} s": round(v, 1) for k, v in seconds.items()}})
        print(json.dumps(rows[-1]), flush=True)
    cpu = detect()
    print(f"\n{recipe.name}, {args.scheme}, adaround ({spec}), first {args.limit} test images; CPU {cpu.model}, "
          f"{os.cpu_count()} threads\n\n| plan | FP32 inputs | uniform context | in sequence under the plan |\n"
          "| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['plan']} | {r['fp32 inputs']:.4f} | {r['uniform context']:.4f} | {r['in sequence']:.4f} |")


if __name__ == "__main__":
    main()
