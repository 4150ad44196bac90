"""Which timm block families the quantizer handles, measured: for each, a small random-weight model is wrapped,
calibrated on random images, exported for both targets, checked against TensorRT's rules and run by ONNX
Runtime against the fake-quant model (8/8/8 and 4/4/4, fqvit).

    python tools/family_table.py            # writes docs/models.md (a few seconds per family)
"""

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import timm
import torch
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pomq_deploy.atomic import write_generated
from pomq_deploy.backends.cpu import detect
from pomq_deploy.backends.ort_cpu import OrtCpuBackend
from pomq_deploy.export import export_quantized
from pomq_deploy.export.graph import matmuls_on_codes
from pomq_deploy.export.trt_rules import check_tensorrt
from pomq_deploy.plan import uniform_plan
from pomq_deploy.progress import Phases
from pomq_deploy.quant.adapters import ModelError, adapter_for
from pomq_deploy.quant.model import QuantModel
from pomq_deploy.verify import agreement

SMALL = dict(num_classes=10, embed_dim=64, depth=2, num_heads=2)
FAMILIES = {  # label -> (timm name, its own keyword arguments at 32 px)
    "ViT": ("vit_small_patch16_224", dict(img_size=32, patch_size=8)),
    "DeiT-3": ("deit3_small_patch16_224", dict(img_size=32, patch_size=8)),
    "Swin": ("swin_tiny_patch4_window7_224", dict(img_size=32, patch_size=4, window_size=4, depths=(2, 2), num_heads=(2, 4))),
    "BEiT": ("beit_base_patch16_224", dict(img_size=32, patch_size=8)),
    "EVA-02": ("eva02_tiny_patch14_224", dict(img_size=32, patch_size=8, embed_dim=128, mlp_ratio=2.0)),  # fused qkv, GluMlp
    "EVA-02 base": ("eva02_base_patch14_224", dict(img_size=32, patch_size=8, embed_dim=128, mlp_ratio=2.0)),  # q/k/v, SwiGLU
    "CaiT": ("cait_xxs24_224", dict(img_size=32, patch_size=8)),
}


def model_of(arch: str, kwargs: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    extra = {k: v for k, v in SMALL.items() if not (arch.startswith("swin") and k in ("depth", "num_heads"))}
    model = timm.create_model(arch, pretrained=False, **{**extra, **kwargs}).eval()
    for name, p in model.named_parameters():  # as if trained: zero heads, 1e-6 LayerScales and ~0 tokens randomised
        if name.startswith("head") and name.endswith("weight") or name.endswith(".gamma") or name in ("cls_token", "pos_embed"):
            torch.nn.init.normal_(p, mean=0.5 if name.endswith(".gamma") else 0.0, std=0.1)
    return model


def row(label: str, arch: str, kwargs: dict, work: Path) -> str:
    model = model_of(arch, kwargs)
    try:
        qm = QuantModel(model, "fqvit")
    except ModelError as e:
        return f"| {label} | `{arch}` | no adapter | - | - | - | - | {e} |"
    g = torch.Generator().manual_seed(1)
    size = tuple(kwargs.get("img_size", 32) for _ in range(2))
    qm.calibrate([torch.randn(8, 3, *size, generator=g) for _ in range(3)])
    x = torch.randn(64, 3, *size, generator=g)
    backend = OrtCpuBackend()
    cells = []
    for text in ("8/8/8", "4/4/4"):
        plan = uniform_plan(text, qm.num_blocks, "t", "fqvit")
        trt = export_quantized(qm, plan, "tensorrt", work / f"{label}_t.onnx").path
        errors = sum(f.severity == "error" for f in check_tensorrt(trt))
        if text == "8/8/8":
            on_codes = matmuls_on_codes(onnx.load(trt))
        info = export_quantized(qm, plan, "ort", work / f"{label}.onnx")
        with torch.no_grad(), qm.exact_path():
            ref = qm(x).numpy()
        a = agreement(ref, backend.run(backend.build(info.path, work), x.numpy()))
        cells.append(f"{a.top1:.3f} / {a.cosine:.5f} (TensorRT rule errors: {errors})")
    family = adapter_for(qm.blocks[0]).family
    return f"| {label} | `{arch}` | {family} | {qm.num_blocks} | {on_codes[0]} of {on_codes[1]} | {cells[0]} | {cells[1]} | |"



HEAD = """# Model families

Which timm encoder-block families the quantizer handles (block adapters, `pomq_deploy/quant/adapters.py`),
measured on small random-weight models (2 blocks, 32 px, calibrated on random images): both export targets,
TensorRT's rules (`pomq-deploy check`) and ONNX Runtime against the PyTorch fake-quant model on 64 random
images. A family or variant without an adapter stops with the one line shown. "MatMuls on Q/DQ inputs" counts
the exported (TensorRT-target) MatMuls both of whose inputs are dequantized codes: every Linear layer and both
attention MatMuls. EVA-02's rotary embeddings sit between its q/k projections and `q @ k^T`, so its q, k and v are
quantized where they enter the attention's MatMuls rather than at the projections' outputs. EVA-02 base / large
have separate q/k/v projections and a SwiGLU MLP (`fc1_g`, `fc1_x`, a LayerNorm, `fc2`): the Linears of one role
share one input quantizer. At 4/4/4 the attention probabilities are log2-quantized (FQ-ViT's LIS), so `probs @ v`
runs in float there. A real checkpoint's accuracy depends on its weights: `pomq-deploy inspect --recipe R` shows
what the quantizer found in it. Regenerate with:

```bash
.venv/bin/python tools/family_table.py
```
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "models.md")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pomq-families-"))
    lines = [HEAD, f"CPU: {detect().describe()}; numpy {np.__version__}, timm {timm.__version__}", "",
             "| family | timm model (small, random weights) | adapter | blocks | MatMuls on Q/DQ inputs (8/8/8) | "
             "8/8/8 ORT agree / cosine | 4/4/4 ORT agree / cosine | note |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    phases = Phases(Console(stderr=True), quiet=not sys.stderr.isatty())  # a bar on a terminal; the log has the rows
    for label, (arch, kwargs) in phases.track(FAMILIES.items(), len(FAMILIES), "block families: wrap, calibrate, export, run"):
        lines.append(row(label, arch, kwargs, work))
        print(lines[-1], file=sys.stderr, flush=True)
    write_generated(args.out, "\n".join(lines) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
