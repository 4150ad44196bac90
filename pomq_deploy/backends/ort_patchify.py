"""A patch embedding's quantized Conv as an integer GEMM, for ONNX Runtime.

A ViT's patch embedding is a Conv2d with kernel = stride and no padding: one GEMM of each patch's pixels with
the flattened kernel. ONNX Runtime fuses Q/DQ around a MatMul into its integer GEMM but runs a Conv with
dequantized inputs in float, in its own summation order, which differs from PyTorch's in the last bits; at
4-bit blocks downstream such a difference flips codes. Here it becomes what the fake-quant reference
computes (``pomq_deploy.quant.functional.integer_patchify``):

    Conv(DQ(Q(x)), DQ(W))  ==>  Transpose(Reshape(MatMul(DQ(Q(patches(x))), DQ(W')) + b))

with ``patches`` a Reshape -> Transpose -> Reshape of the float input (a per-tensor Q commutes with moving
values) and ``W'`` the kernel's codes as (C*kh*kw, O): exact integer sums, the same numbers on every CPU.
"""

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..onnx_graph import Graph, node_attr


def patchify_convs(g: Graph) -> int:
    """Rewrite every patchify Conv whose input is a per-tensor Q/DQ pair and whose weight is a DequantizeLinear of
    constant codes per output channel; returns how many were rewritten."""
    shapes = _input_shapes(g)
    done = 0
    for conv in [n for n in g.graph.node if n.op_type == "Conv"]:
        match = _match(g, conv, shapes)
        if match is None:
            continue
        q, x_dq, w_dq, (c, h, w), (kh, kw), codes = match
        stem = conv.output[0]
        hp, wp = h // kh, w // kw
        o = codes.shape[0]
        consts = {f"{stem}_cut": [0, c, hp, kh, wp, kw], f"{stem}_rows": [0, hp * wp, c * kh * kw], f"{stem}_grid": [0, hp, wp, o]}
        for name, value in consts.items():
            g.replace_initializer(None, numpy_helper.from_array(np.array(value, np.int64), name))
        gemm_codes = numpy_helper.from_array(np.ascontiguousarray(codes.reshape(o, -1).T), f"{w_dq.input[0]}_gemm")
        g.replace_initializer(None, gemm_codes)
        nodes = [helper.make_node("Reshape", [q.input[0], f"{stem}_cut"], [f"{stem}_cut_x"], name=f"{stem}/Cut"),
                 helper.make_node("Transpose", [f"{stem}_cut_x"], [f"{stem}_patches6"], perm=[0, 2, 4, 1, 3, 5], name=f"{stem}/Patches"),
                 helper.make_node("Reshape", [f"{stem}_patches6", f"{stem}_rows"], [f"{stem}_patches"], name=f"{stem}/Rows"),
                 helper.make_node("QuantizeLinear", [f"{stem}_patches", *q.input[1:]], [f"{stem}_pq"], name=f"{stem}/Q"),
                 helper.make_node("DequantizeLinear", [f"{stem}_pq", *x_dq.input[1:]], [f"{stem}_pd"], name=f"{stem}/DQ"),
                 helper.make_node("DequantizeLinear", [gemm_codes.name, *w_dq.input[1:]], [f"{stem}_wd"], axis=1, name=f"{stem}/DQW"),
                 helper.make_node("MatMul", [f"{stem}_pd", f"{stem}_wd"], [f"{stem}_mm"], name=f"{stem}/MatMul")]
        out = f"{stem}_mm"
        if len(conv.input) > 2 and conv.input[2]:
            nodes.append(helper.make_node("Add", [out, conv.input[2]], [f"{stem}_biased"], name=f"{stem}/Bias"))
            out = f"{stem}_biased"
        nodes += [helper.make_node("Reshape", [out, f"{stem}_grid"], [f"{stem}_grid_y"], name=f"{stem}/Grid"),
                  helper.make_node("Transpose", [f"{stem}_grid_y"], [stem], perm=[0, 3, 1, 2], name=f"{stem}/NCHW")]
        g.remove(conv)
        g.add(*nodes)
        g.remove_unread(w_dq, x_dq, q)  # the old pair stays where something else reads it
        done += 1
    if done:
        g.finish()
    return done


def _input_shapes(g: Graph) -> dict[str, list]:
    """Static shapes the graph declares or ONNX's shape inference finds (dims as ints or names)."""
    inferred = onnx.shape_inference.infer_shapes(g.model)
    out = {}
    for v in [*inferred.graph.input, *inferred.graph.value_info]:
        t = v.type.tensor_type
        if t.HasField("shape"):
            out[v.name] = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim]
    return out


def _match(g: Graph, conv, shapes: dict[str, list]):
    """(Q, input DQ, weight DQ, (C, H, W), (kh, kw), weight codes) of a patchify Conv on a per-tensor Q/DQ input and
    per-output-channel constant weight codes; None for any other Conv."""
    x_dq, w_dq = g.producer(conv.input[0]), g.producer(conv.input[1])
    if x_dq is None or w_dq is None or x_dq.op_type != "DequantizeLinear" or w_dq.op_type != "DequantizeLinear":
        return None
    q = g.producer(x_dq.input[0])
    codes = g.value(w_dq.input[0])
    if q is None or q.op_type != "QuantizeLinear" or codes is None or codes.ndim != 4:
        return None
    x_scale, w_scale = g.value(x_dq.input[1]), g.value(w_dq.input[1])
    if x_scale is None or x_scale.size != 1 or w_scale is None or w_scale.shape != (codes.shape[0],) \
            or node_attr(w_dq, "axis", 1) != 0 or node_attr(w_dq, "block_size", 0):
        return None
    k = tuple(node_attr(conv, "kernel_shape", codes.shape[2:]))
    if tuple(node_attr(conv, "strides", (1, 1))) != k or any(node_attr(conv, "pads", (0, 0, 0, 0))) \
            or any(d != 1 for d in node_attr(conv, "dilations", (1, 1))) or node_attr(conv, "group", 1) != 1 \
            or node_attr(conv, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET", b"VALID", "VALID"):
        return None
    shape = shapes.get(q.input[0])
    if shape is None or len(shape) != 4 or not all(isinstance(d, int) and d > 0 for d in shape[1:]):
        return None
    c, h, w = shape[1:]
    if h % k[0] or w % k[1] or c != codes.shape[1]:
        return None  # a remainder the Conv drops: left as it is
    return q, x_dq, w_dq, (c, h, w), k, codes
