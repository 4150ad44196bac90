"""The model-guided search's parts: interleaved latency ratios, the additive latency/size model, the accuracy
model, the design set, rank correlation; each against hand-computed values."""

import math

import pytest
import torch
from conftest import images, tiny_vit

from pomq_deploy.plan import uniform_plan
from pomq_deploy.quant.model import QuantModel
from pomq_deploy.search.models import (
    EIGHT,
    SETTINGS,
    AccuracyModel,
    AdditiveModel,
    block_groups,
    design_plans,
    features,
    kl_sensitivities,
    plan_of,
    spearman,
)
from pomq_deploy.timing import MIN_ROUNDS, interleaved_ratios, log_interval


def test_log_interval_by_hand():
    mean, low, high = log_interval([0.0, 0.2, 0.4])
    sd = math.sqrt((0.04 + 0 + 0.04) / 2)  # 0.2
    assert mean == pytest.approx(0.2) and high - mean == pytest.approx(2.920 * sd / math.sqrt(3))
    assert log_interval([0.3]) == (0.3, 0.3, 0.3)


def test_interleaved_ratio_is_taken_per_round_and_stops_when_narrow():
    """A host that slows down 3x after the first round: each round's ratio is still exactly 0.5, so the minimum of
    rounds suffices; the medians alone (what a single timing at one moment gives) would not say so."""
    calls = []

    def time_ms(key):
        calls.append(key)
        slow = 3.0 if len(calls) > 3 else 1.0
        return {"fp32": 10.0, "plan": 5.0, "u8": 6.0}[key] * slow

    r = interleaved_ratios(time_ms, ["plan"], "fp32", ("u8",))
    assert r["plan"].ratio == pytest.approx(0.5) and r["plan"].rounds == MIN_ROUNDS and r["plan"].spread == pytest.approx(0)
    assert r["u8"].ratio == pytest.approx(0.6)
    assert calls[:3] == ["fp32", "plan", "u8"] and calls[3:6] == ["plan", "u8", "fp32"]  # the order rotates


def test_interleaved_ratio_goes_on_while_noisy_and_stops_at_max_rounds():
    noise = iter([10, 5, 10, 8, 10, 4, 10, 7, 10, 5, 10, 8, 10, 4, 10, 7] * 3)
    r = interleaved_ratios(lambda k: float(next(noise)), ["plan"], "fp32", (), min_rounds=3, max_rounds=6, tolerance=0.01)
    assert r["plan"].rounds == 6 and r["plan"].low < r["plan"].ratio < r["plan"].high


def test_block_groups_follow_shapes():
    lin = lambda a, b: torch.nn.Linear(a, b)  # noqa: E731
    assert block_groups([lin(4, 4), lin(4, 4), lin(8, 8), lin(8, 8), lin(8, 8), lin(4, 4)]) == [0, 0, 1, 1, 1, 2]


def test_design_set_size_and_content():
    one = design_plans([0] * 12, "r", "fqvit")
    assert len(one) == 7 + 4  # each non-8/8/8 setting on all blocks, four alternating probes
    assert all(len({(b.w, b.a, b.attn) for b in p.blocks}) == 1 for p in one[:7])
    probe = [(b.w, b.a, b.attn) for b in one[-1].blocks]
    assert probe == [(8, 8, 4), (8, 8, 8)] * 6  # 11 boundaries, as many as a random plan has on average (12 x 7/8)
    stages = design_plans([0, 0, 1, 1, 1, 1], "r", "fqvit")
    assert len(stages) == 7 * 2 + 4 and len({p.plan_id for p in stages}) == len(stages)


def test_additive_model_recovers_block_costs_and_boundary():
    """Latencies made from known per-setting costs and a boundary cost are fitted exactly from the design set,
    and predict a plan outside it."""
    groups = [0] * 6
    cost = {s: 0.01 * i for i, s in enumerate(SETTINGS)}
    cost[EIGHT] = 0.0

    def true(plan):
        settings = [(b.w, b.a, b.attn) for b in plan.blocks]
        return 0.6 + sum(cost[s] for s in settings) + 0.02 * sum(a != b for a, b in zip(settings, settings[1:], strict=False))

    plans = design_plans(groups, "r", "fqvit") + [uniform_plan("8/8/8", 6, "r", "fqvit")]
    model = AdditiveModel.fit(plans, [true(p) for p in plans], groups)
    other = plan_of([(4, 4, 8), EIGHT, (8, 4, 4), (8, 4, 4), EIGHT, (4, 8, 8)], "r", "fqvit")
    assert model.predict(other) == pytest.approx(true(other), abs=1e-9)
    assert features(other, groups)[-1] == 4  # boundaries: 0|1, 1|2, 3|4, 4|5


def test_accuracy_model_fits_one_factor_through_the_origin():
    kl = [{"w": 0.1, "a": 0.2, "attn": 0.05}, {"w": 0.3, "a": 0.1, "attn": 0.0}]
    m = AccuracyModel(0.9, kl)
    plans = [plan_of([(4, 8, 8), (8, 8, 8)], "r", "fqvit"), plan_of([(8, 4, 8), (8, 4, 8)], "r", "fqvit")]
    assert [m.perturbation(p) for p in plans] == pytest.approx([0.1, 0.3])
    m.fit(plans, [0.9 - 0.02, 0.9 - 0.04])  # drops 0.02 and 0.04 at perturbations 0.1 and 0.3
    assert m.coef == pytest.approx((0.1 * 0.02 + 0.3 * 0.04) / (0.01 + 0.09))
    assert m.predict(plan_of([(4, 4, 4), (8, 8, 8)], "r", "fqvit")) == pytest.approx(0.9 - m.coef * 0.35)
    assert AccuracyModel(0.9, kl).fit(plans, [0.91, 0.95]).coef == 0.0  # better than uniform 8-bit: noise, not a gain


def test_spearman_by_hand():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)  # 1 - 6 * 2 / (3 * 8)
    assert math.isnan(spearman([1, 2], [1, 2]))


def test_isolate_keeps_one_gene_of_one_block():
    qm = QuantModel(tiny_vit(), "fqvit")
    qm.calibrate(images())
    qm.apply(plan_of([(4, 4, 4)] * 6, "t", "fqvit"))
    qm.isolate(2, "a")
    active = {(aq.block, aq.role) for aq in qm.act_quants.values() if aq.active is not None}
    assert active and all(block == 2 and role != "attn" for block, role in active)
    assert all(w.weight_bits is None for w in qm.weighted.values())


def test_kl_sensitivities_are_per_block_and_gene():
    """Zero where a gene's 4-bit setting changes nothing would be a bug in isolate; each is positive, and the
    model is back in FP32 afterwards."""
    qm = QuantModel(tiny_vit(), "fqvit")
    qm.calibrate(images())
    x = torch.cat(images(2, seed=5))
    kl = kl_sensitivities(qm, [x], "t", "fqvit")
    assert len(kl) == 6 and all(set(k) == {"w", "a", "attn"} and min(k.values()) > 0 for k in kl)
    with torch.no_grad():
        assert torch.equal(qm(x), qm.model(x))  # apply(None) at the end: nothing quantized


def test_kl_sensitivities_stream_over_batches_as_one_mean_over_images():
    """Batches of unequal sizes give the mean over all images, as one batch does (the mean of the batches' means is 5%
    off here). Tolerance: another batching changes the float32 GEMMs' rounding, which moved these KLs by at most
    3e-9 (6e-5 relative where a KL exceeds 1e-5) on an AMD EPYC Zen 4; float32's epsilon / 10 and 1e-3 relative."""
    qm = QuantModel(tiny_vit(), "fqvit")
    qm.calibrate(images())
    x = torch.cat(images(2, seed=5))
    whole = kl_sensitivities(qm, [x], "t", "fqvit")
    split = kl_sensitivities(qm, list(x.split([len(x) - 1, 1])), "t", "fqvit")
    assert len(x) > 2 and [k.keys() for k in split] == [k.keys() for k in whole]
    for a, b in zip(whole, split, strict=True):
        assert all(a[g] == pytest.approx(b[g], rel=1e-3, abs=torch.finfo(torch.float32).eps / 10) for g in a)


def test_the_engine_space_holds_the_targets_formats_and_writes_one_parameter_per_block():
    from pomq_deploy.search.space import PAPER, get_space

    ort, trt = get_space("engine", "ort"), get_space("engine", "tensorrt")
    assert ort.settings == (("float",) * 3, (8, 8, 8), (8, 8, "float"), (4, 8, 8), (4, 8, "float"))
    assert ("fp8", "fp8", "fp8") in trt.settings and (4, "float", "float") in trt.settings and (4, 8, 8) not in trt.settings
    plan = plan_of([("float",) * 3, (4, 8, 8)], "r", "fqvit")
    assert ort.params(plan) == {"b0": "float/float/float", "b1": "4/8/8"}
    assert ort.settings_of(ort.params(plan), 2) == [("float",) * 3, (4, 8, 8)]
    assert PAPER.params(plan_of([(4, 8, 8)], "r", "fqvit")) == {"b0_w": 4, "b0_a": 8, "b0_attn": 8}  # as before spaces
    assert not ort.mixed and ort.size_reference == "fp32" and PAPER.mixed
    with pytest.raises(ValueError, match="search space 'wide'; allowed: paper, engine"):
        get_space("wide", "ort")


def test_engine_design_set_and_features():
    from pomq_deploy.search.space import get_space

    space = get_space("engine", "ort")
    plans = design_plans([0] * 6, "r", "fqvit", space=space)
    assert len(plans) == 4 + 4  # each non-8/8/8 format on every block, each alternating with 8/8/8
    assert [(b.w, b.a, b.attn) for b in plans[4].blocks] == [("float",) * 3, (8, 8, 8)] * 3
    x = features(plan_of([("float",) * 3, (8, 8, 8), (4, 8, 8), (4, 8, 8)], "r", "fqvit"), [0] * 4, space.settings)
    assert x.tolist() == [1, 1, 0, 2, 0, 2]  # 1, float x1, 8/8/float x0, 4/8/8 x2, 4/8/float x0, boundaries 2


def test_engine_accuracy_model_is_held_against_fp32():
    """Per block and format, the KL with only that block in that format; a float block adds nothing."""
    kl = [{"8/8/8": 0.01, "4/8/8": 0.05}, {"8/8/8": 0.02, "4/8/8": 0.08}]
    m = AccuracyModel(0.92, kl, space="engine")
    plans = [plan_of([(8, 8, 8), (8, 8, 8)], "r", "fqvit"), plan_of([("float",) * 3, (4, 8, 8)], "r", "fqvit")]
    assert [m.perturbation(p) for p in plans] == pytest.approx([0.03, 0.08])
    m.fit(plans, [0.92 - 0.003, 0.92 - 0.008])
    assert m.coef == pytest.approx(0.1) and m.predict(plans[1]) == pytest.approx(0.912)


def test_kl_sensitivities_per_block_and_format():
    """Only the block measured is quantized (isolate_block): the KL of a block's 8/8/8 is positive, its float format is
    not measured (0 by definition), and the model is back in FP32 afterwards."""
    from pomq_deploy.search.space import get_space

    qm = QuantModel(tiny_vit(), "fqvit")
    qm.calibrate(images())
    qm.apply(plan_of([(4, 8, 8)] * 6, "t", "fqvit"))
    qm.isolate_block(3)
    assert {aq.block for aq in qm.act_quants.values() if aq.active is not None} == {3}
    assert {w.block for w in qm.weighted.values() if w.weight_bits is not None} == {3}
    x = torch.cat(images(2, seed=5))
    kl = kl_sensitivities(qm, x.split(3), "t", "fqvit", space=get_space("engine", "ort"))
    assert len(kl) == 6 and all(set(k) == {"8/8/8", "8/8/float", "4/8/8", "4/8/float"} and min(k.values()) > 0 for k in kl)
    with torch.no_grad():
        assert torch.equal(qm(x), qm.model(x))
