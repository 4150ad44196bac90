"""What a TensorRT engine really runs: its layer information (IEngineInspector, JSON, DETAILED verbosity)
summarised by precision, and held against the plan it was built for. No ``tensorrt`` import: the JSON is
read from the ``layers.json`` written beside the engine.

The format (TensorRT 10): ``{"Layers": [{"Name", "LayerType", "Inputs": [{"Name", "Location",
"Dimensions", "Format/Datatype"}], "Outputs": [...], "Metadata", "TacticName", ...}], "Bindings": [...]}``.
``Name`` joins the fused ONNX nodes with " + "; ``Metadata`` lists them as "[ONNX Layer: <node>]", joined
by the ASCII record/unit separators (TREx replaces both). TensorRT 11 splits "Format/Datatype" into
"Format" and "DataType" and replaces "Bindings" with "I/O Tensors"; both spellings are read.

A layer's precision is that of its data: INT4 weight-only when an input or its weights are INT4 (TensorRT's
INT4 is weight-only), INT8 when an input is INT8, else its float type. Reformat and no-op layers (copies,
Q/DQ layout changes) are counted as "other".
"""

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..plan import BlockBits, Plan

INT4, INT8, FP8, FP16, BF16, FP32, OTHER = "INT4 weight-only", "INT8", "FP8", "FP16", "BF16", "FP32", "other"
PRECISIONS = (INT8, INT4, FP8, FP16, BF16, FP32, OTHER)
# words of a "Format/Datatype" or "DataType" string -> the data type they name
_TYPE_WORDS = {"int8": INT8, "int4": INT4, "fp8": FP8, "fp16": FP16, "half": FP16, "bfloat16": BF16, "bf16": BF16,
               "fp32": FP32, "float": FP32}
_BOOKKEEPING = {"NoOp", "Reformat", "Shuffle", "Constant", "Identity", "signal", "wait"}
_SEPARATORS = re.compile("[\x1e\x1f]| \\+ ")
_ONNX_LAYER = re.compile(r"\[ONNX Layer: ([^\]]+)\]")
# our export's (and timm's) node names: /model/blocks/blocks.3/mlp/fc1/MatMul, .../attn/MatMul_1 (attention x V);
# Swin's restart the block number in each stage: /model/layers/layers.1/blocks/blocks.0/attn/qkv/MatMul
_BLOCK = r"(?:layers\.(\d+)/blocks/)?blocks\.(\d+)/"
_LINEAR = re.compile(_BLOCK + r"(attn/qkv|attn/proj|mlp/fc1|mlp/fc2|attn)/(MatMul(?:_1)?)$")
LINEARS = ("qkv", "proj", "fc1", "fc2", "attn@v")


@dataclass(frozen=True)
class EngineLayer:
    name: str
    layer_type: str
    precision: str
    onnx_nodes: tuple[str, ...]


@dataclass(frozen=True)
class EngineSummary:
    layers: int
    by_precision: dict[str, int]
    not_honoured: tuple[str, ...] = ()  # plan settings the engine runs differently, one sentence each
    unchecked: tuple[str, ...] = ()  # plan layers no engine layer names (fused beyond recognition)

    def to_dict(self) -> dict[str, Any]:
        return {"layers": self.layers, "by_precision": self.by_precision, "not_honoured": list(self.not_honoured),
                "unchecked": list(self.unchecked)}


def read_layer_info(path: Path) -> dict[str, Any]:
    info = json.loads(Path(path).read_text())
    layers = info.get("Layers") if isinstance(info, dict) else None
    if not isinstance(layers, list) or (layers and not isinstance(layers[0], dict)):
        raise ValueError(f"{path}: not TensorRT layer information with DETAILED verbosity (expected 'Layers' as objects)")
    return info


def tensor_type(tensor: dict[str, Any]) -> str | None:
    """The data type a tensor entry names, or None ("N/A due to dynamic shapes", Int32 shape tensors)."""
    text = tensor.get("Format/Datatype") or tensor.get("DataType") or tensor.get("Format") or ""
    for word in re.findall(r"[a-z0-9]+", text.lower()):
        if word in _TYPE_WORDS:
            return _TYPE_WORDS[word]
    return None


def layer_precision(layer: dict[str, Any]) -> str:
    if layer.get("LayerType") in _BOOKKEEPING or layer.get("ParameterType") == "Reformat":
        return OTHER
    inputs = {tensor_type(t) for t in layer.get("Inputs", [])}
    weights = tensor_type({"DataType": (layer.get("Weights") or {}).get("Type", "")})
    if INT4 in inputs or weights == INT4:
        return INT4
    for precision in (INT8, FP8, FP16, BF16, FP32):
        if precision in inputs:
            return precision
    return OTHER


def onnx_nodes(layer: dict[str, Any]) -> tuple[str, ...]:
    """The ONNX nodes a layer implements: from its Metadata when present, else from its fused name."""
    found = _ONNX_LAYER.findall(layer.get("Metadata") or "")
    return tuple(found) if found else tuple(n.strip() for n in _SEPARATORS.split(layer.get("Name", "")) if n.strip())


def parse_layers(info: dict[str, Any]) -> list[EngineLayer]:
    return [EngineLayer(layer.get("Name", ""), layer.get("LayerType", ""), layer_precision(layer), onnx_nodes(layer))
            for layer in info["Layers"]]


def block_order(node_names: Iterable[str]) -> list[tuple[int, int]]:
    """The (stage, block) keys named in ``node_names``, in model order: the plan's block i is the i-th."""
    keys = {(int(m.group(1) or 0), int(m.group(2))) for n in node_names if (m := re.search(_BLOCK, n))}
    return sorted(keys)


def plan_layers(layers: Iterable[EngineLayer], order: list[tuple[int, int]]) -> dict[tuple[int, str], EngineLayer]:
    """(plan block, linear) -> the engine layer that runs it; linear is one of LINEARS; ``order``: ``block_order``."""
    index = {key: i for i, key in enumerate(order)}
    found: dict[tuple[int, str], EngineLayer] = {}
    for layer in layers:
        for node in layer.onnx_nodes:
            m = _LINEAR.search(node)
            if m is None or (m.group(3) == "attn") != (m.group(4) == "MatMul_1"):
                continue  # attn/MatMul is q @ k^T: no plan setting of its own
            key = (int(m.group(1) or 0), int(m.group(2)))
            if key in index:
                linear = "attn@v" if m.group(3) == "attn" else m.group(3).split("/")[1]
                found.setdefault((index[key], linear), layer)
    return found


FLOATS = (FP16, BF16, FP32)


def judge(bits: BlockBits, linear: str, precision: str) -> str | None:
    """How the engine departs from the plan for one of a block's layers, or None where it does not."""
    if linear == "attn@v":
        if bits.attn == "float":
            return None if precision in FLOATS else f"attn=float runs in {precision}, not float"
        if bits.attn == "fp8":
            return None if precision == FP8 else f"attn=fp8 runs in {precision}, not FP8"
        if precision == INT8:
            return None if bits.attn == 8 else "attn=4 runs as INT8 (TensorRT has no 4-bit activation math)"
        return f"attn={bits.attn} runs in {precision}, not INT8"
    if bits.w == "float":
        return None if precision in FLOATS else f"w=float runs in {precision}, not float"
    if bits.w == "fp8":
        return None if precision == FP8 else f"w=fp8 runs in {precision}, not FP8"
    if bits.w == 4:
        if precision != INT4:
            return f"w=4 runs as {precision}, not INT4 weight-only"
        if bits.a == "float":
            return None
        return f"a={bits.a} runs in float: TensorRT's INT4 is weight-only, so this GEMM takes float activations"
    if precision != INT8:
        return f"w=8/a={bits.a} runs in {precision}, not INT8"
    return "a=4 runs as INT8 (TensorRT has no 4-bit activation math)" if bits.a == 4 else None


def summarise(info: dict[str, Any], plan: Plan | None = None, onnx_nodes: Iterable[str] | None = None) -> EngineSummary:
    """Layers by precision and, given the plan the engine was built from, what the engine did not honour.
    ``onnx_nodes``: the node names of the ONNX the engine was built from, whose blocks give the plan's order
    (the engine's own names, where a block fused beyond recognition is missing, otherwise)."""
    layers = parse_layers(info)
    counts = {p: 0 for p in PRECISIONS}
    for layer in layers:
        counts[layer.precision] += 1
    if plan is None:
        return EngineSummary(len(layers), counts)
    found = plan_layers(layers, block_order(onnx_nodes if onnx_nodes is not None else (n for la in layers for n in la.onnx_nodes)))
    notes, unchecked = [], []
    for i, bits in enumerate(plan.blocks):
        missing = [linear for linear in LINEARS if (i, linear) not in found]
        if len(missing) == len(LINEARS):
            unchecked.append(f"block {i}")
            continue
        unchecked += [f"block {i} {linear}" for linear in missing]
        for linear in LINEARS:
            if (i, linear) in found:
                note = judge(bits, linear, found[i, linear].precision)
                if note is not None:
                    notes.append(f"block {i} {linear}: {note}")
    return EngineSummary(len(layers), counts, tuple(notes), tuple(unchecked))
