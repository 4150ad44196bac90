"""Latency, size and accuracy of a plan predicted from a few measured plans (the model-guided search).

Latency (as a ratio to FP32) and size are additive over blocks, as in the lookup tables of HAWQ-V3 and
Once-for-All built from the target's own measurements: a base, plus a cost per block for each setting of the
search space relative to 8/8/8 (the paper's space: the 8 (w, a, attn); the engine space: the target's formats),
per *group* of same-shaped blocks (ViT: one group; Swin: one per stage), plus a cost per boundary between
blocks of different settings (a Q/DQ pair that no longer fuses across it). A small design set of plans,
measured for real, fits it by least squares.

Accuracy is HAWQ's sum of per-layer perturbations. Paper space: for each block and each of its three genes,
the KL divergence of the logits from FP32 when only that gene of that block is 4-bit (everything else FP32, in
the PyTorch fake-quant model: no build); a plan's perturbation is the sum over its 4-bit genes, and its top-1
drop below uniform 8-bit is that sum times one factor fitted on the design set's measured top-1. Engine space:
for each block and each format, the KL when only that block runs in that format (float: 0); a plan's
perturbation is the sum over its blocks, and its drop below FP32 that sum times one fitted factor (a float
block is what buys accuracy back there, so the reference is FP32, not uniform 8-bit).
"""

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from ..plan import BlockBits, Plan
from ..quant.roundings import DEFAULT_ROUNDING
from .space import BASE, GENES, PAPER, Space, plan_of, sensitivity_settings, text

SETTINGS = PAPER.settings  # (w, a, attn): the paper's space
EIGHT = BASE
PROBES = ((4, 4, 4), (4, 8, 8), (8, 4, 8), (8, 8, 4))  # alternated with 8/8/8 in the paper's design set: boundary costs


def block_groups(blocks: list[torch.nn.Module]) -> list[int]:
    """Group index of each block: consecutive blocks with the same parameter shapes share one (Swin's stages)."""
    groups, last = [], None
    for b in blocks:
        shapes = tuple(tuple(p.shape) for p in b.parameters())
        groups.append(0 if last is None else groups[-1] + (shapes != last))
        last = shapes
    return groups


def setting(b: BlockBits) -> tuple:
    return b.w, b.a, b.attn


def probes(space: Space) -> tuple[tuple, ...]:
    return PROBES if space.name == "paper" else tuple(s for s in space.settings if s != BASE)


def design_plans(groups: list[int], recipe: str, scheme: str, rounding: str = DEFAULT_ROUNDING,
                 space: Space = PAPER) -> list[Plan]:
    """The plans measured to fit the models: each setting on every block (per group when blocks differ), and
    each probe setting on every other block of the largest group (the boundary cost). Uniform 8/8/8, the
    baseline, is measured anyway.

    Alternating probes have as many boundaries as a random plan has (about 0.9 per block pair), so the boundary
    cost is measured where it is used, not extrapolated: from one-block probes (2 boundaries) the cost of a
    boundary was a sub-noise difference, and ten of them in a random plan predicted it 0.19 x FP32 too slow
    (AMD EPYC with VNNI)."""
    n, out = len(groups), []
    for s in space.settings:
        if s == BASE:
            continue
        for g in sorted(set(groups)) if len(set(groups)) > 1 else [None]:
            out.append(plan_of([s if g is None or groups[i] == g else BASE for i in range(n)], recipe, scheme, rounding))
    largest = max(set(groups), key=groups.count)
    members = [i for i in range(n) if groups[i] == largest]
    for s in probes(space):
        out.append(plan_of([s if i in members[::2] else BASE for i in range(n)], recipe, scheme, rounding))
    return out


def features(plan: Plan, groups: list[int], settings: tuple[tuple, ...] = SETTINGS) -> np.ndarray:
    """1, then per (group, setting other than 8/8/8) the number of blocks there, then the boundaries."""
    others = [s for s in settings if s != BASE]
    n_groups = max(groups) + 1
    x = np.zeros(1 + n_groups * len(others) + 1)
    x[0] = 1.0
    for g, b in zip(groups, plan.blocks, strict=True):
        if setting(b) != BASE:
            x[1 + g * len(others) + others.index(setting(b))] += 1
    x[-1] = sum(setting(a) != setting(b) for a, b in zip(plan.blocks, plan.blocks[1:], strict=False))
    return x


@dataclass
class AdditiveModel:
    """``features(plan) @ coef``: latency ratio to FP32, or artifact bytes."""

    groups: list[int]
    coef: list[float]
    settings: tuple[tuple, ...] = SETTINGS

    @classmethod
    def fit(cls, plans: list[Plan], values: list[float], groups: list[int], settings: tuple[tuple, ...] = SETTINGS) -> "AdditiveModel":
        x = np.stack([features(p, groups, settings) for p in plans])
        coef, *_ = np.linalg.lstsq(x, np.asarray(values, dtype=float), rcond=None)
        return cls(groups, [float(c) for c in coef], settings)

    def predict(self, plan: Plan) -> float:
        return float(features(plan, self.groups, self.settings) @ np.asarray(self.coef))


@dataclass
class AccuracyModel:
    """top-1 = the reference's - ``coef`` x the plan's summed KL sensitivities: one factor for all genes, since each
    gene's KL already measures how much it moves the logits (fitting a factor per gene kind on a few noisy top-1
    values gave a gene that costs little a factor of 0, i.e. free). The reference is uniform 8-bit in the paper's
    space (``kl``: per block, gene -> KL with only that gene 4-bit) and FP32 in the engine space (``kl``: per
    block, setting "w/a/attn" -> KL with only that block in it)."""

    reference_top1: float
    kl: list[dict[str, float]]
    coef: float = 0.0
    space: str = "paper"

    def perturbation(self, plan: Plan) -> float:
        if self.space == "paper":
            return sum(k[g] for k, b in zip(self.kl, plan.blocks, strict=True) for g in GENES if getattr(b, g) == 4)
        return sum(k.get(b.text(), 0.0) for k, b in zip(self.kl, plan.blocks, strict=True))

    def fit(self, plans: list[Plan], top1: list[float]) -> "AccuracyModel":
        """Least squares through the origin (no perturbation, no drop), never below 0."""
        x = np.array([self.perturbation(p) for p in plans])
        drop = self.reference_top1 - np.asarray(top1, dtype=float)
        self.coef = max(float(x @ drop / (x @ x)), 0.0) if x @ x > 0 else 0.0
        return self

    def predict(self, plan: Plan) -> float:
        return self.reference_top1 - self.coef * self.perturbation(plan)


@torch.no_grad()
def kl_sensitivities(qmodel, batches: Iterable[torch.Tensor], recipe: str, scheme: str, on_step=None,
                     space: Space = PAPER) -> list[dict[str, float]]:
    """Per block, the mean KL(FP32 || quantized) of the logits over the images of ``batches`` (re-iterable: read
    once per run) when only one gene of that block is 4-bit (paper space; ``QuantModel.isolate``), or only that
    block runs in one format (engine space; every format but float, ``QuantModel.isolate_block``), the rest of the
    model in FP32; ``on_step`` after each run. One batch's activations at a time: only the FP32 log-probabilities
    (images x classes) are kept between runs, so the images' count is not bounded by memory."""
    # the plans take the model's own rounding: a fitted one's codes are per (block, setting), so isolating one
    # gene of one block keeps that block's fitted codes
    qmodel.apply(None)
    refs = [torch.log_softmax(qmodel(x), dim=-1) for x in batches]
    images = sum(len(r) for r in refs)
    n = qmodel.num_blocks
    out = [{} for _ in range(n)]
    if space.name == "paper":
        steps = [(i, g) for i in range(n) for g in GENES]
    else:
        steps = [(i, s) for i in range(n) for s in sensitivity_settings(space)]
    for i, g in steps:
        if space.name == "paper":
            bits = [EIGHT] * n
            bits[i] = tuple(4 if gene == g else 8 for gene in GENES)
            qmodel.apply(plan_of(bits, recipe, scheme, qmodel.rounding))
            qmodel.isolate(i, g)
        else:
            qmodel.apply(plan_of([g] * n, recipe, scheme, qmodel.rounding))
            qmodel.isolate_block(i)
            g = text(g)
        total = 0.0
        for ref, x in zip(refs, batches, strict=True):
            logp = torch.log_softmax(qmodel(x), dim=-1)
            total += float(torch.sum(ref.exp() * (ref - logp), dtype=torch.float64))
        out[i][g] = total / images
        if on_step is not None:
            on_step()
    qmodel.apply(None)
    return out


def spearman(a: list[float], b: list[float]) -> float:
    """Rank correlation (ties get their average rank); nan for fewer than 3 points or a constant side."""
    if len(a) < 3:
        return float("nan")

    def ranks(v):
        v = np.asarray(v, dtype=float)
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=float)
        for value in np.unique(v):  # average the ranks of ties
            r[v == value] = r[v == value].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def errors(predicted: list[float], measured: list[float], relative: bool) -> dict:
    """Mean absolute (%) error and Spearman of ``predicted`` against ``measured``."""
    p, m = np.asarray(predicted, dtype=float), np.asarray(measured, dtype=float)
    err = np.abs(p - m) / np.abs(m) * 100 if relative else np.abs(p - m)
    return {"n": len(m), "mape_pct" if relative else "mae": float(err.mean()) if len(m) else float("nan"),
            "spearman": spearman(list(p), list(m))}
