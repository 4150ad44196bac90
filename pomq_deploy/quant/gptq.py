"""GPTQ's column-by-column rounding with error feedback (Frantar et al., "GPTQ: Accurate Post-Training
Quantization for Generative Pre-trained Transformers", ICLR 2023, Algorithm 1).

For a Linear ``y = x W^T`` and inputs ``X`` (rows: tokens), the output error of a rounded weight ``Q`` is
``tr((W - Q) H (W - Q)^T)`` with ``H = X^T X``. GPTQ rounds the input columns of ``W`` one at a time in a
fixed order and, after each, moves the remaining columns to cancel that column's error in the least-squares
sense (the Optimal Brain Surgeon update), using the upper Cholesky factor of ``H^-1``; updates within a block
of columns are applied lazily, as in the paper's reference code (``blocksize``). As there: ``H`` is damped by
1% of its mean diagonal, and an input column that is always zero keeps weight 0.

Where ours departs from the reference code: the grid is given (our symmetric per-output-channel min/max
scale, fitted on the original weight, as the reference does with ``groupsize=-1``), and codes are returned
rather than dequantized values, so that the export stores them as it stores nearest-rounded codes.
"""

import torch


def gptq_codes(w: torch.Tensor, h: torch.Tensor, scale: torch.Tensor, bits: int | torch.Tensor, damp: float = 0.01,
               blocksize: int = 128) -> torch.Tensor:
    """Integer codes (as floats, shaped like ``w``: out x in) of ``w`` on the symmetric grid ``scale`` (per
    output row) at ``bits`` (one width, or one per row: rows are independent, so one call can round a weight
    at several widths stacked), rounded by GPTQ against the input Hessian ``h`` (in x in)."""
    bits = torch.as_tensor(bits).expand(w.shape[0])
    qmin = -(2.0 ** (bits - 1)).to(torch.float64)
    qmax = -qmin - 1
    w = w.detach().to(torch.float64).clone()
    h = h.to(torch.float64).clone()
    s = scale.to(torch.float64).reshape(-1)
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes = torch.zeros_like(w)
    cols = w.shape[1]
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1, u1 = w[:, i1:i2].clone(), u[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        for i in range(i2 - i1):
            col = w1[:, i]
            q = torch.clamp(torch.round(col / s), qmin, qmax)
            codes[:, i1 + i] = q
            e = (col - q * s) / u1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * u1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    return codes.to(scale.dtype)
