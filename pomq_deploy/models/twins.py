"""Outlier twins: exact reparameterizations of a ViT checkpoint whose FP32 function is unchanged but whose
activations carry the channel outliers real pretrained ViTs have (FQ-ViT's and RepQ-ViT's motivation), so that
quantizers can be told apart on a model that is otherwise easy to quantize.

Each kind scales a few channels up by ``factor`` where a tensor is produced and back down where it is read:

- ``ln``: a LayerNorm's weight and bias on channel c times f, the input column c of the Linear(s) it feeds
  (qkv after norm1, fc1 after norm2) divided by f. LayerNorm outputs (qkv and fc1 inputs) get the outliers.
- ``qk``: row c of q's weight and bias times f, the same row of k divided by f (per head, q . k is unchanged).
- ``v``: row c of v's weight and bias times f, input column c of the attention's proj divided by f: the
  attention output (proj's input) gets the outliers.

The channels are drawn per block and per kind from ``seed``. Works on timm ViT/DeiT checkpoints (fused
``attn.qkv`` Linear, ``norm1``/``norm2``, ``mlp.fc1``); the float function differs only by rounding.
"""

import re

import torch

KINDS = ("ln", "qk", "v")


def outlier_twin(state: dict[str, torch.Tensor], kinds: tuple[str, ...] = ("ln",), channels: int = 4,
                 factor: float = 30.0, seed: int = 0) -> dict[str, torch.Tensor]:
    """A copy of ``state`` with ``channels`` outlier channels per block and kind, scaled by ``factor``."""
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown twin kinds {sorted(unknown)}; allowed: {', '.join(KINDS)}")
    out = {k: v.clone() for k, v in state.items()}
    blocks = sorted({int(m[1]) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))})
    g = torch.Generator().manual_seed(seed)
    for i in blocks:
        p = f"blocks.{i}."
        dim = out[p + "norm1.weight"].shape[0]
        for kind in kinds:
            c = torch.randperm(dim, generator=g)[:channels]
            if kind == "ln":
                for norm, reader in (("norm1", "attn.qkv"), ("norm2", "mlp.fc1")):
                    _scale(out, p + norm + ".weight", c, factor, dim=0)
                    _scale(out, p + norm + ".bias", c, factor, dim=0)
                    _scale(out, p + reader + ".weight", c, 1 / factor, dim=1)
            elif kind == "qk":
                for rows, f in ((c, factor), (c + dim, 1 / factor)):
                    _scale(out, p + "attn.qkv.weight", rows, f, dim=0)
                    _scale(out, p + "attn.qkv.bias", rows, f, dim=0)
            else:
                _scale(out, p + "attn.qkv.weight", c + 2 * dim, factor, dim=0)
                _scale(out, p + "attn.qkv.bias", c + 2 * dim, factor, dim=0)
                _scale(out, p + "attn.proj.weight", c, 1 / factor, dim=1)
    return out


def _scale(state: dict[str, torch.Tensor], key: str, index: torch.Tensor, factor: float, dim: int) -> None:
    if key not in state:
        raise ValueError(f"{key}: not in the checkpoint; outlier twins take timm ViT/DeiT checkpoints "
                         "(norm1, attn.qkv, attn.proj, norm2, mlp.fc1)")
    state[key].index_copy_(dim, index, state[key].index_select(dim, index) * factor)
