"""Weights fitted to the calibration data, per (block, block setting), for a composable plan.

A fitted rounding (:mod:`.roundings`) gives each encoder block's weights their codes for every setting the
block can take in a plan: weight width ``w``, activation width ``a``, attention width ``attn``, in one
activation format (``asym``: the ``ort`` target; ``sym``: ``tensorrt``; each fitted when a plan first needs
it). A plan's model is then assembled from the fitted blocks (``QuantModel.apply``), so the search's design
set, sensitivities and fronts reuse them and no block setting is fitted twice.

**What GPTQ fits each block on: FP32 activations.** Block ``i``'s inputs are the FP32 model's, on the
calibration images; inside the block, its activations are quantized as the setting says (the same fitted
activation quantizers a plan applies, RepQ-ViT's reparameterization folded in) and its weights are FP32 while
the inputs are collected, as GPTQ's reference code collects one transformer block's inputs at a time. So a
block's fit does not depend on the other blocks' settings: that is what makes it composable, in one pass. The
block reconstruction (:mod:`.reconstruction`) fits each block in its setting's uniform context instead.

One pass over the calibration images collects every (block, setting) Hessian: the FP32 forward runs as
usual, and on entering each block a hook runs that block once more per (a, attn), quantized, on the same
input; both weight widths share those Hessians.
"""

import itertools
from collections.abc import Callable, Iterable

import torch

from .functional import weight_scale
from .gptq import gptq_codes

Track = Callable[[Iterable, int, str], Iterable]
BITS = (4, 8)


def setting_key(block: int, w: int, a: int, attn: int) -> str:
    return f"{block}/{w}/{a}/{attn}"


@torch.no_grad()
def fit_gptq(qmodel, batches: list[torch.Tensor], fmt: str, track: Track | None = None) -> dict[str, dict[str, dict]]:
    """GPTQ codes of every block's Linears for every setting in activation format ``fmt``: ``setting_key ->
    {"weights": {layer name: {codes, scale}}, "acts": {}}`` (codes int8, scale float32 per output channel; "acts":
    the activation quantizers a fitting learned, none here). ``qmodel`` must be calibrated."""
    hessians = _collect_hessians(qmodel, batches, fmt, track)
    fits: dict[str, dict[str, dict]] = {}
    for (block, a, attn), per_layer in hessians.items():
        _enter(qmodel, block, fmt, a, attn)  # folds RepQ-ViT's factors for this setting: GPTQ rounds the folded weights
        for name, h in per_layer.items():
            weight = qmodel.weighted[name].layer.weight.detach()
            flat = weight.reshape(weight.shape[0], -1)
            scales = {w: weight_scale(weight, w) for w in BITS}  # both widths in one pass: rows stacked
            codes = gptq_codes(torch.cat([flat, flat]), h, torch.cat([scales[4], scales[8]]),
                               bits=torch.tensor([4] * len(flat) + [8] * len(flat)))
            for w, part in zip(BITS, codes.split(len(flat)), strict=True):
                fits.setdefault(setting_key(block, w, a, attn), {"weights": {}, "acts": {}})["weights"][name] = {
                    "codes": part.reshape(weight.shape).to(torch.int8), "scale": scales[w].float()}
        _leave(qmodel, block)
    return fits


def _enter(qmodel, block: int | None, fmt: str, a: int, attn: int, w: int | None = None, fit: dict | None = None) -> None:
    """Block ``block``'s activations quantized at (``a``, ``attn``) in ``fmt``, with the quantizers ``fit`` learned,
    and its weights at ``w`` with ``fit``'s codes (``w`` None: FP32); the rest untouched. ``block`` None: the layers
    outside the blocks (the stem, between the stages, the head)."""
    qmodel.quantize_activations(block, fmt, a, attn, None if fit is None else fit["acts"])
    for aq in qmodel.act_quants.values():
        if aq.block == block:
            aq.state = "quant"
    for name, m in qmodel.weighted.items():
        if m.block == block:
            m.weight_bits, m.fitted = w, None if fit is None or w is None else fit["weights"][name]


def _leave(qmodel, block: int | None) -> None:
    for aq in qmodel.act_quants.values():
        if aq.block == block:
            aq.state, aq.active = "fp", None
    for m in qmodel.weighted.values():
        if m.block == block:
            m.weight_bits, m.fitted = None, None
    if block is not None:
        qmodel.unfold(block)


def _collect_hessians(qmodel, batches: list[torch.Tensor], fmt: str, track: Track | None) -> dict[tuple, dict[str, torch.Tensor]]:
    """``X^T X`` of every block Linear's quantized input in format ``fmt``, per (block, a, attn), in one pass."""
    qmodel.apply(None)
    hessians: dict[tuple, dict[str, torch.Tensor]] = {}
    current: list[tuple] = []  # the (block, a, attn) whose Hessians the input quantizers' hooks add to now
    readers: dict[object, list[str]] = {}  # an input quantizer -> the Linears reading it (q, k and v share one)
    for name, w in qmodel.weighted.items():
        if w.block is not None:
            readers.setdefault(w.in_quant, []).append(name)

    def input_hook(module, args, out):
        if current:
            x = out.reshape(-1, out.shape[-1]).float()
            h = x.T @ x
            acc = hessians.setdefault(current[0], {})
            for name in readers[module]:
                acc[name] = acc[name] + h if name in acc else h

    def block_hook(index):
        def hook(module, args, kwargs):
            if current:  # the block's own quantized reruns below
                return None
            for a, attn in itertools.product(BITS, BITS):
                current.append((index, a, attn))
                _enter(qmodel, index, fmt, a, attn)
                try:
                    module(*args, **kwargs)
                finally:
                    _leave(qmodel, index)
                    current.clear()
            return None
        return hook

    handles = [q.register_forward_hook(input_hook) for q in readers]
    handles += [b.register_forward_pre_hook(block_hook(i), with_kwargs=True) for i, b in enumerate(qmodel.blocks)]
    try:
        for batch in (track(batches, len(batches), f"gptq ({fmt}): inputs of every block setting") if track else batches):
            qmodel.model(batch)
    finally:
        for h in handles:
            h.remove()
    return hessians


Fitter = Callable[..., dict[str, dict[str, dict]]]  # (qmodel, batches, fmt, track, fit spec) -> fits
FITTERS: dict[str, Fitter] = {}


def register_fitter(name: str):
    def register(fn: Fitter) -> Fitter:
        FITTERS[name] = fn
        return fn
    return register


@register_fitter("gptq")
def _gptq(qmodel, batches, fmt, track, spec):
    return fit_gptq(qmodel, batches, fmt, track)
