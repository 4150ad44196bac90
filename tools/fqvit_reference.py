"""FQ-ViT's own code against our ``fqvit`` scheme, on the same checkpoint and the same calibration batches.

FQ-ViT (Lin et al., 2021; github.com/megvii-research/FQ-ViT) is the base of both papers. This tool imports its
``models`` package from a checkout you name (nothing of it is copied into this repository), builds its
VisionTransformer with the recipe's dimensions, loads the recipe's checkpoint (or an outlier twin, from
tools/outlier_twin.py) strictly, calibrates it as its ``test_quant.py`` does (PTF, 8-bit, min/max: ``--quant --ptf``)
on *our* calibration batches, and prints its top-1 beside ours (``fqvit`` 8/8/8, nearest rounding) on the first
``--limit`` test images, and how far their fitted 8-bit quantizers' scales and zero points are from ours on the
same tensors. ``--ablate`` also runs theirs with one of its departures from ours switched off at a time
(the tensors it quantizes that we leave in float, its integer LayerNorm, its weight grid, its quantized residual
stream), and with all four as ours, to find what a difference comes from.

    git clone https://github.com/megvii-research/FQ-ViT /tmp/fqvit
    python tools/fqvit_reference.py --fqvit-src /tmp/fqvit
    python tools/fqvit_reference.py --fqvit-src /tmp/fqvit --checkpoint /tmp/twin.safetensors --ablate
"""

import argparse
import dataclasses
import json
import os
import sys
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

# Their quantizers on tensors we keep in float (the patch embedding's output and the position embedding, q @ k^T,
# the outputs of proj and fc2 before the residual adds, the head's output): those QAct modules' paths in their ViT.
FLOAT_IN_OURS = {
    "patch embedding and position embedding": ["qact_embed", "qact_pos", "patch_embed.qact"],
    "attention logits (q @ k^T)": ["blocks.*.attn.qact_attn1"], "proj and fc2 outputs": ["blocks.*.attn.qact3", "blocks.*.mlp.qact2"],
    "head output": ["act_out"],
}


def their_model(src: Path, cfg_kwargs: dict, dims: dict, state: dict) -> torch.nn.Module:
    if str(src) not in sys.path:
        sys.path.insert(0, str(src))
    from config import Config
    from models.ptq import QIntLayerNorm
    from models.vit_quant import VisionTransformer

    model = VisionTransformer(**dims, qkv_bias=True, norm_layer=partial(QIntLayerNorm, eps=1e-6), input_quant=True,
                              cfg=Config(**cfg_kwargs))
    model.load_state_dict(state, strict=True)
    return model.eval()


def _disable(model: torch.nn.Module, patterns: list[str]) -> None:
    """Switch the QAct modules at ``patterns`` (``*``: every block) to pass through."""
    names = dict(model.named_modules())
    for pattern in patterns:
        head, _, tail = pattern.partition("*")
        for name, m in names.items():
            if name == pattern or (tail and name.startswith(head) and name.endswith(tail.lstrip("."))
                                   and name[len(head):].split(".")[0].isdigit()):
                m.forward = lambda x, *a, **k: x


def their_quantizer(model, ours_name: str, depth: int):
    """Their quantizer of the activation our quantizer ``ours_name`` quantizes (the same tensor, by position)."""
    parts = ours_name.split(".")
    if ours_name == "patch_embed.proj.in_quant":
        return model.qact_input.quantizer
    if ours_name == "norm.quant":
        return model.blocks[depth - 1].qact4.quantizer
    if ours_name == "head.in_quant":
        return model.qact2.quantizer
    i = int(parts[1])
    block = model.blocks[i]
    return {"norm1.quant": (model.qact1 if i == 0 else model.blocks[i - 1].qact4).quantizer,
            "attn.qkv.in_quant": block.qact1.quantizer, "attn.qkv.out_quant": block.attn.qact1.quantizer,
            "attn.attn_drop": block.attn.log_int_softmax.quantizer, "attn.proj.in_quant": block.attn.qact2.quantizer,
            "norm2.quant": block.qact2.quantizer, "mlp.fc1.in_quant": block.qact3.quantizer,
            "mlp.fc2.in_quant": block.mlp.qact1.quantizer}[".".join(parts[2:])]


def compare_parameters(theirs, ours, depth: int) -> dict[str, dict]:
    """Per role: the largest relative difference of the per-channel scales (PTF's shifts applied) and of the zero
    points between their fitted 8-bit quantizers and ours, and how many PTF channel factors differ."""
    out: dict[str, dict] = {}
    for name, aq in ours.act_quants.items():
        q, t = aq.fitted["asym8"], their_quantizer(theirs, name, depth)
        mine = torch.full_like(t.scale.reshape(-1).double(), q.scale) * (1 if q.shift is None else 2.0 ** q.shift.double())
        rel = ((mine - t.scale.reshape(-1).double()).abs() / t.scale.reshape(-1).double()).max().item()
        r = out.setdefault(aq.role, {"quantizers": 0, "max scale rel diff": 0.0, "max zero point diff": 0, "PTF factors differing": 0})
        r["quantizers"] += 1
        r["max scale rel diff"] = max(r["max scale rel diff"], rel)
        r["max zero point diff"] = max(r["max zero point diff"], int((t.zero_point.reshape(-1).double() - q.zero_point).abs().max()))
        if q.shift is not None:
            base = t.scale.reshape(-1).double().min()
            r["PTF factors differing"] += int((torch.round(torch.log2(t.scale.reshape(-1).double() / base)) != q.shift - q.shift.min()).sum())
    return out


def _float_residual_stream(model):
    """Their ViT's forward with the residual stream in float: each PTF quantizer applied only where the stream
    enters a LayerNorm (ours), not to the stream itself (theirs replaces the stream by its quantized value). Only with
    their LayerNorm in float (it takes no quantizer here)."""
    def forward_features(x):
        x = model.patch_embed(model.qact_input(x))
        x = model.qact_embed(torch.cat((model.cls_token.expand(x.shape[0], -1, -1), x), dim=1))
        x = x + model.qact_pos(model.pos_embed)
        enters_norm = model.qact1
        for blk in model.blocks:
            x = x + blk.attn(blk.qact1(blk.norm1(enters_norm(x))))
            x = x + blk.mlp(blk.qact3(blk.norm2(blk.qact2(x))))
            enters_norm = blk.qact4
        return model.qact2(model.norm(enters_norm(x))[:, 0])

    model.forward_features = forward_features


@torch.no_grad()
def calibrate_theirs(model, batches, int_norm: bool = True, our_grid: bool = False) -> None:
    """test_quant.py's protocol: observers on every batch, quantization parameters fitted on the last. ``int_norm``
    False: their LayerNorm in float (as ours) on its PTF-quantized input; ``our_grid``: weights at ``max|w| / 127``
    per output channel (ours, and TensorRT's symmetric [-127, 127]) where theirs divides by 255 / 2 and clamps to
    [-128, 127]."""
    model.model_open_calibrate()
    for i, images in enumerate(batches):
        if i == len(batches) - 1:
            model.model_open_last_calibrate()
        model(images)
    model.model_close_calibrate()
    model.model_quant()
    for m in model.modules():
        if not int_norm and getattr(m, "mode", None) == "int":
            m.mode = "ln"
        if our_grid and hasattr(m, "quantizer") and m.module_type in ("linear_weight", "conv_weight"):
            m.quantizer.scale = m.quantizer.scale * (127.5 / 127)


@torch.no_grad()
def predictions(model, loader) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 predictions and labels over the loader."""
    preds, labels = zip(*[(model(images).argmax(-1), y) for images, y in loader], strict=True)
    return torch.cat(preds), torch.cat(labels)


def main() -> int:
    from pomq_deploy.backends.cpu import detect
    from pomq_deploy.data import calibration_batches, eval_dataset, eval_loader
    from pomq_deploy.evaluate import evaluate
    from pomq_deploy.models.loading import read_state_dict
    from pomq_deploy.models.reference import REFERENCE_CONFIG
    from pomq_deploy.plan import uniform_plan
    from pomq_deploy.quant.calibration import calibrated_model
    from pomq_deploy.recipe import load_recipe

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fqvit-src", type=Path, required=True, help="a checkout of megvii-research/FQ-ViT")
    p.add_argument("--recipe", default="deit_fmnist", help="the model and data (default the reference; a deit_fmnist-shaped ViT)")
    p.add_argument("--checkpoint", type=Path, help="another checkpoint of the recipe's model (an outlier twin)")
    p.add_argument("--calib-seed", type=int, nargs="+", help="calibration samples to draw (default the recipe's data.seed)")
    p.add_argument("--limit", type=int, default=1000, help="first N test images (default 1000)")
    p.add_argument("--ablate", action="store_true", help="also theirs with each departure from ours switched off")
    args = p.parse_args()
    if not (args.fqvit_src / "models" / "vit_quant.py").is_file():
        print(f"--fqvit-src {args.fqvit_src}: no models/vit_quant.py there (a checkout of megvii-research/FQ-ViT)")
        return 2
    torch.set_num_threads(os.cpu_count() or 1)
    recipe = load_recipe(args.recipe)
    if recipe.model.arch != "deit_fmnist":
        print(f"--recipe {args.recipe}: this tool builds FQ-ViT's ViT with deit_fmnist's dimensions only")
        return 2
    if args.checkpoint:
        recipe = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, checkpoint=str(args.checkpoint.resolve())))
    state = read_state_dict(Path(recipe.model.checkpoint))
    dims = {k: REFERENCE_CONFIG[k] for k in ("img_size", "patch_size", "in_chans", "num_classes", "embed_dim", "depth",
                                             "num_heads", "mlp_ratio")}
    fp32 = their_model(args.fqvit_src, dict(ptf=True, lis=False, quant_method="minmax"), dims, state)
    rows = []
    for seed in args.calib_seed or [recipe.data.seed]:
        r = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, seed=seed))
        ours, _ = calibrated_model(r, "fqvit")
        batches = calibration_batches(r.data, ours)
        loader = eval_loader(eval_dataset(r.data, ours), 100, args.limit)
        pred, labels = predictions(fp32, loader)
        row = {"calib seed": seed, "FP32 (theirs)": (pred == labels).float().mean().item()}
        ours.apply(None)
        row["FP32 (ours)"] = evaluate(ours, loader).top1
        ours.apply(uniform_plan("8/8/8", ours.num_blocks, r.name, "fqvit"))
        mine, _ = predictions(ours, loader)
        row["ours fqvit 8/8/8"] = (mine == labels).float().mean().item()
        variants = {"FQ-ViT code (PTF, 8-bit, min/max)": {}}
        if args.ablate:
            every = sum(FLOAT_IN_OURS.values(), [])
            variants |= {"theirs, every tensor we keep in float in float": {"float": every},
                         "theirs, float LayerNorm on the PTF input (ours)": {"int_norm": False},
                         "theirs, weights on our grid (max / 127)": {"grid": True},
                         "theirs, residual stream in float, quantized where it enters a LayerNorm (ours)":
                             {"int_norm": False, "residual": True},
                         "theirs, all four as ours": {"float": every, "int_norm": False, "grid": True, "residual": True}}
        for name, v in variants.items():
            model = their_model(args.fqvit_src, dict(ptf=True, lis=False, quant_method="minmax"), dims, state)
            calibrate_theirs(model, batches, v.get("int_norm", True), v.get("grid", False))
            _disable(model, v.get("float", []))
            if v.get("residual"):
                _float_residual_stream(model)
            pred, _ = predictions(model, loader)
            row[name] = (pred == labels).float().mean().item()
            row[f"{name}: top-1 agreement with ours"] = (pred == mine).float().mean().item()
            if not v:
                for role, diff in compare_parameters(model, ours, dims["depth"]).items():
                    print(f"calibration seed {seed}, {role}: {json.dumps(diff)}")
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{args.checkpoint or recipe.model.checkpoint}, first {args.limit} test images; CPU {detect().model}\n")
    for key in rows[0]:
        if key != "calib seed":
            print(f"| {key} | " + " | ".join(f"{r[key]:.4f}" for r in rows) + " |")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
