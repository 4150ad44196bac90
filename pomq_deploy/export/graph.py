"""Passes over the exported ONNX graph that turn float weights under Q/DQ into real integer (or FP8) initializers.

The exporter writes each quantized weight as ``float initializer -> QuantizeLinear -> DequantizeLinear``.
``store_integer_weights`` runs the QuantizeLinear once, here, and keeps only its integer codes (INT8, or
INT4 for the plan's 4-bit weights) feeding the per-output-channel DequantizeLinear, so the file really
holds 8- or 4-bit weights. ``fold_weight_transposes`` then stores a Linear's weight as (in, out) for
``MatMul`` (DequantizeLinear axis 1), which is the DQ -> MatMul pattern ONNX Runtime and TensorRT fuse.
``qdq_to_attention_matmuls`` moves the Q/DQ of the qkv output past the reshapes that split it into
q, k and v, so that both attention MatMuls also read DequantizeLinear outputs and run as integer kernels.
"""

from collections import Counter

import ml_dtypes
import numpy as np
import onnx
from onnx import numpy_helper

from ..onnx_graph import Graph, node_attr
from ..quant.fp8 import E4M3_MAX

QDQ = ("QuantizeLinear", "DequantizeLinear")


def store_integer_weights(model: onnx.ModelProto, weight_bits: dict[str, int | str]) -> int:
    """Replace ``W -> QuantizeLinear`` on each weight named in ``weight_bits`` with W's codes: INT8, INT4, or
    FLOAT8E4M3FN for ``"fp8"`` (saturated, rounded to nearest even as the QuantizeLinear does).

    Returns how many weights were converted. A 4-bit weight whose codes do not fit INT4 is a bug upstream
    (its scale is amax/7), so it raises rather than silently storing INT8."""
    g = Graph(model)
    done = 0
    for q in [n for n in g.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in weight_bits]:
        name, bits = q.input[0], weight_bits[q.input[0]]
        w, scale = g.value(name), g.value(q.input[1])
        axis = node_attr(q, "axis", 1)
        shape = [1] * w.ndim
        shape[axis] = -1
        if bits == "fp8":
            codes = np.clip(w / scale.reshape(shape), -E4M3_MAX, E4M3_MAX).astype(ml_dtypes.float8_e4m3fn)
            tensor = numpy_helper.from_array(codes, f"{name}_fp8")
        elif bits == 4:
            codes = np.clip(np.rint(w / scale.reshape(shape)), -128, 127)
            if codes.min() < -8 or codes.max() > 7:
                raise ValueError(f"{name}: 4-bit weight codes span [{codes.min()}, {codes.max()}], outside INT4")
            tensor = numpy_helper.from_array(codes.astype(ml_dtypes.int4), f"{name}_int4")
        else:
            codes = np.clip(np.rint(w / scale.reshape(shape)), -128, 127)
            tensor = numpy_helper.from_array(codes.astype(np.int8), f"{name}_int8")
        g.replace_initializer(None, tensor)
        for dq in g.consumers(q.output[0]):
            if dq.op_type != "DequantizeLinear":
                raise ValueError(f"{name}: QuantizeLinear feeds {dq.op_type}, expected DequantizeLinear")
            # symmetric weights: zero point 0, which is DequantizeLinear's default (and typed like the codes)
            g.set_inputs(dq, [tensor.name, dq.input[1]])
        g.remove(q)
        done += 1
    g.drop_unused()
    return done


def fold_weight_transposes(model: onnx.ModelProto) -> int:
    """``DQ(W int, axis 0) -> Transpose -> MatMul``  ==>  ``DQ(W^T int, axis 1) -> MatMul`` (2-D weights)."""
    g = Graph(model)
    done = 0
    for t in [n for n in g.graph.node if n.op_type == "Transpose"]:
        dq = g.producer(t.input[0])
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in g.inits:
            continue
        codes = g.value(dq.input[0])
        if codes.ndim != 2 or list(node_attr(t, "perm", [1, 0])) != [1, 0] or len(g.consumers(dq.output[0])) != 1:
            continue
        tensor = numpy_helper.from_array(np.ascontiguousarray(codes.T), dq.input[0] + "_t")
        g.replace_initializer(dq.input[0], tensor)
        g.set_input(dq, 0, tensor.name)
        for a in dq.attribute:
            if a.name == "axis":
                a.i = 1
        if not any(a.name == "axis" for a in dq.attribute):
            dq.attribute.append(onnx.helper.make_attribute("axis", 1))
        g.replace_uses(t.output[0], dq.output[0])
        g.remove(t)
        done += 1
    return done


def block_int4_scales(model: onnx.ModelProto, block_sizes: tuple[int, ...] = (128, 64)) -> int:
    """Per-output-channel INT4 weight scales, written as blocked ones: scale [K/B, N], ``block_size`` B, axis 0.

    TensorRT runs INT4 only as weight-only block quantization with blocks of 64 or 128 along K. Repeating
    each column's scale over its K/B blocks is the same quantization (every block of a column has the same
    scale), so the plan's per-channel numbers are unchanged. A weight whose K no block size divides keeps
    its per-channel scale (``pomq-deploy check`` reports it). Returns how many weights were rewritten."""
    g = Graph(model)
    done = 0
    for dq in [n for n in g.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in g.inits]:
        codes, scale = g.inits[dq.input[0]], g.value(dq.input[1])
        k = codes.dims[0] if len(codes.dims) == 2 else 0
        block = next((b for b in block_sizes if k and k % b == 0), None)
        if codes.data_type != onnx.TensorProto.INT4 or scale is None or scale.ndim != 1 or node_attr(dq, "axis", 1) != 1 or block is None:
            continue
        tensor = numpy_helper.from_array(np.ascontiguousarray(np.tile(scale, (k // block, 1))), f"{dq.input[0]}_block_scale")
        g.replace_initializer(None, tensor)
        g.set_input(dq, 1, tensor.name)
        for a in [a for a in dq.attribute if a.name in ("axis", "block_size")]:
            dq.attribute.remove(a)
        dq.attribute.extend([onnx.helper.make_attribute("axis", 0), onnx.helper.make_attribute("block_size", block)])
        done += 1
    g.drop_unused()
    return done


# ops that only move values: a Q/DQ pair commutes with them exactly
SHAPE_OPS = ("Reshape", "Transpose", "Split", "Squeeze", "Unsqueeze")


def _shape_leaves(g: Graph, name: str) -> list[str] | None:
    """Tensors reached from ``name`` through shape ops only and read by something else, or None when
    ``name`` feeds anything but shape ops (then moving its Q/DQ gains nothing)."""
    users = g.consumers(name)
    if not users or any(u.op_type not in SHAPE_OPS or u.input[0] != name for u in users):
        return None
    leaves = []
    for u in users:
        for out in u.output:
            if out in g.outputs:
                return None
            nxt = g.consumers(out)
            if all(n.op_type in SHAPE_OPS for n in nxt):
                sub = _shape_leaves(g, out)
                if sub is None:
                    return None
                leaves += sub
            else:
                leaves.append(out)
    return leaves


def _scalar_mul_into_matmul(g: Graph, name: str) -> tuple[onnx.NodeProto, float] | None:
    """``name -> Mul(scalar constant) -> MatMul`` (timm scales q by head_dim^-0.5 there): the Mul and its factor."""
    users = g.consumers(name)
    if len(users) != 1 or users[0].op_type != "Mul":
        return None
    mul = users[0]
    other = mul.input[1] if mul.input[0] == name else mul.input[0]
    factor = g.value(other)
    if factor is None or factor.size != 1 or not all(n.op_type == "MatMul" for n in g.consumers(mul.output[0])):
        return None
    return mul, float(factor.reshape(()))


def qdq_to_attention_matmuls(model: onnx.ModelProto, quantize_first: bool = False) -> int:
    """Move the DequantizeLinear of the qkv output past timm's reshape/split of it into q, k and v.

    ``Q -> DQ -> Reshape/Transpose/Split/Squeeze -> [Mul(c)] -> MatMul`` becomes
    ``shape ops -> Q -> DQ -> MatMul`` or, with ``quantize_first``, ``Q -> shape ops -> DQ -> MatMul``.
    ONNX Runtime does not carry a DequantizeLinear through Split, and timm's q scaling sits between it and
    the MatMul, so both attention MatMuls ran in float. The shape ops only move values, so the codes are
    the same, and so is the QuantizeLinear work; q's factor c goes into its DequantizeLinear's scale
    (``DQ(code, s*c)``, exact for DeiT's c = 1/8, within one float rounding otherwise). ``quantize_first``
    (ONNX Runtime) moves 1-byte integer codes through the shape ops; without it (TensorRT), and for FP8 codes,
    each attention MatMul input gets the Q/DQ pair that TensorRT's attention fusion looks for. Returns the
    DequantizeLinears moved."""
    g = Graph(model)
    moved, codes_moved = 0, False
    for dq in [n for n in g.graph.node if n.op_type == "DequantizeLinear"]:
        q = g.producer(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear" or len(g.consumers(q.output[0])) != 1:
            continue
        scale, zero = g.value(q.input[1]), g.value(q.input[2]) if len(q.input) > 2 else None
        if scale is None or scale.size != 1 or (len(q.input) > 2 and zero is None):
            continue
        leaves = _shape_leaves(g, dq.output[0])
        if leaves is None:
            continue
        # FP8 codes stay floats through the shape ops: ONNX's Split takes no float8 tensor
        first = quantize_first and zero is not None and np.issubdtype(zero.dtype, np.integer)
        g.replace_uses(dq.output[0], q.output[0] if first else q.input[0])
        for leaf in leaves:
            _insert_qdq(g, leaf, scale, zero, _scalar_mul_into_matmul(g, leaf), with_q=not first)
        if not first:
            g.remove(q)
        g.remove(dq)
        moved += 1
        codes_moved |= first
    if codes_moved:  # the tensors between Q and DQ now hold codes, not floats: let ONNX re-infer them
        del g.graph.value_info[:]
    g.finish()
    return moved


def _insert_qdq(g: Graph, leaf: str, scale: np.ndarray, zero: np.ndarray | None, mul, with_q: bool) -> None:
    """[Q ->] DQ on ``leaf``; with ``mul`` = (Mul node, c), DQ's scale is s*c and the Mul goes."""
    names = [f"{leaf}_qscale", f"{leaf}_dqscale", f"{leaf}_zero"]
    factor = 1.0 if mul is None else mul[1]
    g.replace_initializer(None, numpy_helper.from_array(np.float32(scale.reshape(()) * factor), names[1]))
    zp = []
    if zero is not None:
        g.replace_initializer(None, numpy_helper.from_array(zero.reshape(()).copy(), names[2]))
        zp = [names[2]]
    out = mul[0].output[0] if mul is not None else f"{leaf}_dq"
    new = [onnx.helper.make_node("DequantizeLinear", [f"{leaf}_q" if with_q else leaf, names[1], *zp], [out],
                                 name=f"{leaf}/DequantizeLinear")]
    if with_q:
        g.replace_initializer(None, numpy_helper.from_array(scale.reshape(()).astype(np.float32), names[0]))
        new.insert(0, onnx.helper.make_node("QuantizeLinear", [leaf, names[0], *zp], [f"{leaf}_q"], name=f"{leaf}/QuantizeLinear"))
    if mul is not None:
        g.remove(mul[0])
    else:
        g.replace_uses(leaf, out)
    g.add(*new)


def initializer_bytes(model: onnx.ModelProto) -> dict[str, int]:
    """Bytes of the stored initializers by element type (INT4 packs two per byte), e.g. {'INT8': 1234}."""
    out: Counter = Counter()
    for t in model.graph.initializer:
        kind = onnx.TensorProto.DataType.Name(t.data_type)
        out[kind] += len(t.raw_data) if t.raw_data else numpy_helper.to_array(t).nbytes
    return dict(out)


def matmuls_on_codes(model: onnx.ModelProto) -> tuple[int, int]:
    """MatMuls both of whose inputs come out of a DequantizeLinear (integer kernels can take them), and all MatMuls."""
    producer = {o: n.op_type for n in model.graph.node for o in n.output}
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
    return sum(all(producer.get(i) == "DequantizeLinear" for i in n.input) for n in matmuls), len(matmuls)


def count_ops(model: onnx.ModelProto) -> dict[str, int]:
    return dict(Counter(n.op_type for n in model.graph.node))
