"""Export the fake-quant model under a plan to ONNX with QuantizeLinear/DequantizeLinear nodes.

The quantized model is traced in ``onnx_mode``: every quantizer forwards through the PyTorch ops that the
exporter writes as Q/DQ (or, for LIS, as log-domain float ops), so the graph computes the plan's numbers.
The graph passes in :mod:`.graph` then store the weights as INT8/INT4 codes and place the attention's
Q/DQ at its MatMuls, in the layout of the target (:mod:`.targets`).
"""

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from torch import nn

from ..atomic import replace_atomically
from ..plan import Plan
from ..quant.model import QuantModel
from ..targets import get_target
from .graph import block_int4_scales, count_ops, fold_weight_transposes, initializer_bytes, qdq_to_attention_matmuls, store_integer_weights

OPSET = 21  # INT4 initializers and per-axis INT4 DequantizeLinear
INPUT_NAME, OUTPUT_NAME = "images", "logits"


@dataclass(frozen=True)
class ExportInfo:
    path: Path
    target: str  # "ort", "tensorrt", or "fp32" for the float model
    weights_int8: int
    weights_int4: int
    initializer_bytes: dict[str, int]
    ops: dict[str, int]
    weights_fp8: int = 0

    @property
    def weight_bytes(self) -> int:
        return sum(self.initializer_bytes.values())


def input_size(model: nn.Module) -> tuple[int, ...]:
    """(C, H, W) the model was built for: its patch embedding's, else its timm data config's."""
    from timm.data import resolve_data_config

    embed = getattr(model, "patch_embed", None)
    if embed is not None and getattr(embed, "img_size", None) is not None:
        proj = getattr(embed.proj, "layer", embed.proj)  # QuantWeighted wraps the Conv2d
        return (proj.in_channels, *embed.img_size)
    return tuple(resolve_data_config({}, model=model)["input_size"])


def _trace(module: nn.Module, size: tuple[int, ...]) -> onnx.ModelProto:
    buffer = io.BytesIO()
    example = torch.randn(1, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        torch.onnx.export(module.eval(), (example,), buffer, dynamo=False, opset_version=OPSET,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], do_constant_folding=True,
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    return onnx.load_from_string(buffer.getvalue())


def _save(model: onnx.ModelProto, path: Path, target: str, int8: int, int4: int, fp8: int = 0) -> ExportInfo:
    onnx.checker.check_model(model, full_check=True)
    path = Path(path)
    replace_atomically(path, lambda tmp: onnx.save(model, str(tmp)))
    return ExportInfo(path, target, int8, int4, initializer_bytes(model), count_ops(model), fp8)


def export_fp32(model: nn.Module, path: Path) -> ExportInfo:
    """The float model as ONNX (the baseline the quantized engines are compared with). Attention runs timm's
    explicit path, as in the quantized exports: some families' fused path (EVA's scaled_dot_product_attention
    with a traced ``is_causal``) does not trace."""
    fused = {m: m.fused_attn for m in model.modules() if isinstance(getattr(m, "fused_attn", None), bool)}
    try:
        for m in fused:
            m.fused_attn = False
        return _save(_trace(model, input_size(model)), path, "fp32", 0, 0)
    finally:
        for m, value in fused.items():
            m.fused_attn = value


def export_quantized(qmodel: QuantModel, plan: Plan, target: str, path: Path) -> ExportInfo:
    """``qmodel`` (calibrated) under ``plan``, in ``target``'s activation format, as Q/DQ ONNX at ``path``."""
    spec = get_target(target)
    qmodel.apply(plan, spec.act_format)
    with qmodel.onnx_mode():
        model = _trace(qmodel, input_size(qmodel.model))
    bits = qmodel.weight_bits()
    converted = store_integer_weights(model, bits)
    if converted != len(bits):
        raise RuntimeError(f"stored {converted} of {len(bits)} quantized weights as integers; the export lost some")
    fold_weight_transposes(model)
    qdq_to_attention_matmuls(model, quantize_first=spec.quantize_first)
    if spec.int4_blocks:
        block_int4_scales(model)
    return _save(model, path, target, *(sum(b == kind for b in bits.values()) for kind in (8, 4, "fp8")))
