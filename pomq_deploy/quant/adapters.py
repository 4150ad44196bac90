"""Block adapters: for each family of timm encoder blocks, which of its layers play which role.

The quantizer never guesses from attribute names alone: a block is quantized only when an adapter for its
class says where its two LayerNorms, its qkv and proj Linears, its attention probabilities (the module timm
applies right after Softmax) and its MLP's fc1 and fc2 are. A module that looks like an encoder block (its
class name ends in ``Block`` and it has an ``attn``) but has no adapter stops the wrap with one line naming
its class and what an adapter must say. ``attention`` is the attention module itself, whose two MatMuls the
reference computes on integer codes (:mod:`.attention`) (the pattern of torchao's ``register_quantize_module_handler``).
"""

import operator
from dataclasses import dataclass, field

from torch import nn

from ..errors import PomqError

ROLES = ("norm1", "attention", "qkv", "proj", "attn_probs", "norm2", "fc1", "fc2")
VIT_LAYERS = {"norm1": "norm1", "attention": "attn", "qkv": "attn.qkv", "proj": "attn.proj", "attn_probs": "attn.attn_drop",
              "norm2": "norm2", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}


class ModelError(PomqError):
    """The model has a part the quantizer cannot handle (e.g. a block family without an adapter)."""


@dataclass(frozen=True)
class BlockAdapter:
    family: str
    classes: tuple[str, ...]  # "timm.models.<module>.<Class>" of the blocks it handles
    layers: dict[str, str] = field(default_factory=lambda: dict(VIT_LAYERS))  # role -> attribute path in the block
    # the attention calls F.linear(x, self.qkv.weight, bias) itself (BEiT, EVA, with their own q/k/v biases): the
    # quantizer routes that call to the wrapped layer
    functional_linear: bool = False
    # position ops (rotary embeddings) sit between the qkv quantizer and q @ k^T: q and k are off its grid there, so
    # that MatMul runs in float (probs @ v still on codes)
    rotary_qk: bool = False

    def check(self, block: nn.Module, where: str) -> None:
        """Every role resolves to a layer of the kind the quantizer wraps, else one line naming what differs."""
        kinds = {"norm1": nn.LayerNorm, "norm2": nn.LayerNorm, "qkv": nn.Linear, "proj": nn.Linear, "fc1": nn.Linear,
                 "fc2": nn.Linear, "attention": nn.Module, "attn_probs": nn.Module}
        for role, kind in kinds.items():
            try:
                found = self.layer(block, role)
            except AttributeError:
                found = None
            if not isinstance(found, kind):
                what = "missing" if found is None else type(found).__name__
                raise ModelError(f"{where}: {class_path(block)} ({self.family} adapter): its {role} '{self.layers[role]}' is "
                                 f"{what}, not a {kind.__name__}; this variant of the family has no adapter yet (e.g. "
                                 "separate q/k/v projections, or a SwiGLU MLP with fc1_g/fc1_x)")

    def layer(self, block: nn.Module, role: str) -> nn.Module:
        return operator.attrgetter(self.layers[role])(block)

    def replace(self, block: nn.Module, role: str, module: nn.Module) -> None:
        parent, _, name = self.layers[role].rpartition(".")
        setattr(operator.attrgetter(parent)(block) if parent else block, name, module)


ADAPTERS: dict[str, BlockAdapter] = {}


def register_adapter(adapter: BlockAdapter) -> BlockAdapter:
    ADAPTERS[adapter.family] = adapter
    return adapter


def class_path(m: nn.Module) -> str:
    return f"{type(m).__module__}.{type(m).__name__}"


def adapter_for(m: nn.Module) -> BlockAdapter | None:
    path = class_path(m)
    return next((a for a in ADAPTERS.values() if path in a.classes), None)


def looks_like_block(m: nn.Module) -> bool:
    return type(m).__name__.endswith("Block") and isinstance(getattr(m, "attn", None), nn.Module)


def unsupported(m: nn.Module, where: str) -> ModelError:
    families = ", ".join(f"{a.family} ({', '.join(c.rsplit('.', 1)[1] for c in a.classes)})" for a in ADAPTERS.values())
    return ModelError(f"{where}: encoder block {class_path(m)} has no adapter; the quantizer handles {families}. An adapter "
                      "(pomq_deploy/quant/adapters.py) names the block's two LayerNorms, its qkv and proj Linears, the "
                      "module applied to the attention probabilities, and its MLP's fc1 and fc2 Linears")


# timm's ViT Block serves ViT, DeiT and DeiT-3 (LayerScale sits between the block's layers, untouched).
register_adapter(BlockAdapter("vit", ("timm.models.vision_transformer.Block",)))
register_adapter(BlockAdapter("swin", ("timm.models.swin_transformer.SwinTransformerBlock",)))
register_adapter(BlockAdapter("beit", ("timm.models.beit.Block",), functional_linear=True))
# EVA / EVA-02 with a fused qkv and a single-fc1 MLP (GluMlp's fused gate, or Mlp); rotary q/k in EVA-02
register_adapter(BlockAdapter("eva", ("timm.models.eva.EvaBlock",), functional_linear=True, rotary_qk=True))
