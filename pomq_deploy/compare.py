"""Where a deployed model loses accuracy, block by block: the backend running the exported ONNX (the deployed
model) against the PyTorch fake-quant model of the same plan and the FP32 model, on the same images.

Each block's output is found in the ONNX by the exporter's scope names (pomq_deploy.verify.block_boundaries)
and marked as a graph output with Polygraphy's ``ModifyOutputs``; the backend runs that graph the way it runs
its artifacts (``run_onnx``: ORT's rewrites and session options on the CPU, an engine on TensorRT). Two views
of each block: *chained*, the whole deployed model run once (errors accumulate, as in deployment), and
*isolated*, the block alone fed the fake-quant model's input to it (its own error, nothing inherited). The
block that loses most is the one across which the deployed model's cosine to FP32 falls furthest.
"""

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .verify import block_boundaries, block_diffs, block_scopes, cosine, scope_output


@dataclass(frozen=True)
class TensorRow:
    """One compared tensor: a block's output, or (``--tensors``) a quantized activation."""

    name: str  # module path in the quantized model, e.g. "model.blocks.3" or "model.blocks.3.attn.qkv.in_quant"
    tensor: str  # the ONNX tensor
    node: str  # the ONNX node that writes it
    deployed_vs_fakequant: float  # cosine, chained
    max_abs: float  # max |deployed - fake-quant|, chained
    deployed_vs_fp32: float | None  # cosine, chained (block outputs only: a quantizer has no FP32 twin)
    fakequant_vs_fp32: float | None
    isolated: float | None = None  # cosine of the block alone vs fake-quant, given the fake-quant input


@dataclass(frozen=True)
class Comparison:
    backend: str
    images: int
    inputs: str  # "eval" or "noise"
    logits: dict[str, float]  # cosine and top-1 agreement of the final logits
    blocks: list[TensorRow]
    tensors: list[TensorRow]  # empty unless asked for
    skipped: list[str]  # quantized tensors not compared, with why

    def largest_loss(self) -> tuple[int, float, float]:
        """(block index, cosine to FP32 before it, after it): the block across which the deployed model's
        cosine to FP32 falls furthest (before the first block: 1)."""
        before = [1.0] + [b.deployed_vs_fp32 for b in self.blocks[:-1]]
        drops = [prev - b.deployed_vs_fp32 for prev, b in zip(before, self.blocks, strict=True)]
        i = int(np.argmax(drops))
        return i, before[i], self.blocks[i].deployed_vs_fp32

    def to_json(self) -> dict[str, Any]:
        i, before, after = self.largest_loss()
        return asdict(self) | {"largest_loss": {"block": i, "name": self.blocks[i].name, "cosine_before": before,
                                                "cosine_after": after}}


def _outputs(model: nn.Module, modules: list[nn.Module], images: torch.Tensor) -> tuple[np.ndarray, list[np.ndarray]]:
    """``model``'s logits and the outputs of ``modules`` (forward hooks) on ``images``. A Linear on integer codes
    reads its input quantizer's codes without calling it (``QuantWeighted._integer``); it is called here on
    the same input, so that its hook sees the values the graph's DequantizeLinear holds."""
    from .quant.modules import QuantWeighted

    seen: dict[int, np.ndarray] = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, i=i: seen.__setitem__(i, out.detach().cpu().numpy().copy()))
             for i, m in enumerate(modules)]

    def call_input_quantizer(mod, args) -> None:
        mod.in_quant(args[0])

    wanted = {id(m) for m in modules}
    hooks += [m.register_forward_pre_hook(call_input_quantizer)
              for m in model.modules() if isinstance(m, QuantWeighted) and id(m.in_quant) in wanted]
    try:
        with torch.inference_mode():
            logits = model(images).cpu().numpy()
    finally:
        for h in hooks:
            h.remove()
    return logits, [seen.get(i) for i in range(len(modules))]


def _row(name, tensor, node, deployed, fakequant, fp32=None, isolated=None) -> TensorRow:
    d = np.asarray(deployed, np.float64)
    return TensorRow(name, tensor, node, cosine(d, fakequant), float(np.abs(d - fakequant).max()),
                     None if fp32 is None else cosine(d, fp32), None if fp32 is None else cosine(fakequant, fp32), isolated)


def compare(run_onnx, onnx_model, qmodel, plan, act_format: str, images: torch.Tensor, backend: str, inputs: str,
            tensors: bool = False) -> Comparison:
    """Compare the deployed ``onnx_model`` (run by ``run_onnx(model, feeds) -> outputs``, a backend's) with
    ``qmodel`` (calibrated) under ``plan`` in ``act_format``, on its exact path, and with the FP32 model, on
    ``images``."""
    with qmodel.exact_path():
        return _compare(run_onnx, onnx_model, qmodel, plan, act_format, images, backend, inputs, tensors)


def _compare(run_onnx, onnx_model, qmodel, plan, act_format, images, backend, inputs, tensors) -> Comparison:
    from polygraphy.backend.onnx import ModifyOutputs

    from .quant.modules import ActQuant

    qmodel.apply(plan, act_format)
    blocks = list(qmodel.blocks)
    names = {id(m): n for n, m in qmodel.named_modules()}
    writer = {o: n.name for n in onnx_model.graph.node for o in n.output}
    block_out = [y for _, y in block_boundaries(onnx_model, block_scopes(qmodel, blocks))]
    quants, quant_out, skipped = [], [], []
    if tensors:
        for m in qmodel.modules():
            if isinstance(m, ActQuant) and m.active is not None:
                (scope,) = block_scopes(qmodel, [m])
                out = scope_output(onnx_model, scope)
                if out is None:
                    skipped.append(f"{names[id(m)]}: no node of it in the graph")
                else:
                    quants.append(m)
                    quant_out.append(out)
    qmodel.apply(None)
    _, fp32 = _outputs(qmodel, blocks, images)
    qmodel.apply(plan, act_format)
    fq_logits, fq = _outputs(qmodel, blocks + quants, images)
    logits_name = onnx_model.graph.output[0].name
    marked = ModifyOutputs(onnx_model, outputs=[logits_name, *dict.fromkeys(block_out + quant_out)], copy=True)()
    got = dict(zip([o.name for o in marked.graph.output], run_onnx(marked, {marked.graph.input[0].name: images.numpy()}), strict=True))
    isolated = block_diffs(run_onnx, onnx_model, qmodel, blocks, images)
    rows = [_row(names[id(b)], y, writer[y], got[y], fq[i], fp32[i], isolated[i].cosine) for i, (b, y) in enumerate(zip(blocks, block_out, strict=True))]
    quant_rows = []
    for j, (m, y) in enumerate(zip(quants, quant_out, strict=True)):
        ref, value = fq[len(blocks) + j], got[y]
        if not np.issubdtype(value.dtype, np.floating):
            skipped.append(f"{names[id(m)]}: the graph holds its {value.dtype} codes (dequantized where they are read)")
        elif ref is None or value.shape != ref.shape:
            skipped.append(f"{names[id(m)]}: the graph's {list(value.shape)} tensor has no PyTorch twin of that shape")
        else:
            quant_rows.append(_row(names[id(m)], y, writer[y], value, ref))
    deployed_logits = got[logits_name]
    logits = {"cosine": cosine(deployed_logits, fq_logits), "top1_agreement": float((deployed_logits.argmax(1) == fq_logits.argmax(1)).mean())}
    return Comparison(backend, len(images), inputs, logits, rows, quant_rows, skipped)
