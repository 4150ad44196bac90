"""RepQ-ViT: the reparameterization keeps the per-channel codes and the Linear's sums; log-sqrt(2) by hand."""

import math

import pytest
import torch
from conftest import images, tiny_vit

from pomq_deploy.plan import uniform_plan
from pomq_deploy.quant import functional as Fq
from pomq_deploy.quant.model import QuantModel
from pomq_deploy.quant.quantizers import from_state, to_state
from pomq_deploy.quant.repq import ReparamQ, channel_qparams, log_sqrt2_quant, reparam_factors


def test_reparam_factors_by_hand():
    s_t, z_t, r, b = reparam_factors(torch.tensor([0.25, 0.5, 1.0, 0.25]), torch.tensor([10.0, 20.0, 31.0, 3.0]))
    assert s_t == 0.5 and z_t == 16  # mean 16.0
    assert r.tolist() == [0.5, 1.0, 2.0, 0.5] and b.tolist() == [-6.0, 4.0, 15.0, -13.0]


def test_fold_keeps_codes_and_sums():
    """Dyadic scales make every step exact: the per-tensor quantizer on the folded LayerNorm writes the same codes
    as the per-channel one on the original, and the folded Linear on them gives the original Linear's output."""
    torch.manual_seed(0)
    norm, lin = torch.nn.LayerNorm(4), torch.nn.Linear(4, 3)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.5, -0.75, 2.0, 0.5]))
        norm.bias.copy_(torch.tensor([0.25, -1.0, 0.5, 0.125]))
    q = ReparamQ(0.5 / 16, 16, 0, 255, torch.tensor([0.5, 1.0, 2.0, 0.5]), torch.tensor([-6.0, 4.0, 15.0, -13.0]))
    x = torch.randn(64, 4) * 3
    with torch.no_grad():
        y = norm(x)
        per_channel = Fq.quant_codes(y, q.scale * q.ratio, q.zero_point + q.offset, q.qmin, q.qmax) + q.offset
        expected = lin(q(y))
        q.fold(norm, [(lin.weight, lin.bias)])
        d = q.deployed
        y2 = norm(x)
        per_tensor = Fq.quant_codes(y2, d.scale, d.zero_point, d.qmin, d.qmax)
        assert torch.equal(per_tensor, per_channel)  # q - z~ on one grid == (q_c - z_c) + b_c per channel
        assert torch.allclose(lin(d(y2)), expected, atol=1e-5)


def test_channel_qparams_picks_a_percentile_for_an_outlier_channel():
    """Channel 0 has one far outlier: a percentile clip beats min/max by far; channel 1 is uniform: its range
    stays within 1% of min/max."""
    x = torch.stack([torch.linspace(-1, 1, 20001), torch.linspace(-1, 1, 20001)], dim=1)
    x[0, 0] = 50.0
    s, z = channel_qparams(x, x.amin(0), x.amax(0), 4, False)
    assert s[0] < 51 / 15 / 4 and 0.99 * 2 / 15 < s[1] <= 2 / 15 * (1 + 1e-6)


def test_log_sqrt2_by_hand():
    p = torch.tensor([1.0, 2**-0.5, 0.5, 0.3, 2**-7.5, 2**-7.75, 2**-8.5, 1e-6])
    got = log_sqrt2_quant(p, 4, 1.0)
    # codes: 0, 1, 2, round(3.47)=3, 15, round(15.5)=16 -> 0, 17 -> 0, >= 16 -> 0
    want = [1.0, 2**-1 * math.sqrt(2), 0.5, 2**-2 * math.sqrt(2), 2**-8 * math.sqrt(2), 0.0, 0.0, 0.0]
    assert torch.allclose(got, torch.tensor(want), rtol=1e-6, atol=0)
    assert log_sqrt2_quant(torch.tensor([0.9]), 4, 0.5).item() == 0.5  # above delta: clipped to code 0


def test_quantizers_round_trip_the_cache_format():
    q = ReparamQ(0.1, 3, 0, 255, torch.tensor([0.5, 2.0]), torch.tensor([1.0, -1.0]))
    back = from_state(to_state(q))
    assert type(back) is ReparamQ and back.scale == 0.1 and torch.equal(back.ratio, q.ratio)


@pytest.fixture(scope="module")
def repq_model():
    qm = QuantModel(tiny_vit(), "repq")
    qm.calibrate(images())
    return qm


def test_plans_fold_and_restore_exactly(repq_model):
    """Applying a plan folds each block's LayerNorm outputs into its parameters; FP32 (None) restores them bit
    for bit, and a plan applied again after another gives the same logits."""
    qm = repq_model
    originals = {k: v.clone() for k, v in qm.state_dict().items()}
    x = images(1, seed=5)[0]
    with torch.no_grad():
        qm.apply(uniform_plan("4/4/4", 6, "t", "repq"))
        changed = [k for k, v in qm.state_dict().items() if not torch.equal(v, originals[k])]
        four = qm(x)
        qm.apply(uniform_plan("8/8/8", 6, "t", "repq"))
        eight = qm(x)
        qm.apply(uniform_plan("4/4/4", 6, "t", "repq"))
        again = qm(x)
        qm.apply(None)
    # per block: norm1, norm2 (weight, bias), qkv, fc1 (weight, bias)
    assert len(changed) == 6 * 8 and all(".norm" in k or ".qkv." in k or ".fc1." in k for k in changed)
    assert torch.equal(four, again) and not torch.equal(four, eight)
    assert all(torch.equal(v, originals[k]) for k, v in qm.state_dict().items())


def test_reparameterized_model_equals_per_channel_fake_quant(repq_model):
    """With float weights, the folded per-tensor model computes what per-channel quantizers on the original
    LayerNorm outputs compute (the identity the method rests on), up to float rounding."""
    qm = repq_model
    x = images(1, seed=6)[0]
    with torch.no_grad():
        qm.apply(uniform_plan("8/4/8", 6, "t", "repq"))
        for w in qm.weighted.values():
            w.weight_bits = None
        folded = qm(x)
        qm.apply(None)
        per_channel = {}
        qm.apply(uniform_plan("8/4/8", 6, "t", "repq"))
        for i, folds in enumerate(qm.block_folds):  # undo the fold: original parameters, per-channel quantizer
            per_channel.update({site.quant: q[0] for site, q in zip(folds.sites, folds.folded, strict=True) if q is not None})
            qm.unfold(i)
        for aq, q in per_channel.items():
            aq.active = q
        for w in qm.weighted.values():
            w.weight_bits = None
        unfolded = qm(x)
        qm.apply(None)
    assert torch.nn.functional.cosine_similarity(folded.flatten(), unfolded.flatten(), dim=0) > 0.9999
