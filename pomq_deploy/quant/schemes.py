"""Quantization schemes: which method quantizes each kind of activation, at each bit-width.

Roles of an activation: ``act`` (inputs of Linear layers), ``qkv`` (the q, k and v projections' output, where it
enters the attention MatMuls; a rotary attention's MatMul inputs stay ``act``), ``attn_out`` (the attention's
output, proj's input), ``ln_in``
(LayerNorm inputs: the residual stream, with its channel-wise outliers), ``ln_out`` (LayerNorm outputs in a
block: the inputs of qkv and fc1), ``attn`` (post-Softmax probabilities) and ``gelu`` (post-GELU values, the
input of fc2). Weights are always symmetric int per output channel (min/max), in every scheme.

- ``minmax``: uniform everywhere; the baseline.
- ``fqvit``: PTF for LayerNorm inputs; LIS (log2) for 4-bit attention. At 8 bits attention is uniform:
  FQ-ViT's own ablation runs PTF with 8-bit uniform attention and adds LIS at 4 bits.
- ``tsptq``: O-2SF for LayerNorm inputs, V-2SF for post-Softmax and post-GELU values.
- ``repq``: RepQ-ViT on FQ-ViT's PTF LayerNorm inputs: LayerNorm outputs calibrated per channel and
  reparameterized into the LayerNorm's affine and the next Linear (per-tensor when deployed); log-sqrt(2)
  attention at 4 bits, deployed as log2 shifts and a sqrt(2) factor on odd codes.
- ``repq_smooth``: ``repq`` with the attention's scales balanced before its qkv output is quantized: q against
  k, v against proj's weight (SmoothQuant's migration; :mod:`.balance`), folded into the weights.

This module is data only (no torch), so the command line and the plan schema read it cheaply; the methods
it names are fitted by the functions registered in :mod:`.quantizers`.
"""

from dataclasses import dataclass, field

from .registry import Registry

ROLES = ("act", "qkv", "attn_out", "ln_in", "ln_out", "attn", "gelu")
OBSERVERS = ("minmax", "ema", "percentile", "omse")
DEFAULT_SCHEME = "fqvit"


@dataclass(frozen=True)
class Scheme:
    """A scheme: a method per role (``"m"``, or ``("m at 4 bits", "m at 8 bits")``), uniform where not named."""

    name: str
    summary: str  # one line, for --help and the docs
    methods: dict[str, str | tuple[str, str]] = field(default_factory=dict)

    def __post_init__(self):
        unknown = set(self.methods) - set(ROLES)
        if unknown:
            raise ValueError(f"scheme {self.name}: unknown roles {sorted(unknown)}; allowed: {', '.join(ROLES)}")

    def method(self, role: str, bits: int) -> str:
        m = self.methods.get(role, "uniform")
        return m if isinstance(m, str) else m[0 if bits == 4 else 1]

    def all_methods(self, role: str) -> set[str]:
        return {self.method(role, b) for b in (4, 8)}


SCHEMES: Registry[Scheme] = Registry("scheme")
register_scheme = SCHEMES.register
get_scheme = SCHEMES.lookup
SchemeName = SCHEMES.name_field()  # a schema field holding a registered scheme's name

register_scheme(Scheme("fqvit", "FQ-ViT: PTF LayerNorm inputs, LIS (log2) attention at 4 bits",
                       {"ln_in": "ptf", "attn": ("log2", "uniform")}))
register_scheme(Scheme("tsptq", "TSPTQ-ViT: O-2SF LayerNorm inputs, V-2SF post-Softmax and post-GELU values",
                       {"ln_in": "o2sf", "attn": "v2sf", "gelu": "v2sf"}))
register_scheme(Scheme("repq", "RepQ-ViT on FQ-ViT's PTF: reparameterized per-channel LayerNorm outputs, "
                       "log-sqrt(2) attention at 4 bits", {"ln_in": "ptf", "ln_out": "repq_ln", "attn": ("log_sqrt2", "uniform")}))
register_scheme(Scheme("repq_smooth", "repq, and q/k and v/proj scales balanced (SmoothQuant-style) before the qkv output "
                       "is quantized", {"ln_in": "ptf", "ln_out": "repq_ln", "qkv": "balance_qkv",
                                        "attn_out": "balance_out", "attn": ("log_sqrt2", "uniform")}))
register_scheme(Scheme("minmax", "uniform min/max everywhere (the baseline)"))
