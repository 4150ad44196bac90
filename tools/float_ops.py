"""Which float op of a plan moves quantized codes, and whose kernel does: GELU, LayerNorm and Softmax.

Every GEMM of a plan runs on integer codes in the reference and in ONNX Runtime, so what can still part them
is the float32 arithmetic between the GEMMs. This runs the reference model on seeded noise images (which
drive activations to the ends of their ranges), takes the input of every GELU, block LayerNorm and Softmax,
computes the op three ways (PyTorch's float32 kernel, ONNX Runtime's float32 kernel as a one-node model, and
float64, the exact value to within rounding) and counts the codes that the quantizer reading the op's output
writes differently. A flipped code is where the reference and the deployed model start to differ. It first
prints how far each float32 GELU kernel is from the correctly rounded value, in ulp.

    python tools/float_ops.py                       # fqvit, the paper's plan, 500 noise images
    python tools/float_ops.py --scheme tsptq --uniform 8/8/8
"""

import argparse
import operator
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from timm.data import resolve_data_config
from torch.overrides import TorchFunctionMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pomq_deploy.backends.cpu import detect
from pomq_deploy.plan import load_plan, paper_plan, uniform_plan
from pomq_deploy.quant.calibration import calibrated_model
from pomq_deploy.quant.modules import PreciseGELU
from pomq_deploy.recipe import load_recipe
from pomq_deploy.verify import noise_images


class SoftmaxInputs(TorchFunctionMode):
    """Records the input of every Softmax the forward computes, in order."""

    def __init__(self):
        super().__init__()
        self.inputs: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.softmax, torch.softmax, F.softmax):
            self.inputs.append(args[0].detach().clone())
        return func(*args, **(kwargs or {}))


def ort_op(op: str, x: np.ndarray, inits: dict[str, np.ndarray] | None = None, opset: int = 20, **attrs) -> np.ndarray:
    """``op`` on ``x`` by ONNX Runtime's CPU kernel (a one-node model)."""
    inits = inits or {}
    graph = helper.make_graph([helper.make_node(op, ["x", *inits], ["y"], **attrs)], op,
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def flips(quant, outputs: dict[str, torch.Tensor]) -> dict[str, int]:
    """How many values ``quant`` writes differently from PyTorch's and ONNX Runtime's outputs, and from the exact one."""
    q = {k: quant(v.float()) for k, v in outputs.items()}
    return {"ORT vs exact": int((q["ort"] != q["exact"]).sum()), "PyTorch vs exact": int((q["torch"] != q["exact"]).sum()),
            "ORT vs PyTorch": int((q["ort"] != q["torch"]).sum())}


def gelu_ulp_errors(n: int = 4_000_001) -> dict[str, tuple[float, float]]:
    """Mean and max error, in ulp of the correctly rounded GELU, of PyTorch's and ONNX Runtime's float32 GELU on
    ``n`` evenly spaced inputs in [-6, 6], where |GELU(x)| > 1e-3 (below that both kernels lose digits to the
    cancellation in ``1 + erf(x / sqrt 2)``, and an ulp means little)."""
    x = torch.linspace(-6, 6, n)
    exact = F.gelu(x.double())
    rounded = exact.float()
    ulp = torch.from_numpy(np.spacing(np.abs(rounded.numpy()))).double()
    keep = exact.abs() > 1e-3
    out = {}
    for name, y in (("PyTorch", F.gelu(x)), ("ONNX Runtime", torch.from_numpy(ort_op("Gelu", x.numpy())))):
        err = ((y.double() - exact).abs() / ulp)[keep]
        out[name] = (float(err.mean()), float(err.max()))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="deit_fmnist")
    p.add_argument("--scheme", default="fqvit")
    plans = p.add_mutually_exclusive_group()
    plans.add_argument("--plan", type=Path, help="a plan YAML (default: the paper's plan)")
    plans.add_argument("--uniform", metavar="W/A/ATTN")
    p.add_argument("--images", type=int, default=500, help="seeded noise images (default 500, seed 1 as tools/accuracy_table.py)")
    args = p.parse_args()
    recipe = load_recipe(args.recipe)
    model, _ = calibrated_model(recipe, args.scheme)
    if args.plan:
        plan = load_plan(args.plan)
    elif args.uniform:
        plan = uniform_plan(args.uniform, model.num_blocks, recipe.name, args.scheme)
    else:
        plan = paper_plan(model.num_blocks, recipe.name, args.scheme)
    model.apply(plan)
    cfg = resolve_data_config({}, model=model)
    images = noise_images(args.images, tuple(cfg["input_size"]), cfg["mean"], cfg["std"], seed=1)

    seen: dict[str, torch.Tensor] = {}
    approximate: dict[int, str] = {}  # block -> its GELU's form
    layers = lambda i, role: operator.attrgetter(model.block_layers[i][role][0])(model.blocks[i])  # noqa: E731
    for i, block in enumerate(model.blocks):
        for m in block.modules():
            if isinstance(m, PreciseGELU):
                m.register_forward_pre_hook(lambda _, a, i=i: seen.__setitem__(f"gelu{i}", a[0].detach().clone()))
                approximate[i] = m.approximate
        for role in ("norm1", "norm2"):
            layers(i, role).module.register_forward_pre_hook(lambda _, a, k=f"{role}.{i}": seen.__setitem__(k, a[0].detach().clone()))
    with torch.inference_mode(), SoftmaxInputs() as softmax, model.exact_path():  # the ops' inputs in the exact reference
        model(images)

    print(f"CPU: {detect().describe()}; onnxruntime {ort.__version__}, torch {torch.__version__}")
    for name, (mean, worst) in gelu_ulp_errors().items():
        print(f"{name} float32 GELU: {mean:.1f} ulp on average, {worst:.0f} at most, from the correctly rounded value "
              "(4,000,001 inputs in [-6, 6], |GELU| > 1e-3)")
    print(f"\n{args.scheme} plan {plan.plan_id}, {args.images} noise images: values the quantizer after each op writes differently\n")
    print("| block | bits a/attn | op | values | ORT vs exact | PyTorch float32 vs exact | ORT vs PyTorch float32 |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    totals: dict[str, dict[str, int]] = {}
    for i in range(model.num_blocks):
        bits = plan.blocks[i]
        rows = []
        if f"gelu{i}" in seen:
            x = seen[f"gelu{i}"]
            form = approximate[i]
            y_ort = ort_op("Gelu", x.numpy(), approximate=form)
            rows.append(("GELU", layers(i, "fc2").in_quant.active, {"torch": F.gelu(x, approximate=form), "ort": torch.from_numpy(y_ort),
                                                                     "exact": F.gelu(x.double(), approximate=form)}))
        for role, reader in (("norm1", "qkv"), ("norm2", "fc1")):
            x, ln = seen[f"{role}.{i}"], layers(i, role).module
            w, b = ln.weight.detach(), ln.bias.detach()
            y_ort = ort_op("LayerNormalization", x.numpy(), {"w": w.numpy(), "b": b.numpy()}, opset=17, axis=-1, epsilon=ln.eps)
            rows.append((f"LayerNorm ({role})", layers(i, reader).in_quant.active,
                         {"torch": F.layer_norm(x, ln.normalized_shape, w, b, ln.eps), "ort": torch.from_numpy(y_ort),
                          "exact": F.layer_norm(x.double(), ln.normalized_shape, w.double(), b.double(), ln.eps)}))
        if i < len(softmax.inputs):
            x = softmax.inputs[i]
            rows.append(("Softmax", layers(i, "attn_probs").active, {"torch": x.softmax(-1), "ort": torch.from_numpy(ort_op("Softmax", x.numpy(), axis=-1)),
                                                                      "exact": x.double().softmax(-1)}))
        for op, quant, outs in rows:
            counts = flips(quant, outs)
            kind = totals.setdefault(op.split(" ")[0], dict.fromkeys(counts, 0))
            for k, v in counts.items():
                kind[k] += v
            print(f"| {i} | {bits.a}/{bits.attn} | {op} | {outs['torch'].numel():,} | " + " | ".join(f"{v:,}" for v in counts.values()) + " |")
    for op, counts in totals.items():
        print(f"| all | | {op} | | " + " | ".join(f"**{v:,}**" for v in counts.values()) + " |")


if __name__ == "__main__":
    main()
