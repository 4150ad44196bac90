"""RepQ-ViT (Li et al., ICCV 2023): quantize for calibration in one form, deploy in another of the same value.

**Post-LayerNorm activations** vary strongly between channels, so they are calibrated per channel (scale
``s_c``, zero point ``z_c``, each channel's clipping range the best of min/max and three percentiles by L2,
as RepQ-ViT's channel-wise quantizer). Then the variation moves out of the quantizer: with ``s~ = mean(s)``,
``z~ = round(mean(z))``, ``r = s / s~`` and ``b = z - z~`` (integers), the LayerNorm's affine becomes
``gamma / r`` and ``(beta + s b) / r``, the next Linear's weight ``W r`` (per input column) and its bias
``B - W (s b)``. The per-tensor quantizer ``(s~, z~)`` on the new LayerNorm output writes exactly the
per-channel codes, ``round(x / s + b) + z~ = round(x / s) + z``, and the Linear computes the same sums; the
weights are quantized after the change, as in the paper. RepQ-ViT keeps ``z~`` fractional; rounding it keeps
the identity exact and the zero point an integer, which QuantizeLinear needs.

**Post-Softmax probabilities** follow a power law: ``q = round(-2 log2(p / d))`` (log base sqrt 2) resolves
them twice as finely as log2 near the top, ``d`` the best of max and three percentiles by L2. Deployed as
``2^-ceil(q/2)`` times ``sqrt 2`` for odd codes: log2 shifts and one factor, RepQ-ViT's reparameterization.
"""

import math
from dataclasses import dataclass

import torch

from . import functional as Fq
from .observers import RangeObserver
from .quantizers import SEARCH_SAMPLES, SEARCH_TOKENS, UniformQ, register_method, register_quantizer, sample

PERCENTILES = (0.999, 0.9999, 0.99999)


def channel_qparams(x2d: torch.Tensor, lo_c: torch.Tensor, hi_c: torch.Tensor, bits: int,
                    symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (scale, zero point) of ``x2d`` (tokens, channels): per channel, the clipping range of least
    L2 error among [min, max] and the (1-p, p) quantiles for p in PERCENTILES."""
    qmin, qmax = Fq.qrange(bits, symmetric)
    candidates = [(lo_c, hi_c)] + [(torch.quantile(x2d, 1 - p, dim=0), torch.quantile(x2d, p, dim=0)) for p in PERCENTILES]
    best_s = best_z = best_err = None
    for lo, hi in candidates:
        s, z = Fq.uniform_qparams(lo, hi, bits, symmetric)
        err = Fq.mse(Fq.fake_quant(x2d, s, z, qmin, qmax), x2d, dim=0)
        if best_err is None:
            best_s, best_z, best_err = s, z, err
        else:
            better = err < best_err
            best_s, best_z, best_err = torch.where(better, s, best_s), torch.where(better, z, best_z), torch.minimum(err, best_err)
    return best_s, best_z


def reparam_factors(scale_c: torch.Tensor, zero_c: torch.Tensor) -> tuple[float, int, torch.Tensor, torch.Tensor]:
    """(s~, z~, r, b) of the per-tensor form of per-channel parameters: ``s~ = mean(s)``, ``z~ = round(mean(z))``,
    ``r = s / s~``, ``b = z - z~``."""
    s_t = scale_c.mean()
    z_t = torch.round(zero_c.mean())
    return float(s_t), int(z_t), scale_c / s_t, zero_c - z_t


@register_quantizer("reparam")
@dataclass(frozen=True, eq=False)
class ReparamQ:
    """A per-channel uniform quantizer of a LayerNorm's output that deploys per tensor after ``fold``.

    Called directly it fake-quantizes per channel (the calibration form, the values the plan means); after
    ``fold`` has moved ``r`` and ``b`` into the LayerNorm and the Linear, ``deployed`` gives the same codes."""

    scale: float  # s~
    zero_point: int  # z~
    qmin: int
    qmax: int
    ratio: torch.Tensor  # r, per channel
    offset: torch.Tensor  # b, per channel (integers)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        s = self.scale * self.ratio.to(x.dtype)
        return Fq.fake_quant(x, s, self.zero_point + self.offset.to(x.dtype), self.qmin, self.qmax)

    @property
    def deployed(self) -> UniformQ:
        return UniformQ(self.scale, self.zero_point, self.qmin, self.qmax)

    @torch.no_grad()
    def fold(self, norm: torch.nn.LayerNorm, linears: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[UniformQ]:
        """Move ``r``, ``b`` into ``norm``'s affine and the ``(weight, bias)`` of each Linear reading it, in place;
        returns the per-tensor quantizer the Linears' input then takes (alone in a tuple, as ``FoldSite`` asks)."""
        dtype = norm.weight.dtype
        r, shift = self.ratio.to(dtype), (self.scale * self.ratio * self.offset).to(dtype)
        for weight, bias in linears:
            bias += weight @ -shift
            weight *= r
        norm.bias.data = (norm.bias + shift) / r
        norm.weight.data = norm.weight / r
        return (self.deployed,)


@register_method("repq_ln", per_channel=True)
def _fit_repq_ln(obs: RangeObserver, x: torch.Tensor, bits: int, symmetric: bool) -> ReparamQ:
    scale_c, zero_c = channel_qparams(sample(x.reshape(-1, x.shape[-1]), SEARCH_TOKENS), obs.lo_c, obs.hi_c, bits, symmetric)
    s_t, z_t, r, b = reparam_factors(scale_c, zero_c)
    return ReparamQ(s_t, z_t, *Fq.qrange(bits, symmetric), r, b)


def log_sqrt2_quant(p: torch.Tensor, bits: int, delta: float) -> torch.Tensor:
    """``q = clamp(round(-2 log2(p / delta)), 0, 2^b - 1)``, ``p_hat = delta 2^-ceil(q/2) (sqrt 2 if q odd)``,
    and 0 where ``round(-2 log2(p / delta)) >= 2^b``."""
    q = torch.round(-2.0 * torch.log2(p * (1.0 / delta))).clamp(min=0)
    odd = torch.fmod(q, 2.0)  # exported as Mod; ceil(q / 2) = (q + odd) / 2 keeps to the ops TensorRT's parser lists
    factor = torch.where(odd > 0, math.sqrt(2.0), 1.0)
    return torch.where(q >= 2**bits, torch.zeros_like(p), torch.pow(2.0, -(q + odd) * 0.5) * (factor * delta))


@register_quantizer("log_sqrt2")
@dataclass(frozen=True)
class LogSqrt2Q:
    bits: int
    delta: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return log_sqrt2_quant(x, self.bits, self.delta)

    onnx = __call__  # log-domain ops in the graph, like LIS


@register_method("log_sqrt2", log_domain=True)
def _fit_log_sqrt2(obs: RangeObserver, x: torch.Tensor, bits: int, symmetric: bool) -> LogSqrt2Q:
    flat = sample(x.reshape(-1), SEARCH_SAMPLES)
    candidates = [float(obs.hi)] + [float(torch.quantile(flat, p)) for p in PERCENTILES]
    errors = [float(Fq.mse(log_sqrt2_quant(flat, bits, d), flat)) for d in candidates]
    return LogSqrt2Q(bits, candidates[errors.index(min(errors))])
