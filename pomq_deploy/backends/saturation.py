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


def _saturating_integer(self: QuantWeighted, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """``QuantWeighted._integer`` with every 8-bit Linear on per-tensor activation codes as VPMADDUBSW sums it;
    the rest (patchify convolutions, 4-bit weights, split codes) as the exact path computes it."""
    parts = self.in_quant.parts(x)
    if isinstance(self.layer, torch.nn.Conv2d) or parts is None or len(parts[1]) != 1 or self.weight_bits != 8:
        return QuantWeighted._integer(self, x, bias)
    scale, [(codes, _)] = parts
    z = self.in_quant.active.zero_point
    w, w_scale = self.weight_codes(8)
    raw = (codes + z).flatten(0, -2)  # the uint8 codes the kernel reads
    if raw.shape[-1] % 2:
        raw, w = torch.nn.functional.pad(raw, (0, 1)), torch.nn.functional.pad(w, (0, 1))
    pairs = torch.einsum("njk,jko->njo", raw.reshape(len(raw), -1, 2), w.T.reshape(-1, 2, w.shape[0]))
    acc = pairs.clamp_(-32768, 32767).double().sum(1) - z * w.double().sum(1)
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
