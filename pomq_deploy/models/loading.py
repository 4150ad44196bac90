"""timm models by name and keyword arguments, with weights from a local file only (never a hub at run time)."""

import dataclasses
import logging
import pickle
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import CheckpointError, RecipeError
from . import reference  # noqa: F401  (registers deit_fmnist)

if TYPE_CHECKING:
    from ..recipe import ModelSpec

log = logging.getLogger(__name__)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors or .pth/.pt/.bin checkpoint, unwrapped from common training containers."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights-only loading met code: say what, never torch's advice to rerun
        blocked = re.search(r"GLOBAL (\S+)", str(e))  # without weights_only (that would run the code)
        what = f"Python objects besides tensors ({blocked.group(1)})" if blocked else "Python objects besides tensors"
        raise CheckpointError(f"{path}: refused: it holds {what}; a checkpoint is only read as tensors, never unpickled") from None
    except Exception as e:  # the readers raise many types for a corrupt file; all mean the same here
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else "no detail"  # an empty file: EOFError()
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(e).__name__}: {first})") from None
    for key in ("state_dict_ema", "model_ema", "state_dict", "model"):  # timm / DeiT training checkpoints
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def fit_problems(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Why ``state`` cannot load into ``model`` strictly: missing, unexpected and mis-shaped tensors."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs model {tuple(v.shape)}"
              for k, v in own.items() if k in state and state[k].shape != v.shape]
    kinds = [f"{k} {state[k].dtype} vs model {v.dtype}"
             for k, v in own.items() if k in state and _kind(state[k]) != _kind(v)]
    bad = [k for k in own if k in state and state[k].is_floating_point() and not torch.isfinite(state[k]).all()]
    out = []
    if shapes:
        out.append(f"{len(shapes)} shape mismatch(es), e.g. {shapes[0]}")
    if kinds:
        out.append(f"{len(kinds)} of another kind of number, e.g. {kinds[0]}")
    if bad:
        out.append(f"{len(bad)} holding NaN or infinity, e.g. {bad[0]}")
    if missing:
        out.append(f"{len(missing)} missing, e.g. {missing[0]}")
    if unexpected:
        out.append(f"{len(unexpected)} unexpected, e.g. {unexpected[0]}")
    return out


def _kind(t: torch.Tensor) -> str:
    """Float, complex, bool or integer: a tensor loads into another of its kind at any width (a float16 release
    into a float32 model), never across kinds (an integer tensor where weights go, a complex one cast to real)."""
    return "complex" if t.is_complex() else "float" if t.is_floating_point() else "bool" if t.dtype == torch.bool else "int"


def _depth(keys) -> int:
    return 1 + max((int(m.group(1)) for k in keys if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)


def fit_hints(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """The ``model.kwargs`` that would make a ViT-style checkpoint fit, read from its tensors' shapes."""
    own, hints = model.state_dict(), []
    head, conv = state.get("head.weight"), state.get("patch_embed.proj.weight")
    if head is not None and head.dim() == 2 and "head.weight" in own and head.shape[0] != own["head.weight"].shape[0]:
        hints.append(f"num_classes: {head.shape[0]} (head.weight has {head.shape[0]} rows)")
    if conv is not None and conv.dim() == 4 and "patch_embed.proj.weight" in own \
            and conv.shape != own["patch_embed.proj.weight"].shape:
        embed, chans, ph, pw = conv.shape
        mine = own["patch_embed.proj.weight"].shape
        hints += [f"{k}: {v}" for k, v, m in (("embed_dim", embed, mine[0]), ("in_chans", chans, mine[1]),
                                               ("patch_size", ph if ph == pw else [ph, pw], mine[2])) if v != m]
    depth, mine = _depth(state), _depth(own)
    if depth and mine and depth != mine:
        hints.append(f"depth: {depth} (the checkpoint has blocks 0-{depth - 1})")
    pos = state.get("pos_embed")
    if pos is not None and pos.dim() == 3 and "pos_embed" in own and pos.shape[1] != own["pos_embed"].shape[1]:
        hints.append(f"img_size (pos_embed has {pos.shape[1]} positions, the model {own['pos_embed'].shape[1]}: "
                     "image size / patch size decide them)")
    return hints


def _timm_converted(model: nn.Module, state: dict[str, torch.Tensor], checkpoint) -> dict[str, torch.Tensor] | None:
    """``state`` through the ``checkpoint_filter_fn`` timm's module for this model defines (the converter timm applies
    to other checkpoint layouts: OpenAI CLIP, DINOv2, original Swin or BEiT releases, a patch embedding stored as
    a Linear ...), when that makes it fit by renaming and reshaping alone; None otherwise."""
    import sys

    convert = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if convert is None:
        return None
    try:
        converted = convert(dict(state), model)
    except Exception as e:  # a converter meeting a layout it does not know: the checkpoint just does not fit
        log.debug("timm's %s.checkpoint_filter_fn cannot convert %s: %s", type(model).__module__, checkpoint, e)
        return None
    resampled = [k for k, v in converted.items() if k in state and state[k].numel() != v.numel()]
    if resampled or fit_problems(model, converted):  # timm also resamples position and patch embeddings to the
        return None  # model's size; that is another model's numbers, which a deployment must not get silently
    log.info("%s: converted to %s's keys by timm's checkpoint_filter_fn", checkpoint, type(model).__name__)
    return converted


def _create(arch: str, kwargs: dict[str, Any], source: str) -> nn.Module:
    import timm

    if not timm.is_model(arch):
        raise RecipeError(f"{source}: model.arch '{arch}' is not a timm model name")
    try:
        return timm.create_model(arch, pretrained=False, **kwargs)
    except TypeError as e:  # an argument the model class does not take
        raise RecipeError(f"{source}: model.kwargs: {e} (timm.create_model('{arch}', ...) takes the model class's own "
                          "arguments, e.g. num_classes, img_size, in_chans, patch_size, embed_dim, depth, num_heads)") from None
    except (ValueError, RuntimeError, AssertionError, ZeroDivisionError) as e:  # arguments that do not go together
        first = str(e).splitlines()[0] if str(e) else ""
        raise RecipeError(f"{source}: model.kwargs {kwargs}: timm cannot build '{arch}' with them ({type(e).__name__}: "
                          f"{first[:200]}); e.g. embed_dim must divide by num_heads, img_size by patch_size") from None


def _with_data_config(model: nn.Module, spec: "ModelSpec", source: str) -> nn.Module:
    """``model`` with its timm data config following ``model.kwargs`` (img_size, in_chans) and ``model.data``, so
    that every reader of it (the transforms, the export's input shape) sees the model as it was built."""
    cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    size = cfg.get("input_size", (3, 224, 224))
    if "img_size" in spec.kwargs or "in_chans" in spec.kwargs:
        img = spec.kwargs.get("img_size", size[1:])
        size = (spec.kwargs.get("in_chans", size[0]), *((img, img) if isinstance(img, int) else img))
    cfg["input_size"] = tuple(size)
    cfg |= {k: v for k, v in dataclasses.asdict(spec.data).items() if v is not None}
    for key in ("mean", "std"):
        if key in cfg and len(cfg[key]) != cfg["input_size"][0]:
            raise RecipeError(f"{source}: model.data.{key}: {len(cfg[key])} value(s) for {cfg['input_size'][0]} input "
                              f"channel(s); set model.data.mean and model.data.std with one value per channel")
    model.pretrained_cfg = cfg
    return model


def create_model(arch: str, checkpoint: str | Path | None, kwargs: dict[str, Any] | None = None,
                 spec: "ModelSpec | None" = None, source: str = "recipe") -> nn.Module:
    """A timm model in eval mode with the checkpoint's weights loaded strictly (``spec``: its data config too)."""
    if checkpoint is None:
        raise CheckpointError(f"model {arch} needs weights: pass --checkpoint FILE or set model.checkpoint in the recipe")
    state = read_state_dict(Path(checkpoint))
    model = _create(arch, kwargs or {}, source)
    problems = fit_problems(model, state)
    if problems:
        state = _timm_converted(model, state, checkpoint) or state
        problems = fit_problems(model, state)
    if problems:
        hints = fit_hints(model, state)
        fix = f"; set model.kwargs {', '.join(hints)}" if hints else ""
        raise CheckpointError(f"{checkpoint}: tensors do not fit {arch}: {'; '.join(problems)}{fix}")
    model.load_state_dict(state, strict=True)
    log.debug("loaded %d tensors from %s into %s", len(state), checkpoint, arch)
    return (_with_data_config(model, spec, source) if spec is not None else model).eval()


def load_model(spec: "ModelSpec", source: str = "recipe") -> nn.Module:
    """The recipe's model: ``model.arch`` built with ``model.kwargs``, weights from ``model.checkpoint``."""
    return create_model(spec.arch, spec.checkpoint, spec.kwargs, spec, source)


def data_model(spec: "ModelSpec", source: str = "recipe") -> nn.Module:
    """An untrained model of the recipe's shape whose only use is its data config (input size, mean, std, crop);
    building it also checks ``model.kwargs`` and ``model.data``."""
    with torch.device("meta"):  # no memory, no init: the config is all we read
        return _with_data_config(_create(spec.arch, spec.kwargs, source), spec, source)
