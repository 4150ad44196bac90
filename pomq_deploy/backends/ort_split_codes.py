"""GEMMs on V-2SF's two grids as integer GEMMs, for ONNX Runtime.

The export writes a two-grid activation (TSPTQ's V-2SF on post-GELU values and attention probabilities) as
``DQ(Q(fine part)) + DQ(Q(coarse part))``: two code tensors, one of them at its zero point (value 0) in
each element, the coarse step 2^m times the fine one. ONNX Runtime fuses a MatMul only when DequantizeLinear
feeds it directly, so such a GEMM ran in float, with its own summation order. Here it becomes what the
fake-quant reference computes (``pomq_deploy.quant.functional.integer_product``):

    MatMul(DQ(a_f) + DQ(a_c), DQ(b))  ==>  (float(MatMulInteger(a_f, b)) + 2^m float(MatMulInteger(a_c, b))) * s_f s_b

exact integer sums (int32), each cast to float once, one rescale: the same numbers on every CPU.
"""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..onnx_graph import Graph, node_attr


def split_code_matmuls(g: Graph) -> int:
    """Rewrite every ``MatMul(Add(DQ, DQ), DQ)`` whose left codes are uint8 on power-of-two related scales.
    Returns how many MatMuls were rewritten."""
    done = 0
    for mm in [n for n in g.graph.node if n.op_type == "MatMul"]:
        match = _match(g, mm)
        if match is None:
            continue
        add, base, parts, b_dq, (b_codes, b_zero, b_scale) = match
        names, nodes = [], []
        scale = numpy_helper.from_array((np.float32(base) * b_scale).astype(np.float32), f"{mm.name or mm.output[0]}_scale")
        g.replace_initializer(None, scale)
        for i, (codes, zero, e) in enumerate(parts):
            stem = f"{mm.output[0]}_part{i}"
            nodes += [helper.make_node("MatMulInteger", [codes, b_codes, zero, *([b_zero] if b_zero else [])], [f"{stem}_acc"],
                                       name=f"{stem}/MatMulInteger"),
                      helper.make_node("Cast", [f"{stem}_acc"], [f"{stem}_f"], to=TensorProto.FLOAT, name=f"{stem}/Cast")]
            out = f"{stem}_f"
            if e:
                g.replace_initializer(None, numpy_helper.from_array(np.float32(2.0**e), f"{stem}_pow2"))
                nodes.append(helper.make_node("Mul", [out, f"{stem}_pow2"], [f"{stem}_x2e"], name=f"{stem}/Mul"))
                out = f"{stem}_x2e"
            names.append(out)
        nodes += [helper.make_node("Add", names, [f"{mm.output[0]}_acc"], name=f"{mm.output[0]}/AddParts"),
                  helper.make_node("Mul", [f"{mm.output[0]}_acc", scale.name], [mm.output[0]], name=f"{mm.output[0]}/Rescale")]
        g.remove(mm)
        g.add(*nodes)
        # the sum and its DequantizeLinears stay where something else reads them (a graph output: compare marks it)
        g.remove_unread(add, *[g.producer(i) for i in add.input], b_dq)
        done += 1
    if done:
        g.finish()
    return done


def _match(g: Graph, mm: onnx.NodeProto):
    """(Add, the finest part's scale, [(codes, zero point name, e: its scale is that times 2^e)] x 2, B's
    DequantizeLinear, (B codes, B zero point name or None, B scale as float32 array)) when ``mm`` reads two uint8
    code parts and a dequantized B, else None."""
    add, b_dq = g.producer(mm.input[0]), g.producer(mm.input[1])
    if add is None or add.op_type != "Add" or b_dq is None or b_dq.op_type != "DequantizeLinear":
        return None
    parts = []
    for name in add.input:
        dq = g.producer(name)
        if dq is None or dq.op_type != "DequantizeLinear" or len(dq.input) < 3:
            return None
        scale, zero = g.value(dq.input[1]), g.value(dq.input[2])
        if scale is None or zero is None or scale.size != 1 or zero.dtype != np.uint8:
            return None
        parts.append((dq.input[0], float(scale.reshape(())), dq.input[2]))
    base = min(s for _, s, _ in parts)
    exponents = [float(np.log2(s / base)) for _, s, _ in parts]
    if not all(e.is_integer() for e in exponents):
        return None
    b_scale = g.value(b_dq.input[1])
    b_zero = b_dq.input[2] if len(b_dq.input) > 2 and b_dq.input[2] else None
    if b_scale is None or (b_zero is not None and g.value(b_zero) is None):
        return None
    if b_scale.size != 1:  # per output channel: a (K, N) weight dequantized along N
        codes = g.value(b_dq.input[0])
        if codes is None or codes.ndim != 2 or node_attr(b_dq, "axis", 1) not in (1, -1):
            return None
    parts = [(codes, zero, int(e)) for (codes, _, zero), e in zip(parts, exponents, strict=True)]
    return add, base, parts, b_dq, (b_dq.input[0], b_zero, b_scale.astype(np.float32))
