"""Check an ONNX graph against TensorRT's explicit-quantization rules on a CPU, before anyone spends a GPU build.

``check_tensorrt`` returns one :class:`Finding` per problem: ``error`` where TensorRT's ONNX parser or builder
rejects the graph or reads it differently from ONNX, ``warning`` where it builds but a documented Q/DQ fusion
cannot happen (the op then runs in float and its Q/DQ nodes run as separate kernels). Each rule cites its source:

- [ops] ONNX-TensorRT operator support matrix, https://github.com/onnx/onnx-tensorrt/blob/main/docs/operators.md
  (TensorRT 10.15: opsets 9 to 24; the release/10.0 page: 9 to 20; "x_zero_point must be zero"; "UINT8 is only
  supported as network input or output"; the operator list).
- [schemes] Quantization Schemes,
  https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/quantized-types-schemes.html (symmetric
  INT8/FP8/INT4; "INT4 quantization requires per-block scales", block sizes 64 and 128, weight-only).
- [layers] Quantize / Dequantize operator reference, https://docs.nvidia.com/deeplearning/tensorrt/operators/docs/
  Quantize.html and Dequantize.html, and IDequantizeLayer: scale a build-time constant, positive, scalar
  (per-tensor), 1-D (per-channel) or blocked (INT4 only); zero point all zeros.
- [explicit] Explicit Quantization,
  https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/quantized-types-explicit-quantization.html
  (per-tensor activations, per-channel weights along the output channel, DQ directly between weights and the
  linear op, DQ propagation through data-movement ops, Q/DQ placement: all inputs of a weighted op, the residual
  input of an Add after a weighted op).
- [parser] onnx-tensorrt onnxOpImporters.cpp, QuantDequantLinearHelper: a UINT8 zero point is read as INT8
  unless building for DLA; non-zero zero points are rejected.
"""

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto, numpy_helper

from ..errors import PomqError
from ..onnx_graph import Graph, node_attr

ERROR, WARNING = "error", "warning"
MODEL = "(model)"  # Finding.node for whole-model findings

# [ops] The TensorRT 10.15 parser documents opsets 9..24 (10.0's: 9..20); pyproject's gpu extra needs >= 10.15.
OPSET_MIN, OPSET_MAX = 9, 24
# [schemes] The quantized types TensorRT has; anything else (uint8 above all) is not a TensorRT quantized type.
QUANT_TYPES = frozenset({TensorProto.INT8, TensorProto.INT4, TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT4E2M1})
INT4_BLOCK_SIZES = (64, 128)  # [schemes]
_BLOCK_SIZES = " or ".join(map(str, INT4_BLOCK_SIZES))
WEIGHTED = ("Conv", "MatMul", "Gemm")
# [explicit] Data-movement ops TensorRT moves a DQ forward through to reach the op it fuses into.
COMMUTING = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Split", "Slice", "Flatten", "Identity"})
# [ops] Operators our exports (ViT and Swin, fp32 and Q/DQ, LIS log-domain and two-scale forms) use, each "Y" in the
# TensorRT 10.15 support matrix. An op outside this list is an error until someone checks the matrix and adds it.
SUPPORTED_OPS = frozenset({
    "Add", "And", "Cast", "Clip", "Concat", "Constant", "ConstantOfShape", "Conv", "DequantizeLinear", "Div",
    "Equal", "Erf", "Exp", "Expand", "Flatten", "Gather", "Gelu", "Gemm", "Greater", "GreaterOrEqual", "Identity",
    "LayerNormalization", "Less", "LessOrEqual", "Log", "MatMul", "Max", "Min", "Mod", "Mul", "Neg", "Not", "Or",
    "Pad", "Pow", "QuantizeLinear", "Range", "ReduceMean", "Relu", "Reshape", "Round", "Shape", "Sigmoid", "Slice",
    "Softmax", "Split", "Sqrt", "Squeeze", "Sub", "Tanh", "Tile", "Transpose", "Unsqueeze", "Where",
})


@dataclass(frozen=True)
class Finding:
    rule: str  # short stable id, e.g. "zero-point", "int4-block", "qdq-blocks-fusion"
    node: str  # the node name (or tensor name when no node)
    message: str  # one human sentence
    severity: str  # "error" (TensorRT will reject or mis-handle) or "warning" (builds, but slower / not fused)


def load_model(source: "onnx.ModelProto | Path | str") -> onnx.ModelProto:
    """``source`` as a ModelProto; a missing, unreadable or non-ONNX file is the user's to fix (PomqError)."""
    if isinstance(source, onnx.ModelProto):
        return source
    path = Path(source)
    if not path.is_file():
        raise PomqError(f"{path}: {'not a file' if path.exists() else 'no such ONNX file'}")
    try:
        model = onnx.load(str(path))
    except (OSError, DecodeError, ValueError) as e:
        raise PomqError(f"{path}: not a readable ONNX model ({e})") from None
    if not model.HasField("graph") or not model.opset_import:
        raise PomqError(f"{path}: not an ONNX model (no graph or no opset)")
    constants = [*model.graph.initializer, *(a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute
                                             if a.name == "value")]
    for t in constants:  # a tensor whose bytes do not fill its shape (found by tests/test_fuzz.py): one line, not a crash later
        try:
            numpy_helper.to_array(t)
        except (ValueError, TypeError, KeyError) as e:  # KeyError: a data type ONNX does not know
            raise PomqError(f"{path}: not a valid ONNX model (tensor '{t.name}': {type(e).__name__} {str(e)[:200]})") from None
    return model


def check_tensorrt(model: "onnx.ModelProto | Path | str") -> list[Finding]:
    """Every finding for ``model`` under TensorRT's explicit-quantization rules: model-wide first, then by node."""
    model = load_model(model)
    g = Graph(model)
    findings = list(_check_opset(model))
    for node in model.graph.node:
        try:
            findings += _check_node(node, g)
        except (IndexError, KeyError, TypeError, ValueError, ArithmeticError) as e:  # ONNX's checker passes it; its fields do not fit
            findings.append(Finding("malformed", node.name or "(unnamed)", f"the node's inputs or attributes do not "
                                    f"fit its op ({type(e).__name__}: {str(e)[:120]}); TensorRT's parser would not read "
                                    "it either", ERROR))
    return findings


def _name(node: onnx.NodeProto) -> str:
    return node.name or node.output[0]


def _check_opset(model: onnx.ModelProto) -> Iterator[Finding]:
    """[ops] The opsets the parser of TensorRT 10.15 (pyproject's floor for the gpu extra) documents."""
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and not OPSET_MIN <= opset.version <= OPSET_MAX:
            yield Finding("opset", MODEL, f"ONNX opset {opset.version} is outside the opsets {OPSET_MIN}-{OPSET_MAX} "
                          "the TensorRT 10.15 ONNX parser documents.", ERROR)


def _check_node(node: onnx.NodeProto, g: Graph) -> list[Finding]:
    findings = list(_check_op_type(node))
    if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
        findings += _check_qdq(node, g)
    if node.op_type in WEIGHTED:
        findings += _check_weighted_inputs(node, g)
    if node.op_type == "Add":
        findings += _check_residual(node, g)
    return findings


def _check_op_type(node: onnx.NodeProto) -> Iterator[Finding]:
    """[ops] An op outside the default domain needs a TensorRT plugin; an unlisted op may not import at all."""
    if node.domain not in ("", "ai.onnx"):
        yield Finding("op-type", _name(node), f"{node.domain}::{node.op_type} is a custom-domain op: TensorRT "
                      "imports it only through a registered plugin.", ERROR)
    elif node.op_type not in SUPPORTED_OPS:
        yield Finding("op-type", _name(node), f"{node.op_type} is not among the operators checked against "
                      "TensorRT's ONNX support matrix.", ERROR)


# ---- Q/DQ nodes ---------------------------------------------------------------------------------------------


def _qtype(node: onnx.NodeProto, g: Graph) -> int | None:
    """The element type a Q/DQ quantizes to, as ONNX reads it (None where it depends on a non-constant)."""
    if len(node.input) > 2 and node.input[2]:
        zp = g.tensor(node.input[2])
        return None if zp is None else zp.data_type
    if node.op_type == "QuantizeLinear":
        return node_attr(node, "output_dtype", 0) or TensorProto.UINT8  # ONNX's default output type
    data = g.tensor(node.input[0])
    if data is not None:
        return data.data_type
    source = g.producer(node.input[0])
    return _qtype(source, g) if source is not None and source.op_type == "QuantizeLinear" else None


def _granularity(node: onnx.NodeProto, scale: np.ndarray) -> str:
    """"tensor" (one scale), "channel" (a 1-D scale along ``axis``) or "block" (opset 21 ``block_size``, or a
    multi-dimensional scale, which is how the TensorRT parser recognises blocks)."""
    if scale.size == 1:
        return "tensor"
    return "channel" if scale.ndim == 1 and not node_attr(node, "block_size", 0) else "block"


def _check_qdq(node: onnx.NodeProto, g: Graph) -> list[Finding]:
    name = _name(node)
    scale = g.value(node.input[1])
    if scale is None:  # [layers] "The scale tensor must be a build-time constant"
        return [Finding("scale-constant", name, f"{node.op_type} scale '{node.input[1]}' is not a constant; TensorRT "
                        "needs a build-time constant scale.", ERROR)]
    findings = list(_check_scale_and_zero_point(node, scale, g))
    qtype = _qtype(node, g)
    if qtype is not None and qtype not in QUANT_TYPES:  # [schemes] [parser] uint8 is read as int8 (or rejected)
        findings.append(Finding("quant-type", name, f"{node.op_type} uses {TensorProto.DataType.Name(qtype)}; "
                                "TensorRT's quantized types are int8, int4, fp8 and fp4 (uint8 only on DLA).", ERROR))
    on_constant = g.tensor(node.input[0]) is not None
    if node.op_type == "QuantizeLinear" and not on_constant:
        findings += _check_activation(node, scale, qtype)
    elif node.op_type == "DequantizeLinear" and on_constant:
        findings += _check_weight(node, scale, qtype, g)
    return findings


def _check_scale_and_zero_point(node: onnx.NodeProto, scale: np.ndarray, g: Graph) -> Iterator[Finding]:
    """[layers] [ops] Positive scales; symmetric quantization only, so a zero point must be a constant of zeros."""
    name = _name(node)
    if not np.all(scale > 0):
        yield Finding("scale-positive", name, f"{node.op_type} has a scale <= 0 (min {scale.min():g}); TensorRT "
                      "requires strictly positive scales.", ERROR)
    if len(node.input) < 3 or not node.input[2]:
        return
    zero_point = g.value(node.input[2])
    if zero_point is None:
        yield Finding("zero-point", name, f"{node.op_type} zero point '{node.input[2]}' is not a constant; TensorRT "
                      "needs a constant zero point of zeros.", ERROR)
    elif np.any(zero_point.astype(np.float64) != 0):
        yield Finding("zero-point", name, f"{node.op_type} has a non-zero zero point "
                      f"({zero_point.ravel()[0].item()} first); TensorRT supports symmetric quantization only.", ERROR)


def _check_activation(node: onnx.NodeProto, scale: np.ndarray, qtype: int | None) -> Iterator[Finding]:
    """[explicit] [schemes] Activations: per-tensor scales only, and never INT4 (INT4 is weight-only)."""
    if _granularity(node, scale) != "tensor":
        yield Finding("activation-per-channel", _name(node), f"QuantizeLinear on an activation has {scale.size} "
                      "scales; TensorRT quantizes activations per tensor only.", ERROR)
    if qtype == TensorProto.INT4:
        yield Finding("int4-not-weight-only", _name(node), "QuantizeLinear quantizes an activation to INT4; "
                      "TensorRT supports INT4 for weight-only quantization.", ERROR)


def _check_weight(node: onnx.NodeProto, scale: np.ndarray, qtype: int | None, g: Graph) -> list[Finding]:
    weight = g.tensor(node.input[0])
    if qtype == TensorProto.INT4:
        return _check_int4_weight(node, scale, weight, g)
    kind = _granularity(node, scale)
    if kind == "block":  # [layers] "block quantization (supported for DataType::kINT4 only)"
        return [Finding("block-quantization", _name(node), "DequantizeLinear has block scales on a non-INT4 weight; "
                        "TensorRT supports block quantization for INT4 only.", ERROR)]
    if kind == "channel":
        return list(_check_channel_axis(node, len(weight.dims), g))
    return []


def _check_int4_weight(node: onnx.NodeProto, scale: np.ndarray, weight: TensorProto, g: Graph) -> list[Finding]:
    """[schemes] INT4 is weight-only quantization of GEMMs, with per-block scales of 64 or 128 elements."""
    name = _name(node)
    gemm_weight = (("MatMul", 1), ("Gemm", 1))
    findings = [Finding("int4-not-weight-only", name, f"INT4 DequantizeLinear feeds {c.op_type} '{_name(c)}' "
                        f"input {i}; TensorRT supports INT4 only as MatMul/Gemm weights.", ERROR)
                for c, i in g.uses(node.output[0]) if (c.op_type, i) not in gemm_weight]
    kind = _granularity(node, scale)
    if kind != "block":
        findings.append(Finding("int4-block", name, f"INT4 weight has per-{kind} scales ({scale.size}); TensorRT "
                                f"requires INT4 block quantization (block size {_BLOCK_SIZES} along one of the last "
                                "two dimensions).", ERROR))
        return findings
    rank = len(weight.dims)
    axis, block = node_attr(node, "axis", 1) % rank, node_attr(node, "block_size", 0)
    if block not in INT4_BLOCK_SIZES or axis < rank - 2:
        findings.append(Finding("int4-block", name, f"INT4 blocks of {block} along axis {axis} of a rank-{rank} "
                                f"weight; TensorRT supports block sizes {_BLOCK_SIZES} along one of the last two "
                                "dimensions.", ERROR))
    return findings


def _output_axis(consumer: onnx.NodeProto, index: int, rank: int) -> int | None:
    """The output-channel axis of a weight fed to ``consumer`` at ``index`` (None: not a weight input)."""
    if consumer.op_type == "MatMul" and index == 1:
        return rank - 1  # [K, N]: N outputs
    if consumer.op_type == "Gemm" and index == 1:
        return 0 if node_attr(consumer, "transB", 0) else 1
    if consumer.op_type == "Conv" and index == 1:
        return 0  # [M, C/group, kH, kW]
    return None


def _check_channel_axis(node: onnx.NodeProto, rank: int, g: Graph) -> Iterator[Finding]:
    """[explicit] Per-channel weight scales run along the consumer's output channel, the DQ feeding it directly."""
    axis = node_attr(node, "axis", 1) % rank
    for consumer, index in g.uses(node.output[0]):
        expected = _output_axis(consumer, index, rank)
        if expected is None:
            yield Finding("per-channel-axis", _name(node), f"per-channel weight DequantizeLinear feeds "
                          f"{consumer.op_type} '{_name(consumer)}', not the weight input of a Conv/MatMul/Gemm, so "
                          "TensorRT cannot apply it along an output channel.", WARNING)
        elif axis != expected:
            yield Finding("per-channel-axis", _name(node), f"per-channel axis {axis} but {consumer.op_type} "
                          f"'{_name(consumer)}' has its output channels on axis {expected} of this weight.", ERROR)


# ---- Q/DQ placement around weighted ops ---------------------------------------------------------------------


def _source(tensor: str, g: Graph) -> onnx.NodeProto | None:
    """The first producer of ``tensor`` that is not a data-movement op (TensorRT moves a DQ through those)."""
    node = g.producer(tensor)
    while node is not None and node.op_type in COMMUTING:
        node = g.producer(node.input[0])
    return node


def _is_dq(node: onnx.NodeProto | None) -> bool:
    return node is not None and node.op_type == "DequantizeLinear"


def _fed_by_dq(node: onnx.NodeProto | None, g: Graph) -> bool:
    return node is not None and any(_is_dq(_source(i, g)) for i in node.input if i)


def _quantized(node: onnx.NodeProto, g: Graph) -> bool:
    return all(_is_dq(_source(i, g)) for i in node.input[:2])


def _check_weighted_inputs(node: onnx.NodeProto, g: Graph) -> Iterator[Finding]:
    """[explicit] TensorRT runs a Conv/MatMul/Gemm in INT8 only when a DQ (moved through data-movement ops) feeds
    each of its inputs; an op between the DQ and it, or an input without Q/DQ, leaves it in float."""
    sources = [_source(i, g) for i in node.input[:2]]
    if not any(_is_dq(s) or _fed_by_dq(s, g) for s in sources):
        return  # a float op by design: nothing to fuse
    types = [_qtype(s, g) if _is_dq(s) else None for s in sources]
    if types[1] == TensorProto.INT4:  # [schemes] INT4 is weight-only: the GEMM takes float activations
        if types[0] is not None:
            yield Finding("qdq-weight-only", _name(node), f"{node.op_type} has an INT4 weight and "
                          f"{TensorProto.DataType.Name(types[0])} Q/DQ on its input; TensorRT's INT4 is weight-only, "
                          "so it runs the GEMM on float activations and the input's Q/DQ as kernels of their own.",
                          WARNING)
        return
    if None not in types and types[0] != types[1]:
        yield Finding("qdq-mixed-types", _name(node), f"{node.op_type} reads {TensorProto.DataType.Name(types[0])} "
                      f"and {TensorProto.DataType.Name(types[1])} inputs; TensorRT has no kernel for two quantized "
                      f"types, so it runs the {node.op_type} in float.", WARNING)
        return
    for index, source in enumerate(sources):
        if _is_dq(source):
            continue
        if _fed_by_dq(source, g):
            yield Finding("qdq-blocks-fusion", _name(source), f"{source.op_type} sits between DequantizeLinear and "
                          f"{node.op_type} '{_name(node)}' input {index}, so TensorRT cannot fuse the DQ and runs the "
                          f"{node.op_type} in float.", WARNING)
        else:
            yield Finding("qdq-unquantized-input", _name(node), f"{node.op_type} input {index} "
                          f"('{node.input[index]}') has no Q/DQ while another input does, so TensorRT runs the "
                          f"{node.op_type} in float; the guide recommends quantizing all inputs of a weighted op.",
                          WARNING)


def _constant(tensor: str, g: Graph) -> bool:
    """A constant, or an Identity of one (the exporter writes equal biases as Identities of one initializer)."""
    node = g.producer(tensor)
    return g.tensor(tensor) is not None or (node is not None and node.op_type == "Identity" and _constant(node.input[0], g))


def _weighted_producer(tensor: str, g: Graph) -> onnx.NodeProto | None:
    """The Conv/MatMul/Gemm whose output ``tensor`` is, directly or after its bias Add."""
    node = g.producer(tensor)
    if node is not None and node.op_type == "Add":
        rest = [i for i in node.input if not _constant(i, g)]
        node = g.producer(rest[0]) if len(rest) == 1 else None
    return node if node is not None and node.op_type in WEIGHTED else None


def _check_residual(node: onnx.NodeProto, g: Graph) -> Iterator[Finding]:
    """[explicit] TensorRT fuses an Add after a quantized weighted op when the Add's other (residual) input is
    quantized too; the guide recommends Q/DQ on that skip-connection input."""
    if len(node.input) != 2 or any(_constant(i, g) for i in node.input):
        return
    for mine, other in ((0, 1), (1, 0)):
        weighted = _weighted_producer(node.input[mine], g)
        if weighted is not None and _quantized(weighted, g) and not _is_dq(_source(node.input[other], g)):
            yield Finding("residual-add", _name(node), f"the residual input '{node.input[other]}' has no Q/DQ, so "
                          f"TensorRT cannot fuse this Add into {weighted.op_type} '{_name(weighted)}'.", WARNING)
            return
