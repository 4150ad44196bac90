"""A timm ViT / DeiT / Swin wrapped in place for calibration and fake-quantized inference under a plan.

Encoder blocks are found by shape, not by class: any module with ``norm1``, ``attn`` (``qkv``, ``proj``,
``attn_drop``), ``norm2`` and ``mlp`` (``fc1``, ``fc2``) is one, in module order, which covers timm's
``VisionTransformer`` blocks and the ``SwinTransformerBlock`` s of every Swin stage. Layers outside the
blocks (patch embedding, Swin's patch merging, the final norm and the head) stay 8-bit.
"""

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..plan import Plan
from .attention import integer_attention
from .functional import weight_scale
from .modules import ActQuant, QuantInput, QuantWeighted
from .observers import RangeObserver
from .quantizers import FORMATS, from_state, get_method, to_state
from .schemes import get_scheme

OUTSIDE_BITS = 8


def is_encoder_block(m: nn.Module) -> bool:
    attn, mlp = getattr(m, "attn", None), getattr(m, "mlp", None)
    return (hasattr(m, "norm1") and hasattr(m, "norm2") and attn is not None and mlp is not None
            and all(hasattr(attn, k) for k in ("qkv", "proj", "attn_drop")) and all(hasattr(mlp, k) for k in ("fc1", "fc2")))


def find_blocks(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if is_encoder_block(m)]


class NormLink:
    """A LayerNorm, the quantizer of its output and the Linear reading it: where a quantizer with a ``fold``
    method (RepQ-ViT's) moves per-channel factors into the LayerNorm's affine and the Linear's weight and bias.
    Keeps the original parameters to restore them before another plan folds its own."""

    def __init__(self, norm: nn.LayerNorm, linear: QuantWeighted):
        self.norm, self.linear = norm, linear
        self.params = [norm.weight, norm.bias, linear.layer.weight, linear.layer.bias]
        self.originals: list[torch.Tensor] | None = None
        self.folded = None  # the quantizer now folded in

    @torch.no_grad()
    def apply(self, q):
        """Fold ``q`` if it has ``fold`` (else nothing), restoring what an earlier fold changed; returns the
        quantizer the Linear's input then takes (``q``, or the per-tensor form ``q`` deploys as)."""
        new = q if hasattr(q, "fold") else None
        if new is not self.folded:
            self._refold(new)
        return q if new is None else new.deployed

    def _refold(self, q) -> None:
        if self.folded is not None:
            for p, orig in zip(self.params, self.originals, strict=True):
                p.copy_(orig)
        if q is not None:
            if self.linear.layer.bias is None:
                raise ValueError(f"{type(self.linear.layer).__name__} without a bias after a LayerNorm: a reparameterized "
                                 "quantizer needs one to fold its zero-point offsets into")
            if self.originals is None:
                self.originals = [p.detach().clone() for p in self.params]
            q.fold(self.norm, self.linear.layer.weight, self.linear.layer.bias)
        self.folded = q
        self.linear.weight_changed()


def _wrap_block(block: nn.Module, i: int) -> list[NormLink]:
    attn, mlp = block.attn, block.mlp
    attn.fused_attn = False  # timm's explicit q @ k -> softmax -> attn_drop -> @ v path, where we quantize
    block.norm1 = QuantInput(block.norm1, ActQuant("ln_in", i))
    attn.qkv = QuantWeighted(attn.qkv, i, ActQuant("ln_out", i), out_quant=ActQuant("act", i))  # q, k, v enter MatMuls
    attn.attn_drop = ActQuant("attn", i)
    attn.proj = QuantWeighted(attn.proj, i, ActQuant("act", i))
    block.norm2 = QuantInput(block.norm2, ActQuant("ln_in", i))
    mlp.fc1 = QuantWeighted(mlp.fc1, i, ActQuant("ln_out", i))
    mlp.fc2 = QuantWeighted(mlp.fc2, i, ActQuant("gelu", i))
    integer_attention(attn)
    return [NormLink(block.norm1.module, attn.qkv), NormLink(block.norm2.module, mlp.fc1)]


def _wrap_rest(module: nn.Module) -> None:
    """Every Linear, Conv2d and LayerNorm not inside an encoder block, at 8 bits."""
    for name, child in list(module.named_children()):
        if isinstance(child, (QuantWeighted, QuantInput, ActQuant)) or is_encoder_block(child):
            continue
        if isinstance(child, (nn.Linear, nn.Conv2d)):
            setattr(module, name, QuantWeighted(child, None, ActQuant("act", None)))
        elif isinstance(child, nn.LayerNorm):
            setattr(module, name, QuantInput(child, ActQuant("ln_in", None)))
        else:
            _wrap_rest(child)


class QuantModel(nn.Module):
    """The fake-quant reference model: wraps ``model`` in place; ``apply(plan)`` switches bit-widths."""

    def __init__(self, model: nn.Module, scheme: str, observer: str = "minmax"):
        super().__init__()
        spec = get_scheme(scheme)
        self.model, self.scheme, self.observer = model.eval(), scheme, observer
        self.blocks = find_blocks(model)
        if not self.blocks:
            raise ValueError(f"{type(model).__name__} has no ViT/Swin encoder blocks to quantize")
        self.norm_links = [link for i, block in enumerate(self.blocks) for link in _wrap_block(block, i)]
        _wrap_rest(model)
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
    def onnx_mode(self) -> Iterator[None]:
        """Forward through exportable Q/DQ ops (same values as the fake-quant path) while exporting."""
        for aq in self.act_quants.values():
            aq.exporting = True
        for w in self.weighted.values():
            # computed here, outside the trace, so that the exporter sees the scales as constants
            w.export_scale = None if w.weight_bits is None else weight_scale(w.layer.weight, w.weight_bits)
        try:
            yield
        finally:
            for aq in self.act_quants.values():
                aq.exporting = False
            for w in self.weighted.values():
                w.export_scale = None

    def weight_bits(self) -> dict[str, int]:
        """Width of each quantized weight, by its parameter name in this module's state dict."""
        return {f"model.{name}.layer.weight": w.weight_bits for name, w in self.weighted.items() if w.weight_bits}

    def apply(self, plan: Plan | None, fmt: str = "asym") -> None:
        """Fake-quantize every activation and weight at the plan's widths (``None``: back to FP32)."""
        if plan is None:
            self._set_state("fp")
            for w in self.weighted.values():
                w.weight_bits = None
            for link in self.norm_links:
                link.apply(None)
            return
        if fmt not in FORMATS:
            raise ValueError(f"format {fmt!r}; allowed: {', '.join(FORMATS)}")
        plan.check_blocks(self.num_blocks)
        for aq in self.act_quants.values():
            bits = OUTSIDE_BITS if aq.block is None else getattr(plan.blocks[aq.block], "attn" if aq.role == "attn" else "a")
            aq.active = aq.fitted[f"{fmt}{bits}"]
        for link in self.norm_links:  # before the weights are quantized: RepQ-ViT quantizes the folded weights
            link.linear.in_quant.active = link.apply(link.linear.in_quant.active)
        for w in self.weighted.values():
            w.weight_bits = OUTSIDE_BITS if w.block is None else plan.blocks[w.block].w
        self._set_state("quant")
