"""The attention's two MatMuls on integer codes, in the fake-quant reference.

timm computes ``q @ k^T`` and ``attn @ v`` with ``@`` inside its attention's forward, on the dequantized
tensors: a float GEMM, whose summation order differs from the deployed model's integer kernels (ONNX
Runtime runs both MatMuls on the codes). At 4-bit activations such a last-bit difference moves codes
downstream. While the quantized model runs, a ``TorchFunctionMode`` around each attention's forward catches
those two MatMuls and computes them as the deployed kernels do: exact sums of code products, one scale.
Nothing of timm's forward is copied; a MatMul whose operands are not on integer grids (LIS probabilities)
stays float.

The same mode routes an attention's ``F.linear(x, self.qkv.weight, bias)`` (BEiT computes its qkv so, with
q/k/v biases of its own) to the wrapped qkv layer, in every state (calibration, export, fake-quant), so that
its input, weight and output are quantized as any other block's.
"""


import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .functional import integer_matmul, integer_product
from .modules import ActQuant, QuantWeighted

MATMULS = (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__)
LINEAR = (F.linear, torch._C._nn.linear)


class IntegerAttention(TorchFunctionMode):
    """``q @ k^T`` and ``probs @ v`` of one attention forward on codes (when ``integer``), and functional calls of
    the attention's wrapped Linear layers routed to them (``linears``: id of a layer's weight -> its wrapper).

    q, k and v come from the qkv output's uniform quantizer through shape ops only, q times the attention's
    ``scale`` (the exported graph folds that factor into q's DequantizeLinear scale), so their codes are their
    values over the scale, exactly; the probabilities' codes come from their quantizer (``ActQuant.parts``: one
    grid or V-2SF's two)."""

    def __init__(self, qkv_out: ActQuant, probs: ActQuant, q_factor: float, integer: bool = True,
                 linears: dict[int, QuantWeighted] | None = None, qk_on_grid: bool = True):
        super().__init__()
        self.qkv_out, self.probs, self.q_factor, self.integer = qkv_out, probs, q_factor, integer
        self.linears, self.qk_on_grid = linears or {}, qk_on_grid

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in LINEAR and self.linears:
            x, weight, bias = (list(args) + [kwargs.get(k) for k in ("input", "weight", "bias")[len(args):]])[:3]
            layer = self.linears.get(id(weight))
            if layer is not None:  # the mode is off inside its own handler: the layer's own F.linear runs plain
                return layer(x, bias)
        # the attention's own MatMuls are batched over heads (4-D x 4-D); the Linear layers' GEMMs running
        # inside the same forward (qkv, proj: ``integer_linear``, 2-D weight) are not theirs to take
        if self.integer and func in MATMULS and len(args) == 2 and not kwargs and args[0].ndim == 4 and args[1].ndim == 4:
            y = self._integer(*args)
            if y is not None:
                return y
        return func(*args, **kwargs)

    def _integer(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
        grid = self.qkv_out.uniform()
        if grid is None:
            return None
        v_scale = torch.tensor(grid.scale, dtype=a.dtype)
        last = self.probs.last
        if last is not None:  # the probabilities' quantizer has run: probs @ v, or nothing of ours
            parts = self.probs.parts(last[0]) if a is last[1] else None
            if parts is None:
                return None
            return integer_product(parts[1], torch.round(b / v_scale)) * (torch.tensor(parts[0], dtype=a.dtype) * v_scale)
        if not self.qk_on_grid:  # rotary embeddings moved q and k off the grid: q @ k^T in float, as deployed
            return None
        # before the Softmax: q @ k^T, q scaled by the attention's factor (exported: q's DequantizeLinear scale s * factor)
        q_scale = v_scale * self.q_factor
        return integer_matmul(torch.round(a / q_scale), torch.round(b / v_scale)) * (q_scale * v_scale)


def integer_attention(attn: nn.Module, functional_linear: bool = False, rotary_qk: bool = False) -> None:
    """Run ``attn``'s MatMuls on codes whenever its quantizers are applied (forward hooks on ``attn``, whose
    ``qkv`` and ``attn_drop`` the quantizer has wrapped); with ``functional_linear``, also route its
    ``F.linear(x, self.qkv.weight, ...)`` calls to the wrapped layers, always. The hooks read those from the
    module they are called on, so a deep copy of the model (e.g. ``.double()`` for a float64 run) hooks its own.
    ``rotary_qk``: q and k reach their MatMul through rotary embeddings, off the qkv quantizer's grid."""
    assert isinstance(attn.qkv, QuantWeighted) and attn.qkv.out_quant is not None and isinstance(attn.attn_drop, ActQuant)
    attn._functional_linear, attn._rotary_qk = functional_linear, rotary_qk
    attn.register_forward_pre_hook(_enter)
    attn.register_forward_hook(_leave, always_call=True)


def _enter(attn: nn.Module, args) -> None:
    out, probs = attn.qkv.out_quant, attn.attn_drop
    integer = out.state == "quant" and not out.exporting
    linears = {id(m.layer.weight): m for m in (attn.qkv, attn.proj)} if attn._functional_linear else {}
    if integer or linears:
        mode = IntegerAttention(out, probs, float(attn.scale), integer, linears, qk_on_grid=not attn._rotary_qk)
        probs.keep_last, probs.last = integer, None
        mode.__enter__()
        attn._integer_mode = mode


def _leave(attn: nn.Module, args, output) -> None:
    mode = attn.__dict__.pop("_integer_mode", None)
    if mode is not None:
        mode.__exit__(None, None, None)
        attn.attn_drop.keep_last, attn.attn_drop.last = False, None
