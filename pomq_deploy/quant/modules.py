"""Modules inserted into a timm model, in place, to observe and fake-quantize it.

``ActQuant`` sits on an activation; ``QuantWeighted`` wraps a Linear or Conv2d (quantizing its input, its
weight and optionally its output); ``QuantInput`` quantizes what enters a LayerNorm; ``PreciseGELU`` takes
the place of a GELU, so that the exact reference computes it correctly rounded. Two paths compute the same
fake-quant values: the *fast* one (the default) runs every GEMM and the GELU in the input's float type on the
dequantized values, as a float model would; the *exact* one (``exact`` True, ``QuantModel.exact_path``) runs
the GEMMs on integer codes and the GELU correctly rounded, the arithmetic the deployed kernels' results are
compared against (the build's self-check, ``compare``). Nothing of timm's forward code is copied: the wrappers
replace child modules, and the post-Softmax quantizer takes the place of the attention's ``attn_drop`` (timm
applies it right after Softmax on the explicit path).
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .fp8 import FP8QDQ, fp8_weight_fake_quant, fp8_weight_scale
from .functional import integer_linear, integer_patchify, is_patchify, weight_codes
from .observers import RangeObserver
from .quantizers import FORMATS, Parts, Quantizer, TwoScaleQ, UniformQ, fit, fit_fp8
from .schemes import Scheme


class ActQuant(nn.Module):
    """One quantized activation. States: ``fp`` (pass through), ``observe`` (update the range),
    ``fit`` (update, then fit a quantizer per bit-width and format on this batch), ``quant`` (apply ``active``)."""

    def __init__(self, role: str, block: int | None):
        super().__init__()
        self.role, self.block = role, block
        self.state = "fp"
        self.scheme: Scheme | None = None
        self.observer: RangeObserver | None = None
        self.fitted: dict[str, Quantizer] = {}  # "asym8" -> quantizer
        self.active: Quantizer | None = None
        self.exporting = False  # forward through the ops the ONNX exporter maps to Q/DQ (QuantModel.onnx_mode)
        self.keep_last = False  # keep (input, output) of the last call in ``last`` (IntegerAttention reads it)
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None
        # while a block's weights are fitted by gradient (quant.reconstruction): gradients pass the rounding
        # straight through, and with ``drop`` > 0 each element keeps its float value with that probability (QDrop)
        self.straight_through = False
        self.drop = 0.0
        self.learned: Callable[[torch.Tensor], torch.Tensor] | None = None  # a step size being learned (LSQ), in place of active

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.state == "quant":
            if self.exporting:
                return x if self.active is None else self.active.onnx(x)
            if self.straight_through:
                return self._fitting(x)
            y = x if self.active is None else self.active(x)
            if self.keep_last:
                self.last = (x, y)
            return y
        if self.state in ("observe", "fit"):
            self.observer.update(x)
            if self.state == "fit":
                self.fitted = {f"{fmt}{bits}": fit(self.scheme.method(self.role, bits), self.observer, x, bits, fmt)
                               for bits in (4, 8) for fmt in FORMATS} | {"fp8": fit_fp8(self.observer)}
        return x

    def _fitting(self, x: torch.Tensor) -> torch.Tensor:
        """While a block is fitted: the learned quantizer (its own gradients), or ``active`` with the rounding passed
        straight through; with ``drop``, each element keeps its float value with that probability (QDrop)."""
        if self.learned is not None:
            y = self.learned(x)
        elif self.active is None:
            y = x
        else:
            y = _StraightThrough.apply(x, self.active)
        return torch.where(torch.rand_like(x) < self.drop, x, y) if self.drop else y

    def uniform(self) -> UniformQ | None:
        """The quantizer now applied, when it puts the whole tensor on one uniform grid (one scale, zero point)."""
        q = self.active
        if self.state == "quant" and not self.exporting and not self.straight_through and isinstance(q, UniformQ) \
                and q.shift is None:
            return q
        return None

    def parts(self, x: torch.Tensor) -> Parts | None:
        """``x`` as the integer codes the quantizer now applied writes (see ``Parts``), when it writes codes that a
        GEMM can read (one grid, or V-2SF's two grids): then the GEMM reading this activation runs on them."""
        q = self.active
        if self.state != "quant" or self.exporting or self.straight_through or not isinstance(q, (UniformQ, TwoScaleQ)):
            return None
        return q.parts(x)

    def extra_repr(self) -> str:
        return f"role={self.role}, block={self.block}, state={self.state}, active={self.active}"


class _StraightThrough(torch.autograd.Function):
    """``quant(x)`` forward, the identity backward: the quantizer's own ops need no graph, and the value is the
    quantizer's exactly (not ``x + (quant(x) - x)``, two more passes that round once more)."""

    @staticmethod
    def forward(ctx, x, quant):
        return quant(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class QuantWeighted(nn.Module):
    """A Linear or Conv2d with a quantized input, weight (symmetric per output channel) and optional output.

    A Linear whose input is written as integer codes (one grid, or V-2SF's two) runs as an integer GEMM
    (``integer_linear``), the arithmetic of the deployed kernels, and so does a patch embedding's Conv2d
    (``integer_patchify``); otherwise (PTF-scaled inputs, other convolutions) the layer runs in float on the
    dequantized values."""

    def __init__(self, layer: nn.Module, block: int | None, in_quant: ActQuant, out_quant: ActQuant | None = None):
        super().__init__()
        self.layer, self.block, self.in_quant, self.out_quant = layer, block, in_quant, out_quant
        self.weight_bits: int | str | None = None  # 4, 8, "fp8", or None (float)
        self.fitted: dict[str, torch.Tensor] | None = None  # codes and scales a fitted rounding gave (QuantModel.apply)
        self._codes: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # (bits, dtype, device) -> nearest codes, scales
        self.export_scale: torch.Tensor | None = None  # set while exporting (QuantModel.onnx_mode)
        self.soft: Callable[[], torch.Tensor] | None = None  # a weight being fitted by gradient (quant.reconstruction)
        self.exact = False  # GEMM on integer codes where the input is on a grid (QuantModel.exact_path)
        self._dequantized: tuple[tuple, torch.Tensor] | None = None  # (its key, the quantized weight) the fast path reads

    def weight_codes(self, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The fitted codes at ``weight_bits`` when a fitted rounding set them (in the weight's float type), else
        the nearest ones, computed once per width and float type (a model moved to float64 gets float64 codes);
        ``weight_changed`` drops those."""
        dtype, device = self.layer.weight.dtype, self.layer.weight.device
        if self.fitted is not None and bits == self.weight_bits:
            return self.fitted["codes"].to(device, dtype), self.fitted["scale"].to(device, dtype)
        key = (bits, dtype, device)
        if key not in self._codes:
            self._codes[key] = weight_codes(self.layer.weight.detach(), bits)
        return self._codes[key]

    def weight_changed(self) -> None:
        self._codes.clear()
        self._dequantized = None

    def weight_scale(self, bits: int | str) -> torch.Tensor:
        """The per-output-channel scale the weight is quantized with at ``bits`` (4, 8 or "fp8")."""
        if bits == "fp8":
            return fp8_weight_scale(self.layer.weight)
        return self.weight_codes(bits)[1]

    def quantized_weight(self, bits: int | str) -> torch.Tensor:
        """The weight on its grid at ``bits``, in the weight's float type: computed once per width, float type,
        device and fitted rounding (one kept: the fast path reads it every call)."""
        w = self.layer.weight
        key = (bits, w.dtype, w.device, id(self.fitted) if bits == self.weight_bits else None)
        if self._dequantized is None or self._dequantized[0] != key:
            if bits == "fp8":
                value = fp8_weight_fake_quant(w.detach())
            else:  # nearest codes straight from the weight: the fast path keeps no codes beside this
                fitted = self.fitted is not None and bits == self.weight_bits
                codes, scale = self.weight_codes(bits) if fitted else weight_codes(w.detach(), bits)
                value = codes * scale.reshape(-1, *([1] * (codes.ndim - 1)))
            self._dequantized = (key, value)
        return self._dequantized[1]

    @property
    def weight(self) -> torch.Tensor:
        """The wrapped layer's float weight, visible as on the layer itself: code that calls ``F.linear(x, m.weight)``
        (BEiT's attention) keeps working, and the block adapter routes that call here (``quant.attention``)."""
        return self.layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.layer.bias

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``bias``: one the caller computed (BEiT's q/k/v biases), instead of the layer's own."""
        bias = self.layer.bias if bias is None else bias
        y = self._integer(x, bias) if self.exact else None
        if y is None:
            y = self._float(self.in_quant(x), bias)
        return self.out_quant(y) if self.out_quant is not None else y

    def _integer(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
        """The Linear (or patchify Conv2d) as an integer GEMM, when its input is written as codes and its weight
        is quantized."""
        conv = isinstance(self.layer, nn.Conv2d)
        if not isinstance(self.weight_bits, int) or (conv and not is_patchify(self.layer, x.shape[-2:])):
            return None
        parts = self.in_quant.parts(x)
        if parts is None:
            return None
        w_codes, w_scale = self.weight_codes(self.weight_bits)
        if conv:
            kh, kw = self.layer.kernel_size
            return integer_patchify(parts[1], w_codes, parts[0], w_scale, bias, (x.shape[-2] // kh, x.shape[-1] // kw))
        return integer_linear(parts[1], w_codes, parts[0], w_scale, bias)

    def _float(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The layer in float on the (already quantized) input ``x``."""
        if self.soft is not None:
            w = self.soft()
        elif self.weight_bits is None:
            w = self.layer.weight
        elif self.export_scale is not None and self.weight_bits == "fp8":
            w = FP8QDQ.apply(self.layer.weight, self.export_scale.float())
        elif self.export_scale is not None:  # Q/DQ on the float weight; the export's graph pass stores the codes
            zero = torch.zeros_like(self.export_scale, dtype=torch.int32)
            w = torch.fake_quantize_per_channel_affine(self.layer.weight, self.export_scale, zero, 0, -128, 127)
        else:
            w = self.quantized_weight(self.weight_bits)
        if isinstance(self.layer, nn.Conv2d):
            return self.layer._conv_forward(x, w, bias)
        return F.linear(x, w, bias)


class QuantInput(nn.Module):
    """Quantize the input of a module (a LayerNorm) with per-channel-capable ``quant``."""

    def __init__(self, module: nn.Module, quant: ActQuant):
        super().__init__()
        self.module, self.quant = module, quant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(self.quant(x))


class PreciseGELU(nn.Module):
    """On the exact path, a GELU computed in float64 and rounded once to the input's type: the correctly rounded
    GELU; on the fast path PyTorch's own.

    PyTorch's float32 GELU is the least accurate float op of the reference, several times further from the
    exact value than ONNX Runtime's (``tools/float_ops.py``; docs/quantization.md). The code of the quantizer
    after GELU changes wherever such an error crosses a rounding boundary, and at 4-bit activations downstream
    the flip spreads; a reference should not be the noisier side. The ONNX export traces the plain GELU (the
    deployed kernel's own float32 arithmetic), and so does a fitting that takes gradients through it (a block
    reconstruction's rounding error is far above the last bit, and float64 costs it a tenth of its time)."""

    def __init__(self, approximate: str = "none"):
        super().__init__()
        self.approximate = approximate
        self.exact = False  # QuantModel.exact_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.exact or torch.onnx.is_in_onnx_export() or x.dtype == torch.float64 or x.requires_grad:
            return F.gelu(x, approximate=self.approximate)
        return F.gelu(x.double(), approximate=self.approximate).to(x.dtype)

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}, exact={self.exact} (exact: computed in float64)"
