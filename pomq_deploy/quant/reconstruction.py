"""Block-output reconstruction: each encoder block's weight rounding learned against its FP32 output.

AdaRound (Nagel et al., ICML 2020) at the granularity of BRECQ (Li et al., ICLR 2021): every weight of a
block's Linears may round down or up, ``W_q = s * clamp(floor(W / s) + h(V), qmin, qmax)`` with the rectified
sigmoid ``h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)`` (zeta 1.1, gamma -0.1), ``V`` initialised
so that ``h(V)`` is the fractional part (the soft weight starts at the float weight), and Adam on
``||block_q(x) - block_fp32(x)||^2`` (per token, averaged) ``+ lambda * sum(1 - |2h(V) - 1|^beta)`` over minibatches of the calibration
images, the regulariser off for the first 20% of the iterations and ``beta`` annealed from 20 to 2 after them;
the codes are then ``floor(W / s) + (h(V) >= 0.5)``. With ``drop`` > 0, QDrop (Wei et al., ICLR 2022): while
fitting, each activation element of the block keeps its float value with that probability.

As for GPTQ (:mod:`.fitting`), each block is fitted on the FP32 model's inputs to it, with its own activation
quantizers at the setting's widths (gradients straight through their rounding), for every (w, a, attn), so a
plan is assembled from fitted blocks.

Where ours departs from the papers' code (BRECQ's and QDrop's public repositories):
- the grid is fixed: our symmetric per-output-channel min/max scale (theirs searches the scale by MSE first),
  so the exported scales are the nearest rounding's and only codes move;
- activation step sizes are not learned (QDrop learns them with LSQ): our activation quantizers keep the
  calibration's fitted grids, which the export and the TensorRT rules rely on;
- iterations default to hundreds, not their 20,000: a block setting must fit in seconds on 2 CPU cores
  (recipe ``fit``); every block setting of the reference model took 22 minutes (docs/roundings.md);
- the loss is the plain output MSE (BRECQ's Fisher-weighted variant needs the task loss's gradients).
"""

import itertools
import math
from collections.abc import Callable, Iterable

import torch

from .fitting import BITS, _enter, _leave, register_fitter, setting_key
from .functional import qrange, weight_scale

Track = Callable[[Iterable, int, str], Iterable]
ZETA, GAMMA = 1.1, -0.1
WARMUP = 0.2  # share of the iterations without the rounding regulariser
BETA = (20.0, 2.0)


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def initial_v(rest: torch.Tensor) -> torch.Tensor:
    """``V`` with ``rectified_sigmoid(V) == rest`` (the fractional part, in [0, 1))."""
    return -torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)


def rounding_loss(h: torch.Tensor, beta: float) -> torch.Tensor:
    """AdaRound's regulariser: 0 where every ``h`` is 0 or 1, largest at 0.5."""
    return (1 - (2 * h - 1).abs().pow(beta)).sum()


class SoftWeight:
    """One Linear's weight as ``s * clamp(floor(W/s) + h(V), qmin, qmax)``, ``V`` learnable."""

    def __init__(self, weight: torch.Tensor, bits: int):
        self.qmin, self.qmax = qrange(bits, symmetric=True)
        self.scale = weight_scale(weight, bits).reshape(-1, *([1] * (weight.ndim - 1)))
        scaled = weight.detach() / self.scale
        self.floor = torch.floor(scaled)
        self.v = initial_v(scaled - self.floor).requires_grad_(True)

    def __call__(self) -> torch.Tensor:
        return self.scale * torch.clamp(self.floor + rectified_sigmoid(self.v), self.qmin, self.qmax)

    def codes(self) -> torch.Tensor:
        return torch.clamp(self.floor + (rectified_sigmoid(self.v) >= 0.5).to(self.floor.dtype), self.qmin, self.qmax)


def fit_adaround(qmodel, batches: list[torch.Tensor], fmt: str, track: Track | None = None, *, iterations: int = 200,
                 batch: int = 32, lr: float = 1e-2, weight: float = 0.01, drop: float = 0.0,
                 seed: int = 0) -> dict[str, dict[str, dict]]:
    """Learned codes of every block's Linears for every setting in activation format ``fmt`` (the structure of
    ``fitting.fit_gptq``'s)."""
    inputs, outputs = _block_io(qmodel, batches)
    settings = [(i, a, attn, w) for i in range(qmodel.num_blocks) for a, attn in itertools.product(BITS, BITS) for w in BITS]
    fits: dict[str, dict[str, dict]] = {}
    g = torch.Generator().manual_seed(seed)
    steps = track(settings, len(settings), f"block reconstruction ({fmt}): {iterations} iterations per block setting") \
        if track else settings
    frozen = [p for p in qmodel.parameters() if p.requires_grad]  # only the roundings learn: no gradients for the rest
    for p in frozen:
        p.requires_grad_(False)
    try:
        for block, a, attn, w in steps:
            fits[setting_key(block, w, a, attn)] = reconstruct_block(qmodel, block, fmt, a, attn, w, inputs[block],
                                                                     outputs[block], iterations, batch, lr, weight, drop, g)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return fits


@register_fitter("adaround")
def _adaround(qmodel, batches, fmt, track, spec):
    return fit_adaround(qmodel, batches, fmt, track, iterations=spec.iterations, batch=spec.batch, lr=spec.lr,
                        weight=spec.weight, seed=spec.seed)


@register_fitter("qdrop")
def _qdrop(qmodel, batches, fmt, track, spec):
    return fit_adaround(qmodel, batches, fmt, track, iterations=spec.iterations, batch=spec.batch, lr=spec.lr,
                        weight=spec.weight, drop=spec.drop, seed=spec.seed)


def reconstruct_block(qmodel, block: int, fmt: str, a: int, attn: int, w: int, inputs, outputs, iterations: int,
                      batch: int, lr: float, weight: float, drop: float, g: torch.Generator) -> dict[str, dict]:
    """Block ``block``'s codes at weight width ``w`` under activations (``a``, ``attn``) in ``fmt``, learned on its
    FP32 ``inputs`` ((x, kwargs)) against its FP32 ``outputs``."""
    module = qmodel.blocks[block]
    layers = {n: m for n, m in qmodel.weighted.items() if m.block == block}
    quants = [aq for aq in qmodel.act_quants.values() if aq.block == block]
    _enter(qmodel, block, fmt, a, attn)  # RepQ-ViT's factors folded: the learned codes are the folded weights'
    soft = {n: SoftWeight(m.layer.weight, w) for n, m in layers.items()}
    for n, m in layers.items():
        m.weight_bits, m.soft = w, soft[n]
    for aq in quants:
        aq.straight_through, aq.drop = True, drop
    params = [s.v for s in soft.values()]
    opt = torch.optim.Adam(params, lr=lr)
    count = inputs[0].shape[0]
    warm = int(WARMUP * iterations)
    try:
        with torch.enable_grad():
            for it in range(iterations):
                pick = torch.randint(0, count, (min(batch, count),), generator=g)
                args, kwargs = inputs
                out = module(args[pick], **{k: v[pick] if torch.is_tensor(v) and v.shape[:1] == args.shape[:1] else v
                                           for k, v in kwargs.items()})
                loss = ((out - outputs[pick]) ** 2).sum(-1).mean()  # BRECQ's: squared error per token, averaged
                if it >= warm:
                    progress = (it - warm) / max(1, iterations - warm)
                    beta = BETA[1] + 0.5 * (BETA[0] - BETA[1]) * (1 + math.cos(math.pi * progress))
                    loss = loss + weight * sum(rounding_loss(rectified_sigmoid(s.v), beta) for s in soft.values())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    finally:
        for m in layers.values():
            m.weight_bits, m.soft = None, None
        for aq in quants:
            aq.straight_through, aq.drop = False, 0.0
    fitted = {n: {"codes": s.codes().detach().to(torch.int8), "scale": s.scale.reshape(-1).detach().float()}
              for n, s in soft.items()}
    _leave(qmodel, block)
    return fitted


@torch.no_grad()
def _block_io(qmodel, batches: list[torch.Tensor]) -> tuple[list, list[torch.Tensor]]:
    """Each block's FP32 inputs ((x, tensor kwargs), concatenated over the batches) and outputs."""
    qmodel.apply(None)
    ins: list[list] = [[] for _ in qmodel.blocks]
    outs: list[list] = [[] for _ in qmodel.blocks]
    handles = []
    for i, block in enumerate(qmodel.blocks):
        handles.append(block.register_forward_pre_hook(lambda m, args, kwargs, i=i: ins[i].append((args[0], kwargs)),
                                                       with_kwargs=True))
        handles.append(block.register_forward_hook(lambda m, args, out, i=i: outs[i].append(out)))
    try:
        for b in batches:
            qmodel.model(b)
    finally:
        for h in handles:
            h.remove()
    inputs = []
    for per_batch in ins:
        x = torch.cat([x for x, _ in per_batch])
        keys = per_batch[0][1].keys()
        kwargs = {k: torch.cat([kw[k] for _, kw in per_batch]) if torch.is_tensor(per_batch[0][1][k]) else per_batch[0][1][k]
                  for k in keys}
        inputs.append((x, kwargs))
    return inputs, [torch.cat(o) for o in outs]
