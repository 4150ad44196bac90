"""Block adapters: for each family of timm encoder blocks, which of its layers play which role.

The quantizer never guesses from attribute names alone: a block is quantized only when an adapter for its
class says where its two LayerNorms, its qkv (or q/k/v) and proj Linears, its attention probabilities (the
module timm applies right after Softmax) and its MLP's fc1 (or SwiGLU's fc1_g/fc1_x) and fc2 are; a role may
take several forms across a family's variants (EVA-02 tiny's fused qkv, base's q/k/v projections), tried in
order. A module that looks like an encoder block (its class name ends in ``Block`` and it has an ``attn``) but
has no adapter stops the wrap with one line naming its class and what an adapter must say. ``attention`` is the
attention module itself, whose two MatMuls the reference computes on integer codes (:mod:`.attention`) (the
pattern of torchao's ``register_quantize_module_handler``).
"""

import operator
from dataclasses import dataclass, field

from torch import nn

from ..errors import PomqError

# the roles, and the kind of layer each takes; qkv and fc1 may be several Linears reading the same LayerNorm output
KINDS = {"norm1": nn.LayerNorm, "attention": nn.Module, "qkv": nn.Linear, "proj": nn.Linear, "attn_probs": nn.Module,
         "norm2": nn.LayerNorm, "fc1": nn.Linear, "fc2": nn.Linear}
MULTI = ("qkv", "fc1")
Form = tuple[str, ...]  # attribute paths in the block of the layers that play a role: one, or q/k/v, or fc1_g/fc1_x
VIT_LAYERS = {"norm1": "norm1", "attention": "attn", "qkv": "attn.qkv", "proj": "attn.proj", "attn_probs": "attn.attn_drop",
              "norm2": "norm2", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}


class ModelError(PomqError):
    """The model has a part the quantizer cannot handle (e.g. a block family without an adapter)."""


def _forms(spec: str | tuple) -> tuple[Form, ...]:
    """``"a.b"``: one form, one layer; ``("a", ("b", "c"))``: two forms tried in order, the second of two layers."""
    return tuple((f,) if isinstance(f, str) else tuple(f) for f in ((spec,) if isinstance(spec, str) else spec))


@dataclass(frozen=True)
class BlockAdapter:
    family: str
    classes: tuple[str, ...]  # "timm.models.<module>.<Class>" of the blocks it handles
    # role -> attribute path(s) in the block; a tuple lists the forms a role takes across the family's variants
    layers: dict[str, str | tuple] = field(default_factory=lambda: dict(VIT_LAYERS))
    # the attention calls F.linear(x, self.qkv.weight, bias) itself (BEiT, EVA, with their own q/k/v biases): the
    # quantizer routes that call to the wrapped layer
    functional_linear: bool = False
    # position ops (rotary embeddings) sit between the q/k projections and q @ k^T: q, k and v are quantized where
    # they enter the attention's MatMuls instead of at the projections' outputs
    rotary_qk: bool = False

    def resolve(self, block: nn.Module, where: str) -> dict[str, Form]:
        """Each role's first form whose layers all exist and are of the role's kind (a Linear for qkv, ...), else
        one line naming the block, the role and the forms the adapter knows."""
        found = {}
        for role, kind in KINDS.items():
            forms = _forms(self.layers[role])
            form = next((f for f in forms if (len(f) == 1 or role in MULTI) and all(
                isinstance(_get(block, p), kind) for p in f)), None)
            if form is None:
                known = " or ".join("+".join(f"'{p}'" for p in f) for f in forms)
                seen = ", ".join(f"'{p}' is {type(_get(block, p)).__name__ if _get(block, p) is not None else 'missing'}"
                                 for f in forms for p in f)
                raise ModelError(f"{where}: {class_path(block)} ({self.family} adapter): its {role} must be {known} "
                                 f"({kind.__name__}), but {seen}; this variant of the family has no adapter yet")
            found[role] = form
        return found


def _get(block: nn.Module, path: str) -> nn.Module | None:
    try:
        return operator.attrgetter(path)(block)
    except AttributeError:
        return None


def replace(block: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
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
                      "(pomq_deploy/quant/adapters.py) names the block's two LayerNorms, its qkv (or q/k/v) and proj Linears, "
                      "the module applied to the attention probabilities, and its MLP's fc1 (or fc1_g/fc1_x) and fc2 Linears")


# timm's ViT Block serves ViT, DeiT and DeiT-3 (LayerScale sits between the block's layers, untouched).
register_adapter(BlockAdapter("vit", ("timm.models.vision_transformer.Block",)))
register_adapter(BlockAdapter("swin", ("timm.models.swin_transformer.SwinTransformerBlock",)))
register_adapter(BlockAdapter("beit", ("timm.models.beit.Block",), functional_linear=True))
# EVA / EVA-02: a fused qkv (tiny, small) or q/k/v projections (base, large); one fc1 (Mlp, GluMlp's fused gate) or
# SwiGLU's fc1_g and fc1_x; rotary q/k
register_adapter(BlockAdapter("eva", ("timm.models.eva.EvaBlock",), functional_linear=True, rotary_qk=True,
                              layers=VIT_LAYERS | {"qkv": ("attn.qkv", ("attn.q_proj", "attn.k_proj", "attn.v_proj")),
                                                   "fc1": ("mlp.fc1", ("mlp.fc1_g", "mlp.fc1_x"))}))
