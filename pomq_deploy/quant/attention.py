"""The attention's two MatMuls on integer codes, in the fake-quant reference.

timm computes ``q @ k^T`` and ``attn @ v`` with ``@`` inside its attention's forward, on the dequantized
tensors: a float GEMM, whose summation order differs from the deployed model's integer kernels (ONNX
Runtime runs both MatMuls on the codes). At 4-bit activations such a last-bit difference moves codes
downstream. While the quantized model runs on its exact path, a ``TorchFunctionMode`` around each attention's forward catches
those two MatMuls and computes them as the deployed kernels do: exact sums of code products, one scale.
Nothing of timm's forward is copied; a MatMul whose operands are not on integer grids (LIS probabilities)
stays float. Where rotary embeddings (EVA-02) sit between the q/k projections and ``q @ k^T``, the mode also
quantizes q, k and v where they enter the MatMuls (the exported graph has its Q/DQ pairs there), so that both
MatMuls still run on codes.

The same mode routes an attention's ``F.linear(x, self.qkv.weight, bias)`` (BEiT computes its qkv so, with
q/k/v biases of its own) to the wrapped qkv layer, in every state (calibration, export, fake-quant), so that
its input, weight and output are quantized as any other block's.
"""


import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .functional import integer_matmul, integer_product
from .modules import ActQuant, QuantWeighted

MATMULS = (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__)
LINEAR = (F.linear, torch._C._nn.linear)
INPUT_QUANTS = ("q_in", "k_in", "v_in")  # a rotary attention's quantizers of its MatMuls' inputs (attributes of it)


@dataclass(frozen=True)
class AttentionLayers:
    """Where an attention's wrapped layers are (attribute paths in the attention module), and how it computes."""
    qkv: tuple[str, ...]  # one fused qkv, or q, k and v projections
    proj: str
    probs: str  # the quantizer after Softmax
    functional_linear: bool  # it calls F.linear on its qkv's weight itself
    rotary_qk: bool  # q, k and v get quantizers of their own where they enter the MatMuls


class IntegerAttention(TorchFunctionMode):
    """One attention forward: its two batched MatMuls, ``q @ k^T`` then ``probs @ v``, on codes (when ``integer``),
    with q, k and v quantized on the way in (when ``apply``: rotary blocks); and functional calls of its wrapped
    Linear layers routed to them (``linears``: id of a layer's weight -> its wrapper).

    ``q``, ``k``, ``v`` are the quantizers whose grids the operands are on: without ``apply``, the qkv output's (or each
    projection's) through shape ops only, q times the attention's ``scale`` (``q_factor``: the exported graph folds it
    into q's DequantizeLinear scale), so their codes are their values over the scale, exactly; the probabilities'
    codes come from their quantizer (``ActQuant.parts``: one grid or V-2SF's two)."""

    def __init__(self, q: ActQuant, k: ActQuant, v: ActQuant, probs: ActQuant, q_factor: float, apply: bool,
                 integer: bool, linears: dict[int, QuantWeighted]):
        super().__init__()
        self.q, self.k, self.v, self.probs, self.q_factor = q, k, v, probs, q_factor
        self.apply, self.integer, self.linears = apply, integer, linears
        self.matmuls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in LINEAR and self.linears:
            x, weight, bias = (list(args) + [kwargs.get(k) for k in ("input", "weight", "bias")[len(args):]])[:3]
            layer = self.linears.get(id(weight))
            if layer is not None:  # the mode is off inside its own handler: the layer's own F.linear runs plain
                return layer(x, bias)
        # the attention's own MatMuls are batched over heads (4-D x 4-D); the Linear layers' GEMMs running
        # inside the same forward (qkv, proj: ``integer_linear``, 2-D weight) are not theirs to take
        if func in MATMULS and len(args) == 2 and not kwargs and args[0].ndim == 4 and args[1].ndim == 4:
            a, b = args
            first = self.matmuls == 0
            self.matmuls += 1
            if self.apply:
                a, b = (self.q(a), self.k(b)) if first else (a, self.v(b))
            y = (self._qk(a, b) if first else self._pv(a, b)) if self.integer else None
            return func(a, b) if y is None else y
        return func(*args, **kwargs)

    def _qk(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
        qg, kg = self.q.uniform(), self.k.uniform()
        if qg is None or kg is None:
            return None
        q_scale, k_scale = torch.tensor(qg.scale * self.q_factor, dtype=a.dtype), torch.tensor(kg.scale, dtype=a.dtype)
        return integer_matmul(torch.round(a / q_scale), torch.round(b / k_scale)) * (q_scale * k_scale)

    def _pv(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
        vg, last = self.v.uniform(), self.probs.last
        parts = self.probs.parts(last[0]) if vg is not None and last is not None and a is last[1] else None
        if parts is None:
            return None
        v_scale = torch.tensor(vg.scale, dtype=a.dtype)
        return integer_product(parts[1], torch.round(b / v_scale)) * (torch.tensor(parts[0], dtype=a.dtype) * v_scale)


def integer_attention(attn: nn.Module, block: int, paths: dict[str, tuple[str, ...]], functional_linear: bool = False,
                      rotary_qk: bool = False) -> None:
    """Hook ``attn`` (whose qkv, proj and probabilities the quantizer has wrapped, at ``paths`` in it) so that its
    MatMuls run on codes whenever its quantizers are applied; with ``functional_linear``, route its
    ``F.linear(x, self.qkv.weight, ...)`` calls to the wrapped layers, always. With ``rotary_qk``, q and k reach
    their MatMul through rotary embeddings, off any projection's grid: ``attn`` gets quantizers ``q_in``, ``k_in``
    and ``v_in`` for the MatMuls' inputs, applied in every state (calibration, export, fake-quant). The hooks read
    all of these from the module they are called on, so a deep copy of the model (e.g. ``.double()``) hooks its own."""
    attn._pomq_layers = AttentionLayers(paths["qkv"], paths["proj"][0], paths["attn_probs"][0], functional_linear, rotary_qk)
    if rotary_qk:
        for name in INPUT_QUANTS:
            setattr(attn, name, ActQuant("act", block))
    attn.register_forward_pre_hook(_enter)
    attn.register_forward_hook(_leave, always_call=True)


def _enter(attn: nn.Module, args) -> None:
    at = attn._pomq_layers
    qkv = [operator.attrgetter(p)(attn) for p in at.qkv]
    proj, probs = operator.attrgetter(at.proj)(attn), operator.attrgetter(at.probs)(attn)
    if at.rotary_qk:
        q, k, v = (getattr(attn, name) for name in INPUT_QUANTS)
        factor = 1.0  # q arrives scaled: its quantizer saw it so
    else:  # a fused qkv's one output grid serves all three
        q, k, v = (m.out_quant for m in (qkv * 3 if len(qkv) == 1 else qkv))
        factor = float(attn.scale)
    integer = q.state == "quant" and not q.exporting and proj.exact
    linears = {id(m.layer.weight): m for m in [*qkv, proj]} if at.functional_linear else {}
    if integer or linears or at.rotary_qk:
        mode = IntegerAttention(q, k, v, probs, factor, at.rotary_qk, integer, linears)
        probs.keep_last, probs.last = integer, None
        mode.__enter__()
        attn._integer_mode = mode


def _leave(attn: nn.Module, args, output) -> None:
    mode = attn.__dict__.pop("_integer_mode", None)
    if mode is not None:
        mode.__exit__(None, None, None)
        mode.probs.keep_last, mode.probs.last = False, None
