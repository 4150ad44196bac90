"""The search with a fitted rounding against ``nearest``: same recipe, scheme, seed and build budget, fronts side by
side; writes docs/rounding_search.md.

Each rounding gets its own ``pomq-deploy search --full-front`` (its own study, baselines and latency rounds, on the
same backend), so every front plan's top-1 is on the whole evaluation split. Printed per rounding: the hypervolume,
the measured front, and the smallest plan of the front within --within points of uniform 8-bit's top-1 (each
search's own uniform 8-bit, same rounding). The fitted rounding's fits come from the cache (``POMQ_DEPLOY_CACHE``)
when a run before filled it, e.g. tools/rounding_table.py's folder: otherwise the first search fits them.

    python tools/rounding_search.py                                  # repq: nearest vs adaround, the recipe's search
    POMQ_DEPLOY_CACHE=/tmp/pomq-rounding-table-x python tools/rounding_search.py --roundings nearest gptq
"""

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pomq_deploy.atomic import write_generated
from pomq_deploy.backends.cpu import detect
from pomq_deploy.quant.roundings import ROUNDINGS
from pomq_deploy.quant.schemes import SCHEMES
from pomq_deploy.search.space import GENES


def smallest_within(front: list[dict], uniform8_top1: float, points: float) -> dict | None:
    """The smallest front plan (then the most accurate) whose full-split top-1 is within ``points`` of uniform
    8-bit's; None when none is."""
    ok = [t for t in front if t["top1_full"] is not None and t["top1_full"] >= uniform8_top1 - points / 100]
    return min(ok, key=lambda t: (t["size_bytes"], -t["top1_full"])) if ok else None


def genes(t: dict) -> str:
    return " / ".join("".join(str(b[g])[0] for b in t["plan"]) for g in GENES)


def ratio(t: dict) -> str:
    r = t["latency_ratio_fp32"]
    return "" if r is None else f"{r['ratio']:.3f}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="deit_fmnist")
    p.add_argument("--scheme", default="repq", choices=SCHEMES)
    p.add_argument("--roundings", nargs=2, default=["nearest", "adaround"], choices=ROUNDINGS, metavar="ROUNDING")
    p.add_argument("--within", type=float, default=0.5, help="points of top-1 below uniform 8-bit's (default 0.5)")
    p.add_argument("--work", type=Path, help="folder for the two searches' outputs (default: a new temporary one)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "rounding_search.md")
    p.add_argument("search_args", nargs=argparse.REMAINDER, help="after --: passed to both searches (e.g. --builds 12)")
    args = p.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="pomq-rounding-search-"))
    extra = [a for a in args.search_args if a != "--"]
    docs = {}
    for rounding in args.roundings:
        out = work / rounding
        cmd = [sys.executable, "-m", "pomq_deploy", "search", "--recipe", args.recipe, "--scheme", args.scheme,
               "--rounding", rounding, "--full-front", "--allow-infeasible", "--study", f"rounding-{rounding}",
               "--out", str(out), *extra]
        print("$", shlex.join(cmd), flush=True)
        code = subprocess.run(cmd).returncode
        if code:
            print(f"the {rounding} search failed (exit {code}): its own message is above")
            return code
        docs[rounding] = json.loads((out / "pareto.json").read_text())
    cpu = detect()
    first = docs[args.roundings[0]]["meta"]
    lines = ["# A search with a fitted rounding against nearest", "",
             f"Recipe `{args.recipe}`, scheme `{args.scheme}`, each rounding its own `pomq-deploy search --full-front` "
             f"({first['mode']} mode, seed {first['seed']}, backend "
             f"{first['backend']}, batch {first['batch']}; extra arguments: `{shlex.join(extra) or 'none'}`). Top-1 on the "
             f"whole test split; latency as each search's ratio to FP32, timed interleaved with it. CPU: {cpu.model} "
             f"({platform.machine()}: {', '.join(cpu.flags)}), {os.cpu_count()} threads.", "",
             f"Regenerate with `.venv/bin/python {shlex.join(sys.argv)}`.", "",
             "| rounding | hypervolume | plans measured | real builds | seconds | FP32 | uniform 8-bit | "
             f"smallest front plan within {args.within} point of uniform 8-bit |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    fronts = {}
    for rounding, doc in docs.items():
        meta, base = doc["meta"], doc["baselines"]
        front = [t for t in doc["trials"] if t["on_front"]]
        fronts[rounding] = front
        u8 = base["uniform8"]["top1_full"]
        small = smallest_within(front, u8, args.within)
        pick = "none" if small is None else (f"{small['plan_id']} ({genes(small)}): {small['top1_full']:.4f}, "
                                             f"{small['size_bytes'] / 1e6:.3f} MB, {ratio(small)}x FP32")
        lines.append(f"| {rounding} | {meta['hypervolume']:.4f} | {meta['trials']} | {meta['builds']} | {meta['seconds']:.0f} | "
                     f"{base['fp32']['top1_full']:.4f} | {u8:.4f} | {pick} |")
    for rounding, front in fronts.items():
        lines += ["", f"## Front with `{rounding}`", "", "| plan-id | w / a / attn, block 1 to 12 | top-1 | latency / FP32 | size (MB) |",
                  "| --- | --- | --- | --- | --- |"]
        lines += [f"| {t['plan_id']} | {genes(t)} | {t['top1_full']:.4f} | {ratio(t)} | "
                  f"{t['size_bytes'] / 1e6:.3f} |" for t in sorted(front, key=lambda t: -t["top1_full"])]
    write_generated(args.out, "\n".join(lines) + "\n")
    print(args.out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
