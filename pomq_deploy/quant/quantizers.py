"""Fitted activation quantizers: small frozen objects that fake-quantize a tensor, and how to fit them.

A quantizer is fitted once per (bits, format) at calibration time and cached; applying a plan only picks
one per activation. ``format`` is ``asym`` (uint codes with a zero point: FQ-ViT's activations and what
ONNX Runtime's x86 kernels fuse) or ``sym`` (int codes, zero point 0: what TensorRT accepts).
"""

from dataclasses import dataclass

import torch

from . import functional as Fq
from .observers import RangeObserver

FORMATS = ("asym", "sym")
# Element-wise searches (OMSE, V-2SF) run on a fixed random sample of the last batch this large, and the
# per-channel ones (PTF, O-2SF) on at most this many tokens: the error estimates barely move, the
# calibration gets several times faster.
SEARCH_SAMPLES = 1 << 18
SEARCH_TOKENS = 1 << 14


# An activation as integer codes: (base scale, [(centred codes, e)]), the value being sum(codes * scale * 2^e).
Parts = tuple[float, list[tuple[torch.Tensor, int]]]


def _sample(x: torch.Tensor, k: int) -> torch.Tensor:
    """At most ``k`` rows of ``x``, drawn with a fixed seed so that calibration stays deterministic."""
    if x.shape[0] <= k:
        return x
    return x[torch.randint(x.shape[0], (k,), generator=torch.Generator().manual_seed(0))]


@dataclass(frozen=True, eq=False)
class UniformQ:
    """Per-tensor uniform Q/DQ; with ``shift``, channel c uses scale ``scale * 2^shift[c]`` (PTF, O-2SF)."""

    scale: float
    zero_point: int
    qmin: int
    qmax: int
    shift: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.shift is None:
            return Fq.fake_quant(x, self.scale, self.zero_point, self.qmin, self.qmax)
        return Fq.fake_quant_shifted(x, self.scale, self.zero_point, self.qmin, self.qmax, self.shift)

    def parts(self, x: torch.Tensor) -> Parts | None:
        """The centred integer codes ``q - z`` with their scale (``self(x) == codes * scale``); None with a
        per-channel shift, whose channels sit on different grids."""
        if self.shift is not None:
            return None
        return self.scale, [(Fq.quant_codes(x, self.scale, self.zero_point, self.qmin, self.qmax), 0)]

    def onnx(self, x: torch.Tensor) -> torch.Tensor:
        """The same values as exportable Q/DQ; a per-channel shift becomes ``Mul(2^-shift) -> Q/DQ -> Mul(2^shift)``."""
        if self.shift is None:
            return Fq.fake_quant_onnx(x, self.scale, self.zero_point, self.qmin, self.qmax)
        return Fq.fake_quant_shifted(x, self.scale, self.zero_point, self.qmin, self.qmax, self.shift, Fq.fake_quant_onnx)


@dataclass(frozen=True)
class Log2Q:
    """FQ-ViT's log2 quantizer of Softmax outputs (the LIS output side)."""

    bits: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return Fq.log2_quant(x, self.bits)

    onnx = __call__  # log-domain ops in the graph (Log, Round, Clip, Pow, Where): no Q/DQ form exists for LIS


@dataclass(frozen=True)
class TwoScaleQ:
    """V-2SF: a fine and a coarse uniform grid (fine step = coarse step / 2^m), one flag bit between them."""

    coarse_scale: float
    coarse_zero_point: int
    fine_scale: float
    fine_zero_point: int
    qmin: int
    qmax: int
    m: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return Fq.two_scale_quant(x, *self._grids(), self.qmin, self.qmax)

    def onnx(self, x: torch.Tensor) -> torch.Tensor:
        return Fq.two_scale_quant_onnx(x, *self._grids(), self.qmin, self.qmax)

    def parts(self, x: torch.Tensor) -> Parts:
        """Fine codes (scale ``fine_scale``) and coarse codes (2^m times that), each 0 where the other applies."""
        fine, coarse = Fq.two_scale_codes(x, *self._grids(), self.qmin, self.qmax)
        return self.fine_scale, [(fine, 0), (coarse, self.m)]

    def _grids(self):
        return (self.coarse_scale, self.coarse_zero_point), (self.fine_scale, self.fine_zero_point)


Quantizer = UniformQ | Log2Q | TwoScaleQ
_TYPES = {"uniform": UniformQ, "log2": Log2Q, "two_scale": TwoScaleQ}


def to_state(q: Quantizer) -> dict:
    kind = {UniformQ: "uniform", Log2Q: "log2", TwoScaleQ: "two_scale"}[type(q)]
    return {"type": kind, **{k: v for k, v in vars(q).items() if v is not None}}


def from_state(state: dict) -> Quantizer:
    state = dict(state)
    return _TYPES[state.pop("type")](**state)


def fit(method: str, obs: RangeObserver, x: torch.Tensor, bits: int, fmt: str) -> Quantizer:
    """Fit the quantizer ``method`` uses for ``bits`` from the observer's range and the last batch ``x``."""
    symmetric = fmt == "sym"
    x = x.detach().float()
    if method == "log2":
        return Log2Q(bits)
    if method == "uniform":
        lo, hi = obs.lo, obs.hi
        if obs.kind == "omse":
            lo, hi = Fq.omse_range(_sample(x.reshape(-1), SEARCH_SAMPLES), lo, hi, bits, symmetric)
        scale, zp = Fq.uniform_qparams(lo, hi, bits, symmetric)
        return UniformQ(float(scale), int(zp), *Fq.qrange(bits, symmetric))
    if method in ("ptf", "o2sf"):
        search = Fq.ptf_search if method == "ptf" else Fq.o2sf_search
        scale, zp, shift = search(_sample(x.reshape(-1, x.shape[-1]), SEARCH_TOKENS), obs.lo_c, obs.hi_c, bits, symmetric)
        return UniformQ(float(scale), int(zp), *Fq.qrange(bits, symmetric), shift=shift.to(torch.int8))
    if method == "v2sf":
        m = Fq.v2sf_search(_sample(x.reshape(-1), SEARCH_SAMPLES), obs.lo, obs.hi, bits, symmetric)
        (s_c, z_c), (s_f, z_f), (qmin, qmax) = Fq.two_scale_regions(obs.lo, obs.hi, bits, m, symmetric)
        return TwoScaleQ(float(s_c), int(z_c), float(s_f), int(z_f), qmin, qmax, m)
    raise ValueError(f"unknown quantization method {method!r}")
