"""The quantization math, as pure functions on tensors.

Conventions (FQ-ViT's, and ONNX QuantizeLinear's): ``q = clamp(round(x / s) + z, qmin, qmax)`` and
``x_hat = (q - z) * s``, with round-half-to-even (``torch.round``, like ONNX). Activations are uint
asymmetric (``z`` from the minimum) in FQ-ViT's format or int symmetric (``z = 0``) for TensorRT; weights
are int symmetric per output channel. Every search here minimises the L2 (mean squared) error on the
calibration data it is given, as FQ-ViT's OMSE and PTF do on their last calibration batch.
"""

import torch

EPS = 1e-8


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer range of a ``bits``-wide code: [0, 2^b - 1] unsigned, [-2^(b-1), 2^(b-1) - 1] signed."""
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)


def uniform_qparams(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point covering [lo, hi] (element-wise, so per-tensor or per-channel).

    Asymmetric: ``s = (hi - lo) / (qmax - qmin)``, ``z = qmin - round(lo / s)`` (FQ-ViT), with the range
    widened to include 0 so that zero is exact. Symmetric: ``s = max(|lo|, |hi|) / qmax``, ``z = 0``
    (the TensorRT / ONNX Runtime convention; FQ-ViT divides by 127.5 and clips the top code instead).
    """
    qmin, qmax = qrange(bits, symmetric)
    lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)
    if symmetric:
        scale = (torch.maximum(-lo, hi) / qmax).clamp(min=EPS)
        return scale, torch.zeros_like(scale)
    scale = ((hi - lo) / (qmax - qmin)).clamp(min=EPS)
    zero_point = (qmin - torch.round(lo / scale)).clamp(qmin, qmax)
    return scale, zero_point


def quant_codes(x: torch.Tensor, scale, zero_point, qmin: int, qmax: int) -> torch.Tensor:
    """The centred integer codes ``q - z`` (as floats): ``fake_quant(x) == quant_codes(x) * scale``.

    Without gradients the steps run in place on one new tensor, the zero point folded into the clamp's bounds
    (``clamp(r + z, qmin, qmax) - z == clamp(r, qmin - z, qmax - z)`` for the integers r and z, exactly in
    float): the same values (0 may come out as -0.0), one allocation and three passes instead of five of each
    (on the CPU a fresh activation-sized buffer costs more than the arithmetic; docs/benchmarks.md)."""
    if x.requires_grad or getattr(scale, "requires_grad", False):
        return torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax) - zero_point
    return (x / scale).round_().clamp_(qmin - zero_point, qmax - zero_point)


def fake_quant(x: torch.Tensor, scale, zero_point, qmin: int, qmax: int) -> torch.Tensor:
    """Quantize then dequantize: exactly what a QuantizeLinear -> DequantizeLinear pair computes."""
    codes = quant_codes(x, scale, zero_point, qmin, qmax)
    return codes * scale if codes.requires_grad else codes.mul_(scale)


def fake_quant_shifted(x: torch.Tensor, scale, zero_point, qmin: int, qmax: int, shift: torch.Tensor,
                       quant=fake_quant) -> torch.Tensor:
    """Per-channel power-of-two scales ``s * 2^shift_c`` (PTF, O-2SF) over the last dimension.

    Written as ``Mul(2^-shift) -> Q/DQ(s, z) -> Mul(2^shift)``: the same arithmetic as a per-channel scale
    sharing one integer zero point, in the per-tensor form TensorRT accepts for activations (multiplying
    by a power of two is exact). ``quant`` is the per-tensor fake quantizer (``fake_quant_onnx`` to export).
    """
    factor = torch.pow(2.0, shift.to(x.device, x.dtype))
    return quant(x * (1.0 / factor), scale, zero_point, qmin, qmax) * factor


def weight_scale(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric per-output-channel (dim 0) min/max scale of a weight tensor: ``amax_c / qmax``, shape (C_out,)."""
    amax = w.detach().abs().reshape(w.shape[0], -1).amax(dim=1)
    return (amax / qrange(bits, symmetric=True)[1]).clamp(min=EPS)


def weight_codes(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer codes (as floats, shaped like ``w``) and per-output-channel scales of ``weight_fake_quant``."""
    scale = weight_scale(w, bits)
    return quant_codes(w, scale.reshape(-1, *([1] * (w.ndim - 1))), 0.0, *qrange(bits, symmetric=True)), scale


def weight_fake_quant(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric per-output-channel (dim 0) min/max fake quantization of a weight tensor."""
    codes, scale = weight_codes(w, bits)
    return codes * scale.reshape(-1, *([1] * (w.ndim - 1)))


def integer_matmul(a_codes: torch.Tensor, b_codes: torch.Tensor) -> torch.Tensor:
    """``a_codes @ b_codes`` on integer codes (held in floats): the products summed exactly, then rounded once to
    ``a_codes``' float type, as an int32 accumulator cast to float (ONNX MatMulInteger -> Cast). Exact sums do not
    depend on a float GEMM's summation order, which at 4-bit activations decides codes downstream
    (docs/quantization.md)."""
    dtype = a_codes.dtype
    # float32 sums integers exactly while every partial sum stays below 2^24, in any summation order
    bound = a_codes.shape[-1] * _amax(a_codes) * _amax(b_codes) if a_codes.numel() else 0.0
    if dtype == torch.float32 and bound < 2**24:
        return a_codes @ b_codes
    return (a_codes.double() @ b_codes.double()).to(dtype)


def _amax(t: torch.Tensor) -> float:
    """max |t| without an |t|-sized temporary."""
    lo, hi = torch.aminmax(t)
    return max(-float(lo), float(hi))


def integer_product(parts: list[tuple[torch.Tensor, int]], b_codes: torch.Tensor) -> torch.Tensor:
    """``sum_i 2^e_i (a_i @ b)`` for an input split into code parts ``(a_i, e_i)`` on grids 2^e_i apart (V-2SF's
    fine and coarse codes): each part's exact integer product rounded once, scaled by 2^e_i (exact), summed in
    order, as the deployed graph's MatMulInteger -> Cast -> Mul(2^e) -> Add does."""
    acc = None
    for codes, e in parts:
        part = integer_matmul(codes, b_codes)
        part = part * 2.0**e if e else part
        acc = part if acc is None else acc + part
    return acc


def integer_linear(x_parts: list[tuple[torch.Tensor, int]], w_codes: torch.Tensor, x_scale: float, w_scale: torch.Tensor,
                   bias: torch.Tensor | None) -> torch.Tensor:
    """A Linear layer on quantized input and weight, computed as integer hardware does: the code products summed
    exactly (``integer_product``), then one scale ``s_x s_w[c]`` per output channel and the bias, in the codes'
    float type (float32: ONNX Runtime's MatMulIntegerToFloat, an INT8 GEMM with a float epilogue)."""
    dtype = x_parts[0][0].dtype
    y = integer_product(x_parts, w_codes.T).mul_(torch.tensor(x_scale, dtype=dtype) * w_scale.to(dtype))
    return y if bias is None else y.add_(bias)


def is_patchify(conv: torch.nn.Conv2d, hw: tuple[int, int]) -> bool:
    """A Conv2d that cuts an input of height and width ``hw`` into whole non-overlapping patches (ViT/Swin patch
    embedding: kernel = stride, no padding): a GEMM of each patch's pixels with the flattened kernel."""
    return (conv.kernel_size == conv.stride and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding in ((0, 0), "valid") and hw[0] % conv.kernel_size[0] == 0 and hw[1] % conv.kernel_size[1] == 0)


def to_patches(x: torch.Tensor, k: tuple[int, int]) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/kh * W/kw, C*kh*kw): each patch's pixels in a Conv2d kernel's (c, u, v) order (the
    deployed ONNX Runtime graph's Reshape -> Transpose -> Reshape, see backends.ort_patchify)."""
    b, c, h, w = x.shape
    kh, kw = k
    p = x.reshape(b, c, h // kh, kh, w // kw, kw)
    return p.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // kh) * (w // kw), c * kh * kw)


def integer_patchify(x_parts: list[tuple[torch.Tensor, int]], w_codes: torch.Tensor, x_scale: float,
                     w_scale: torch.Tensor, bias: torch.Tensor | None, out_hw: tuple[int, int]) -> torch.Tensor:
    """A patchify Conv2d (``is_patchify``) on quantized input and weight as an integer GEMM per patch
    (``integer_linear``): (B, O, H/kh, W/kw), the exact sums a float convolution only approximates."""
    k = tuple(w_codes.shape[2:])
    y = integer_linear([(to_patches(c, k), e) for c, e in x_parts], w_codes.flatten(1), x_scale, w_scale, bias)
    return y.reshape(y.shape[0], *out_hw, y.shape[-1]).permute(0, 3, 1, 2)


def fake_quant_onnx(x: torch.Tensor, scale: float, zero_point: int, qmin: int, qmax: int) -> torch.Tensor:
    """``fake_quant`` written with the op the ONNX exporter turns into QuantizeLinear -> DequantizeLinear.

    ONNX's 8-bit Q/DQ has no narrower range, so a narrower code (4-bit, V-2SF's half codes) first clips x
    to what its codes cover; the 8-bit Q then yields exactly the narrow code (the 4-bit emulation docs/quantization.md
    describes for activations)."""
    lo8, hi8 = (0, 255) if qmin >= 0 else (-128, 127)
    if (qmin, qmax) != (lo8, hi8):
        x = torch.clamp(x, (qmin - zero_point) * scale, (qmax - zero_point) * scale)
    return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, lo8, hi8)


def mse(a: torch.Tensor, b: torch.Tensor, dim=None) -> torch.Tensor:
    return (a - b).pow(2).mean() if dim is None else (a - b).pow(2).mean(dim=dim)


def omse_range(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool,
               steps: int = 90, step: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """FQ-ViT's OMSE: shrink [lo, hi] by 1% at a time (up to 90 times), keep the range of lowest L2 error."""
    qmin, qmax = qrange(bits, symmetric)
    best, best_err = (lo, hi), None
    for i in range(steps):
        cand_lo, cand_hi = lo * (1.0 - i * step), hi * (1.0 - i * step)
        scale, zp = uniform_qparams(cand_lo, cand_hi, bits, symmetric)
        err = mse(fake_quant(x, scale, zp, qmin, qmax), x)
        if best_err is None or err < best_err:
            best, best_err = (cand_lo, cand_hi), err
    return best


def ptf_search(x2d: torch.Tensor, lo_c: torch.Tensor, hi_c: torch.Tensor, bits: int, symmetric: bool,
               max_shift: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FQ-ViT's power-of-two factor for LayerNorm inputs ``x2d`` (tokens, channels).

    One layer-wide range gives ``s8 = (max - min) / (qmax - qmin)`` and the zero point; the base scale is
    ``s1 = s8 / 2^K`` (K = 3), and channel c uses ``s1 * 2^alpha_c`` with ``alpha_c`` in {0..K} chosen to
    minimise that channel's L2 error. Returns (s1, zero point, alpha).
    """
    qmin, qmax = qrange(bits, symmetric)
    s_top, zp = uniform_qparams(lo_c.min(), hi_c.max(), bits, symmetric)
    base = s_top / 2**max_shift
    errors = torch.stack([mse(fake_quant(x2d, base * 2**a, zp, qmin, qmax), x2d, dim=0) for a in range(max_shift + 1)])
    return base, zp, errors.argmin(dim=0)  # argmin keeps the smallest alpha on ties, as FQ-ViT's list.index(min)


def o2sf_search(x2d: torch.Tensor, lo_c: torch.Tensor, hi_c: torch.Tensor, bits: int, symmetric: bool,
                normal_fractions=(1.0, 0.99, 0.98, 0.95, 0.9, 0.8, 0.7)) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TSPTQ-ViT's outlier-aware two scales for LayerNorm inputs ``x2d`` (tokens, channels).

    For each candidate fraction f, the channels whose range is within the f-quantile of channel ranges are
    "normal": their joint range sets the base scale s and zero point. The remaining outlier channels share
    one second scale ``s * 2^m``, with m the smallest power of two that fits every outlier channel. The
    candidate with the lowest L2 error on ``x2d`` wins (f = 1: one scale, no outliers). Returns
    (s, zero point, shift) where shift_c is 0 for normal channels and m for outliers.
    """
    qmin, qmax = qrange(bits, symmetric)
    width = hi_c - lo_c
    best, best_err = None, None
    for f in normal_fractions:
        normal = width <= torch.quantile(width, f)
        scale, zp = uniform_qparams(lo_c[normal].min(), hi_c[normal].max(), bits, symmetric)
        # the codes [qmin, qmax] cover [(qmin - z) s 2^m, (qmax - z) s 2^m]; find the m each channel needs
        need_hi = torch.log2((hi_c.clamp(min=0) / ((qmax - zp) * scale)).clamp(min=1.0)) if qmax > zp else torch.zeros_like(hi_c)
        need_lo = torch.log2((lo_c.clamp(max=0) / ((qmin - zp) * scale)).clamp(min=1.0)) if qmin < zp else torch.zeros_like(lo_c)
        m = int(torch.ceil(torch.maximum(need_hi, need_lo)[~normal]).max()) if (~normal).any() else 0
        shift = torch.where(normal, 0, m).to(torch.int64)
        err = mse(fake_quant_shifted(x2d, scale, zp, qmin, qmax, shift), x2d)
        if best_err is None or err < best_err:
            best, best_err = (scale, zp, shift), err
    return best


def log2_quant(p: torch.Tensor, bits: int) -> torch.Tensor:
    """FQ-ViT's LIS output quantizer: ``q = clamp(round(-log2 p), 0, 2^b - 1)``, ``p_hat = 2^-q``, and 0 where
    ``round(-log2 p) >= 2^b`` (a probability too small for the code range)."""
    q = torch.round(-torch.log2(p)).clamp(min=0)
    return torch.where(q >= 2**bits, torch.zeros_like(p), torch.pow(2.0, -q))


def two_scale_regions(lo: torch.Tensor, hi: torch.Tensor, bits: int, m: int, symmetric: bool):
    """V-2SF grids: a coarse and a fine uniform grid of ``bits - 1`` bits each (one bit flags the region),
    the fine step 2^m times smaller. Returns ((s_c, z_c), (s_f, z_f), (qmin, qmax)) for the half-width code."""
    qmin, qmax = qrange(bits - 1, symmetric)
    coarse = uniform_qparams(lo, hi, bits - 1, symmetric)
    s_f = coarse[0] / 2**m
    z_f = torch.zeros_like(s_f) if symmetric else (qmin - torch.round(torch.clamp(lo, max=0.0) / s_f)).clamp(qmin, qmax)
    return coarse, (s_f, z_f), (qmin, qmax)


def two_scale_codes(x: torch.Tensor, coarse, fine, qmin: int, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The centred fine and coarse codes of ``two_scale_quant``, each 0 where the other grid applies:
    ``two_scale_quant(x) == fine_codes * s_f + coarse_codes * s_c``, one term always 0."""
    (s_c, z_c), (s_f, z_f) = coarse, fine
    inside = _inside_fine(x, s_f, z_f, qmin, qmax)
    zero = torch.zeros_like(x)
    return (torch.where(inside, quant_codes(x, s_f, z_f, qmin, qmax), zero),
            torch.where(inside, zero, quant_codes(x, s_c, z_c, qmin, qmax)))


def _inside_fine(x: torch.Tensor, s_f, z_f, qmin: int, qmax: int) -> torch.Tensor:
    return (x >= (qmin - z_f) * s_f) & (x <= (qmax - z_f) * s_f)


def two_scale_quant(x: torch.Tensor, coarse, fine, qmin: int, qmax: int) -> torch.Tensor:
    """Values inside the fine grid's range take the fine grid, the rest the coarse one."""
    (s_c, z_c), (s_f, z_f) = coarse, fine
    return torch.where(_inside_fine(x, s_f, z_f, qmin, qmax), fake_quant(x, s_f, z_f, qmin, qmax), fake_quant(x, s_c, z_c, qmin, qmax))


def two_scale_quant_onnx(x: torch.Tensor, coarse, fine, qmin: int, qmax: int) -> torch.Tensor:
    """``two_scale_quant`` as two Q/DQ pairs whose codes are the fine and coarse codes (the other grid's x set to 0,
    which quantizes to the zero point), added: ``DQ(Q(where(in, x, 0))) + DQ(Q(where(in, 0, x)))``, one term
    always 0, so the same values. Each grid's codes stay in the graph, so ONNX Runtime's backend runs a GEMM
    reading them as two integer GEMMs (``pomq_deploy.backends.ort_cpu``)."""
    (s_c, z_c), (s_f, z_f) = coarse, fine
    inside = _inside_fine(x, s_f, z_f, qmin, qmax)
    zero = torch.zeros_like(x)
    return (fake_quant_onnx(torch.where(inside, x, zero), s_f, z_f, qmin, qmax)
            + fake_quant_onnx(torch.where(inside, zero, x), s_c, z_c, qmin, qmax))


def v2sf_search(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool, max_m: int = 12) -> int:
    """TSPTQ-ViT's value-aware two scales (in PTQ4ViT's twin-uniform spirit): the fine/coarse ratio 2^m,
    m in 1..max_m, of lowest L2 error on ``x``."""
    errors = []
    for m in range(1, max_m + 1):
        coarse, fine, (qmin, qmax) = two_scale_regions(lo, hi, bits, m, symmetric)
        errors.append(float(mse(two_scale_quant(x, coarse, fine, qmin, qmax), x)))
    return 1 + min(range(len(errors)), key=errors.__getitem__)
