"""GPTQ's rounding against values computed by hand, and against the error it minimises."""

import math

import torch

from pomq_deploy.quant.gptq import gptq_codes


def test_two_columns_by_hand():
    """w = (0.4, 0.4), grid step 1, H = [[2, 1], [1, 2]], no damping. H^-1 = [[2, -1], [-1, 2]] / 3, whose upper
    Cholesky factor is [[sqrt(2/3), -1/sqrt(6)], [0, sqrt(1/2)]]. Column 0 rounds to 0 with error 0.4; the update
    moves column 1 by -0.4 / sqrt(2/3) * (-1/sqrt(6)) = +0.2, to 0.6, which rounds to 1. Nearest gives (0, 0):
    output error e^T H e = 0.96 against GPTQ's 0.56."""
    w = torch.tensor([[0.4, 0.4]])
    h = torch.tensor([[2.0, 1.0], [1.0, 2.0]])
    codes = gptq_codes(w, h, torch.tensor([1.0]), bits=8, damp=0.0)
    assert codes.tolist() == [[0.0, 1.0]]
    for q, expected in (((0.0, 0.0), 0.96), ((0.0, 1.0), 0.56)):
        e = w - torch.tensor([q])
        assert math.isclose((e @ h @ e.T).item(), expected, rel_tol=1e-6)


def test_uncorrelated_inputs_give_nearest_rounding():
    """With a diagonal H no column's error can be cancelled by another: GPTQ is round-to-nearest."""
    torch.manual_seed(0)
    w = torch.randn(16, 32)
    scale = w.abs().amax(dim=1) / 7
    codes = gptq_codes(w, torch.diag(torch.rand(32) + 0.5), scale, bits=4)
    assert torch.equal(codes, torch.clamp(torch.round(w / scale[:, None]), -8, 7))


def test_correlated_inputs_lower_the_output_error_and_codes_stay_on_the_grid():
    torch.manual_seed(0)
    x = torch.randn(512, 48) @ torch.randn(48, 48)  # correlated inputs, as a LayerNorm's outputs are
    w = torch.randn(24, 48)
    h = x.T @ x
    scale = w.abs().amax(dim=1) / 7
    nearest = torch.clamp(torch.round(w / scale[:, None]), -8, 7)
    codes = gptq_codes(w, h, scale, bits=4, blocksize=16)  # three lazy blocks
    assert codes.min() >= -8 and codes.max() <= 7 and torch.equal(codes, codes.round())

    def error(q):
        return ((x @ (w - q * scale[:, None]).T) ** 2).sum().item()

    assert error(codes) < 0.7 * error(nearest)


def test_a_dead_input_column_gets_weight_zero():
    w = torch.tensor([[0.5, 0.3], [0.2, -0.7]])
    h = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    codes = gptq_codes(w, h, torch.tensor([0.1, 0.1]), bits=8)
    assert codes[:, 1].tolist() == [0.0, 0.0]
