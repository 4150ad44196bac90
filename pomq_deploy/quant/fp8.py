"""FP8 (E4M3) fake quantization, as ONNX's ``QuantizeLinear`` to ``FLOAT8E4M3FN`` computes it.

``q = saturate(x / s)`` rounded to the nearest E4M3 value (ties to even), ``x_hat = q * s``: E4M3 keeps 3
mantissa bits over a range of +-448, so the error is relative (about 2^-4 of the value) instead of a fixed
step. Activations take one scale per tensor, weights one per output channel, ``s = amax / 448`` (NVIDIA
ModelOpt's FP8 default, max calibration): FP8 is a format, not a scheme, so the scheme's integer-grid methods
(PTF, LIS, V-2SF, RepQ-ViT's reparameterization) do not apply to it. torch's float8 cast rounds to nearest
even as the ONNX operator does; the clamp makes the saturation explicit rather than the cast's.
"""

import torch

E4M3_MAX = 448.0
EPS = 1e-12


def fp8_scale(amax: torch.Tensor) -> torch.Tensor:
    return (amax / E4M3_MAX).clamp(min=EPS)


def fp8_fake_quant(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """``x`` on the E4M3 grid scaled by ``scale`` (a number, or a tensor broadcasting against ``x``)."""
    return (x / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).to(x.dtype) * scale


def fp8_weight_scale(w: torch.Tensor) -> torch.Tensor:
    """Per output channel (dim 0): ``amax_c / 448``, shape (C_out,)."""
    return fp8_scale(w.detach().abs().reshape(w.shape[0], -1).amax(dim=1))


def fp8_weight_fake_quant(w: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    scale = fp8_weight_scale(w) if scale is None else scale
    return fp8_fake_quant(w, scale.reshape(-1, *([1] * (w.ndim - 1))))


class FP8QDQ(torch.autograd.Function):
    """``fp8_fake_quant`` that the ONNX exporter writes as ``QuantizeLinear -> DequantizeLinear`` on
    ``FLOAT8E4M3FN`` (zero point 0 of that type; a 1-D scale quantizes along ``axis``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, axis: int = 0) -> torch.Tensor:
        shape = [1] * x.ndim
        if scale.ndim:
            shape[axis] = -1
        return fp8_fake_quant(x, scale.reshape(shape) if scale.ndim else scale)

    @staticmethod
    def symbolic(g, x, scale, axis: int = 0):
        size = scale.type().sizes()
        zero = g.op("Constant", value_t=torch.zeros(size, dtype=torch.float8_e4m3fn))
        kw = {"axis_i": axis} if size else {}
        q = g.op("QuantizeLinear", x, scale, zero, **kw)
        return g.op("DequantizeLinear", q, scale, zero, **kw)
