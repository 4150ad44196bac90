"""Fitted activation quantizers: small frozen objects that fake-quantize a tensor, and how to fit them.

A quantizer is fitted once per (bits, format) at calibration time and cached; applying a plan only picks
one per activation. ``format`` is ``asym`` (uint codes with a zero point: FQ-ViT's activations and what
ONNX Runtime's x86 kernels fuse) or ``sym`` (int codes, zero point 0: what TensorRT accepts). Each
activation also gets one FP8 quantizer (``fp8``), the same on both targets.
"""

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import functional as Fq
from .fp8 import FP8QDQ, fp8_fake_quant, fp8_scale
from .observers import RangeObserver

FORMATS = ("asym", "sym")
# Element-wise searches (OMSE, V-2SF) run on a fixed random sample of the last batch this large, and the
# per-channel ones (PTF, O-2SF) on at most this many tokens: the error estimates barely move, the
# calibration gets several times faster.
SEARCH_SAMPLES = 1 << 18
SEARCH_TOKENS = 1 << 14


# An activation as integer codes: (base scale, [(centred codes, e)]), the value being sum(codes * scale * 2^e).
Parts = tuple[float, list[tuple[torch.Tensor, int]]]


def sample(x: torch.Tensor, k: int) -> torch.Tensor:
    """At most ``k`` rows of ``x``, drawn with a fixed seed so that calibration stays deterministic."""
    if x.shape[0] <= k:
        return x
    return x[torch.randint(x.shape[0], (k,), generator=torch.Generator().manual_seed(0))]


QUANTIZER_TYPES: dict[str, type] = {}  # kind -> class; the kind names a fitted quantizer in the calibration cache


def register_quantizer(kind: str):
    """Register a frozen-dataclass quantizer type under ``kind``, the name its fitted state is saved with."""
    def wrap(cls):
        QUANTIZER_TYPES[kind] = cls
        return cls

    return wrap


@register_quantizer("uniform")
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


@register_quantizer("log2")
@dataclass(frozen=True)
class Log2Q:
    """FQ-ViT's log2 quantizer of Softmax outputs (the LIS output side)."""

    bits: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return Fq.log2_quant(x, self.bits)

    onnx = __call__  # log-domain ops in the graph (Log, Round, Clip, Pow, Where): no Q/DQ form exists for LIS


@register_quantizer("two_scale")
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


@register_quantizer("fp8")
@dataclass(frozen=True)
class FP8Q:
    """Per-tensor FP8 E4M3 Q/DQ (:mod:`.fp8`): the ``fp8`` gene's activations, whatever the scheme."""

    scale: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_fake_quant(x, self.scale)

    def onnx(self, x: torch.Tensor) -> torch.Tensor:
        return FP8QDQ.apply(x, torch.tensor(self.scale, dtype=torch.float32))


def fit_fp8(obs: RangeObserver) -> FP8Q:
    """``amax / 448`` over the observer's per-tensor range (:mod:`.fp8`)."""
    return FP8Q(float(fp8_scale(torch.maximum(-obs.lo, obs.hi))))


Quantizer = UniformQ | Log2Q | TwoScaleQ | FP8Q  # and the types other modules register (see register_quantizer)
def to_state(q: Quantizer) -> dict:
    """What the calibration cache stores of ``q`` (its tensors on the CPU, wherever it was fitted)."""
    kind = next(k for k, cls in QUANTIZER_TYPES.items() if type(q) is cls)
    return {"type": kind, **{k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in vars(q).items() if v is not None}}


def moved(q: Quantizer | None, device: torch.device) -> Quantizer | None:
    """``q`` with its tensors (per-channel shifts, ranges, factors) on ``device``."""
    if q is None or not dataclasses.is_dataclass(q):
        return q
    changes = {f.name: getattr(q, f.name).to(device) for f in dataclasses.fields(q)
               if isinstance(getattr(q, f.name), torch.Tensor) and getattr(q, f.name).device != device}
    return dataclasses.replace(q, **changes) if changes else q


def from_state(state: dict) -> Quantizer:
    state = dict(state)
    return QUANTIZER_TYPES[state.pop("type")](**state)


@dataclass(frozen=True)
class Method:
    """How one quantization method is fitted: ``fit(observer, last batch, bits, symmetric) -> quantizer``.
    ``per_channel``: it needs the observer's per-channel ranges. ``log_domain``: its codes are not on a uniform
    grid, so the deployed graph computes it with float log-domain ops (no integer kernel reads them)."""

    fit: Callable[[RangeObserver, torch.Tensor, int, bool], Quantizer]
    per_channel: bool = False
    log_domain: bool = False


METHODS: dict[str, Method] = {}


def register_method(name: str, per_channel: bool = False, log_domain: bool = False):
    def wrap(fn):
        METHODS[name] = Method(fn, per_channel, log_domain)
        return fn

    return wrap


@register_method("log2", log_domain=True)
def _fit_log2(obs: RangeObserver, x: torch.Tensor, bits: int, symmetric: bool) -> Quantizer:
    return Log2Q(bits)


@register_method("uniform")
def _fit_uniform(obs: RangeObserver, x: torch.Tensor, bits: int, symmetric: bool) -> Quantizer:
    lo, hi = obs.lo, obs.hi
    if obs.kind == "omse":
        lo, hi = Fq.omse_range(sample(x.reshape(-1), SEARCH_SAMPLES), lo, hi, bits, symmetric)
    scale, zp = Fq.uniform_qparams(lo, hi, bits, symmetric)
    return UniformQ(float(scale), int(zp), *Fq.qrange(bits, symmetric))


def _fit_shifted(search):
    def fit_shifted(obs: RangeObserver, x: torch.Tensor, bits: int, symmetric: bool) -> Quantizer:
        scale, zp, shift = search(sample(x.reshape(-1, x.shape[-1]), SEARCH_TOKENS), obs.lo_c, obs.hi_c, bits, symmetric)
        return UniformQ(float(scale), int(zp), *Fq.qrange(bits, symmetric), shift=shift.to(torch.int8))

    return fit_shifted


register_method("ptf", per_channel=True)(_fit_shifted(Fq.ptf_search))
register_method("o2sf", per_channel=True)(_fit_shifted(Fq.o2sf_search))


@register_method("v2sf")
def _fit_v2sf(obs: RangeObserver, x: torch.Tensor, bits: int, symmetric: bool) -> Quantizer:
    m = Fq.v2sf_search(sample(x.reshape(-1), SEARCH_SAMPLES), obs.lo, obs.hi, bits, symmetric)
    (s_c, z_c), (s_f, z_f), (qmin, qmax) = Fq.two_scale_regions(obs.lo, obs.hi, bits, m, symmetric)
    return TwoScaleQ(float(s_c), int(z_c), float(s_f), int(z_f), qmin, qmax, m)


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown quantization method {name!r}; registered: {', '.join(METHODS)}")
    return METHODS[name]


def fit(method: str, obs: RangeObserver, x: torch.Tensor, bits: int, fmt: str) -> Quantizer:
    """Fit the quantizer ``method`` uses for ``bits`` from the observer's range and the last batch ``x``."""
    return get_method(method).fit(obs, x.detach().float(), bits, fmt == "sym")


from . import balance as _balance  # noqa: E402,F401  (registers the balanced qkv method; it imports this module's types)
from . import repq as _repq  # noqa: E402,F401  (registers RepQ-ViT's methods; it imports this module's types)
