"""Scale balancing inside the attention: an equivalent transformation of q against k and of v against proj.

A fused qkv Linear writes q, k and v as one tensor, quantized per tensor (its one grid feeds both attention
MatMuls, and TensorRT takes activations per tensor only). A few channels far larger than the rest (real
pretrained ViTs have them in q and k, and in v and the attention output) set that grid's step for all.
Both products the attention computes are unchanged by per-channel factors moved across them:

- ``q . k``: channel c of q divided by ``t_c``, the same channel of k multiplied by it, with
  ``t_c = sqrt(max|q_c| / max|k_c|)``, so both reach ``sqrt(max|q_c| max|k_c|)`` (the q/k case of the
  equivalent transformations OmniQuant learns; here in closed form from the calibration ranges);
- ``probs @ v`` then proj: channel c of v divided by ``u_c``, proj's input column c multiplied by it, with
  SmoothQuant's ``u_c = max|v_c|^alpha / max|W_proj[:, c]|^(1 - alpha)``, alpha 0.5 (Xiao et al., ICML 2023):
  the v outlier moves halfway into the weight, which proj's per-output-channel weight grid absorbs; v's
  channels also reach the attention output (proj's input) divided by ``u_c``.

The factors are folded into the qkv rows (weight and bias) and proj's columns; the per-tensor quantizer then
covers the balanced ranges (calibrated per channel, min/max), and so does proj's input quantizer (``attn_out``:
the attention output's channel c is v's channel c mixed over tokens, so it is divided by ``u_c`` too; it is
calibrated per channel for that). Calibrated ranges and weights are all the fold reads, so it is the same
wherever it is applied (the fake-quant reference, a fitted rounding, the export).
"""

from dataclasses import dataclass

import torch

from . import functional as Fq
from .observers import RangeObserver
from .quantizers import UniformQ, register_method, register_quantizer

ALPHA = 0.5  # SmoothQuant's migration strength for v against proj's weight


@register_quantizer("balanced_qkv")
@dataclass(frozen=True, eq=False)
class BalancedQ:
    """The quantizer of a fused qkv output whose q/k and v/proj factors are folded into the weights first
    (``fold``); it deploys as the per-tensor ``UniformQ`` ``fold`` returns."""

    lo_c: torch.Tensor  # calibrated per-channel range of the qkv output (3 x dim channels: q, k, v)
    hi_c: torch.Tensor
    bits: int
    symmetric: bool
    fold_only = True  # (a class attribute) QuantModel refuses a plan that would leave it unfolded

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("a balanced qkv quantizer runs only folded into its attention's weights (QuantModel folds it)")

    onnx = __call__

    def factors(self, proj_weight: torch.Tensor) -> torch.Tensor:
        """Per qkv output channel, what it is divided by: ``t`` on q, ``1/t`` on k, ``u`` on v."""
        amax = torch.maximum(self.lo_c.abs(), self.hi_c.abs()).clamp(min=Fq.EPS)
        q, k, v = amax.chunk(3)
        t = torch.sqrt(q / k)
        w = proj_weight.detach().abs().amax(dim=0).clamp(min=Fq.EPS).to(v.dtype)
        u = v.pow(ALPHA) / w.pow(1 - ALPHA)
        return torch.cat([t, 1 / t, u])

    @torch.no_grad()
    def fold(self, qkv_weight: torch.Tensor, qkv_bias: torch.Tensor, proj_weight: torch.Tensor,
             proj_input: "ChannelRangeQ") -> tuple[UniformQ, UniformQ]:
        """Divide the qkv output's channels by their factors (rows of its weight and bias), multiply proj's input
        columns by v's, in place; return the per-tensor quantizers of the balanced qkv output and of proj's input
        (the attention's output, whose channel c is v's channel c mixed over tokens: divided by ``u_c`` too)."""
        if not isinstance(proj_input, ChannelRangeQ):
            raise ValueError(f"a balanced qkv rescales proj's input: its quantizer must be 'balance_out' (got "
                             f"{type(proj_input).__name__}); the scheme pairs them")
        f = self.factors(proj_weight)
        u = f[2 * (len(f) // 3):]
        qkv_weight /= f.to(qkv_weight.dtype)[:, None]
        qkv_bias /= f.to(qkv_bias.dtype)
        proj_weight *= u.to(proj_weight.dtype)[None, :]
        return per_tensor(self.lo_c / f, self.hi_c / f, self.bits, self.symmetric), proj_input.divided(u)

    def __post_init__(self):
        if self.lo_c.numel() % 3:
            raise ValueError(f"a balanced qkv quantizer needs q, k and v channels in one output ({self.lo_c.numel()} channels)")


@register_quantizer("channel_range")
@dataclass(frozen=True, eq=False)
class ChannelRangeQ:
    """proj's input under a balanced qkv: its calibrated per-channel range, deployed per tensor once the fold has
    divided its channels (``divided``)."""

    lo_c: torch.Tensor
    hi_c: torch.Tensor
    bits: int
    symmetric: bool
    fold_only = True

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("proj's input under a balanced qkv is quantized only once the attention is folded")

    onnx = __call__

    def divided(self, u: torch.Tensor) -> UniformQ:
        return per_tensor(self.lo_c / u, self.hi_c / u, self.bits, self.symmetric)


def per_tensor(lo_c: torch.Tensor, hi_c: torch.Tensor, bits: int, symmetric: bool) -> UniformQ:
    """The min/max per-tensor quantizer covering every channel's range."""
    scale, zero_point = Fq.uniform_qparams(lo_c.min(), hi_c.max(), bits, symmetric)
    return UniformQ(float(scale), int(zero_point), *Fq.qrange(bits, symmetric))


@register_method("balance_out", per_channel=True)
def _fit_balance_out(obs: RangeObserver, x: torch.Tensor, bits: int, symmetric: bool) -> ChannelRangeQ:
    return ChannelRangeQ(obs.lo_c.clone(), obs.hi_c.clone(), bits, symmetric)


@register_method("balance_qkv", per_channel=True)
def _fit_balance(obs: RangeObserver, x: torch.Tensor, bits: int, symmetric: bool) -> BalancedQ:
    return BalancedQ(obs.lo_c.clone(), obs.hi_c.clone(), bits, symmetric)

