"""A timm ViT / DeiT / Swin wrapped in place for calibration and fake-quantized inference under a plan.

Encoder blocks are the modules a block adapter (:mod:`.adapters`) handles, in module order: timm's
``VisionTransformer`` blocks (ViT, DeiT, DeiT-3) and the ``SwinTransformerBlock`` s of every Swin stage. Layers
outside the blocks (patch embedding, Swin's patch merging, the final norm and the head) stay 8-bit.
"""

import operator
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..plan import Plan
from .adapters import ADAPTERS, Form, ModelError, adapter_for, looks_like_block, replace, unsupported
from .attention import integer_attention
from .fitting import setting_key
from .functional import weight_scale
from .modules import ActQuant, PreciseGELU, QuantInput, QuantWeighted
from .observers import RangeObserver
from .quantizers import FORMATS, from_state, get_method, to_state
from .roundings import DEFAULT_ROUNDING, get_rounding
from .schemes import get_scheme

OUTSIDE_BITS = 8


def locate_blocks(model: nn.Module) -> list[tuple[nn.Module, dict[str, Form]]]:
    """The encoder blocks of ``model`` in module order, each with its layers' paths by role (its adapter's
    ``resolve``); a block-like module no adapter handles, or a variant its adapter does not cover, is an error."""
    found, names = [], []
    for name, m in model.named_modules():
        if any(name.startswith(f"{b}.") for b in names):  # inside a block already found
            continue
        adapter = adapter_for(m)
        if adapter is not None:
            found.append((m, adapter.resolve(m, f"{type(model).__name__}.{name}")))
            names.append(name)
        elif looks_like_block(m):
            raise unsupported(m, f"{type(model).__name__}.{name}")
    return found


def find_blocks(model: nn.Module) -> list[nn.Module]:
    """The encoder blocks of ``model`` in module order (see ``locate_blocks``)."""
    return [block for block, _ in locate_blocks(model)]


class NormLink:
    """A LayerNorm, the quantizer of its output and the Linear(s) reading it (qkv, or q/k/v; fc1, or fc1_g/fc1_x):
    where a quantizer with a ``fold`` method (RepQ-ViT's) moves per-channel factors into the LayerNorm's affine and
    the Linears' weights and biases. Keeps the original parameters to restore them before another plan folds its own."""

    def __init__(self, norm: nn.LayerNorm, linears: list[QuantWeighted]):
        self.norm, self.linears = norm, linears
        self.in_quant = linears[0].in_quant  # one quantizer, shared by the Linears
        self.params = [norm.weight, norm.bias] + [p for lin in linears for p in (lin.layer.weight, lin.layer.bias)]
        self.originals: list[torch.Tensor] | None = None
        self.folded = None  # the quantizer now folded in

    @torch.no_grad()
    def apply(self, q):
        """Fold ``q`` if it has ``fold`` (else nothing), restoring what an earlier fold changed; returns the
        quantizer the Linears' input then takes (``q``, or the per-tensor form ``q`` deploys as)."""
        new = q if hasattr(q, "fold") else None
        if new is not self.folded:
            self._refold(new)
        return q if new is None else new.deployed

    def _refold(self, q) -> None:
        if self.folded is not None:
            for p, orig in zip(self.params, self.originals, strict=True):
                p.copy_(orig)
        if q is not None:
            if any(lin.layer.bias is None for lin in self.linears):
                raise ModelError(f"{type(self.linears[0].layer).__name__} without a bias after a LayerNorm (e.g. BEiT's qkv, "
                                 "whose q/v biases live in its attention, or EVA-02's k_proj): a reparameterized quantizer "
                                 "(repq) needs one to fold its zero-point offsets into; use another scheme for this model")
            if self.originals is None:
                self.originals = [p.detach().clone() for p in self.params]
            q.fold(self.norm, [(lin.layer.weight, lin.layer.bias) for lin in self.linears])
        self.folded = q
        for lin in self.linears:
            lin.weight_changed()


def _wrap_block(block: nn.Module, i: int, paths: dict[str, Form]) -> list[NormLink]:
    """Quantizers around the layers at ``paths`` (role -> the paths its adapter resolved); returns the block's
    (LayerNorm, Linears) pairs. The Linears of one role (q/k/v, fc1_g/fc1_x) share their input's quantizer."""
    a = adapter_for(block)
    layer = {role: [operator.attrgetter(p)(block) for p in form] for role, form in paths.items()}
    attn = layer["attention"][0]
    attn.fused_attn = False  # timm's explicit q @ k -> softmax -> attn_drop -> @ v path, where we quantize
    ln_out = {role: ActQuant("ln_out", i) for role in ("qkv", "fc1")}
    wrap = {"norm1": [QuantInput(layer["norm1"][0], ActQuant("ln_in", i))],
            # q, k and v enter the attention's MatMuls: quantized there, past the rotary embeddings, when it has them
            "qkv": [QuantWeighted(m, i, ln_out["qkv"], out_quant=None if a.rotary_qk else ActQuant("act", i))
                    for m in layer["qkv"]],
            "attn_probs": [ActQuant("attn", i)],
            "proj": [QuantWeighted(layer["proj"][0], i, ActQuant("act", i))],
            "norm2": [QuantInput(layer["norm2"][0], ActQuant("ln_in", i))],
            "fc1": [QuantWeighted(m, i, ln_out["fc1"]) for m in layer["fc1"]],
            "fc2": [QuantWeighted(layer["fc2"][0], i, ActQuant("gelu", i))]}
    for role, modules in wrap.items():
        for path, module in zip(paths[role], modules, strict=True):
            replace(block, path, module)
    attention_paths = {role: tuple(p.removeprefix(f"{paths['attention'][0]}.") for p in paths[role])
                       for role in ("qkv", "proj", "attn_probs")}
    integer_attention(attn, i, attention_paths, a.functional_linear, a.rotary_qk)
    return [NormLink(wrap["norm1"][0].module, wrap["qkv"]), NormLink(wrap["norm2"][0].module, wrap["fc1"])]


def _wrap_rest(module: nn.Module) -> None:
    """Every Linear, Conv2d and LayerNorm not inside an encoder block, at 8 bits."""
    for name, child in list(module.named_children()):
        if isinstance(child, (QuantWeighted, QuantInput, ActQuant)) or adapter_for(child) is not None:
            continue
        if isinstance(child, (nn.Linear, nn.Conv2d)):
            setattr(module, name, QuantWeighted(child, None, ActQuant("act", None)))
        elif isinstance(child, nn.LayerNorm):
            setattr(module, name, QuantInput(child, ActQuant("ln_in", None)))
        else:
            _wrap_rest(child)


def _precise_gelus(model: nn.Module) -> None:
    """Every GELU of ``model`` (PyTorch's, or timm's ``GELU`` / ``GELUTanh`` that a model built with
    ``act_layer='gelu'`` holds) computed correctly rounded (``PreciseGELU``)."""
    from timm.layers.activations import GELU, GELUTanh

    kinds = {GELU: "none", GELUTanh: "tanh"}
    for name, m in list(model.named_modules()):
        if type(m) is nn.GELU or type(m) in kinds:
            replace(model, name, PreciseGELU(m.approximate if type(m) is nn.GELU else kinds[type(m)]))


class QuantModel(nn.Module):
    """The fake-quant reference model: wraps ``model`` in place; ``apply(plan)`` switches bit-widths."""

    def __init__(self, model: nn.Module, scheme: str, observer: str = "minmax", rounding: str = DEFAULT_ROUNDING):
        super().__init__()
        spec = get_scheme(scheme)
        self.model, self.scheme, self.observer, self.rounding = model.eval(), scheme, observer, get_rounding(rounding).name
        self.weight_fits: dict[str, dict[str, dict]] = {}  # format -> a fitted rounding's codes (quant.fitting)
        self.fit_source: Callable[[str], dict] | None = None  # format -> its fits (calibrate_cached sets it)
        located = locate_blocks(model)
        self.blocks = [block for block, _ in located]
        self.block_layers = [paths for _, paths in located]  # per block: role -> the paths of its layers
        if not self.blocks:
            raise ModelError(f"{type(model).__name__} has no encoder blocks to quantize: no module of it is a block an "
                             f"adapter handles ({', '.join(c for a in ADAPTERS.values() for c in a.classes)})")
        self.norm_links = [link for i, (block, paths) in enumerate(located) for link in _wrap_block(block, i, paths)]
        _wrap_rest(model)
        _precise_gelus(model)
        self.act_quants = {n: m for n, m in model.named_modules() if isinstance(m, ActQuant)}
        self.weighted = {n: m for n, m in model.named_modules() if isinstance(m, QuantWeighted)}
        for aq in self.act_quants.values():
            aq.scheme = spec

    @property
    def pretrained_cfg(self) -> dict:
        """The wrapped timm model's data config (input size, mean, std), for timm's resolve_data_config."""
        return self.model.pretrained_cfg

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _set_state(self, state: str) -> None:
        for aq in self.act_quants.values():
            aq.state = state

    @torch.no_grad()
    def calibrate(self, batches: list[torch.Tensor], progress: Iterable | None = None) -> dict:
        """FQ-ViT's calibration: FP forward passes update every observer; on the last batch each activation
        also fits its quantizers for 4 and 8 bits in both formats. Returns the fitted state for the cache."""
        self.apply(None)  # observe the model's own LayerNorm outputs, not a plan's reparameterized ones
        for aq in self.act_quants.values():
            per_channel = any(get_method(m).per_channel for m in aq.scheme.all_methods(aq.role))
            aq.observer = RangeObserver(self.observer, per_channel=per_channel)
        self._set_state("observe")
        for i, batch in enumerate(progress if progress is not None else batches):
            if i == len(batches) - 1:
                self._set_state("fit")
            self.model(batch)
        self._set_state("fp")
        for aq in self.act_quants.values():
            aq.observer = None
        return self.state()

    def state(self) -> dict:
        return {name: {k: to_state(q) for k, q in aq.fitted.items()} for name, aq in self.act_quants.items()}

    def load_state(self, state: dict) -> None:
        missing = set(self.act_quants) - set(state)
        if missing:
            raise ValueError(f"calibration state lacks {len(missing)} activations, e.g. {sorted(missing)[0]}")
        for name, aq in self.act_quants.items():
            aq.fitted = {k: from_state(v) for k, v in state[name].items()}

    @contextmanager
    @torch.no_grad()
    def onnx_mode(self) -> Iterator[None]:
        """Forward through exportable Q/DQ ops (same values as the fake-quant path) while exporting. A fitted
        rounding's weights are exported as their dequantized codes on their own scales (the export's graph pass
        reads the same codes back), in the layer's own parameter, which the graph pass finds by name."""
        originals = {}
        for aq in self.act_quants.values():
            aq.exporting = True
        for w in self.weighted.values():
            # computed here, outside the trace, so that the exporter sees the scales as constants
            w.export_scale = None if w.weight_bits is None else weight_scale(w.layer.weight, w.weight_bits)
            if w.weight_bits is not None and w.fitted is not None:
                codes, scale = w.weight_codes(w.weight_bits)
                originals[w] = w.layer.weight.detach().clone()
                w.layer.weight.copy_(codes * scale.reshape(-1, *([1] * (codes.ndim - 1))))
                w.export_scale = scale
        try:
            yield
        finally:
            for aq in self.act_quants.values():
                aq.exporting = False
            for w in self.weighted.values():
                w.export_scale = None
            for w, weight in originals.items():
                w.layer.weight.copy_(weight)

    def isolate(self, block: int, gene: str) -> None:
        """After ``apply``: keep only ``gene`` ('w', 'a' or 'attn') of ``block`` quantized, everything else in FP32
        (a per-gene sensitivity, as HAWQ measures one layer's perturbation at a time)."""
        for aq in self.act_quants.values():
            if not (aq.block == block and gene == ("attn" if aq.role == "attn" else "a")):
                aq.active = None
        for w in self.weighted.values():
            if not (w.block == block and gene == "w"):
                w.weight_bits = None

    def weight_bits(self) -> dict[str, int]:
        """Width of each quantized weight, by its parameter name in this module's state dict."""
        return {f"model.{name}.layer.weight": w.weight_bits for name, w in self.weighted.items() if w.weight_bits}

    def apply(self, plan: Plan | None, fmt: str = "asym") -> None:
        """Fake-quantize every activation and weight at the plan's widths (``None``: back to FP32)."""
        if plan is None:
            self._set_state("fp")
            for w in self.weighted.values():
                w.weight_bits, w.fitted = None, None
            for link in self.norm_links:
                link.apply(None)
            return
        if fmt not in FORMATS:
            raise ValueError(f"format {fmt!r}; allowed: {', '.join(FORMATS)}")
        plan.check_blocks(self.num_blocks)
        self.quantize_activations(None, fmt, OUTSIDE_BITS, OUTSIDE_BITS)
        for i, b in enumerate(plan.blocks):  # before the weights are quantized: RepQ-ViT quantizes the folded weights
            self.quantize_activations(i, fmt, b.a, b.attn)
        fits = self.fits(plan.rounding, fmt)
        for name, w in self.weighted.items():
            w.weight_bits = OUTSIDE_BITS if w.block is None else plan.blocks[w.block].w
            w.fitted = None if w.block is None or fits is None else \
                fits[setting_key(w.block, w.weight_bits, plan.blocks[w.block].a, plan.blocks[w.block].attn)][name]
        self._set_state("quant")

    def quantize_activations(self, block: int | None, fmt: str, a: int, attn: int) -> None:
        """Put the activations of ``block`` (None: the layers outside the blocks) on their fitted quantizers at
        width ``a`` (post-Softmax: ``attn``) in ``fmt``, and fold RepQ-ViT's factors into its LayerNorms and Linears
        for them; their state is left as it is (``apply`` switches the whole model, the fitting one block)."""
        for aq in self.act_quants.values():
            if aq.block == block:
                aq.active = aq.fitted[f"{fmt}{attn if aq.role == 'attn' else a}"]
        for link in self.norm_links:
            if link.in_quant.block == block:
                link.in_quant.active = link.apply(link.in_quant.active)

    def fits(self, rounding: str, fmt: str) -> dict | None:
        """The fitted rounding's codes in activation format ``fmt``, fitted (or read from the cache) the first time
        a plan needs them; None for a rounding that fits nothing."""
        if rounding != self.rounding:
            raise ValueError(f"a plan with rounding {rounding!r} on a model prepared for {self.rounding!r}")
        if not get_rounding(rounding).fitted:
            return None
        if fmt not in self.weight_fits:
            if self.fit_source is None:
                raise ValueError(f"rounding {rounding!r}: the weights are not fitted (quant.calibration.calibrate_cached fits them)")
            self.weight_fits[fmt] = self.fit_source(fmt)
        return self.weight_fits[fmt]
