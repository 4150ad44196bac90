"""The quantization math against values computed by hand."""


import pytest
import torch

from pomq_deploy.quant import functional as Fq


def test_uniform_qparams_asymmetric_and_symmetric():
    scale, zp = Fq.uniform_qparams(torch.tensor(-1.0), torch.tensor(3.0), 8, symmetric=False)
    assert float(scale) == pytest.approx(4 / 255) and int(zp) == 64  # 0 - round(-1 / (4/255)) = round(63.75)
    scale, zp = Fq.uniform_qparams(torch.tensor(-1.0), torch.tensor(3.0), 8, symmetric=True)
    assert float(scale) == pytest.approx(3 / 127) and int(zp) == 0
    scale, zp = Fq.uniform_qparams(torch.tensor(0.5), torch.tensor(2.0), 4, symmetric=False)
    assert float(scale) == pytest.approx(2 / 15) and int(zp) == 0  # range widened to include 0


def test_fake_quant_rounds_half_to_even_and_clamps():
    x = torch.tensor([0.3, 0.375, 0.625, 100.0, -1.0])
    out = Fq.fake_quant(x, 0.25, 0.0, 0, 255)
    assert out.tolist() == [0.25, 0.5, 0.5, 63.75, 0.0]  # 1.2->1, 1.5->2, 2.5->2, clamp high, clamp low


def test_weight_fake_quant_per_output_channel():
    w = torch.tensor([[1.0, -0.45, 0.25], [2.0, 1.1, -2.0]])
    q8 = Fq.weight_fake_quant(w, 8)
    assert q8[0].tolist() == pytest.approx([1.0, -57 / 127, 32 / 127])  # scale 1/127: -57.15 -> -57, 31.75 -> 32
    assert q8[1].tolist() == pytest.approx([2.0, 2 * 70 / 127, -2.0])  # scale 2/127: 69.85 -> 70
    q4 = Fq.weight_fake_quant(w, 4)
    assert q4[0].tolist() == pytest.approx([1.0, -3 / 7, 2 / 7])  # scale 1/7: -3.15 -> -3, 1.75 -> 2


def test_integer_linear_by_hand():
    """Codes (x: scale 0.5, zero point 2, 4-bit; w: per channel), summed exactly, scaled once, biased."""
    x = torch.tensor([[1.0, -0.5, 8.0]])
    xc = Fq.quant_codes(x, 0.5, 2, 0, 15)
    assert xc.tolist() == [[2.0, -1.0, 13.0]]  # 8 / 0.5 + 2 = 18 clamps to 15, centred 13
    wc, ws = Fq.weight_codes(torch.tensor([[0.7, -0.3, 0.1], [1.4, 0.0, -0.6]]), 8)
    assert wc.tolist() == [[127.0, -54.0, 18.0], [127.0, 0.0, -54.0]]  # -0.3 / (0.7/127) = -54.4, 0.1 -> 18.1
    y = Fq.integer_linear([(xc, 0)], wc, 0.5, ws, torch.tensor([0.25, -1.0]))
    acc = [2 * 127 + 54 + 13 * 18, 2 * 127 - 13 * 54]  # 542, -448
    scales = torch.tensor(0.5) * ws  # one float32 multiplier per output channel
    assert y.dtype == torch.float32
    assert y.tolist() == [[float(acc[0] * scales[0] + 0.25), float(acc[1] * scales[1] - 1.0)]]
    assert torch.equal(Fq.fake_quant(x, 0.5, 2, 0, 15), xc * 0.5)  # the same grid as the fake quantizer


def test_patches_by_hand_and_the_patch_embedding_as_a_gemm():
    """A 1-channel 4x4 image in 2x2 patches: row-major patches, each in the kernel's (c, u, v) order; the
    patchify convolution as one integer GEMM per patch equals the convolution of the codes."""
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    assert Fq.to_patches(x, (2, 2)).tolist() == [[[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]]
    conv = torch.nn.Conv2d(3, 5, 4, stride=4)
    assert Fq.is_patchify(conv, (8, 12)) and not Fq.is_patchify(conv, (8, 10))  # 10 leaves a remainder
    assert not Fq.is_patchify(torch.nn.Conv2d(3, 5, 4, stride=2), (8, 8))  # overlapping
    g = torch.Generator().manual_seed(0)
    xc = torch.randint(-128, 128, (2, 3, 8, 12), generator=g).float()
    wc = torch.randint(-127, 128, (5, 3, 4, 4), generator=g).float()
    ws, bias = torch.rand(5, generator=g), torch.rand(5, generator=g)
    y = Fq.integer_patchify([(xc, 0)], wc, 0.5, ws, bias, (2, 3))
    acc = torch.nn.functional.conv2d(xc.double(), wc.double(), stride=4)  # exact in float64
    assert y.shape == (2, 5, 2, 3)
    want = acc.float() * (torch.tensor(0.5) * ws).view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)
    assert torch.equal(y, want)


@pytest.mark.parametrize("x_max, w_max, k", [(15, 7, 192), (255, 127, 768)])  # float32 path; float64 path (> 2^24)
def test_integer_linear_sums_exactly(x_max, w_max, k):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-x_max, x_max + 1, (64, k), generator=g).float()
    w = torch.randint(-w_max, w_max + 1, (32, k), generator=g).float()
    exact = (x.long() @ w.long().T).float() * torch.tensor(0.1)
    assert torch.equal(Fq.integer_linear([(x, 0)], w, 0.1, torch.ones(32), None), exact)


def test_omse_shrinks_range_when_clipping_pays():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.rand(10000, generator=g), torch.tensor([2.0])])
    lo, hi = Fq.omse_range(x, torch.tensor(0.0), torch.tensor(2.0), 4, symmetric=False)
    i = round((1 - float(hi) / 2.0) / 0.01)
    assert float(hi) == pytest.approx(2.0 * (1 - 0.01 * i)) and 30 <= i <= 60

    def err(h):
        s, z = Fq.uniform_qparams(torch.tensor(0.0), torch.tensor(h), 4, False)
        return float(Fq.mse(Fq.fake_quant(x, s, z, 0, 15), x))

    assert err(float(hi)) <= min(err(2.0), err(2.0 * (1 - 0.01 * (i - 1))), err(2.0 * (1 - 0.01 * (i + 1))))


def test_ptf_picks_the_known_alpha():
    # channels of range [0, 8], [0, 1], [0, 2]: s8 = 8/255, s1 = s8/8 = 1/255, so alpha = 3, 0, 1
    t = torch.linspace(0, 1, 1001)
    x = torch.stack([8 * t, t, 2 * t], dim=1)
    base, zp, alpha = Fq.ptf_search(x, x.amin(0), x.amax(0), 8, symmetric=False)
    assert float(base) == pytest.approx(1 / 255) and int(zp) == 0
    assert alpha.tolist() == [3, 0, 1]
    # the shifted quantizer is exact on each channel's own grid points
    q = Fq.fake_quant_shifted(x, base, zp, 0, 255, alpha)
    assert float((q - x).abs().max()) <= 8 / 255 / 2 + 1e-6


def test_log2_quant_values():
    p = torch.tensor([1.0, 0.75, 0.5, 0.3, 0.1, 2.0**-15, 2.0**-16, 0.0])
    # -log2 p = 0, 0.415, 1, 1.737, 3.32, 15, 16 (>= 2^4: zero), inf (zero)
    assert Fq.log2_quant(p, 4).tolist() == [1.0, 1.0, 0.5, 0.25, 0.125, 2.0**-15, 0.0, 0.0]
    assert float(Fq.log2_quant(torch.tensor([2.0**-16]), 8)) == 2.0**-16


def test_two_scale_grids_by_hand():
    coarse, fine, (qmin, qmax) = Fq.two_scale_regions(torch.tensor(0.0), torch.tensor(1.0), 8, 3, symmetric=False)
    assert (qmin, qmax) == (0, 127)
    assert float(coarse[0]) == pytest.approx(1 / 127) and float(fine[0]) == pytest.approx(1 / 1016)
    out = Fq.two_scale_quant(torch.tensor([0.05, 0.5]), coarse, fine, qmin, qmax)
    assert out.tolist() == pytest.approx([51 / 1016, 64 / 127])  # 50.8 -> 51 on the fine grid; 63.5 -> 64 coarse
    fine_codes, coarse_codes = Fq.two_scale_codes(torch.tensor([0.05, 0.5]), coarse, fine, qmin, qmax)
    assert fine_codes.tolist() == [51.0, 0.0] and coarse_codes.tolist() == [0.0, 64.0]  # one of each pair is 0


@pytest.mark.parametrize("bits, symmetric", [(8, False), (4, False), (4, True)])
def test_two_scale_codes_and_onnx_form_give_the_fake_quant_values(bits, symmetric):
    """fine * s_f + coarse * s_c and DQ(Q(fine part)) + DQ(Q(coarse part)) are two_scale_quant, bit for bit."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4000, generator=g) ** 3 * (0.1 if not symmetric else 1.0)
    x = x if symmetric else x.abs()
    coarse, fine, (qmin, qmax) = Fq.two_scale_regions(x.min(), x.max(), bits, 3, symmetric)
    want = Fq.two_scale_quant(x, coarse, fine, qmin, qmax)
    f, c = Fq.two_scale_codes(x, coarse, fine, qmin, qmax)
    assert ((f != 0) & (c != 0)).sum() == 0 and (f != 0).sum() > 100 and (c != 0).sum() > 10
    assert torch.equal(f * fine[0] + c * coarse[0], want)
    assert torch.equal(Fq.two_scale_quant_onnx(x, coarse, fine, qmin, qmax), want)


def test_integer_product_sums_each_part_exactly_then_scales_by_its_power_of_two():
    g = torch.Generator().manual_seed(0)
    fine = torch.randint(0, 128, (8, 300), generator=g).float()
    coarse = torch.randint(0, 128, (8, 300), generator=g).float() * (torch.rand(8, 300, generator=g) < 0.1)
    b = torch.randint(-127, 128, (300, 16), generator=g).float()
    want = (fine.long() @ b.long()).float() + 8 * (coarse.long() @ b.long()).float()
    assert torch.equal(Fq.integer_product([(fine, 0), (coarse, 3)], b), want)


@pytest.mark.parametrize("bits", [8, 4])
def test_v2sf_beats_one_scale_on_heavy_tailed_values(bits):
    g = torch.Generator().manual_seed(0)
    x = torch.cat([-0.01 * torch.log(torch.rand(20000, generator=g)), torch.rand(20, generator=g)]).clamp(max=1.0)
    lo, hi = x.min(), x.max()
    m = Fq.v2sf_search(x, lo, hi, bits, symmetric=False)
    coarse, fine, (qmin, qmax) = Fq.two_scale_regions(lo, hi, bits, m, symmetric=False)
    two = float(Fq.mse(Fq.two_scale_quant(x, coarse, fine, qmin, qmax), x))
    s, z = Fq.uniform_qparams(lo, hi, bits, symmetric=False)
    one = float(Fq.mse(Fq.fake_quant(x, s, z, 0, 2**bits - 1), x))
    assert m >= 2 and two < one / 4


def test_o2sf_gives_the_outlier_channel_a_second_scale():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2000, 7, generator=g) * 2 - 1
    x[:, 6] *= 20  # one outlier channel in [-20, 20]
    x[0, :6], x[1, :6], x[0, 6], x[1, 6] = 1.5, -1.0, 20.0, -20.0
    scale, zp, shift = Fq.o2sf_search(x, x.amin(0), x.amax(0), 8, symmetric=False)
    # base range [-1, 1.5]: s = 2.5/255, z = 102, codes cover [-1, 1.5]; the outlier needs 20 / 1 -> 2^5
    assert float(scale) == pytest.approx(2.5 / 255, rel=1e-6) and int(zp) == 102
    assert shift.tolist() == [0, 0, 0, 0, 0, 0, 5]
    s1, z1 = Fq.uniform_qparams(x.min(), x.max(), 8, False)
    one = Fq.mse(Fq.fake_quant(x, s1, z1, 0, 255), x)
    two = Fq.mse(Fq.fake_quant_shifted(x, scale, zp, 0, 255, shift), x)
    assert float(two) < 0.7 * float(one)


def test_qrange():
    assert Fq.qrange(8, False) == (0, 255) and Fq.qrange(8, True) == (-128, 127)
    assert Fq.qrange(4, False) == (0, 15) and Fq.qrange(4, True) == (-8, 7)


def test_fp8_rounds_to_nearest_even_and_saturates_by_hand():
    """E4M3: 3 mantissa bits; between 1 and 2 the step is 1/8, and the smallest subnormal is 2^-9."""
    from pomq_deploy.quant.fp8 import fp8_fake_quant, fp8_weight_fake_quant, fp8_weight_scale

    x = torch.tensor([1.0625, 1.1875, 1.2, 500.0, -1000.0, 2.0**-9, 2.0**-11, 3 * 2.0**-10, 0.0])
    assert fp8_fake_quant(x, 1.0).tolist() == [1.0, 1.25, 1.25, 448.0, -448.0, 2.0**-9, 0.0, 2.0**-8, 0.0]
    assert fp8_fake_quant(torch.tensor([0.53125, 300.0]), 0.5).tolist() == [0.5, 224.0]
    w = torch.tensor([[896.0, 1.0], [2.0, -0.5]])  # per output channel: scales 2 and 2/448
    assert torch.allclose(fp8_weight_scale(w), torch.tensor([2.0, 2.0 / 448]))
    assert fp8_weight_fake_quant(w).tolist() == [[896.0, 1.0], [2.0, -0.5]]
    assert fp8_weight_fake_quant(torch.tensor([[448.0, 17.0]])).tolist() == [[448.0, 16.0]]  # 17 between 16 and 18: even
