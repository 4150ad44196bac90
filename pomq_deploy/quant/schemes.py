"""Quantization schemes: which method quantizes each kind of activation, at each bit-width.

Roles of an activation: ``act`` (inputs of Linear layers and of the attention MatMuls), ``ln_in``
(LayerNorm inputs: the residual stream, with its channel-wise outliers), ``attn`` (post-Softmax
probabilities) and ``gelu`` (post-GELU values, the input of fc2). Weights are always symmetric int per
output channel (min/max), in every scheme.

- ``minmax``: uniform everywhere; the baseline.
- ``fqvit``: PTF for LayerNorm inputs; LIS (log2) for 4-bit attention. At 8 bits attention is uniform:
  FQ-ViT's own ablation runs PTF with 8-bit uniform attention and adds LIS at 4 bits.
- ``tsptq``: O-2SF for LayerNorm inputs, V-2SF for post-Softmax and post-GELU values.
"""

from collections.abc import Callable

ROLES = ("act", "ln_in", "attn", "gelu")
OBSERVERS = ("minmax", "ema", "percentile", "omse")
PER_CHANNEL_METHODS = ("ptf", "o2sf")

SCHEMES: dict[str, Callable[[str, int], str]] = {}


def register_scheme(name: str):
    def wrap(fn: Callable[[str, int], str]):
        SCHEMES[name] = fn
        return fn

    return wrap


@register_scheme("minmax")
def _minmax(role: str, bits: int) -> str:
    return "uniform"


@register_scheme("fqvit")
def _fqvit(role: str, bits: int) -> str:
    if role == "ln_in":
        return "ptf"
    if role == "attn" and bits == 4:
        return "log2"
    return "uniform"


@register_scheme("tsptq")
def _tsptq(role: str, bits: int) -> str:
    if role == "ln_in":
        return "o2sf"
    if role in ("attn", "gelu"):
        return "v2sf"
    return "uniform"


def method_for(scheme: str, role: str, bits: int) -> str:
    return SCHEMES[scheme](role, bits)


def needs_channels(scheme: str, role: str) -> bool:
    return any(method_for(scheme, role, b) in PER_CHANNEL_METHODS for b in (4, 8))
