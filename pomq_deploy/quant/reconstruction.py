"""Block-output reconstruction: each encoder block's weight rounding learned against its FP32 output.

AdaRound (Nagel et al., ICML 2020) at the granularity of BRECQ (Li et al., ICLR 2021): every weight of a
block's Linears may round down or up, ``W_q = s * clamp(floor(W / s) + h(V), qmin, qmax)`` with the rectified
sigmoid ``h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)`` (zeta 1.1, gamma -0.1), ``V`` initialised
so that ``h(V)`` is the fractional part (the soft weight starts at the float weight), and Adam on
``||block_q(x) - block_fp32(x)||^2`` (per token, averaged) ``+ lambda * sum(1 - |2h(V) - 1|^beta)`` over minibatches of the calibration
images, the regulariser off for the first 20% of the iterations and ``beta`` annealed from 20 to 2 after them;
the codes are then ``floor(W / s) + (h(V) >= 0.5)``. With ``act_lr`` > 0 the step sizes of the block's 4-bit
uniform activation quantizers are learned with the roundings (LSQ, Esser et al., ICLR 2020, as QDrop learns them).
With ``drop`` > 0, QDrop (Wei et al., ICLR 2022): while fitting, each activation element of the block keeps its
float value with that probability.

**What each block is fitted on: its setting's uniform context.** Block ``i`` at setting (w, a, attn) is fitted
on its inputs in the model whose blocks before it all run at that same setting, with their own fits (and the
layers outside the blocks at 8 bits), against the FP32 model's block output; inside the block its activations are
quantized at the setting's widths (gradients straight through their rounding). The fits are still one per
(block, setting), so a plan is assembled from fitted blocks and a search composes them; for a uniform plan this
is exactly fitting in sequence under the plan (as BRECQ and QDrop fit one model), and a mixed plan's blocks saw
inputs with the quantization noise of their own setting rather than none (``tools/fit_context.py`` measures both
against FP32 inputs and against fitting in sequence under each plan; docs/roundings.md). The settings are fitted
block by block, each setting's inputs carried from one block to the next (replayed through the model where a
block's input is not the output of the block before it, as across Swin's stages).

Where ours departs from the papers' code (BRECQ's and QDrop's public repositories):
- the weight grid is our symmetric per-output-channel min/max scale, where theirs searches each row's clipping by
  MSE first: on the reference model at 4/4/4 the MSE grid cost 0.45 and 0.75 point under this reconstruction
  (two fitting seeds, first 2,000 test images; docs/roundings.md), the cause not isolated;
- activation step sizes are learned only at 4 bits, on ``log s`` (positive by construction), with the zero point,
  the range and PTF's per-channel power-of-two shifts kept as calibrated, so the learned quantizer is exported
  as the calibrated one is; RepQ-ViT's folded LayerNorm outputs learn their deployed per-tensor step; log-domain
  quantizers (LIS, log-sqrt(2)) and V-2SF's two grids keep their calibrated parameters;
- 1,000 iterations of 4 images at Adam's rate 0.1 on ``V``, not their 20,000 of 32 at 1e-3: a block setting must
  fit in seconds on 2 CPU cores (recipe ``fit``), and within that the number of steps limits the fit, not the
  images per step (docs/roundings.md); a setting with only step sizes to learn runs a quarter of them
  (``STEPS_ONLY``);
- only what is at 4 bits is learned (``LEARNED_BITS``), where theirs learns every weight: 8-bit weights keep their
  nearest codes, and a setting with nothing to learn (8-bit weights and no 4-bit activation step to learn, e.g.
  8/8/8) is not fitted at all, so uniform 8/8/8 is rounding to nearest (docs/roundings.md);
- the loss is the plain output MSE (BRECQ's Fisher-weighted variant needs the task loss's gradients).
"""

import dataclasses
import itertools
import math
from collections.abc import Callable, Iterable
from typing import get_args

import torch

from ..recipe import FitSpec
from .fitting import BITS, _enter, _leave, register_fitter, setting_key
from .functional import qrange, weight_scale
from .model import OUTSIDE_BITS
from .quantizers import UniformQ, to_state

Track = Callable[[Iterable, int, str], Iterable]
ZETA, GAMMA = 1.1, -0.1
WARMUP = 0.2  # share of the iterations without the rounding regulariser
BETA = (20.0, 2.0)
# The width whose weight roundings and activation step sizes are learned. At 8 bits rounding to nearest and the
# calibrated steps are already within noise of a fit (uniform 8/8/8 on the reference, full test split: 0.9180
# nearest, 0.9186 with every 8-bit weight and block fitted; docs/roundings.md), while a setting's 8-bit weights
# cost a third of its GEMMs and 8/8/8 a whole eighth of the fitting time: an 8-bit weight keeps its nearest codes,
# and a setting with nothing to learn is not fitted at all (its blocks still carry the uniform context).
LEARNED_BITS = 4
# The share of the iterations a setting with only step sizes to learn runs (8-bit weights, 4-bit activations: a
# handful of scalars). On the reference model's first block at 8/4/4, its output error on held-out calibration
# images was 34.2, 33.2 and 32.5 after 200, 400 and 800 iterations (8 images each), where learning the 4-bit
# roundings takes 4/4/4's from 20.4 to 10.9: a quarter keeps the fit of every block setting of the reference model
# at 744 s on 2 cores instead of 1000 s, within 15 minutes (docs/roundings.md).
STEPS_ONLY = 0.25
_FIT = FitSpec()  # the recipe's defaults
CONTEXTS = get_args(FitSpec.__annotations__["context"])  # what a block setting is fitted on (the module docstring)


def steps_only_iterations(iterations: int) -> int:
    """The iterations of a setting with only step sizes to learn (``STEPS_ONLY``)."""
    return max(1, round(STEPS_ONLY * iterations))


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def initial_v(rest: torch.Tensor) -> torch.Tensor:
    """``V`` with ``rectified_sigmoid(V) == rest`` (the fractional part, in [0, 1))."""
    return -torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)


def rounding_loss(h: torch.Tensor, beta: float) -> torch.Tensor:
    """AdaRound's regulariser ``sum(1 - |2h - 1|^beta)``: 0 where every ``h`` is 0 or 1, largest at 0.5."""
    return _RoundingLoss.apply(h, beta)


class _RoundingLoss(torch.autograd.Function):
    """The regulariser with one power per element, not autograd's two (its ``pow`` forward and backward): it runs on
    every weight of a block at every iteration, and a float power is the costliest pass of the fit's weight side.
    ``d/dh = -2 beta |2h - 1|^(beta - 1) sign(2h - 1)``."""

    @staticmethod
    def forward(ctx, h, beta):
        d = h * 2 - 1
        a = d.abs()
        t = a.pow(beta - 1)
        loss = h.numel() - torch.dot(t.reshape(-1), a.reshape(-1))
        ctx.save_for_backward(t.mul_(d.sign_()).mul_(-2 * beta))
        return loss

    @staticmethod
    def backward(ctx, grad):
        (dh,) = ctx.saved_tensors
        return grad * dh, None


class SoftWeight:
    """One Linear's weight as ``s * clamp(floor(W/s) + h(V), qmin, qmax)``, ``V`` learnable."""

    def __init__(self, weight: torch.Tensor, bits: int):
        self.qmin, self.qmax = qrange(bits, symmetric=True)
        self.scale = weight_scale(weight, bits).reshape(-1, *([1] * (weight.ndim - 1)))
        scaled = weight.detach() / self.scale
        self.floor = torch.floor(scaled)
        self.v = initial_v(scaled - self.floor).requires_grad_(True)
        self.h = rectified_sigmoid(self.v)

    def __call__(self) -> torch.Tensor:
        """The soft weight; its ``h(V)`` is kept in ``h`` for the iteration's regulariser (one sigmoid per step)."""
        self.h = rectified_sigmoid(self.v)
        return self.scale * torch.clamp(self.floor + self.h, self.qmin, self.qmax)

    def codes(self) -> torch.Tensor:
        return torch.clamp(self.floor + (rectified_sigmoid(self.v) >= 0.5).to(self.floor.dtype), self.qmin, self.qmax)


class LearnedStep:
    """A per-tensor uniform quantizer whose step size is learned (LSQ, Esser et al., ICLR 2020, as QDrop learns its
    activations'): ``s`` as ``exp(log s)``, the rounding passed straight through, so that ``d y / d s`` is LSQ's
    ``round(x/s) - x/s`` inside the range and the clipped code outside it. The zero point, the range and a
    per-channel power-of-two shift (PTF) stay as calibrated, so the learned quantizer exports as the calibrated
    one does."""

    def __init__(self, q: UniformQ):
        self.q = q
        self.log_scale = torch.tensor(math.log(q.scale), requires_grad=True)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        s = self.log_scale.exp().to(x.dtype)
        if self.q.shift is not None:
            s = s * torch.pow(2.0, self.q.shift.to(x.dtype))
        return _LSQ.apply(x, s, self.q.zero_point, self.q.qmin, self.q.qmax)

    def frozen(self) -> UniformQ:
        return dataclasses.replace(self.q, scale=float(self.log_scale.detach().exp()))


class _LSQ(torch.autograd.Function):
    """``(clamp(round(x/s) + z, qmin, qmax) - z) * s`` with LSQ's gradients, in two saved tensors instead of the
    graph of its seven ops (a block reconstruction runs it on every activation, hundreds of times per block):
    ``dy/dx`` is 1 inside the range and 0 outside, ``dy/ds`` is ``codes - x/s`` inside and ``codes`` outside."""

    @staticmethod
    def forward(ctx, x, s, zero_point, qmin, qmax):
        u = x / s + zero_point  # in place where it can be: each op is a pass over the block's largest activations
        codes = torch.round(u).clamp_(qmin, qmax)
        inside = (u >= qmin).logical_and_(u <= qmax)
        codes.sub_(zero_point)
        ctx.save_for_backward(inside, torch.where(inside, codes - u.sub_(zero_point), codes), s)
        return codes.mul_(s)

    @staticmethod
    def backward(ctx, grad):
        inside, ds, s = ctx.saved_tensors
        grad_s = grad * ds
        grad_s = grad_s.sum() if s.ndim == 0 else grad_s.sum_to_size(s.shape)
        return grad * inside, grad_s, None, None, None


def fit_adaround(qmodel, batches: list[torch.Tensor], fmt: str, track: Track | None = None, *,
                 iterations: int = _FIT.iterations, batch: int = _FIT.batch, lr: float = _FIT.lr, act_lr: float = 0.0,
                 weight: float = _FIT.weight, drop: float = 0.0, seed: int = 0, context: str = _FIT.context,
                 pairs: list[tuple[int, tuple]] | None = None) -> dict[str, dict[str, dict]]:
    """Learned codes of every block's Linears for every setting in activation format ``fmt`` (the structure of
    ``fitting.fit_gptq``'s), each block fitted on its FP32 inputs (``context`` "fp32") or in its setting's uniform
    context ("uniform"; the module docstring). ``pairs``: only these (block, (w, a, attn)), in order, each after
    its setting's blocks before it (default: all)."""
    if context not in CONTEXTS:
        raise ValueError(f"fit context {context!r}; allowed: {', '.join(CONTEXTS)}")
    fp32 = Fp32Blocks(qmodel, batches)
    if pairs is None:
        settings = [(w, a, attn) for a, attn in itertools.product(BITS, BITS) for w in BITS]
        pairs = [(block, setting) for block in range(qmodel.num_blocks) for setting in settings]
    fits: dict[str, dict[str, dict]] = {}
    carried: dict[tuple, tuple] = {}  # setting -> (block, its inputs with every block before it at that setting)
    chained = fp32.chained + [False]

    def inputs_of(block: int, setting: tuple) -> tuple:
        if context == "fp32":
            return fp32.inputs(block)
        if carried.get(setting, (None,))[0] != block:
            carried[setting] = (block, _inputs_in_context(qmodel, block, fmt, [setting] * block, fits, batches))
        return carried[setting][1]

    g = torch.Generator().manual_seed(seed)
    steps = track(pairs, len(pairs), f"block reconstruction ({fmt}): {iterations} iterations per block setting "
                  f"({steps_only_iterations(iterations)} where only step sizes are learned)") \
        if track else pairs
    frozen = [p for p in qmodel.parameters() if p.requires_grad]  # only the roundings learn: no gradients for the rest
    for p in frozen:
        p.requires_grad_(False)
    try:
        for block, (w, a, attn) in steps:
            target = fp32.outputs(block)
            fit = reconstruct_block(qmodel, block, fmt, a, attn, w, inputs_of(block, (w, a, attn)), target,
                                    iterations, batch, lr, act_lr, weight, drop, g)
            fits[setting_key(block, w, a, attn)] = fit
            if context != "fp32" and chained[block + 1]:  # the next block's input is this one's output, same kwargs
                x, kwargs = carried[(w, a, attn)][1]
                carried[(w, a, attn)] = (block + 1, (_run_block(qmodel, block, fmt, (w, a, attn), fit, x, kwargs), kwargs))
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return fits


@register_fitter("adaround")
def _adaround(qmodel, batches, fmt, track, spec):
    return fit_adaround(qmodel, batches, fmt, track, iterations=spec.iterations, batch=spec.batch, lr=spec.lr,
                        act_lr=spec.act_lr, weight=spec.weight, seed=spec.seed, context=spec.context)


@register_fitter("qdrop")
def _qdrop(qmodel, batches, fmt, track, spec):
    return fit_adaround(qmodel, batches, fmt, track, iterations=spec.iterations, batch=spec.batch, lr=spec.lr,
                        act_lr=spec.act_lr, weight=spec.weight, drop=spec.drop, seed=spec.seed, context=spec.context)


def reconstruct_block(qmodel, block: int, fmt: str, a: int, attn: int, w: int, inputs, outputs, iterations: int,
                      batch: int, lr: float, act_lr: float, weight: float, drop: float, g: torch.Generator) -> dict:
    """Block ``block``'s codes at weight width ``w`` under activations (``a``, ``attn``) in ``fmt``, learned on its
    FP32 ``inputs`` ((x, kwargs)) against its FP32 ``outputs``; with ``act_lr`` > 0, the step sizes of its uniform
    per-tensor 4-bit activation quantizers too (Adam on ``log s`` at that rate). Only 4-bit weights and steps are
    learned (``LEARNED_BITS``): 8-bit weights get their nearest codes, and with no 4-bit weight the steps are
    learned in a quarter of the iterations (``STEPS_ONLY``). Returns ``{"weights": {layer: {codes, scale}},
    "acts": {activation: quantizer state}}``."""
    layers = {n: m for n, m in qmodel.weighted.items() if m.block == block}
    quants = {n: aq for n, aq in qmodel.act_quants.items() if aq.block == block}
    _enter(qmodel, block, fmt, a, attn)  # RepQ-ViT's factors folded: the learned codes are the folded weights'
    soft = {n: SoftWeight(m.layer.weight, w) for n, m in layers.items()} if w == LEARNED_BITS else {}
    steps = {n: LearnedStep(aq.active) for n, aq in quants.items()
             if act_lr > 0 and type(aq.active) is UniformQ and (attn if aq.role == "attn" else a) == LEARNED_BITS}
    nearest = {n: m.weight_codes(w) for n, m in layers.items() if n not in soft}  # the layer's cached nearest codes
    if soft or steps:
        _learn(qmodel, block, layers, quants, w, soft, steps, inputs, outputs,
               iterations if soft else steps_only_iterations(iterations), batch, lr, act_lr, weight, drop, g)
    codes = {n: (s.codes().detach(), s.scale.reshape(-1).detach()) for n, s in soft.items()} | nearest
    fitted = {"weights": {n: {"codes": c.to(torch.int8), "scale": sc.float()} for n, (c, sc) in codes.items()},
              "acts": {n: to_state(s.frozen()) for n, s in steps.items()}}
    _leave(qmodel, block)
    return fitted


def _learn(qmodel, block: int, layers: dict, quants: dict, w: int, soft: dict, steps: dict, inputs, outputs,
           iterations: int, batch: int, lr: float, act_lr: float, weight: float, drop: float, g: torch.Generator) -> None:
    """Adam on the ``soft`` roundings and the ``steps``' log step sizes of block ``block`` (entered), in place."""
    module = qmodel.blocks[block]
    for n, m in layers.items():
        m.weight_bits, m.soft = w, soft.get(n)
    for n, aq in quants.items():
        aq.straight_through, aq.drop, aq.learned = True, drop, steps.get(n)
    groups = [{"params": [s.v for s in soft.values()], "lr": lr}] if soft else []
    if steps:
        groups.append({"params": [s.log_scale for s in steps.values()], "lr": act_lr})
    opt = torch.optim.Adam(groups, fused=True)  # one pass per step over the block's roundings, not six
    count = inputs[0].shape[0]
    warm = int(WARMUP * iterations)
    try:
        with torch.enable_grad():
            for it in range(iterations):
                pick = torch.randint(0, count, (min(batch, count),), generator=g)
                args, kwargs = inputs
                out = module(args[pick], **_rows(kwargs, args, pick))
                loss = ((out - outputs[pick]) ** 2).sum(-1).mean()  # BRECQ's: squared error per token, averaged
                if it >= warm:
                    progress = (it - warm) / max(1, iterations - warm)
                    beta = BETA[1] + 0.5 * (BETA[0] - BETA[1]) * (1 + math.cos(math.pi * progress))
                    loss = loss + weight * sum(rounding_loss(s.h, beta) for s in soft.values())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    finally:
        for m in layers.values():
            m.weight_bits, m.soft = None, None
        for aq in quants.values():
            aq.straight_through, aq.drop, aq.learned = False, 0.0, None


class Fp32Blocks:
    """One block's FP32 input ((x, kwargs)) and output on the calibration images at a time, the blocks' own
    way through the FP32 model: the next block's input is this block's output where the model chains them (ViT,
    DeiT, BEiT, EVA; within a Swin stage), the model's forward stopped at the block elsewhere (or when an earlier
    block is asked for). Memory: two activation tensors of the calibration images, whatever the depth (ViT-L at
    1,000 images: 0.8 GB each), where holding every block's would take 2 x 24 of them. Each block runs on the
    calibration batches as the forward does, so its output is bit for bit the full forward's."""

    def __init__(self, qmodel, batches: list[torch.Tensor]):
        qmodel.apply(None)
        self.qmodel, self.batches = qmodel, batches
        self.sizes = [len(b) for b in batches]
        self.chained = self._chaining()
        self.block, self._x, self._kwargs, self._y = None, None, [], None

    def inputs(self, block: int) -> tuple[torch.Tensor, dict]:
        """Block ``block``'s FP32 inputs: (x over all the images, kwargs with tensors along the batch concatenated)."""
        self._reach(block)
        return self._x, _concat_kwargs(self._kwargs, self.sizes)

    def outputs(self, block: int) -> torch.Tensor:
        self._reach(block)
        if self._y is None:
            with torch.no_grad():
                self._y = torch.cat([self.qmodel.blocks[block](x, **kw) for x, kw in zip(self._x.split(self.sizes), self._kwargs,
                                                                                          strict=True)])
        return self._y

    def _reach(self, block: int) -> None:
        if block == self.block:
            return
        if self.block is not None and block == self.block + 1 and self.chained[block]:
            x = self.outputs(self.block)
        else:
            seen = _stopped_inputs(self.qmodel, block, self.batches)
            x, self._kwargs = torch.cat([x for x, _ in seen]), [kw for _, kw in seen]
        self.block, self._x, self._y = block, x, None

    @torch.no_grad()
    def _chaining(self) -> list[bool]:
        """Per block, whether its input is the output of the block before it with the same kwargs (seen on the
        first calibration batch)."""
        ins, outs, handles = [], [], []
        for block in self.qmodel.blocks:
            handles.append(block.register_forward_pre_hook(lambda m, args, kwargs: ins.append((args[0], kwargs)),
                                                           with_kwargs=True))
            handles.append(block.register_forward_hook(lambda m, args, out: outs.append(out)))
        try:
            self.qmodel.model(self.batches[0])
        finally:
            for h in handles:
                h.remove()
        return [i > 0 and ins[i][0].shape == outs[i - 1].shape and torch.equal(ins[i][0], outs[i - 1])
                and _same_kwargs(ins[i][1], ins[i - 1][1]) for i in range(len(ins))]


def _same_kwargs(a: dict, b: dict) -> bool:
    """The same kwargs: the same tensor objects (a rotary embedding every block is given) and equal other values."""
    return a.keys() == b.keys() and all(v is b[k] or (not torch.is_tensor(v) and v == b[k]) for k, v in a.items())


def _concat_kwargs(per_batch: list[dict], sizes: list[int]) -> dict:
    """A block's kwargs collected per batch as one: tensors along the batch concatenated, the rest (a rotary
    embedding or a mask that every image shares) as the first batch gave them."""
    first = per_batch[0]
    return {k: torch.cat([kw[k] for kw in per_batch]) if torch.is_tensor(v) and v.shape[:1] == (sizes[0],) else v
            for k, v in first.items()}


def _rows(kwargs: dict, x: torch.Tensor, pick) -> dict:
    """A block's kwargs for the rows ``pick`` of its input ``x`` (tensors with x's batch dimension are indexed)."""
    return {k: v[pick] if torch.is_tensor(v) and v.shape[:1] == x.shape[:1] else v for k, v in kwargs.items()}


@torch.no_grad()
def _run_block(qmodel, block: int, fmt: str, setting: tuple, fit: dict, x: torch.Tensor, kwargs: dict,
               chunk: int = 100) -> torch.Tensor:
    """Block ``block`` at ``setting`` (w, a, attn) with its fitted codes and activation quantizers, on ``x``."""
    w, a, attn = setting
    _enter(qmodel, block, fmt, a, attn, w, fit)
    try:
        return torch.cat([qmodel.blocks[block](x[i:i + chunk], **_rows(kwargs, x, slice(i, i + chunk)))
                          for i in range(0, len(x), chunk)])
    finally:
        _leave(qmodel, block)


class _Reached(Exception):
    """Raised by the hook that collected a block's input: the rest of the forward is not needed."""


@torch.no_grad()
def _stopped_inputs(qmodel, block: int, batches: list[torch.Tensor]) -> list[tuple]:
    """Block ``block``'s (x, kwargs) per batch, as the model is now set: its forward, stopped at the block."""
    seen = []

    def stop(module, args, kwargs):
        seen.append((args[0], kwargs))
        raise _Reached

    handle = qmodel.blocks[block].register_forward_pre_hook(stop, with_kwargs=True)
    try:
        for b in batches:
            try:
                qmodel.model(b)
            except _Reached:
                pass
    finally:
        handle.remove()
    return seen


@torch.no_grad()
def _inputs_in_context(qmodel, block: int, fmt: str, settings: list[tuple], fits: dict, batches: list[torch.Tensor]) -> tuple:
    """Block ``block``'s inputs ((x, tensor kwargs)) with the layers outside the blocks at 8 bits and each block
    ``j`` before it at ``settings[j]`` (w, a, attn) with its fit in ``fits``: the model forward, stopped at the
    block."""
    _enter(qmodel, None, fmt, OUTSIDE_BITS, OUTSIDE_BITS, OUTSIDE_BITS)
    for j, (w, a, attn) in enumerate(settings[:block]):
        _enter(qmodel, j, fmt, a, attn, w, fits[setting_key(j, w, a, attn)])
    try:
        seen = _stopped_inputs(qmodel, block, batches)
    finally:
        for j in (None, *range(block)):
            _leave(qmodel, j)
    return torch.cat([x for x, _ in seen]), _concat_kwargs([kw for _, kw in seen], [len(b) for b in batches])
