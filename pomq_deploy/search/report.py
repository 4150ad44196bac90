"""What a search hands the user: pareto.json, pareto.png, report.md and best.yaml."""

import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
from optuna.trial import TrialState

from ..atomic import replace_atomically, write_text
from ..plan import Plan, save_plan
from ..timing import Ratio
from . import SELECT_RULES
from .space import GENES, PAPER, Space
from .study import plan_from_params

CODES = {4: "4", 8: "8", "fp8": "e", "float": "f"}  # one character per block in the report's tables


@dataclass
class Row:
    """One completed trial: its plan and what was measured."""

    number: int
    plan: Plan
    top1: float
    latency_ms: float
    size_bytes: int
    feasible: bool
    constraints: list[float]
    on_front: bool = False
    top1_full: float | None = None  # re-measured on the full evaluation split (front only)
    source: str = "search"  # search (sampled and measured), design (fits the models) or front (predicted, then measured)
    ratio: dict | None = None  # latency / FP32's, interleaved: ratio, low, high, rounds (timing.Ratio)
    predicted: dict | None = None  # what the models predicted for it (front plans)
    ratio_confirmed: dict | None = None  # the chosen plan's ratio timed again after the selection

    def as_dict(self) -> dict:
        return {"trial": self.number, "plan_id": self.plan.plan_id, "source": self.source, "measured": True,
                "plan": [{g: getattr(b, g) for g in GENES} for b in self.plan.blocks],
                "top1": self.top1, "latency_ms": self.latency_ms, "latency_ratio_fp32": self.ratio,
                "latency_ratio_fp32_confirmed": self.ratio_confirmed, "predicted": self.predicted, "size_bytes": self.size_bytes,
                "feasible": self.feasible, "constraints": {"mixed": self.constraints[0], "latency_vs_fp32_ms": self.constraints[1],
                                                           "size_vs_reference_bytes": self.constraints[2]}
                | ({"top1_vs_budget": self.constraints[3]} if len(self.constraints) > 3 else {}),
                "on_front": self.on_front, "top1_full": self.top1_full}


def rows_of(study: optuna.Study, n_blocks: int, recipe: str, scheme: str, rounding: str, space: Space = PAPER) -> list[Row]:
    out = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        a = t.user_attrs
        out.append(Row(t.number, plan_from_params(t.params, n_blocks, recipe, scheme, rounding, space), a["top1"], a["latency_ms"],
                       a["size_bytes"], a["feasible"], a["constraints"], source=a.get("source", "search"),
                       ratio=a.get("ratio"), predicted=a.get("predicted")))
    return out


def mark_front(rows: list[Row], study: optuna.Study) -> list[Row]:
    """Flag the rows of the study's Pareto front: optuna's ``best_trials``, the feasible trials (every constraint
    <= 0) that no other feasible trial dominates (top-1 up, latency and size down)."""
    front = {t.number for t in study.best_trials}
    for r in rows:
        r.on_front = r.number in front
    return [r for r in rows if r.on_front]


def hypervolume(rows: list[Row], base: dict, size_reference: str = "uniform8") -> float:
    """Hypervolume of the feasible front in normalised objectives (1 - top-1, latency / FP32's, size / the
    space's size reference: uniform 8-bit's, FP32's in the engine space) against the reference point (1, 1, 1):
    larger is better, 0 for an empty front."""
    import moocore

    size = base[size_reference]["size_bytes"]
    pts = np.array([[1 - r.top1, r.latency_ms / base["fp32"]["latency_ms"], r.size_bytes / size]
                    for r in rows if r.feasible])
    if len(pts) == 0:
        return 0.0
    # a plan measured against a baseline within noise of the box edge contributes (almost) nothing: clip
    return float(moocore.hypervolume(np.minimum(pts, 1.0), ref=np.ones(3)))


def select(front: list[Row], base: dict, rule: str, full: Callable[[Row | None], float] | None = None,
           max_drop: float | None = None, fp32_full: Callable[[], float] | None = None) -> Row | None:
    """The plan ``rule`` (one of ``SELECT_RULES``) picks from the front; None when the front is empty.

    ``full(row)`` (``None``: uniform 8-bit) is a plan's top-1 on the whole evaluation split, asked for only where
    the rule's answer depends on it, once per plan, in the order that settles it soonest: a search scores plans
    on demand, each costing a pass over the split. Without it, the top-1 the rows and ``base`` hold (the full
    split's where known).

    ``max_drop`` (points of top-1, as a fraction) replaces the rule by the accuracy budget: the fastest, then
    smallest, plan whose top-1 is at most that far below FP32's (``fp32_full()``, else ``base``'s); None when no
    plan given is (the runner gives every feasible plan: ``runner.candidates``)."""
    if rule not in SELECT_RULES:
        raise ValueError(f"unknown selection rule {rule!r}; allowed: {', '.join(SELECT_RULES)}")
    if not front:
        return None
    asked: dict[int, float] = {}

    def top1(r: Row | None) -> float:
        if id(r) not in asked:
            if full is not None:
                asked[id(r)] = full(r)
            elif r is None:
                asked[id(r)] = base["uniform8"].get("top1_full", base["uniform8"]["top1"])
            else:
                asked[id(r)] = r.top1 if r.top1_full is None else r.top1_full
        return asked[id(r)]

    if max_drop is not None:
        floor = (fp32_full() if fp32_full is not None else base["fp32"].get("top1_full", base["fp32"]["top1"])) - max_drop
        return next((r for r in sorted(front, key=lambda r: (r.latency_ms, r.size_bytes)) if top1(r) >= floor - 1e-9), None)  # 1e-9: float rounding of k/N

    if rule == "max-top1":
        return max(front, key=lambda r: (top1(r), -r.latency_ms))
    order = {"min-latency": lambda r: r.latency_ms, "min-size": lambda r: r.size_bytes,
             "top1-within-1pt": lambda r: r.latency_ms}[rule]
    groups: dict[float, list[Row]] = {}  # plans tied on the rule's measure (one cached ratio) go by top-1
    for r in front:
        groups.setdefault(order(r), []).append(r)
    floor = top1(None) - 0.01 if rule == "top1-within-1pt" else None
    for key in sorted(groups):
        group = groups[key]
        if floor is None:
            return group[0] if len(group) == 1 else max(group, key=top1)
        passing = [r for r in group if top1(r) >= floor]
        if passing:
            return max(passing, key=top1)
    return max(front, key=top1)  # none within a point of uniform 8-bit: the most accurate


def plot(rows: list[Row], base: dict, path: Path, predicted: list[dict] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label, scale in ((axes[0], "latency_ms", "latency (ms: ratio to FP32 x FP32's)", 1.0),
                                  (axes[1], "size_bytes", "deployable size (MB)", 1e-6)):
        if predicted:
            ax.scatter([p["predicted"][key] * scale for p in predicted], [100 * p["predicted"]["top1"] for p in predicted],
                       s=10, marker=".", color="0.75", label="predicted front (models)")
        for group, style in (([r for r in rows if not r.feasible], dict(marker="x", color="0.6", label="infeasible")),
                             ([r for r in rows if r.feasible and not r.on_front], dict(marker="o", color="tab:blue", alpha=0.5, label="feasible")),
                             ([r for r in rows if r.on_front], dict(marker="o", color="tab:red", label="Pareto front"))):
            if group:
                ax.scatter([getattr(r, key) * scale for r in group], [100 * r.top1 for r in group], s=18, **style)
        for name, b, marker in (("FP32", base["fp32"], "*"), ("uniform 8/8/8", base["uniform8"], "D")):
            ax.scatter([b[key] * scale], [100 * b["top1"]], marker=marker, s=90, color="k", label=name)
        ax.set_xlabel(label)
        ax.set_ylabel("top-1 (%) on the search subset")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    replace_atomically(path, lambda p: fig.savefig(p, format="png", dpi=120))
    plt.close(fig)


def write_outputs(out_dir: Path, rows: list[Row], base: dict, best: Row | None, meta: dict, paper_rows: list[dict],
                  guided=None, closest: Row | None = None) -> None:
    """``guided``: the model-guided search's result (its models and predicted front), when it ran. ``closest``: with
    an accuracy budget no plan met, the plan nearest it (named, never written as best.yaml)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {"meta": meta, "baselines": base, "best": best.as_dict() if best else None, "trials": [r.as_dict() for r in rows]}
    if closest is not None:
        doc["closest_to_budget"] = closest.as_dict()
    predicted = None
    if guided is not None:
        predicted = [{"plan_id": p["plan"].plan_id, "plan": [{g: getattr(b, g) for g in GENES} for b in p["plan"].blocks],
                      "measured": p["trial"] is not None, "trial": p["trial"], "predicted": p["predicted"]}
                     for p in guided.predicted]
        models = guided.models.as_dict() | {"errors_on_measured_front": guided.errors}
        doc |= {"predicted_front": predicted, "models": models}
        write_text(out_dir / "models.json", json.dumps(models, indent=1) + "\n")
    write_text(out_dir / "pareto.json", json.dumps(doc, indent=1) + "\n")
    plot(rows, base, out_dir / "pareto.png", predicted)
    if best is not None:
        save_plan(Plan(recipe=best.plan.recipe, scheme=best.plan.scheme, rounding=best.plan.rounding, blocks=best.plan.blocks,
                       measured={"top1_search_subset": best.top1, "top1_full": best.top1_full, "latency_ms": best.latency_ms,
                                 # the independent timing after selection (what a rebuild sees); the search's own beside it
                                 "latency_ratio_fp32": (best.ratio_confirmed or best.ratio or {}).get("ratio"),
                                 "latency_ratio_fp32_search": None if best.ratio is None else best.ratio["ratio"],
                                 "batch": meta["batch"], "backend": meta["backend"],
                                 "size_bytes": best.size_bytes, "trial": best.number, "select": meta["select"]}),
                  out_dir / "best.yaml")
    write_text(out_dir / "report.md", report_md(rows, base, best, meta, paper_rows, guided, closest))


def closest_text(r: Row, base: dict, eval_images: int) -> str:
    """How near an accuracy budget's closest plan came: on the whole split where it and FP32 were scored there."""
    if r.top1_full is not None and base["fp32"].get("top1_full") is not None:
        return f"top-1 {r.top1_full:.4f} against FP32's {base['fp32']['top1_full']:.4f} on the whole split"
    return f"top-1 {r.top1:.4f} against FP32's {base['fp32']['top1']:.4f} on the search's {eval_images} images"


def _full_or_subset(baseline: dict, meta: dict) -> str:
    """A baseline's top-1 on the full split, or on the search's subset (said so) where it was not scored."""
    if baseline.get("top1_full") is not None:
        return f"{baseline['top1_full']:.4f}"
    return f"{baseline['top1']:.4f} (first {meta['eval_images']} images)"


def report_md(rows: list[Row], base: dict, best: Row | None, meta: dict, paper_rows: list[dict], guided=None,
              closest: Row | None = None) -> str:
    front = [r for r in rows if r.on_front]
    feasible = sum(r.feasible for r in rows)
    budget = meta.get("max_drop")
    if best is None and budget is not None:
        first = (f"NO PLAN WITHIN THE BUDGET: none of the {len(rows)} evaluated plans is within {100 * budget:g} point(s) of "
                 f"FP32's top-1 and faster than FP32 on {meta['backend']}; no best.yaml was written.")
        if closest is not None:
            first += f" The closest: trial {closest.number} (plan {closest.plan.plan_id}), {closest_text(closest, base, meta['eval_images'])}."
    elif feasible == 0:
        first = (f"NO FEASIBLE PLAN: none of the {len(rows)} evaluated plans is both faster than FP32 "
                 f"({base['fp32']['latency_ms']:.2f} ms) and smaller than "
                 f"{'FP32' if meta.get('space') == 'engine' else 'uniform 8-bit'} on {meta['backend']}.")
    else:
        first = (f"{feasible} of {len(rows)} evaluated plans are feasible; the Pareto front holds {len(front)}; "
                 f"best.yaml is trial {best.number} (plan {best.plan.plan_id}).")
        floats = [i for i, b in enumerate(best.plan.blocks) if b.w == "float"]
        if floats:
            first += f" It keeps block(s) {', '.join(map(str, floats))} in float."
        if best.ratio_confirmed is not None and best.ratio is not None:
            c = best.ratio_confirmed
            first += (f" Its latency / FP32, timed again after the selection: {c['ratio']:.3f} ({c['low']:.3f}-{c['high']:.3f}; "
                      f"{best.ratio['ratio']:.3f} in the search).")
    u8 = base["uniform8"]
    lines = [first, "", f"# Search report: {meta['recipe']} ({meta['scheme']}, {meta['rounding']} rounding, {meta['algorithm']}, study {meta['study']})", "",
             f"Backend {meta['backend']}, latency batch {meta['batch']}; top-1 during the search on the first "
             f"{meta['eval_images']} evaluation images; 'top-1 full' on the whole split, scored for the plans the "
             f"selection needed (every front plan and FP32 with --full-front). "
             f"Search space `{meta.get('space', 'paper')}`"
             f"{' (' + meta['target'] + ' formats)' if meta.get('space') == 'engine' else ''}. "
             + (f"Selection: the fastest, then smallest, plan within {100 * budget:g} point(s) of FP32's top-1 on the whole "
                f"split (--max-drop, also a constraint of the search on its images). " if budget is not None else
                f"Selection rule `{meta['select']}`: {SELECT_RULES[meta['select']]}. ")
             + "Hypervolume of the feasible front "
             f"(normalised to FP32 latency and {'FP32' if meta.get('space') == 'engine' else 'uniform-8'} size, reference "
             f"point 1,1,1): {meta['hypervolume']:.4f}.", "",
             "## In the paper's form", "", "| method | top-1 | latency (ms) | size (MB) |", "| --- | --- | --- | --- |",
             f"| FP32 | {_full_or_subset(base['fp32'], meta)} | {base['fp32']['latency_ms']:.2f} | "
             f"{base['fp32']['size_bytes'] / 1e6:.2f} |",
             f"| uniform 8-bit | {_full_or_subset(u8, meta)} | {u8['latency_ms']:.2f} | {u8['size_bytes'] / 1e6:.2f} |"]
    for p in paper_rows:
        lines.append(f"| {p['method']} | {p['top1']:.4f} | {p['latency_ms']:.2f} | {p['size_bytes'] / 1e6:.2f} |")
    lines += ["", "## Pareto front (measured)", "",
              "| trial | source | plan-id | w | a | attn | top-1 (subset) | top-1 full | latency (ms) | / FP32 (90% interval) | size (MB) |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    shown = front + ([best] if best is not None and best not in front else [])  # a budget may pick off the front
    for r in sorted(shown, key=lambda r: -r.top1):
        w, a, t = ("".join(CODES[getattr(b, g)] for b in r.plan.blocks) for g in GENES)
        full = "" if r.top1_full is None else f"{r.top1_full:.4f}"
        ratio = "" if r.ratio is None else f"{r.ratio['ratio']:.3f} ({r.ratio['low']:.3f}-{r.ratio['high']:.3f}, {r.ratio['rounds']} rounds)"
        mark = "" if best is not r else " (best)" if r.on_front else " (best, off the front)"
        lines.append(f"| {r.number}{mark} | {r.source} | {r.plan.plan_id} | {w} | {a} | {t} | {r.top1:.4f} | "
                     f"{full} | {r.latency_ms:.2f} | {ratio} | {r.size_bytes / 1e6:.2f} |")
    lines += ["", "Genes are per block, first to last: 4 or 8 bits, e FP8 (E4M3), f float. Every trial, feasible or not, is in pareto.json. Latency is "
              "the ratio to FP32 measured interleaved with it until its 90% interval is within +-3%, shown in the study's "
              "FP32 milliseconds. An empty 'top-1 full' is a plan the selection did not need scored on the whole split.", ""]
    if guided is not None:
        e = guided.errors
        sources = {s: sum(r.source == s for r in rows) for s in ("design", "front", "search")}
        lines += ["## Models (`--mode model`)", "",
                  f"{sources['design']} design plans fitted the latency, size and accuracy models (measured on "
                  f"{guided.models.measured_on['backend']}, {guided.models.measured_on['machine']}, batch "
                  f"{guided.models.measured_on['batch']}); NSGA-II on the models predicted a front of {len(guided.predicted)} "
                  f"plans, {sources['front']} of which were built and measured. {meta['builds']} real builds in "
                  f"{meta['seconds']:.0f} s. The models against the measured plans they were not fitted on (n = "
                  f"{e['latency']['n']}):", "",
                  "| objective | mean abs. error | Spearman |", "| --- | --- | --- |",
                  f"| latency | {e['latency']['mape_pct']:.1f}% | {e['latency']['spearman']:.3f} |",
                  f"| top-1 | {e['top1']['mae'] * 100:.2f} points | {e['top1']['spearman']:.3f} |",
                  f"| size | {e['size']['mape_pct']:.2f}% | {e['size']['spearman']:.3f} |", "",
                  *_spans([r for r in rows if r.source != "design"], meta["eval_images"]),
                  "The predicted front and the models' coefficients are in pareto.json and models.json; best.yaml comes "
                  "only from measured plans.", ""]
    if meta.get("phases"):
        lines += ["## Where the time went (this process)", "", "| phase | seconds |", "| --- | --- |",
                  *[f"| {name} | {seconds:.1f} |" for name, seconds in meta["phases"].items()],
                  f"| total (the search's wall clock) | {meta['seconds']:.1f} |", ""]
    return "\n".join(lines)


def _spans(held: list[Row], eval_images: int) -> list[str]:
    """How far apart the plans the models are checked on lie, beside their measurements' own spread: the predicted
    front's plans are often closer together than that, and a rank correlation among them then ranks noise."""
    timed = [Ratio(**r.ratio) for r in held if r.ratio is not None]
    if len(timed) < 2:
        return []
    lo, hi = min(t.ratio for t in timed), max(t.ratio for t in timed)
    interval = statistics.median(t.spread for t in timed)
    top1 = [r.top1 for r in held]
    return [f"These plans' latency ratios to FP32 span {lo:.3f}-{hi:.3f} ({hi / lo - 1:.1%}), their 90% intervals +-{interval:.1%} "
            f"(median); their top-1 spans {min(top1):.4f}-{max(top1):.4f} ({round((max(top1) - min(top1)) * eval_images)} of "
            f"{eval_images} images). Among plans closer together than their measurements' spread, a rank correlation ranks "
            "the noise: read the mean errors then.", ""]
