"""pomq-deploy inspect: the recipe's model as the quantizer sees it."""

import argparse
import operator

from ._common import add_recipe_arguments

HELP = "show the model as the quantizer sees it: blocks, their layers' roles, what stays 8-bit, the data config"
DESCRIPTION = """\
Build the recipe's model (its timm architecture with model.kwargs; no weights are read) and wrap it as the
quantizer does, then list the encoder blocks found (module path, timm class, the adapter that handles it),
each block's layers with the role a plan gives them (qkv, proj, fc1, fc2 at the block's w and a widths;
the attention probabilities at attn), the layers outside the blocks that stay 8-bit, and the timm data
config in force (input size, mean, std, interpolation, crop). The first check that the tool understands a
model: a block family without an adapter fails here with one line. Then the per-block formats the --target's
engine runs (what `search --space engine` draws from) and what each runs as; `check --plan` says it for a
whole plan.

examples:
  pomq-deploy inspect
  pomq-deploy inspect --recipe my_vit.yaml --target tensorrt --json
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..targets import TARGETS

    add_recipe_arguments(p)
    p.add_argument("--target", choices=list(TARGETS), default="ort", help="whose per-block engine formats to list (default: ort)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _shape(m) -> str:
    inner = getattr(m, "layer", getattr(m, "module", m))  # the wrapped Linear / Conv2d / LayerNorm
    if hasattr(inner, "in_features"):
        return f"{type(inner).__name__} {inner.in_features} -> {inner.out_features}"
    if hasattr(inner, "in_channels"):
        return f"{type(inner).__name__} {inner.in_channels} -> {inner.out_channels}, kernel {tuple(inner.kernel_size)}"
    if hasattr(inner, "normalized_shape"):
        return f"{type(inner).__name__} {tuple(inner.normalized_shape)}"
    return "the attention probabilities, after Softmax"


WIDTHS = {"norm1": "a (its input)", "qkv": "w, a", "proj": "w, a", "attn_probs": "attn", "norm2": "a (its input)",
          "fc1": "w, a", "fc2": "w, a"}


def describe(model) -> dict:
    """``model`` wrapped as the quantizer wraps it: blocks, roles, the 8-bit remainder and the data config."""
    from timm.data import resolve_data_config

    from ..quant.adapters import adapter_for, class_path
    from ..quant.attention import INPUT_QUANTS
    from ..quant.model import QuantModel
    from ..quant.modules import QuantInput, QuantWeighted
    from ..quant.schemes import DEFAULT_SCHEME

    cfg = resolve_data_config({}, model=model)
    qm = QuantModel(model, DEFAULT_SCHEME)
    names = {id(m): n for n, m in model.named_modules()}
    blocks = []
    for i, block in enumerate(qm.blocks):
        adapter, paths = adapter_for(block), qm.block_layers[i]
        layers = [{"role": role, "path": path, "layer": _shape(operator.attrgetter(path)(block)), "widths": w}
                  for role, w in WIDTHS.items() for path in paths[role]]
        if adapter.rotary_qk:  # q, k, v quantized where they enter the attention's MatMuls (past the rotary embeddings)
            layers += [{"role": "attention input", "path": f"{paths['attention'][0]}.{name}",
                        "layer": f"{name[0]} where it enters its MatMul", "widths": "a"} for name in INPUT_QUANTS]
        blocks.append({"index": i, "path": names[id(block)], "class": class_path(block), "adapter": adapter.family,
                       "parameters": sum(p.numel() for p in block.parameters()), "layers": layers})
    inside = tuple(f"{b['path']}." for b in blocks)
    outside = [{"path": n, "layer": _shape(m)} for n, m in model.named_modules()
               if isinstance(m, (QuantWeighted, QuantInput)) and not n.startswith(inside)]
    total = sum(p.numel() for p in model.parameters())
    return {"blocks": blocks, "outside_8bit": outside,
            "parameters": {"total": total, "in_blocks": sum(b["parameters"] for b in blocks)},
            "data_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}}


def run(args: argparse.Namespace) -> int:
    import json

    from rich.table import Table

    from ..models.loading import data_model
    from ._common import recipe_from_args
    from ._console import stdout

    recipe = recipe_from_args(args)
    info = describe(data_model(recipe.model))
    info = {"recipe": recipe.name, "arch": recipe.model.arch, "kwargs": recipe.model.kwargs, **info,
            "engine_formats": engine_formats(args.target)}
    if args.json:
        print(json.dumps(info))
        return 0
    p = info["parameters"]
    kwargs = f" with {recipe.model.kwargs}" if recipe.model.kwargs else ""
    stdout.print(f"{recipe.name}: timm {recipe.model.arch}{kwargs}, {len(info['blocks'])} encoder blocks "
                 f"({p['in_blocks'] / 1e6:.2f} M of {p['total'] / 1e6:.2f} M parameters follow the plan)")
    table = Table(title="encoder blocks (one plan row each)")
    for col in ("block", "module", "class (adapter)", "parameters"):
        table.add_column(col)
    for b in info["blocks"]:
        table.add_row(str(b["index"]), b["path"], f"{b['class']} ({b['adapter']})", f"{b['parameters']:,}")
    stdout.print(table)
    roles = Table(title=f"roles in a block (block 0: {info['blocks'][0]['path']})")
    for col in ("role", "attribute", "layer", "plan widths"):
        roles.add_column(col)
    for la in info["blocks"][0]["layers"]:
        roles.add_row(la["role"], la["path"], la["layer"], la["widths"])
    stdout.print(roles)
    stdout.print("stays 8-bit: " + "; ".join(f"{o['path']} ({o['layer']})" for o in info["outside_8bit"]))
    cfg = info["data_config"]
    stdout.print(f"data config: input {tuple(cfg['input_size'])}, mean {tuple(cfg['mean'])}, std {tuple(cfg['std'])}, "
                 f"{cfg['interpolation']}, crop {cfg['crop_pct']}")
    formats = Table(title=f"per-block formats {args.target}'s engine runs (search --space engine)")
    for col in ("format", "w/a/attn", "qkv, proj, fc1, fc2", "probs @ v"):
        formats.add_column(col, overflow="fold")
    for f in info["engine_formats"]:
        formats.add_row(f["format"], f["genes"], f["gemm"], f["attention"])
    stdout.print(formats)
    return 0


def engine_formats(target_name: str) -> list[dict]:
    """Each (format, attention) of the target's engine space with what its engine runs (uniform attention
    quantizers; a scheme's log-domain attention runs as float ops, which `check --plan` says per plan)."""
    from ..targets import get_target

    target = get_target(target_name)
    return [{"format": f.name, "genes": "/".join(map(str, (f.w, f.a, t))), "gemm": target.gemm(f.w, f.a)[0],
             "attention": target.attention(f.a, t, log_domain=False)[0]} for f in target.formats for t in f.attn]
