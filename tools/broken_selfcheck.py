"""Does the build's self-check still refuse a broken artifact where the logits are near-tied?

Builds ``--uniform 8/8/8`` (fqvit, ort-cpu) of a timm model with random weights (as ``tools/bench_sizes.py``
makes it: timm's init, seed 0, an image folder of random JPEGs) or of a recipe, runs the self-check on the
correct artifact, then on copies of its ONNX file broken in one place or everywhere, the way an exporter or a backend
could get one tensor wrong, each built and checked as ``build`` does (``measure.self_check``):

- ``zero-points``: every activation's zero point 128 off in its DequantizeLinear (int8 codes read as uint8);
- ``zero-point``: the same in one place, the input of the middle block's ``fc1``;
- ``scale``: that ``fc1``'s weight scales doubled;
- ``channel``: one output channel of that ``fc1``'s weight codes negated;

and the arithmetic the check was made for: ``saturating``, the plan computed with u8 x s8 pairs saturating
int16 as ONNX Runtime's kernel does on a CPU without VNNI (pomq_deploy.backends.saturation, on the reference's
own codes and the self-check's images: the ort-cpu backend never builds that artifact, so it is emulated).

Prints one row per artifact: passed or refused, and the check's own line (top-1 on the judged images, cosine,
the block it blames). Random weights give near-tied logits: top-1 is judged on few images, the cosine carries
the rest (pomq_deploy.verify).

    python tools/broken_selfcheck.py                                   # ViT-B/16 at 224 px, random weights
    python tools/broken_selfcheck.py --recipe deit_fmnist              # the reference model
    python tools/broken_selfcheck.py --breaks saturating scale
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_sizes import image_folder, recipe

from pomq_deploy.backends.cpu import detect
from pomq_deploy.backends.ort_cpu import OrtCpuBackend
from pomq_deploy.backends.saturation import saturating
from pomq_deploy.errors import VerifyError
from pomq_deploy.measure import measure, self_check_images
from pomq_deploy.plan import uniform_plan
from pomq_deploy.quant.calibration import calibrated_model
from pomq_deploy.recipe import load_recipe
from pomq_deploy.verify import reference_pair, verify


def _value(model: onnx.ModelProto, name: str) -> np.ndarray:
    """The constant ``name``: an initializer or a Constant node's output."""
    for t in model.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            return numpy_helper.to_array(next(a.t for a in node.attribute if a.name == "value"))
    raise KeyError(name)


def _replace(model: onnx.ModelProto, node: onnx.NodeProto, i: int, value: np.ndarray) -> None:
    """``node``'s input ``i`` replaced by a new initializer holding ``value`` in the old one's dtype: only this
    node reads it (the QuantizeLinear beside it keeps the original)."""
    name = f"{node.name}/broken_input_{i}"
    model.graph.initializer.append(numpy_helper.from_array(value.astype(_value(model, node.input[i]).dtype), name))
    node.input[i] = name


def _dq(model: onnx.ModelProto, block: int, weight: bool, layer: str = "") -> onnx.NodeProto:
    """The first DequantizeLinear of a weight (its codes an initializer) or of an activation in block ``block``."""
    inits = {t.name for t in model.graph.initializer}
    for node in model.graph.node:
        if (node.op_type == "DequantizeLinear" and f"/blocks.{block}/" in node.name and layer in node.name
                and (node.input[0] in inits) == weight and (weight or len(node.input) > 2)):
            return node
    raise SystemExit(f"no {'weight' if weight else 'activation'} DequantizeLinear {layer} in blocks.{block} of the graph")


def break_zero_point(model: onnx.ModelProto, block: int) -> str:
    node = _dq(model, block, weight=False, layer="/fc1/")
    _replace(model, node, 2, _off_by_128(_value(model, node.input[2])))
    return f"zero point of {node.name} 128 off"


def break_zero_points(model: onnx.ModelProto, block: int) -> str:
    inits = {t.name for t in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] not in inits and len(n.input) > 2]
    for node in nodes:
        _replace(model, node, 2, _off_by_128(_value(model, node.input[2])))
    return f"the zero points of all {len(nodes)} activation DequantizeLinear 128 off"


def _off_by_128(z: np.ndarray) -> np.ndarray:
    return (z.astype(np.int32) + 128) % 256 - (128 if z.dtype == np.int8 else 0)


def break_scale(model: onnx.ModelProto, block: int) -> str:
    node = _dq(model, block, weight=True, layer="/fc1/")
    _replace(model, node, 1, _value(model, node.input[1]) * 2)
    return f"weight scales of {node.name} doubled"


def break_channel(model: onnx.ModelProto, block: int) -> str:
    node = _dq(model, block, weight=True, layer="/fc1/")
    codes = _value(model, node.input[0]).astype(np.int32)
    axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
    index = [slice(None)] * codes.ndim
    index[axis] = 0
    codes[tuple(index)] = -np.clip(codes[tuple(index)], -127, 127)
    _replace(model, node, 0, codes)
    return f"output channel 0 of {node.name}'s codes negated"


BREAKS = {"zero-points": break_zero_points, "zero-point": break_zero_point, "scale": break_scale, "channel": break_channel}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="vit_base_patch16_224", help="timm model given random weights (default ViT-B/16)")
    p.add_argument("--recipe", help="a recipe instead of --arch (its own weights and data)")
    p.add_argument("--breaks", nargs="+", choices=[*BREAKS, "saturating"], default=[*BREAKS, "saturating"],
                   help="which broken artifacts to check (default all)")
    p.add_argument("--work", type=Path, help="folder for the checkpoint, images and builds (default: a new temporary one)")
    args = p.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="pomq-broken-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.recipe:
        r = load_recipe(args.recipe)
    else:
        data = image_folder(work / "images", classes=8, per_class=8)
        r = load_recipe(str(recipe(work, args.arch, data, argparse.Namespace(calib_images=64, eval_images=64, builds=13,
                                                                             fit_iterations=1))[0]))
    print(f"CPU: {detect().describe()}, {os.cpu_count()} CPUs; {r.model.arch}, fqvit 8/8/8, ort-cpu; work in {work}\n")
    qm, _ = calibrated_model(r, "fqvit")
    plan = uniform_plan("8/8/8", qm.num_blocks, r.name, "fqvit")
    backend = OrtCpuBackend()
    built = measure(backend, work / "correct", model=qm, plan=plan, target="ort", verify_recipe=r)  # raises if refused
    print("| artifact | self-check | calibration images | noise images | block it blames |\n| --- | --- | --- | --- | --- |")
    print(row("correct", built.verify), flush=True)
    block = qm.num_blocks // 2
    refused = 0
    for name, breaker in BREAKS.items():
        if name not in args.breaks:
            continue
        model = onnx.load(str(built.onnx_path))
        what = breaker(model, block)
        (work / name).mkdir(exist_ok=True)
        path = work / name / "model.onnx"
        onnx.save(model, str(path))
        try:
            check = measure(backend, work / name, model=qm, onnx_path=path, verify_recipe=r).verify
        except VerifyError as e:
            refused += 1
            check = e.check
        print(row(f"{name}: {what}", check), flush=True)
    if "saturating" not in args.breaks:
        return 0 if refused == len(args.breaks) else 1
    calib, noise = self_check_images(r, qm)

    def saturating_run(x: np.ndarray) -> np.ndarray:
        with saturating(qm), torch.inference_mode():
            return qm(torch.from_numpy(x)).numpy()

    check = verify(saturating_run, *reference_pair(qm), calib, noise)
    refused += not check.passed
    print(row("saturating: every 8-bit GEMM's u8 x s8 pairs saturating int16", check.to_json()), flush=True)
    return 0 if refused == len(args.breaks) else 1


def row(label: str, check: dict) -> str:
    cells = [f"top-1 {a['top1']:.4f} on {a['judged']} judged of {a['images']}, cosine {a['cosine']:.5f}"
             for a in (check["calibration"], check["noise"])]
    worst = check.get("worst_block")
    blamed = f"block {worst['block']} (output cosine {worst['cosine']:.5f})" if worst else ""
    return f"| {label} | {'passed' if check['passed'] else '**refused**'} | {cells[0]} | {cells[1]} | {blamed} |"


if __name__ == "__main__":
    sys.exit(main())
