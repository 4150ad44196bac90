"""What ONNX Runtime's u8 x s8 GEMM computes on an x86 CPU without VNNI (VPMADDUBSW, pomq_deploy.backends.cpu):
raw uint8 activations times int8 weights, each *pair* of products summed in int16 with saturation, then
accumulated exactly. Emulated on the fake-quant model's own codes, it is the broken artifact the build's
self-check must refuse (the ort-cpu backend never builds one: it stores weights as uint8 where u8 x s8
saturates); tests and ``tools/broken_selfcheck.py`` run it."""

from collections.abc import Iterator
from contextlib import contextmanager
from types import MethodType

import torch

from ..quant.modules import QuantWeighted


def vpmaddubsw_gemm(raw: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``raw @ w.T`` (uint8 codes, rows x K, times int8 codes, O x K, both as floats) as VPMADDUBSW sums it: each
    pair of products (k = 2j, 2j+1) saturated to int16, the pairs then summed exactly; float64. Computed as the
    exact sum corrected where a pair saturates: only pairs of weight codes with ``|w0| + |w1| > 128`` can
    (255 x 128 = 32,640 fits in int16), so the pairs are formed for those alone."""
    if raw.shape[-1] % 2:
        raw, w = torch.nn.functional.pad(raw, (0, 1)), torch.nn.functional.pad(w, (0, 1))
    acc = raw.double() @ w.double().T  # exact: |sum| < 2^53
    out, pair = torch.nonzero(w[:, 0::2].abs() + w[:, 1::2].abs() > 128, as_tuple=True)
    w0, w1 = w[out, 2 * pair].float(), w[out, 2 * pair + 1].float()
    rows = max(1, 2**24 // max(1, len(out)))  # the pairs of this many rows at a time: 64 MB
    for i in range(0, len(raw), rows):
        p = raw[i:i + rows, 2 * pair].float() * w0 + raw[i:i + rows, 2 * pair + 1].float() * w1  # exact: |p| <= 64,770
        acc[i:i + rows].index_add_(1, out, (p.clamp(-32768, 32767) - p).double())
    return acc


def _saturating_integer(self: QuantWeighted, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """``QuantWeighted._integer`` with every 8-bit Linear on per-tensor activation codes through
    ``vpmaddubsw_gemm``; the rest (patchify convolutions, 4-bit weights, split codes) as the exact path has it."""
    parts = self.in_quant.parts(x)
    if isinstance(self.layer, torch.nn.Conv2d) or parts is None or len(parts[1]) != 1 or self.weight_bits != 8:
        return QuantWeighted._integer(self, x, bias)
    scale, [(codes, _)] = parts
    z = self.in_quant.active.zero_point
    w, w_scale = self.weight_codes(8)
    acc = vpmaddubsw_gemm((codes + z).flatten(0, -2), w) - z * w.double().sum(1)  # raw: the uint8 codes the kernel reads
    y = (acc * (scale * w_scale.double())).float().reshape(*codes.shape[:-1], -1)
    return y if bias is None else y + bias


@contextmanager
def saturating(qmodel) -> Iterator[None]:
    """``qmodel`` (a QuantModel with a plan applied) on its exact path, its 8-bit GEMMs saturating as above."""
    layers = list(qmodel.weighted.values())
    for m in layers:
        m._integer = MethodType(_saturating_integer, m)
    try:
        with qmodel.exact_path():
            yield
    finally:
        for m in layers:
            del m._integer
