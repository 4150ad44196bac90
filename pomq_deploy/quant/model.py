"""A timm ViT / DeiT / Swin wrapped in place for calibration and fake-quantized inference under a plan.

Encoder blocks are the modules a block adapter (:mod:`.adapters`) handles, in module order: timm's
``VisionTransformer`` blocks (ViT, DeiT, DeiT-3) and the ``SwinTransformerBlock`` s of every Swin stage. Layers
outside the blocks (patch embedding, Swin's patch merging, the final norm and the head) stay 8-bit.
"""

import operator
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..plan import Gene, Plan
from .adapters import ADAPTERS, Form, ModelError, adapter_for, looks_like_block, replace, unsupported
from .attention import integer_attention
from .fitting import setting_key
from .modules import ActQuant, PreciseGELU, QuantInput, QuantWeighted
from .observers import RangeObserver
from .quantizers import FORMATS, Quantizer, from_state, get_method, moved, to_state
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


@dataclass
class FoldSite:
    """Where a quantizer with a ``fold`` method rewrites the layers around it: ``quant`` (the activation it
    quantizes), ``targets`` (what its ``fold`` takes), ``layers`` (the Linears whose weights change), ``params``
    (every tensor it may write) and ``also`` (activations downstream that the fold rescales). ``fold`` receives
    ``targets``, then ``also``'s quantizers, and returns a tuple: the quantizer each of ``quant`` and ``also``
    takes on the folded model. ``refused``: why this model cannot
    take a fold here (None: it can)."""

    quant: ActQuant
    targets: tuple
    layers: list[QuantWeighted]
    params: list[torch.Tensor]
    refused: str | None = None
    also: tuple[ActQuant, ...] = ()


def norm_site(norm: nn.LayerNorm, linears: list[QuantWeighted]) -> FoldSite:
    """A LayerNorm and the Linear(s) reading its output (qkv, or q/k/v; fc1, or fc1_g/fc1_x), sharing one input
    quantizer: RepQ-ViT's per-channel factors move into the LayerNorm's affine and the Linears' columns and biases."""
    refused = None
    if any(lin.layer.bias is None for lin in linears):
        refused = (f"{type(linears[0].layer).__name__} without a bias after a LayerNorm (e.g. BEiT's qkv, whose q/v biases "
                   "live in its attention, or EVA-02's k_proj): a reparameterized quantizer (repq) needs one to fold its "
                   "zero-point offsets into; use another scheme for this model")
    return FoldSite(linears[0].in_quant, (norm, [(lin.layer.weight, lin.layer.bias) for lin in linears]), linears,
                    [norm.weight, norm.bias] + [p for lin in linears for p in (lin.layer.weight, lin.layer.bias)], refused)


def attention_site(qkv: QuantWeighted, proj: QuantWeighted) -> FoldSite:
    """A fused qkv Linear's output and the proj reading the attention's output: q/k and v/proj factors
    (:mod:`.balance`) move into qkv's rows and proj's columns; proj's input (v's channels, mixed over tokens) is
    rescaled with them."""
    refused = None if qkv.layer.bias is not None else \
        f"{type(qkv.layer).__name__} qkv without a bias: a balanced qkv quantizer needs one to fold its factors into"
    return FoldSite(qkv.out_quant, (qkv.layer.weight, qkv.layer.bias, proj.layer.weight), [qkv, proj],
                    [qkv.layer.weight, proj.layer.weight] + ([] if qkv.layer.bias is None else [qkv.layer.bias]), refused,
                    also=(proj.in_quant,))


class BlockFolds:
    """A block's fold sites (norm1 -> qkv, the attention, norm2 -> fc1). Sites share parameters (qkv's weight is
    read by norm1's site and written by the attention's), so a change at any site restores every parameter of the
    block and folds the block's quantizers again in site order; the originals are kept for that."""

    def __init__(self, sites: list[FoldSite]):
        self.sites = sites
        self.params = list({id(p): p for site in sites for p in site.params}.values())
        self.originals: list[torch.Tensor] | None = None
        self.folded: list = [None] * len(sites)  # per site, the quantizers (its own, then ``also``'s) now folded in
        self.deployed: list = [None] * len(sites)  # and what its fold returned for each

    @torch.no_grad()
    def apply(self, fold: bool = True) -> None:
        """Fold every site whose activation's quantizer has ``fold`` (``fold`` False: none, the model's own
        parameters back), and put the quantizers the folded model deploys with on the site's activations."""
        new = [(site.quant.active, *(a.active for a in site.also)) if fold and hasattr(site.quant.active, "fold") else None
               for site in self.sites]
        if _identities(new) != _identities(self.folded):
            if self.originals is not None:
                for p, orig in zip(self.params, self.originals, strict=True):
                    p.copy_(orig)
            for site, q in zip(self.sites, new, strict=True):
                if q is not None and site.refused:
                    raise ModelError(site.refused)
            if self.originals is None and any(q is not None for q in new):
                self.originals = [p.detach().clone() for p in self.params]
            self.deployed = [None if q is None else q[0].fold(*site.targets, *q[1:])
                             for site, q in zip(self.sites, new, strict=True)]
            self.folded = new
            for site in self.sites:
                for layer in site.layers:
                    layer.weight_changed()
        for site, deployed in zip(self.sites, self.deployed, strict=True):
            if deployed is not None and fold:
                for aq, q in zip((site.quant, *site.also), deployed, strict=True):
                    aq.active = q


def quantizer_for(aq: ActQuant, fmt: str, gene: Gene) -> Quantizer | None:
    """The fitted quantizer an activation takes for ``gene`` in integer format ``fmt``: ``{fmt}{bits}``, the
    FP8 one, or None (float)."""
    if gene == "float":
        return None
    return aq.fitted["fp8" if gene == "fp8" else f"{fmt}{gene}"]


def _check_fitted(plan: Plan) -> None:
    """A fitted rounding fits integer weights in PoMQ-ViT's settings; FP8 and float weights it leaves as they are
    (there is no integer grid to round to), but an integer weight next to an FP8 or float gene has no fit."""
    for i, b in enumerate(plan.blocks):
        if isinstance(b.w, int) and not b.integer:
            raise ModelError(f"block {i} ({b.text()}): rounding {plan.rounding} fits integer weights in settings whose "
                             "genes are all 4 or 8; use --rounding nearest for this plan")


def _identities(folded: list) -> list:
    """Which quantizer objects each site holds (None: no fold); quantizers compare by identity, not by value."""
    return [None if qs is None else tuple(map(id, qs)) for qs in folded]


def _wrap_block(block: nn.Module, i: int, paths: dict[str, Form]) -> BlockFolds:
    """Quantizers around the layers at ``paths`` (role -> the paths its adapter resolved); returns the block's
    fold sites. The Linears of one role (q/k/v, fc1_g/fc1_x) share their input's quantizer."""
    a = adapter_for(block)
    layer = {role: [operator.attrgetter(p)(block) for p in form] for role, form in paths.items()}
    attn = layer["attention"][0]
    attn.fused_attn = False  # timm's explicit q @ k -> softmax -> attn_drop -> @ v path, where we quantize
    ln_out = {role: ActQuant("ln_out", i) for role in ("qkv", "fc1")}
    wrap = {"norm1": [QuantInput(layer["norm1"][0], ActQuant("ln_in", i))],
            # q, k and v enter the attention's MatMuls: quantized there, past the rotary embeddings, when it has them
            "qkv": [QuantWeighted(m, i, ln_out["qkv"], out_quant=None if a.rotary_qk else ActQuant("qkv", i))
                    for m in layer["qkv"]],
            "attn_probs": [ActQuant("attn", i)],
            "proj": [QuantWeighted(layer["proj"][0], i, ActQuant("attn_out", i))],
            "norm2": [QuantInput(layer["norm2"][0], ActQuant("ln_in", i))],
            "fc1": [QuantWeighted(m, i, ln_out["fc1"]) for m in layer["fc1"]],
            "fc2": [QuantWeighted(layer["fc2"][0], i, ActQuant("gelu", i))]}
    for role, modules in wrap.items():
        for path, module in zip(paths[role], modules, strict=True):
            replace(block, path, module)
    attention_paths = {role: tuple(p.removeprefix(f"{paths['attention'][0]}.") for p in paths[role])
                       for role in ("qkv", "proj", "attn_probs")}
    integer_attention(attn, i, attention_paths, a.functional_linear, a.rotary_qk)
    fused = len(wrap["qkv"]) == 1 and not a.rotary_qk
    return BlockFolds([norm_site(wrap["norm1"][0].module, wrap["qkv"])]
                      + ([attention_site(wrap["qkv"][0], wrap["proj"][0])] if fused else [])
                      + [norm_site(wrap["norm2"][0].module, wrap["fc1"])])


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


def _inputs_to_model_device(model: nn.Module, args: tuple) -> tuple:
    device = next(model.parameters()).device
    return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)


def exactly(model: nn.Module):
    """``model``'s exact path for the length of a ``with`` (a float model computes as it always does)."""
    from contextlib import nullcontext

    return model.exact_path() if isinstance(model, QuantModel) else nullcontext()


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
        self.block_folds = [_wrap_block(block, i, paths) for i, (block, paths) in enumerate(located)]
        _wrap_rest(model)
        _precise_gelus(model)
        self.act_quants = {n: m for n, m in model.named_modules() if isinstance(m, ActQuant)}
        self.weighted = {n: m for n, m in model.named_modules() if isinstance(m, QuantWeighted)}
        for aq in self.act_quants.values():
            aq.scheme = spec
        self.exact = False
        model.register_forward_pre_hook(_inputs_to_model_device)  # every caller's images, wherever the model runs

    @property
    def pretrained_cfg(self) -> dict:
        """The wrapped timm model's data config (input size, mean, std), for timm's resolve_data_config."""
        return self.model.pretrained_cfg

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to_device(self, device: torch.device) -> "QuantModel":
        """Move the model, its fitted quantizers and what it caches to ``device`` (back to FP32 first: a plan's
        folds are made again on the device by the next ``apply``)."""
        self.apply(None)
        self.model.to(device)
        for aq in self.act_quants.values():
            aq.fitted = {k: moved(q, device) for k, q in aq.fitted.items()}
        for w in self.weighted.values():
            w.weight_changed()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def set_exact(self, exact: bool) -> None:
        """The exact path (integer GEMMs, a correctly rounded GELU: what the deployed kernels are checked against)
        or the fast one (float GEMMs on the same fake-quant values; the default). See :mod:`.modules`."""
        self.exact = exact
        for m in self.model.modules():
            if isinstance(m, (QuantWeighted, PreciseGELU)):
                m.exact = exact

    @contextmanager
    def exact_path(self) -> Iterator[None]:
        """Run on the exact path inside the block, as before it after."""
        before = self.exact
        self.set_exact(True)
        try:
            yield
        finally:
            self.set_exact(before)

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
        device = self.device
        for name, aq in self.act_quants.items():
            aq.fitted = {k: moved(from_state(v), device) for k, v in state[name].items()}

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
            w.export_scale = None if w.weight_bits is None else w.weight_scale(w.weight_bits)
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

    def isolate_block(self, block: int) -> None:
        """After ``apply``: keep only ``block`` quantized, everything else in FP32 (a per-format sensitivity)."""
        for aq in self.act_quants.values():
            if aq.block != block:
                aq.active = None
        for w in self.weighted.values():
            if w.block != block:
                w.weight_bits = None

    def weight_bits(self) -> dict[str, int | str]:
        """Format of each quantized weight (4, 8 or "fp8"), by its parameter name in this module's state dict."""
        return {f"model.{name}.layer.weight": w.weight_bits for name, w in self.weighted.items() if w.weight_bits}

    def apply(self, plan: Plan | None, fmt: str = "asym") -> None:
        """Fake-quantize every activation and weight at the plan's widths (``None``: back to FP32)."""
        if plan is None:
            self._set_state("fp")
            for w in self.weighted.values():
                w.weight_bits, w.fitted = None, None
            for i in range(self.num_blocks):
                self.unfold(i)
            return
        if fmt not in FORMATS:
            raise ValueError(f"format {fmt!r}; allowed: {', '.join(FORMATS)}")
        plan.check_blocks(self.num_blocks)
        fits = self.fits(plan.rounding, fmt)
        if fits is not None:
            _check_fitted(plan)
        block_fits = [None if fits is None or not isinstance(b.w, int) else fits[setting_key(i, b.w, b.a, b.attn)]
                      for i, b in enumerate(plan.blocks)]
        self.quantize_activations(None, fmt, OUTSIDE_BITS, OUTSIDE_BITS)
        for i, b in enumerate(plan.blocks):  # before the weights are quantized: RepQ-ViT quantizes the folded weights
            self.quantize_activations(i, fmt, b.a, b.attn, None if block_fits[i] is None else block_fits[i]["acts"])
        for name, w in self.weighted.items():
            gene = OUTSIDE_BITS if w.block is None else plan.blocks[w.block].w
            w.weight_bits = None if gene == "float" else gene
            w.fitted = None if w.block is None or block_fits[w.block] is None else block_fits[w.block]["weights"][name]
        self._set_state("quant")

    def quantize_activations(self, block: int | None, fmt: str, a: Gene, attn: Gene, learned: dict | None = None) -> None:
        """Put the activations of ``block`` (None: the layers outside the blocks) on their fitted quantizers at
        gene ``a`` (post-Softmax: ``attn``) in ``fmt``, and fold RepQ-ViT's factors into its LayerNorms and Linears
        for them; their state is left as it is (``apply`` switches the whole model, the fitting one block).
        ``learned``: activation name -> the saved state of a quantizer a fitted rounding learned for this block
        setting (after the fold: it replaces the per-tensor quantizer the folded LayerNorm output deploys with)."""
        quants = [aq for aq in self.act_quants.values() if aq.block == block]
        for aq in quants:
            aq.active = quantizer_for(aq, fmt, attn if aq.role == "attn" else a)
        if block is not None:
            self.block_folds[block].apply()
        for aq in quants:
            if getattr(aq.active, "fold_only", False):
                raise ModelError(f"scheme {self.scheme}: block {block}'s {aq.role} quantizer ({type(aq.active).__name__}) "
                                 "runs only folded into the layers around it, which this model's block does not allow "
                                 "(a balanced qkv needs a fused qkv Linear without rotary embeddings); use another scheme")
        for name, state in (learned or {}).items():
            self.act_quants[name].active = moved(from_state(state), self.device)

    def unfold(self, block: int) -> None:
        """Block ``block``'s parameters back to the model's own (undoing the folds a plan made)."""
        self.block_folds[block].apply(fold=False)

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
