"""timm models by name, with weights from a local file only (never a hub at run time)."""

import logging
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError, RecipeError
from . import reference  # noqa: F401  (registers deit_fmnist)

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
    except Exception as e:  # the readers raise many types for a corrupt file; all mean the same here
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
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
    out = []
    if shapes:
        out.append(f"{len(shapes)} shape mismatch(es), e.g. {shapes[0]}")
    if missing:
        out.append(f"{len(missing)} missing, e.g. {missing[0]}")
    if unexpected:
        out.append(f"{len(unexpected)} unexpected, e.g. {unexpected[0]}")
    return out


def create_model(arch: str, checkpoint: str | Path | None, **kwargs) -> nn.Module:
    """A timm model in eval mode with the checkpoint's weights loaded strictly."""
    import timm

    if not timm.is_model(arch):
        raise RecipeError(f"model.arch '{arch}' is not a timm model name")
    if checkpoint is None:
        raise CheckpointError(f"model {arch} needs weights: pass --checkpoint FILE or set model.checkpoint in the recipe")
    state = read_state_dict(Path(checkpoint))
    model = timm.create_model(arch, pretrained=False, **kwargs)
    problems = fit_problems(model, state)
    if problems:
        raise CheckpointError(f"{checkpoint}: tensors do not fit {arch}: {'; '.join(problems)}")
    model.load_state_dict(state, strict=True)
    log.debug("loaded %d tensors from %s into %s", len(state), checkpoint, arch)
    return model.eval()


def data_model(arch: str) -> nn.Module:
    """An untrained ``arch`` whose only use is its timm data config (input size, mean, std, crop)."""
    import timm

    if not timm.is_model(arch):
        raise RecipeError(f"model.arch '{arch}' is not a timm model name")
    with torch.device("meta"):  # no memory, no init: the config is all we read
        return timm.create_model(arch, pretrained=False)
